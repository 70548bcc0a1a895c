"""The file task from flags only, end to end: sft.py, train.py and evaluate.py on a JSONL dataset
with a tiny BPE checkpoint (experiments/byo_example.py's builders), custom rewards by path, an eval
file with its own field names, and what a run leaves to track it (config.json, TensorBoard hparams,
a Weights & Biases offline run with the same keys as metrics.jsonl)."""

import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

import metrics_doc  # tests/metrics_doc.py

from experiments import byo_example
from mixpo import logging as mlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO_REWARD = ("def always_zero(prompts, completions, **columns):\n  return [0.0] * len(completions)\n"
               "def always_one(prompts, completions, **columns):\n  return [1.0] * len(completions)\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("byo"))
  paths = byo_example.make_files(d, n_train=24, n_test=8, hidden=32, layers=1)
  with open(os.path.join(d, "zero.py"), "w") as f:
    f.write(ZERO_REWARD)
  with open(paths["train"], "a") as f:  # a row without an answer: dropped, with a WARNING.
    f.write(json.dumps({"question": "Ana has 2 cards. How many?", "solution": "\\boxed{2}"}) + "\n")
  paths["zero"] = os.path.join(d, "zero.py")
  # The eval file of another dataset: other field names.
  rows = [{"problem": r["question"], "final": r["answer"]} for r in byo_example.problems(6, 2)]
  paths["renamed"] = byo_example.write_jsonl(os.path.join(d, "renamed.jsonl"), rows)
  return paths


def _run(script, args, **env):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script)] + args,
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def test_sft_on_a_file_dataset_evaluates_its_held_out_rows(files, tmp_path):
  out_dir = str(tmp_path / "sft")
  _run("sft.py", [f"--init={files['init']}", f"--out={out_dir}", "--task=file",
                  f"--train_path={files['train']}", "--eval_fraction=0.3",
                  "--prompt_field=question", "--chat_template", "--response_field=solution",
                  "--max_response_tokens=16", "--steps=5", "--batch_size=4", "--eval_size=4"])
  assert os.path.isfile(os.path.join(out_dir, "config.json"))
  result = json.load(open(os.path.join(out_dir, "sft_eval.json")))
  # Before: no --eval_path, no evaluation (though --help promised greedy accuracy).
  assert result["steps"] == 5 and result["eval"] == "held-out split"
  assert result["num_examples"] == 4 and 0.0 <= result["accuracy"] <= 1.0


def _records(path: str):
  """The payloads of a record file: TFRecord (TensorBoard events) when `tfrecord`, else wandb's
  leveldb-style log (a 7-byte header, then 32 KiB blocks of records with 7-byte headers)."""
  data = open(path, "rb").read()
  if path.endswith(".wandb"):
    pos, payload = 7, b""
    while pos + 7 <= len(data):
      if 32768 - pos % 32768 < 7:  # the block's tail is padding
        pos += 32768 - pos % 32768
        continue
      length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
      payload += data[pos + 7:pos + 7 + length]
      pos += 7 + length
      if kind in (1, 4):  # a whole record, or the last part of one
        yield payload
        payload = b""
      elif kind == 0:
        payload = b""
    return
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    yield data[pos + 12:pos + 12 + length]
    pos += 16 + length


def _tb_hparams(workdir: str) -> dict:
  from tensorboardX.proto import event_pb2, plugin_hparams_pb2
  (path,) = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  for raw in _records(path):
    event = event_pb2.Event.FromString(raw)
    for v in event.summary.value:
      if v.tag == "_hparams_/session_start_info":
        data = plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
        return {k: getattr(h, h.WhichOneof("kind")) for k, h in
                data.session_start_info.hparams.items()}
  return {}


def _wandb_history_keys(workdir: str) -> set:
  from wandb.proto import wandb_internal_pb2
  (path,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  keys = set()
  for raw in _records(path):
    record = wandb_internal_pb2.Record.FromString(raw)
    if record.WhichOneof("record_type") == "history":
      keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
  return {k for k in keys if not k.startswith("_")}  # wandb's own _step, _runtime, _timestamp


def test_train_two_steps_on_a_file_dataset_with_custom_rewards_and_trackers(files, tmp_path):
  workdir = str(tmp_path / "run")
  out = _run("train.py", [
      "--config=default", f"--workdir={workdir}", "--config.algo=dapo",
      f"--config.policy={files['init']}", "--config.task=file",  # config.guide.path stays 'builtin'
      f"--config.task_kwargs.train_path={files['train']}",
      f"--config.task_kwargs.eval_path={files['renamed']}",
      "--config.task_kwargs.eval_prompt_field=problem",
      "--config.task_kwargs.eval_answer_field=final",
      "--config.task_kwargs.prompt_field=question", "--config.task_kwargs.chat_template=True",
      f"--config.reward.functions={files['zero']}:always_zero,{files['zero']}:always_one",
      "--config.rollout.max_new_tokens=4",
      "--config.rollout.groups=2", "--config.rollout.n=2", "--config.rollout.zero_groups=0",
      "--config.rollout.max_num_gen_batches=1", "--config.num_steps=2", "--config.eval_every=2",
      "--config.eval_size=4", "--config.eval_batch_size=4", "--config.checkpoint_every=2",
      "--config.export_hf=False", "--config.progress=False", "--config.no_signal_steps=2",
      "--config.loggers=tb,wandb"], WANDB_MODE="offline", WANDB_SILENT="true")
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["final_step"] == 2 and summary["eval_size"] == 4
  # dapo from your own checkpoint: no built-in guide or policy is built.
  assert not os.path.exists(os.path.join(workdir, "models"))
  # The answerless row: a WARNING naming the file, and in summary.json.
  warned = [line for line in out.stderr.splitlines() if line.startswith("W") and
            "dropped 1 of 25 rows" in line]  # absl's WARNING prefix: W<mmdd>
  assert warned and "missing_field" in warned[0], out.stderr[-3000:]
  assert any("1 of 25 rows dropped" in w for w in summary["warnings"]), summary["warnings"]
  # orbax's INFO chatter stays below WARNING by default (--verbosity=0 restores it).
  assert "checkpoint_manager.py" not in out.stderr
  # The constant custom rewards leave no group with variance: warned and in summary.json.
  assert summary["no_signal_steps"] == 2
  assert any("no learning signal for 2 steps" in w for w in summary["warnings"]), summary
  rows = mlog.read_metrics(workdir)
  metrics_doc.assert_documented({k for r in rows for k in r})
  train_rows = [r for r in rows if "reward/always_zero" in r]
  assert len(train_rows) == 2 and all(r["reward/always_one"] == 1.0 for r in train_rows)
  # The summary is printed once, as lines a person reads (not a raw dict, not twice).
  assert out.stdout.count("run summary:") == 1 and "summary: {" not in out.stdout + out.stderr
  assert re.search(r"eval accuracy +\d\.\d{3} -> \d\.\d{3} \(greedy, 4 problems\)", out.stdout)
  # The resolved config at the top of the run directory, and as TensorBoard hparams.
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["task_kwargs"]["eval_prompt_field"] == "problem" and config["loggers"] == "tb,wandb"
  assert config["_resolved"]["policy"] == os.path.abspath(files["init"])
  assert config["_resolved"]["guide"] is None
  hparams = _tb_hparams(workdir)
  assert hparams["algo"] == "dapo" and hparams["task_kwargs.eval_answer_field"] == "final"
  assert hparams["optim.learning_rate"] == 3e-4
  # The wandb offline run logged the same keys as metrics.jsonl.
  assert _wandb_history_keys(workdir) == {k for r in rows for k in r} - {"step"}
  # Samples from the first step on, with the reference answer and each reward's own value.
  samples = mlog.read_jsonl(os.path.join(workdir, mlog.SAMPLES_FILE))
  assert samples[0]["step"] == 1 and samples[0]["answer"].isdigit()
  assert samples[0]["rewards"] == {"always_zero": 0.0, "always_one": 1.0}
  plots = sorted(os.path.basename(p) for p in summary["plots"])
  assert {"loss.png", "grad_norm.png", "reward_components.png"} <= set(plots), plots


def test_evaluate_k4_on_dataset_files(files, tmp_path):
  out = str(tmp_path / "eval.json")
  stdout = _run("evaluate.py", [
      f"--model={files['init']}", "--task=file", f"--eval_path={files['test']},{files['train']}",
      "--prompt_field=question", "--chat_template", "--k=4", "--max_new_tokens=2",
      "--eval_size=3", "--bootstrap=200", f"--out={out}", "--strict_boxed"]).stdout
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
  assert {"prompt", "answer", "response", "extracted", "correct", "truncated"} <= set(samples[0])
  assert "pass@4" in stdout
  # The budget, the share of responses that hit it, the rows each file dropped, the extraction.
  assert result["max_new_tokens"] == 2 and result["answer_extraction"] == "boxed only"
  train = result["datasets"][files["train"]]
  assert train["rows"]["rows"] == 25 and train["rows"]["skipped"] == {"missing_field": 1}
  assert result["truncation_rate"] == pytest.approx(
      sum(s["truncated"] for s in samples[:12]) / 12)
  # A random model in 2 tokens rarely ends (EOS): most responses are cut off, and it says so.
  assert result["truncation_rate"] > 0.5
  assert any("hit the 2-token budget" in w for w in result["warnings"]), result["warnings"]
  # Strict: only a \boxed{} answer counts (a random model writes none).
  assert all(s["extracted"] is None and not s["correct"] for s in samples
             if "\\boxed{" not in s["response"])


def test_evaluate_a_run_beside_it_and_never_on_zero_problems(files, tmp_path):
  run = tmp_path / "run"  # a finished run's directory: export/, checkpoints/, config.json
  shutil.copytree(files["init"], run / "export")
  os.makedirs(run / "checkpoints")
  (run / "config.json").write_text(json.dumps({"algo": "dapo", "rollout": {"max_new_tokens": 3}}))
  args = [f"--model={run}", "--task=file", f"--eval_path={files['renamed']}",
          "--eval_prompt_field=problem", "--eval_answer_field=final", "--eval_size=2",
          "--bootstrap=50"]
  _run("evaluate.py", args)
  # Written beside the run, not into export/ (which the next export replaces).
  assert not os.path.exists(run / "export" / "eval.json")
  result = json.load(open(run / "eval.json"))
  assert result["num_examples"] == 2 and result["max_new_tokens"] == 3  # the run's own budget
  assert result["max_new_tokens_from"].endswith("config.json")
  before = (run / "eval.json").read_bytes(), (run / "eval_samples.jsonl").read_bytes()
  # A field the file lacks: before, a WARNING, "mean@1 0.000 (0 problems)" and exit 0 over the
  # good results.
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py")] +
                       args[:3] + ["--eval_prompt_field=question"] + args[4:], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
  err = bad.stderr.strip().splitlines()[-1]
  assert err.startswith("error: --eval_prompt_field=question: no usable problem in"), err
  assert "renamed.jsonl" in err and "field 'question' is missing" in err
  assert ((run / "eval.json").read_bytes(), (run / "eval_samples.jsonl").read_bytes()) == before
