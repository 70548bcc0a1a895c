"""FieldError: a config value refused by the dataclass its group builds.

Each group of the experiment config (experiments/configs/default.py) is built into one frozen
dataclass (`config.objective` → objectives.ObjectiveConfig, `config.rollout` → rl.RolloutConfig,
...), and that dataclass is the one place its fields are checked. It raises FieldError with the
field's dotted path in the config, so the front door (mixpo/cli.py) names the flag that caused
it, `--config.<field>`, without rewriting the message.
"""

from __future__ import annotations


class FieldError(ValueError):
  """`field` (dotted path in the experiment config, e.g. "objective.eps_low") has a bad `value`;
  `reason` says what it must be."""

  def __init__(self, field: str, value, reason: str):
    self.field, self.value, self.reason = field, value, reason
    super().__init__(f"{field}={value!r}: {reason}")
