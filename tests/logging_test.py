"""Tests for mixpo.logging: jsonl metrics/samples, NaN handling, TensorBoard, timers, plots."""

import glob
import json
import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from mixpo import logging as mlog


def test_metrics_jsonl_lines_and_read_back(tmp_path):
  with mlog.MetricLogger(tmp_path, tensorboard=False) as lg:
    lg.write(1, {"train/reward": jnp.float32(0.5), "n": np.int64(3), "ok": True, "lr": 1e-6})
    lg.write(2, {"train/reward": 0.75})
    # Flushed per line: readable before close.
    assert len(open(tmp_path / mlog.METRICS_FILE).read().splitlines()) == 2
  lines = open(tmp_path / mlog.METRICS_FILE).read().splitlines()
  assert json.loads(lines[0]) == {"step": 1, "train/reward": 0.5, "n": 3, "ok": 1, "lr": 1e-6}
  rows = mlog.read_metrics(tmp_path)
  assert rows == [json.loads(lines[0]), {"step": 2, "train/reward": 0.75}]
  assert type(rows[0]["n"]) is int and type(rows[0]["train/reward"]) is float


def test_nonfinite_written_as_strings_and_read_back(tmp_path):
  with mlog.MetricLogger(tmp_path, tensorboard=False) as lg:
    lg.write(0, {"a": float("nan"), "b": jnp.inf, "c": np.float32(-np.inf), "d": 1.0})
  raw = open(tmp_path / mlog.METRICS_FILE).read()
  assert "NaN" not in raw and "Infinity" not in raw
  assert json.loads(raw) == {"step": 0, "a": "nan", "b": "inf", "c": "-inf", "d": 1.0}
  (row,) = mlog.read_metrics(tmp_path)
  assert math.isnan(row["a"]) and row["b"] == math.inf and row["c"] == -math.inf


def test_non_scalar_metric_names_the_key(tmp_path):
  with mlog.MetricLogger(tmp_path, tensorboard=False) as lg:
    with pytest.raises(TypeError, match="'train/reward'"):
      lg.write(3, {"train/reward": jnp.ones(4)})


def test_truncated_last_line_is_skipped(tmp_path):
  with mlog.MetricLogger(tmp_path, tensorboard=False) as lg:
    lg.write(1, {"x": 1.0})
  with open(tmp_path / mlog.METRICS_FILE, "a") as f:
    f.write('{"step": 2, "x"')  # Crash mid-write.
  assert mlog.read_metrics(tmp_path) == [{"step": 1, "x": 1.0}]


def test_tensorboard_event_file_exists(tmp_path):
  with mlog.MetricLogger(tmp_path) as lg:
    lg.write(1, {"train/reward": 0.1, "loss/x": float("nan")})
  events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0


def test_samples_file(tmp_path):
  with mlog.MetricLogger(tmp_path, tensorboard=False) as lg:
    lg.write_samples(5, [{"prompt": "1+1=", "response": "2 ✓", "reward": np.float32(1.0),
                          "set": "on", "tokens": jnp.arange(3)},
                         {"prompt": "2+2=", "response": "5", "reward": 0.0, "set": "off"}])
  rows = mlog.read_jsonl(str(tmp_path / mlog.SAMPLES_FILE))
  assert rows[0] == {"step": 5, "prompt": "1+1=", "response": "2 ✓", "reward": 1.0, "set": "on",
                     "tokens": [0, 1, 2]}
  assert rows[1]["set"] == "off" and len(rows) == 2


def test_non_main_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with mlog.MetricLogger(workdir, is_main=False) as lg:
    lg.write(1, {"x": 1.0})
    lg.write_samples(1, [{"prompt": "p"}])
  assert not workdir.exists()


def test_resume_step_drops_later_rows(tmp_path):
  with mlog.MetricLogger(tmp_path, tensorboard=False) as lg:
    for s in range(1, 6):
      lg.write(s, {"x": float(s)})
      lg.write_samples(s, [{"prompt": str(s)}])
  with mlog.MetricLogger(tmp_path, tensorboard=False, resume_step=3) as lg:
    lg.write(4, {"x": 40.0})
  assert [(r["step"], r["x"]) for r in mlog.read_metrics(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  assert [r["step"] for r in mlog.read_jsonl(str(tmp_path / mlog.SAMPLES_FILE))] == [1, 2, 3]


def test_phase_timer_sums():
  timer = mlog.PhaseTimer()
  with timer("generate_policy"):
    time.sleep(0.02)
  with timer("update"):
    time.sleep(0.01)
  with timer("update"):  # Repeated phases accumulate.
    time.sleep(0.01)
  time.sleep(0.01)  # Unattributed.
  m = timer.metrics()
  assert set(m) == {"time/generate_policy", "time/update", "time/step", "time/other"}
  assert m["time/generate_policy"] >= 0.02 and m["time/update"] >= 0.02
  assert m["time/other"] >= 0.01
  assert m["time/step"] == pytest.approx(
      m["time/generate_policy"] + m["time/update"] + m["time/other"], abs=1e-9)
  m2 = timer.metrics()  # Reset per step.
  assert set(m2) == {"time/step", "time/other"} and m2["time/step"] < 0.01


def test_phase_timer_rejects_nesting():
  timer = mlog.PhaseTimer()
  with pytest.raises(RuntimeError, match="'score'.*inside.*'update'"):
    with timer("update"):
      with timer("score"):
        pass


def test_progress_updates(capsys, monkeypatch):
  import logging

  from absl import logging as absl_logging
  now = [100.0]  # the first step ends after 100 s of compiling
  monkeypatch.setattr(time, "perf_counter", lambda: now[0])
  with mlog.Progress(total=10, initial=2) as bar:
    bar.update(3, {"reward/mean": jnp.float32(0.25), "train/reward": 0.9, "time/step": 1.5})
    absl_logging.get_absl_handler().emit(logging.LogRecord(  # what absl.logging.info(...) does
        "absl", logging.INFO, __file__, 1, "a log line during the bar", None, None))
    now[0] = 101.0
    bar.update(5, {"eval/accuracy": 0.5})
    now[0] = 103.0
    bar.update(6, {"reward/mean": 0.5})  # Accuracy from step 5 stays shown.
    assert bar.step == 6
  err = capsys.readouterr().err
  # The reward shown is the policy samples' reward/mean, not train/reward (the trained rows').
  assert "6/10" in err and "reward=0.5" in err and "acc=0.5" in err and "s/step=1.5" in err
  assert "reward=0.9" not in err
  # ETA from the steps after the first: (103 - 100) s / 3 steps · 4 steps left, not 103 s / 4 · 4.
  assert "eta=00:04" in err.rsplit("6/10", 1)[1], err
  # The log line is written above the bar (the bar is cleared with \r, then drawn again after).
  line = err.index("a log line during the bar")
  assert err.rfind("\r", 0, line) > err.rfind("%|", 0, line) and err.find("%|", line) > line, err
  with mlog.Progress(total=10, disable=True) as bar:  # e.g. non-main processes.
    bar.update(4, {"reward/mean": 1.0})
  assert capsys.readouterr().err == ""


def test_plot_run_writes_png_and_tolerates_missing_keys(tmp_path):
  with mlog.MetricLogger(tmp_path, tensorboard=False) as lg:
    for s in range(1, 31):
      lg.write(s, {"train/reward": s / 30, "policy_tokens": 100 * s, "train/entropy": 1 / s,
                   "loss/clipfrac_on": 0.1, "loss/f_ratio_off": float("nan") if s == 3 else 0.5})
      if s % 10 == 0:  # Eval rows written apart, without policy_tokens.
        lg.write(s, {"eval/accuracy": s / 40})
  paths = mlog.plot_run(tmp_path)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["accuracy_vs_step.png", "accuracy_vs_tokens.png", "clipfrac.png",
                   "entropy.png", "guide_ratio.png", "reward_vs_step.png",
                   "reward_vs_tokens.png"]  # No response_length rows: that panel skipped.
  for p in paths:
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  # A file with none of the plotted keys: no plots, no error.
  other = tmp_path / "other"
  with mlog.MetricLogger(other, tensorboard=False) as lg:
    lg.write(1, {"something/else": 1.0})
  assert mlog.plot_run(other, out_dir=str(tmp_path / "o")) == []


def test_reward_components_are_the_functions_only():
  # Counters (items, scorer_errors) and per-source repeats (reward/policy/...) are not reward
  # functions: plotted as such they crowd the components figure with counts.
  from mixpo.rewards.runner import RewardResult
  rows = [{"reward/mean": 0.5, "reward/answer": 0.5, "reward/format": 1.0,
           "reward/policy/answer": 0.5, "reward/guide/mean": 1.0, "reward/traces/items": 3,
           **{k: 1 for k in RewardResult.COUNTERS}}]
  assert mlog.reward_components(rows) == ("reward/answer", "reward/format")


def test_metrics_doc_patterns_take_the_table_and_refuse_other_keys():
  import metrics_doc  # noqa: PLC0415  (tests/metrics_doc.py)
  assert not metrics_doc.undocumented(["loss/clipfrac_zero", "reward/guide/items", "time/score",
                                       "reward/my_fn", "loss/j_mix", "train/rows_off"])
  assert metrics_doc.undocumented(["loss/clipfrac_both", "time/nap", "reward/guide/a/b",
                                   "train/new_thing"]) == ["loss/clipfrac_both",
                                                           "reward/guide/a/b", "time/nap",
                                                           "train/new_thing"]
