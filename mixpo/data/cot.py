"""Column arithmetic written out step by step: the built-in chain-of-thought task.

The addition task's answers are at most 6 tokens; here a solution is a chain of 40-150 characters
that ends in `\\boxed{answer}`, so token-level ratios πθ/πϕ drift over a real reasoning chain, the
reward goes through answer extraction and math-verify (`RewardRunner`), and DAPO's overlong
shaping has something to shape. Prompts are short ("472+389=?") so a tiny char-level model learns
the task on CPU in minutes.

Two solution styles, both correct, so a guide can write in a style the policy does not:
  columns  "2+9=11 c1\\n7+8+1=16 c1\\n4+3+1=8 c0\\n\\boxed{861}"
  words    "units 9 and 2 make 11, carry 1. tens 8 and 7 and 1 make 16, carry 1. hundreds 3 and
           4 and 1 make 8. so \\boxed{861}"
Subtraction (ops="-", first operand the larger) writes borrows the same way ("b1").
Knobs: digits (operands in [10^(digits-1), 10^digits)), ops ("+", "-" or "+-"), style,
eval_fraction. The split is decided by the hash of the problem, as for the addition task.
"""

from __future__ import annotations

import numpy as np

from mixpo.data.tasks import (Example, GeneratedTask, check_split, derive_seed,
                              register_task, split_of)
from mixpo.data.tokenizer import DEFAULT_ALPHABET
from mixpo.rewards.math_answer import FormatReward, MathAnswerReward

# Characters a char-level tokenizer needs for every style of this task.
COT_ALPHABET = DEFAULT_ALPHABET + "\\{}abcdefghijklmnopqrstuvwxyz,.?\n"
STYLES = ("columns", "words")
_PLACES = ("units", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands")


def _digits(x: int, width: int) -> list[int]:
  """Digits of x, least significant first, padded to `width`."""
  return [(x // 10**i) % 10 for i in range(width)]


def solution(a: int, b: int, op: str, style: str) -> str:
  """The worked solution of `a op b` in `style`, ending in \\boxed{result}."""
  width = max(len(str(a)), len(str(b)))
  da, db = _digits(a, width), _digits(b, width)
  carry, steps = 0, []
  for i in range(width):
    if op == "+":
      total = da[i] + db[i] + carry
      digit, nxt = total % 10, total // 10
      top = da[i]
    else:  # borrow 10 when the column would go negative: "12-9=3 b1"
      nxt = int(da[i] - db[i] - carry < 0)
      top = da[i] + 10 * nxt
      total = digit = top - db[i] - carry
    terms = [top, db[i]] + ([carry] if carry else [])
    if style == "columns":
      steps.append(f"{op.join(map(str, terms))}={total} {'c' if op == '+' else 'b'}{nxt}")
    else:
      verb, link, what = ("make", "and", "carry") if op == "+" else ("leave", "minus", "borrow")
      order = [terms[1], terms[0]] + terms[2:] if op == "+" else terms  # another order, too
      said = f" {link} ".join(map(str, order))
      steps.append(f"{_PLACES[i]} {said} {verb} {total}" + (f", {what} {nxt}" if nxt else ""))
    carry = nxt
  result = a + b if op == "+" else a - b
  if style == "columns":
    return "\n".join(steps) + f"\n\\boxed{{{result}}}"
  return ". ".join(steps) + f". so \\boxed{{{result}}}"


class CotArithmeticTask(GeneratedTask):
  """Two-operand column addition / subtraction solved in written steps.

  format_weight: weight of a format reward (a non-empty, balanced \\boxed{}) added to the answer
    reward; < 1 so that only a right answer counts as solved (`rl.solved`: reward >= 1).
  """

  def __init__(self, digits: int = 3, ops: str = "+", style: str = "columns",
               eval_fraction: float = 0.1, format_weight: float = 0.0):
    if not 2 <= digits <= 6 or not ops or set(ops) - {"+", "-"} or style not in STYLES:
      raise ValueError(f"CotArithmeticTask(digits={digits}, ops={ops!r}, style={style!r}): need "
                       f"2 <= digits <= 6, ops of '+' / '-', style in {STYLES}")
    if not 0 <= format_weight < 1 or not 0 < eval_fraction < 1:
      raise ValueError(f"CotArithmeticTask(format_weight={format_weight}, eval_fraction="
                       f"{eval_fraction}): need 0 <= format_weight < 1, 0 < eval_fraction < 1")
    self.digits, self.ops, self.style, self.eval_fraction = digits, ops, style, eval_fraction
    self.name = f"cot_d{digits}_{'add' if ops == '+' else 'sub' if ops == '-' else 'addsub'}"
    self.reward_fn = BoxedAnswerReward(format_weight)
    self.max_solution_chars = max(len(self._solution(10**digits - 1, 10**digits - 1, op))
                                  for op in ops)

  def _solution(self, a, b, op):
    return solution(a, b, op, self.style)

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    """The index-th example of `split` in the stream of `seed` (pure function of its arguments)."""
    check_split(split, f"{self.name}.example")
    lo, hi = 10**(self.digits - 1), 10**self.digits
    for attempt in range(10_000):
      rng = np.random.default_rng(derive_seed(self.name, seed, index, attempt))
      a, b = (int(x) for x in rng.integers(lo, hi, size=2))
      op = self.ops[int(rng.integers(len(self.ops)))]
      if op == "-" and a < b:
        a, b = b, a
      if split_of(f"cot:{a}{op}{b}", self.eval_fraction) == split:
        result = a + b if op == "+" else a - b
        return Example(prompt=f"{a}{op}{b}=?", answer=str(result),
                       metadata={"operands": [a, b], "op": op,
                                 "solution": self._solution(a, b, op)})
    raise RuntimeError(f"{self.name}: no {split} problem in 10000 draws; raise eval_fraction")


class BoxedAnswerReward:
  """math-verify answer reward on the last \\boxed{} (none: 0, a chain must end in its box) plus
  `format_weight` x a format reward; `name` is its name in the reward metrics."""

  def __init__(self, format_weight: float, name: str = "cot_answer"):
    self.format_weight = format_weight
    self.answer = MathAnswerReward()
    self.format = FormatReward()
    self.__name__ = name

  def __call__(self, prompts, completions, answer, **columns) -> list[float]:
    boxed = self.format(prompts, completions)
    out = [r * b for r, b in zip(self.answer(prompts, completions, answer=answer), boxed,
                                 strict=True)]
    if self.format_weight:
      out = [r + self.format_weight * f for r, f in zip(out, boxed, strict=True)]
    return out


register_task("cot_arithmetic", CotArithmeticTask)
