"""Run plots say which run they show: algorithm, seed and task in the title."""

import json
import os

from mixpo import logging as mlog


def test_run_label_from_the_checkpoint_fingerprint(tmp_path):
  assert mlog.run_label(str(tmp_path)) == ""
  os.makedirs(tmp_path / "checkpoints")
  with open(tmp_path / "checkpoints" / "fingerprint.json", "w") as f:
    json.dump({"algo": "mix2", "seed": 3, "task": "file",
               "task_kwargs": {"train_path": "/data/dapo-math.parquet"}}, f)
  assert mlog.run_label(str(tmp_path)) == "mix2 · seed 3 · file dapo-math.parquet"
  with mlog.MetricLogger(str(tmp_path), tensorboard=False) as log:
    for step in range(3):
      log.write(step, {"eval/accuracy": 0.01 * step, "train/reward": -0.5})
  paths = mlog.plot_run(str(tmp_path))
  assert any(p.endswith("accuracy_vs_step.png") for p in paths)
