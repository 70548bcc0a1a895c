"""mixpo/logging.RunHealth: problems a person must see become WARNINGs and summary.json entries."""

import logging

import pytest

from mixpo import logging as mlog


def _step(loss=0.5, variance_groups=3, rows_off=0, skipped=0, timeouts=0):
  return {"loss/loss": loss, "dynamic/variance_groups": variance_groups,
          "train/rows_off": rows_off, "loss/skipped_updates": skipped, "reward/timeouts": timeouts,
          "reward/errors": 0}


def test_no_signal_warning_after_n_steps_once_per_streak(caplog):
  caplog.set_level(logging.WARNING)
  h = mlog.RunHealth(no_signal_steps=3)
  for step in range(1, 3):
    h.observe(step, _step(loss=-0.0, variance_groups=0))
  assert not caplog.messages  # 2 < 3 steps
  h.observe(3, _step(loss=0.0, variance_groups=0))
  h.observe(4, _step(loss=0.0, variance_groups=0))  # same streak: no second warning.
  assert len(caplog.messages) == 1 and "no learning signal for 3 steps" in caplog.messages[0]
  h.observe(5, _step())  # signal again: the streak ends
  for step in range(6, 9):
    h.observe(step, _step(loss=0.3, variance_groups=0))  # no variance and no guide rows
  s = h.summary()
  assert s["no_signal_steps"] == 7 and len(s["warnings"]) == 2
  # Guide (OFF) rows carry signal even when no policy group has variance.
  assert not mlog.RunHealth.no_signal(_step(variance_groups=0, rows_off=8))


def test_skips_and_timeouts_warn_and_the_skip_ratio_fails_the_run():
  h = mlog.RunHealth(max_skip_ratio=0.3, min_steps=4)
  h.observe(1, _step(timeouts=2))
  h.observe(2, _step(skipped=1))
  h.observe(3, _step())
  s = h.summary()
  assert s["reward_timeouts"] == 2 and s["skipped_update_steps"] == 1 and len(s["warnings"]) == 2
  with pytest.raises(mlog.RunHealthError, match="2 of 4 steps.*max_skip_ratio=0.3"):
    h.observe(4, _step(skipped=1))
