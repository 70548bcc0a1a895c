"""Weighted combination of TRL-style reward functions."""

from __future__ import annotations

import numpy as np


class Combined:
  """One TRL-style reward: Σ_k w_k · fn_k(prompts, completions, **columns)."""

  def __init__(self, fns_with_weights):
    self.fns_with_weights = [(fn, float(w)) for fn, w in fns_with_weights]
    self.__name__ = "+".join(f"{w:g}*{fn_name(fn)}" for fn, w in self.fns_with_weights)

  def prepare(self) -> None:
    """Each part's `prepare()` (RewardRunner calls this before arming its guard)."""
    for fn, _ in self.fns_with_weights:
      if hasattr(fn, "prepare"):
        fn.prepare()

  def __call__(self, prompts, completions, **columns) -> list[float]:
    total = np.zeros(len(completions), np.float64)
    for fn, w in self.fns_with_weights:
      total += w * np.asarray(fn(prompts, completions, **columns), np.float64)
    return total.tolist()


def combine(fns_with_weights) -> Combined:
  """Weighted sum of reward functions as one TRL-style callable (no timeout of its own)."""
  return Combined(fns_with_weights)


def fn_name(fn) -> str:
  return getattr(fn, "__name__", None) or type(fn).__name__
