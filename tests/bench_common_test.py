"""experiments/bench_common: the decode roofline's byte count matches the model it describes."""

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
