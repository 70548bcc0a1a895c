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


def test_rewards_mostly_not_verdicts_warn_once_and_reach_the_summary(caplog):
  """Blocked / errors / unverifiable / scorer errors / timeouts above the ratio: one WARNING at
  the first such step, every such step counted (a run scoring all-blocked said warnings: [])."""
  caplog.set_level(logging.WARNING)
  h = mlog.RunHealth(reward_failure_ratio=0.5)
  h.observe(1, {**_step(), "reward/items": 16, "reward/blocked": 4, "reward/scorer_errors": 4})
  assert not caplog.messages  # 8 of 16: not more than half
  h.observe(2, {**_step(), "reward/items": 16, "reward/blocked": 16})
  h.observe(3, {**_step(), "reward/items": 16, "reward/unverifiable": 9})
  assert len(caplog.messages) == 1
  assert caplog.messages[0].startswith("step 2: 16 of 16 reward items scored 0 without a verdict")
  assert "16 blocked" in caplog.messages[0]
  assert "reward.failure_warn_ratio=0.5" in caplog.messages[0]
  s = h.summary()
  assert s["warnings"] == caplog.messages and s["reward_failure_steps"] == 2
  assert (s["reward_items"], s["reward_blocked"], s["reward_unverifiable"],
          s["reward_scorer_errors"]) == (48, 20, 9, 4)
  with pytest.raises(ValueError, match="reward.failure_warn_ratio=1.5"):
    mlog.RunHealth(reward_failure_ratio=1.5)
