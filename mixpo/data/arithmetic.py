"""Multi-digit addition / chain sums: the built-in task a tiny char-level model learns on CPU.

Format (why our own and not reasoning-gym's chain_sum: its prompts are ~100 characters of
instructions, far beyond what a 2-layer char model handles in minutes):
  prompt "37+45="   completion "82" then EOS        (terms=2, digits=2)
  prompt "3+91+40=" completion "134" then EOS       (terms=3)
Knobs: digits (operands uniform in [0, 10^digits)), terms (2..), eval_fraction.
The split is decided by the hash of the *sorted* operands, so "45+37" is eval iff "37+45" is.
"""

from __future__ import annotations

import re

import numpy as np

from mixpo.data.tasks import (Example, GeneratedTask, check_split, derive_seed,
                              register_task, split_of)

_INT = re.compile(r"\s*(-?\d{1,40})\s*")


def exact_integer_reward(prompts, completions, answer, **_) -> list[float]:
  """TRL-style exact verifier: 1.0 iff the stripped completion is the integer `answer`."""
  out = []
  for c, a in zip(completions, answer, strict=True):
    m = _INT.fullmatch(c) if isinstance(c, str) else None
    out.append(float(m is not None and int(m.group(1)) == int(a)))
  return out


def digit_credit_reward(prompts, completions, answer, **_) -> list[float]:
  """Dense partial credit in [0, 1]: 1.0 iff exact, else 0.5 × the fraction of answer digits
  matched position by position from the right (0 for a completion that is not an integer).

  For tests and ablations that need reward variance from an untrained policy; accuracy is still
  "reward == 1" (see `rl.evaluate`).
  """
  out = []
  for c, a in zip(completions, answer, strict=True):
    m = _INT.fullmatch(c) if isinstance(c, str) else None
    if m is None:
      out.append(0.0)
    elif int(m.group(1)) == int(a):
      out.append(1.0)
    else:
      got, want = m.group(1)[::-1], str(a)[::-1]
      hits = sum(x == y for x, y in zip(got, want))
      out.append(0.5 * hits / max(len(want), len(got)))
  return out


REWARDS = {"exact": exact_integer_reward, "digits": digit_credit_reward}


class AdditionTask(GeneratedTask):
  """Sums of `terms` non-negative integers with up to `digits` digits each.

  reward: "exact" (1 iff the completion is the sum) or "digits" (`digit_credit_reward`).
  """

  def __init__(self, digits: int = 2, terms: int = 2, eval_fraction: float = 0.1,
               reward: str = "exact"):
    if reward not in REWARDS:
      raise ValueError(f"AdditionTask(reward={reward!r}): use one of {sorted(REWARDS)}")
    if not 1 <= digits <= 9 or terms < 2 or not 0 < eval_fraction < 1:
      raise ValueError(f"AdditionTask(digits={digits}, terms={terms}, eval_fraction="
                       f"{eval_fraction}): need 1 <= digits <= 9, terms >= 2, 0 < eval_fraction < 1")
    self.digits, self.terms, self.eval_fraction = digits, terms, eval_fraction
    self.name = f"addition_d{digits}_t{terms}"
    self.reward_fn = REWARDS[reward]
    self.max_prompt_chars = terms * (digits + 1)
    self.max_answer_chars = len(str(terms * (10**digits - 1)))

  def _split(self, ops) -> str:
    return split_of(f"add:{'+'.join(map(str, sorted(ops)))}", self.eval_fraction)

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    """The index-th example of `split` in the stream of `seed` (pure function of its arguments)."""
    check_split(split, f"{self.name}.example")
    for attempt in range(10_000):
      rng = np.random.default_rng(derive_seed(self.name, seed, index, attempt))
      ops = [int(x) for x in rng.integers(0, 10**self.digits, size=self.terms)]
      if self._split(ops) == split:
        return Example(prompt="+".join(map(str, ops)) + "=", answer=str(sum(ops)),
                       metadata={"operands": ops})
    raise RuntimeError(f"{self.name}: no {split} problem in 10000 draws; raise eval_fraction")


register_task("addition", AdditionTask)
