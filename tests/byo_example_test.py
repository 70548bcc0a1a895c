"""experiments/byo_example.py end to end (sft → train → evaluate → export) with flags only."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bring_your_own_example_runs(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "byo_example.py"),
                        f"--workdir={tmp_path}", "--sft_steps=20", "--rl_steps=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-4000:]
  assert os.path.isfile(tmp_path / "run" / "export" / "config.json")
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  assert summary["final_step"] == 2
  result = json.load(open(tmp_path / "eval.json"))
  assert set(result["datasets"]) == {str(tmp_path / "test.jsonl")}
  assert "mean@4" in result["datasets"][str(tmp_path / "test.jsonl")]
