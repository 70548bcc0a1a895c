"""The file task from flags only, end to end: sft.py, train.py and evaluate.py on a JSONL dataset
with a tiny BPE checkpoint (experiments/byo_example.py's builders), and a custom reward by path."""

import json
import os
import subprocess
import sys

import pytest

from experiments import byo_example
from mixpo import logging as mlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO_REWARD = "def always_zero(prompts, completions, **columns):\n  return [0.0] * len(completions)\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("byo"))
  paths = byo_example.make_files(d, n_train=24, n_test=8, hidden=32, layers=1)
  with open(os.path.join(d, "zero.py"), "w") as f:
    f.write(ZERO_REWARD)
  with open(paths["train"], "a") as f:  # a row without an answer: dropped, with a WARNING.
    f.write(json.dumps({"question": "Ana has 2 cards. How many?", "solution": "\\boxed{2}"}) + "\n")
  paths["zero"] = os.path.join(d, "zero.py")
  return paths


def _run(script, args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script)] + args,
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def test_sft_on_a_file_dataset(files, tmp_path):
  out_dir = str(tmp_path / "sft")
  _run("sft.py", [f"--init={files['init']}", f"--out={out_dir}", "--task=file",
                  f"--train_path={files['train']}", f"--eval_path={files['test']}",
                  "--prompt_field=question", "--chat_template", "--response_field=solution",
                  "--max_response_tokens=16", "--steps=5", "--batch_size=4", "--eval_size=4"])
  assert os.path.isfile(os.path.join(out_dir, "config.json"))
  result = json.load(open(os.path.join(out_dir, "sft_eval.json")))
  assert result["steps"] == 5 and result["num_examples"] == 4


def test_train_two_steps_on_a_file_dataset_with_a_custom_reward(files, tmp_path):
  workdir = str(tmp_path / "run")
  out = _run("train.py", [
      "--config=default", f"--workdir={workdir}", "--config.algo=dapo",
      f"--config.policy={files['init']}", "--config.guide=", "--config.task=file",
      f"--config.task_kwargs.train_path={files['train']}",
      f"--config.task_kwargs.eval_path={files['test']}",
      "--config.task_kwargs.prompt_field=question", "--config.task_kwargs.chat_template=True",
      f"--config.rewards={files['zero']}:always_zero", "--config.max_new_tokens=4",
      "--config.groups=2", "--config.n=2", "--config.zero_groups=0",
      "--config.max_num_gen_batches=1", "--config.num_steps=2", "--config.eval_every=2",
      "--config.eval_size=4", "--config.eval_batch_size=4", "--config.checkpoint_every=2",
      "--config.export_hf=False", "--config.progress=False", "--config.no_signal_steps=2"])
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["final_step"] == 2
  # The answerless row: a WARNING naming the file, and in summary.json.
  warned = [line for line in out.stderr.splitlines() if line.startswith("W") and
            "dropped 1 of 25 rows" in line]  # absl's WARNING prefix: W<mmdd>
  assert warned and "missing_field" in warned[0], out.stderr[-3000:]
  assert any("1 of 25 rows dropped" in w for w in summary["warnings"]), summary["warnings"]
  # orbax's INFO chatter stays below WARNING by default (--verbosity=0 restores it).
  assert "checkpoint_manager.py" not in out.stderr
  # The constant custom reward leaves no group with variance: warned and in summary.json.
  assert summary["no_signal_steps"] == 2
  assert any("no learning signal for 2 steps" in w for w in summary["warnings"]), summary
  rows = [r for r in mlog.read_metrics(workdir) if "reward/always_zero" in r]
  assert len(rows) == 2 and all(r["reward/always_zero"] == 0.0 for r in rows)


def test_evaluate_k4_on_dataset_files(files, tmp_path):
  out = str(tmp_path / "eval.json")
  stdout = _run("evaluate.py", [
      f"--model={files['init']}", "--task=file", f"--eval_path={files['test']},{files['train']}",
      "--prompt_field=question", "--chat_template", "--k=4", "--max_new_tokens=4",
      "--eval_size=3", "--bootstrap=200", f"--out={out}"]).stdout
  result = json.load(open(out))
  assert sorted(result["datasets"]) == sorted([files["test"], files["train"]])
  for r in result["datasets"].values():
    assert r["num_examples"] == 3
    for metric in ("mean@4", "pass@4", "maj@4"):
      lo, hi = r[metric]["ci95"]
      assert 0.0 <= lo <= r[metric]["value"] <= hi <= 1.0
    assert r["pass@4"]["value"] >= r["mean@4"]["value"]
  samples = [json.loads(line) for line in open(result["samples"])]
  assert len(samples) == 2 * 3 * 4
  assert {"prompt", "answer", "response", "extracted", "correct"} <= set(samples[0])
  assert "pass@4" in stdout
