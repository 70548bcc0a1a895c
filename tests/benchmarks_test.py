"""The benchmark scripts behind BUILD_NOTES' figures still run.

Figures in BUILD_NOTES and the README name these commands: a script broken by a refactor would
leave them unrepeatable without any test failing. Each runs once at toy sizes and must print
the line its figures are read from (-m slow); in the default suite, bench_device.py (run on
lent accelerators with minutes of budget) and overhead.py (on a written metrics file).
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--hidden=64", "--intermediate=128", "--layers=2"]

CASES = {
    "bench_model": (["--batch=2", "--seq=16", "--steps=1", "--rounds=1", "--warmup=1"],
                    "ratio mixpo / transformers:"),
    "bench_rollout": (["--batch=2", "--prompt_len=8", "--new_tokens=8", "--repeats=1"],
                      "of the measured copy bandwidth"),
    "bench_scaling": (["--lengths=16,32", "--tokens=64"], "| 32 | 2 | transformers |"),
    # mixpo's side only: tunix is not a mixpo dependency (the script's docstring installs it).
    "bench_peers": (["--layers=1", "--batch=1", "--prompt_len=4", "--new_tokens=4", "--steps=1",
                     "--rounds=1", "--libs=mixpo"], "mixpo:"),
    "bench_decode_gemm": (TOY + ["--rows=2", "--repeats=1"], "bf16 [out, in]"),
    "bench_lora_memory": (TOY + ["--heads=4", "--kv_heads=2", "--vocab=512", "--rows=2",
                                 "--prompt_len=8", "--response_len=8", "--steps=1"],
                          "LoRA / full: step peak RSS"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs_at_toy_size(script):
  args, expected = CASES[script]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{script}.py"), *args],
                       capture_output=True, text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert expected in out.stdout, out.stdout[-3000:]


def test_overhead_reports_phase_shares_of_plain_steps(tmp_path):
  # Its figure (the RL overhead of the default run) is read from a finished run's metrics.jsonl:
  # step 1 (compiles) and steps that evaluate or checkpoint are left out.
  from mixpo import logging as mlog
  rows = {1: {"time/step": 9.0, "time/update": 9.0},
          2: {"time/step": 1.0, "time/update": 0.5, "time/score": 0.25, "time/reward": 0.25},
          3: {"time/step": 1.0, "time/update": 0.5, "time/score": 0.25, "time/reward": 0.25},
          4: {"time/step": 5.0, "time/update": 0.5, "time/eval": 4.5}}
  with mlog.MetricLogger(str(tmp_path), tensorboard=False) as logger:
    for step, metrics in rows.items():
      logger.write(step, metrics)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "overhead.py"),
                        f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "2 steps, mean step 1.000 s" in out.stdout, out.stdout
  assert "outside model compute (generate / score / update): 25.0 %" in out.stdout, out.stdout


def test_bench_device_cpu_smoke_run_prints_throughput_and_mfu():
  # The accelerator benchmark runs on lent devices with minutes of budget: its documented CPU
  # smoke run keeps the script itself working between those sessions.
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "bench_device.py"), "--shape=tiny",
       "--dtype=float32", "--batch=2", "--prompt_len=8", "--new_tokens=8", "--train_batch=2",
       "--seq=16", "--repeats=1", "--cpu_peak_gflops=100"],
      capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = re.findall(r"^\| (generate|score|train) .*\| ([0-9.]+) \| ([0-9.]+) % \|$", out.stdout,
                    re.M)
  assert [r[0] for r in rows] == ["generate", "score", "train"], out.stdout
  assert all(0 < float(mfu) < 100 for _, _, mfu in rows), out.stdout


def test_bench_independent_prints_both_libraries_score_and_train_at_toy_size():
  # The cross-check behind BUILD_NOTES' "Speed figures: the 0.5B disagreement": its result lines
  # carry both libraries' medians, their ratio and the load they ran under (values not asserted).
  import json
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "bench_independent.py"), "--layers=1",
       "--what=score,train", "--batch=2", "--seq=16", "--rounds=1", "--hidden=64",
       "--intermediate=128", "--heads=4", "--kv_heads=2", "--vocab=512", "--mask=response"],
      capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line[len("result "):]) for line in out.stdout.splitlines()
          if line.startswith("result ")]
  assert [r["what"] for r in rows] == ["score", "train"], out.stdout
  for r in rows:
    assert set(r["seconds"]) == {"mixpo", "transformers"}
    assert r["ratio"] > 0 and r["load"] and r["torch_threads"] >= 1
  assert rows[0]["max_abs_dlogp"] < 1e-3  # both libraries scored the same checkpoint
