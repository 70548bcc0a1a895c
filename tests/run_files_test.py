"""What a run leaves in its directory for the researcher who reads it: config.json, samples from
the first step (with the reference answer and each reward function's value), summary.json and
plots also when the run is preempted, resume marks on the plots."""

import json
import os
import signal

from experiments.configs import smoke
from mixpo import logging as mlog
from mixpo import loop, rl


def test_preempted_run_leaves_summary_plots_and_samples_and_resume_is_marked(
    builtin_dir, tmp_path, monkeypatch):
  config = smoke.get_config()
  config.builtin_dir, config.num_steps, config.log_samples_every = builtin_dir, 3, 10
  workdir = str(tmp_path / "run")
  real_step = rl.rl_step

  def step_then_sigterm(*args, **kwargs):  # a scheduler's preemption after the first step
    out = real_step(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(rl, "rl_step", step_then_sigterm)
  summary = loop.run(config, workdir)
  assert summary["preempted"] and summary["preempted_by"] == "SIGTERM" and summary["final_step"] == 1
  # Before: a preempted run wrote neither summary.json nor plots.
  assert json.load(open(os.path.join(workdir, "summary.json")))["preempted"] is True
  assert os.path.isfile(os.path.join(workdir, "plots", "accuracy_vs_step.png"))
  resolved = json.load(open(os.path.join(workdir, "config.json")))
  assert resolved["algo"] == "mix2" and resolved["num_steps"] == 3
  assert resolved["_resolved"]["guide"].endswith("guide")
  # Step 1's samples, though log_samples_every=10 > the run's length: with the reference answer
  # and every reward function's own value.
  samples = mlog.read_jsonl(os.path.join(workdir, mlog.SAMPLES_FILE))
  assert samples and {s["step"] for s in samples} == {1}
  policy = [s for s in samples if not s["guide"]]
  guide = [s for s in samples if s["guide"]]
  assert policy and guide
  for s in samples:
    assert s["answer"].isdigit() and s["answer"] == str(eval(s["prompt"].rstrip("=")))  # noqa: S307
    assert list(s["rewards"]) == ["exact_integer_reward"], s
    assert s["rewards"]["exact_integer_reward"] == s["reward"]

  monkeypatch.setattr(rl, "rl_step", real_step)
  summary = loop.run(config, workdir)  # resumes from the forced checkpoint of step 1
  assert summary["start_step"] == 1 and summary["final_step"] == 3 and not summary["preempted"]
  assert [e["step"] for e in mlog.read_events(workdir) if e["event"] == "resumed"] == [1]
  figures = dict(mlog.run_figures(workdir))
  assert {"loss.png", "grad_norm.png", "accuracy_vs_step.png"} <= set(figures)
  ax = figures["accuracy_vs_step.png"].axes[0]
  assert "16 problems" in ax.get_title()  # the eval-set size
  assert all(float(t).is_integer() for t in ax.get_xticks())  # steps are whole numbers
  marks = [line for line in ax.get_lines() if line.get_label() == "resumed"]
  assert len(marks) == 1 and list(marks[0].get_xdata()) == [1, 1]
