"""mean@k, pass@k (unbiased), maj@k of sampled answers, with bootstrap 95 % intervals (numpy only).

Inputs are per problem: `correct_PxN` (bool, N ≥ k samples of each of P problems) and
`answers_PxN` (the extracted final answer of each sample, for majority voting).
- mean@k: the mean of the first k samples' correctness (the expected accuracy of one sample).
- pass@k: the unbiased estimator 1 − C(N−c, k) / C(N, k) of "one of k samples is correct" from
  N ≥ k samples with c correct (computed as a product, no huge binomials).
- maj@k: the most frequent answer of the first k samples (ties: the answer seen first) is correct.
Intervals: percentile bootstrap over problems (resampled with replacement), seeded.
`BoxedOnly` makes a reward strict about the answer format: only a final `\\boxed{...}` counts.
"""

from __future__ import annotations

import collections
import re

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (needs n ≥ k)."""
  if k > n:
    raise ValueError(f"pass@k: k={k} > n={n} samples; sample at least k per problem")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(answers, correct) -> bool:
  """Whether the most frequent answer (ties: first seen) was judged correct; None answers (no
  extractable answer) never win a vote unless nothing else was answered."""
  votes = collections.Counter(a for a in answers if a is not None)
  if not votes:
    return False
  first = {}
  for i, a in enumerate(answers):
    first.setdefault(a, i)
  best = max(votes, key=lambda a: (votes[a], -first[a]))
  return bool(any(c for a, c in zip(answers, correct) if a == best))


def per_problem(correct_PxN: np.ndarray, answers_PxN, k: int) -> dict[str, np.ndarray]:
  """{metric name: float [P]} per-problem values whose mean is the metric."""
  correct_PxN = np.asarray(correct_PxN, bool)
  p, n = correct_PxN.shape
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, samples per problem = {n}]")
  c_P = correct_PxN.sum(axis=1)
  return {
      f"mean@{k}": correct_PxN[:, :k].mean(axis=1),
      f"pass@{k}": np.array([pass_at_k(n, int(c), k) for c in c_P]),
      f"maj@{k}": np.array([majority_correct(list(answers_PxN[i])[:k], correct_PxN[i, :k])
                            for i in range(p)], np.float64),
  }


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 10_000, seed: int = 0):
  """Percentile bootstrap interval of the mean of `values` (NaNs dropped): (mean, lo, hi).

  Resamples the values with replacement `n_boot` times (a fixed `seed`: the same interval every
  time). Fewer than 2 values: (mean, NaN, NaN), no interval (NaN mean when empty). The one
  implementation for problems (evaluate.py: over an eval set) and seeds (mixpo.analysis: over a
  grid's seeds; 5 seeds give a rough interval, narrower than a t interval).
  """
  v = np.asarray([x for x in np.asarray(values, np.float64).ravel() if not np.isnan(x)])
  if not len(v):
    return float("nan"), float("nan"), float("nan")
  if len(v) < 2:
    return float(v.mean()), float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(v.mean()), float(lo), float(hi)


def summarize(correct_PxN, answers_PxN, k: int, resamples: int = 1000, seed: int = 0) -> dict:
  """{"num_examples": P, "mean@k": {"value": v, "ci95": [lo, hi]}, "pass@k": ..., "maj@k": ...}."""
  out = {"num_examples": int(np.asarray(correct_PxN).shape[0])}
  for name, vals in per_problem(correct_PxN, answers_PxN, k).items():
    out[name] = {"value": float(vals.mean()) if vals.size else 0.0,
                 "ci95": list(bootstrap_ci(vals, n_boot=resamples, seed=seed)[1:])}
  return out


_BOXED = re.compile(r"\\boxed\s*\{")


def boxed_answer(text: str) -> str | None:
  """The content of the last balanced `\\boxed{...}` of `text` (nested braces allowed), or None
  when there is none or it is unbalanced."""
  if not isinstance(text, str):
    return None
  starts = [m.end() for m in _BOXED.finditer(text)]
  if not starts:
    return None
  depth = 1
  for j in range(starts[-1], len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[starts[-1]:j].strip() or None
  return None


class BoxedOnly:
  """A TRL-style reward made strict: completions without a final balanced `\\boxed{...}` score
  0, whatever "The answer is ..." or last number the default extraction would fall back to.
  A module-level class, so it pickles into the reward runner's workers."""

  def __init__(self, fn):
    self.fn = fn
    self.__name__ = getattr(fn, "__name__", "reward")

  def __call__(self, prompts, completions, **columns) -> list[float]:
    scores = self.fn(prompts, completions, **columns)
    return [float(s) if boxed_answer(c) is not None else 0.0
            for s, c in zip(scores, completions, strict=True)]
