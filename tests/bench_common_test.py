"""experiments/bench_common: the decode roofline's byte count matches the model it describes; the
accelerator benchmark (bench_device.py) runs its CPU smoke configuration."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import bench_common
from mixpo import models


@pytest.mark.parametrize("name", ["tiny", "mid"])
def test_decode_step_bytes_counts_every_parameter_once_plus_the_kv_cache(name):
  config = bench_common.hf_config(name, 64)
  # The parameter count of the real (tied) model, built abstractly: nothing is allocated.
  state = nnx.state(nnx.eval_shape(lambda: models.init_from_config(config, 0)), nnx.Param)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  assert bench_common.decode_step_bytes(config, 8, 0, 4) == 4 * params
  kv = config["num_hidden_layers"] * 2 * 8 * config["num_key_value_heads"] * (
      config["hidden_size"] // config["num_attention_heads"]) * 10
  assert bench_common.decode_step_bytes(config, 8, 10, 2) == 2 * (params + kv)


def test_copy_bandwidth_is_a_positive_rate():
  assert bench_common.copy_bandwidth(1 << 22, repeats=2) > 1e6  # > 1 MB/s on any machine


def test_bench_device_cpu_smoke_run_prints_throughput_and_mfu():
  # The accelerator benchmark runs on lent devices with minutes of budget: its documented CPU
  # smoke run keeps the script itself working between those sessions.
  import os
  import re
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, os.path.join(root, "experiments", "bench_device.py"), "--shape=tiny",
       "--dtype=float32", "--batch=2", "--prompt_len=8", "--new_tokens=8", "--train_batch=2",
       "--seq=16", "--repeats=1", "--cpu_peak_gflops=100"],
      capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = re.findall(r"^\| (generate|score|train) .*\| ([0-9.]+) \| ([0-9.]+) % \|$", out.stdout,
                    re.M)
  assert [r[0] for r in rows] == ["generate", "score", "train"], out.stdout
  assert all(0 < float(mfu) < 100 for _, _, mfu in rows), out.stdout
