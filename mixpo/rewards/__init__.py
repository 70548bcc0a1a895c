"""Rewards: answer extraction + math-verify, format reward, timed runner, DAPO overlong shaping.

The names below are imported on first use (PEP 562): the reward workers' fork server imports
`mixpo.rewards.worker_init`, which must re-execute the process with a scrubbed environment before
math-verify and sympy are loaded (a second of imports it would otherwise do twice).
"""

import importlib

# Eager: the function `combine` shares its name with its module, which a lazy import would bind.
from mixpo.rewards.combine import Combined, combine

_EXPORTS = {
    "FormatReward": "math_answer", "MathAnswerReward": "math_answer",
    "extract_answer": "math_answer", "format_reward": "math_answer",
    "math_answer_reward": "math_answer", "parse_gold": "math_answer",
    "verify_answer": "math_answer", "OverlongConfig": "overlong", "overlong_penalty": "overlong",
    "shape_rewards": "overlong", "truncation_loss_mask": "overlong", "RewardError": "runner",
    "RewardResult": "runner", "RewardConfig": "runner",
    "RewardRunner": "runner", "ScorerError": "runner",
}

__all__ = sorted([*_EXPORTS, "Combined", "combine"])


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  try:
    return importlib.import_module(f"{__name__}.{name}")  # a submodule, as after an eager import
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
