"""Answer extraction and math-verify based answer / format rewards (TRL-style callables).

Every reward here has the TRL signature `fn(prompts, completions, **columns) -> list[float]`
(one float per completion, columns are per-completion lists such as `answer`). They are classes
or module-level functions so they pickle into `RewardRunner`'s worker processes.

None of these functions enforces a time limit of its own: math-verify's built-in limit uses
`signal.alarm`, which only works in the main thread and clobbers any other alarm, so it is
switched off here and `mixpo.rewards.runner.RewardRunner` enforces a per-item deadline instead.
Call them through the runner whenever completions come from a model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading

import math_verify
import math_verify.grader
import math_verify.parser

from mixpo.rewards.deadline import DeadlineExceeded, deadline

# We provide the timeout (RewardRunner), so silence math-verify's one-time warning about it.
math_verify.parser.TIMEOUT_WARNING_SHOWN = True
math_verify.grader.TIMEOUT_WARNING_SHOWN = True

# A real final answer is short; longer candidates are scored 0 without parsing (a 1 MB digit
# string would otherwise reach sympy and take seconds or raise).
MAX_ANSWER_CHARS = 512

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*:?\s*([^\n]*)",
                        re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")


def _last_boxed(text: str) -> tuple[str | None, bool]:
  """(content of the last `\\boxed{...}`, whether one was found at all); nested braces allowed.

  Returns (None, True) for an unbalanced last box (malformed), (None, False) when there is none.
  """
  starts = [m.end() for m in _BOXED.finditer(text)]
  if not starts:
    return None, False
  i = starts[-1]
  depth = 1
  for j in range(i, len(text)):
    c = text[j]
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[i:j].strip(), True
  return None, True


def extract_answer(text: str) -> str | None:
  """The final answer of a completion, or None when there is none.

  Order: the last `\\boxed{...}` (nested braces allowed; an unbalanced last box is malformed →
  None), else what follows the last "The answer is" / "Answer:" (up to the line end, trailing
  period and `$` stripped), else the last number in the text ("1,000", "-3.5", "2/3").
  """
  if not isinstance(text, str) or not text:
    return None
  boxed, found = _last_boxed(text)
  if found:
    return boxed or None
  matches = list(_ANSWER_IS.finditer(text))
  if matches:
    ans = matches[-1].group(1).strip().rstrip(".").strip().strip("$").strip()
    if ans:
      return ans
  nums = _NUMBER.findall(text[-100_000:])  # the last number is near the end; bound the scan
  return nums[-1] if nums else None


@functools.lru_cache(maxsize=65536)
def parse_gold(answer: str, timeout_s: int | None = None) -> tuple:
  """math-verify parse of a reference answer; raises ValueError when it does not parse.

  A reference that does not parse would score every completion 0 — a silent wrong reward — so
  it is an error here. Cached: a group of n completions shares one reference.
  timeout_s: seconds for the whole parse, enforced in-process by `mixpo.rewards.deadline` (main
    thread only; elsewhere ignored). Dataset readers set it: a short pathological answer such
    as "x^x^...^2" keeps sympy busy for minutes. Reward workers leave it None (RewardRunner's
    deadline applies there).
  """
  text = str(answer).strip()
  parsed = []
  if timeout_s is not None and threading.current_thread() is not threading.main_thread():
    timeout_s = None
  if text:
    try:
      with deadline(timeout_s) if timeout_s is not None else contextlib.nullcontext():
        parsed = math_verify.parse(text if "$" in text or "\\" in text else f"${text}$",
                                   parsing_timeout=None)
        if not parsed:
          parsed = math_verify.parse(text, parsing_timeout=None)
    except DeadlineExceeded:
      raise ValueError(f"reference answer {text[:80]!r} took over {timeout_s} s to parse "
                       "(pathological LaTeX or a huge power tower?); simplify the dataset's "
                       "answer") from None
  if not parsed:
    raise ValueError(f"reference answer {text[:80]!r} does not parse with math-verify; fix the "
                     "dataset's answer field or use a task-specific exact reward")
  return tuple(parsed)


def _parse_pred(ans: str) -> list:
  parsed = math_verify.parse(f"\\boxed{{{ans}}}", parsing_timeout=None)
  return parsed or math_verify.parse(ans, parsing_timeout=None)


def _as_float(x) -> float | None:
  try:
    v = float(x)
  except (TypeError, ValueError, OverflowError):
    return None
  return v if math.isfinite(v) else None


def verify_answer(completion: str, answer: str, rel_tol: float | None = None) -> float:
  """1.0 when the completion's final answer equals the reference (math-verify), else 0.0.

  rel_tol: when set and both sides are numbers, |pred − gold| <= rel_tol·max(|gold|, 1e-12)
    counts as equal (for tasks that state a numeric tolerance); math-verify's own comparison
    rounds floats to 6 decimals.
  Raises ValueError only for a reference that does not parse; a malformed completion scores 0.
  """
  gold = parse_gold(str(answer))
  ans = extract_answer(completion)
  if ans is None or len(ans) > MAX_ANSWER_CHARS:
    return 0.0
  try:
    pred = _parse_pred(ans)
  except Exception:  # noqa: BLE001 — any parser failure on model output means "no answer"
    return 0.0
  if not pred:
    return 0.0
  if rel_tol is not None:
    g, p = _as_float(gold[0]), _as_float(pred[0])
    if g is not None and p is not None:
      return float(abs(p - g) <= rel_tol * max(abs(g), 1e-12))
  try:
    return float(math_verify.verify(list(gold), pred, timeout_seconds=None))
  except Exception:  # noqa: BLE001
    return 0.0


class MathAnswerReward:
  """TRL-style math answer reward: 1.0 if the final answer verifies against `answer`, else 0.0.

  Args:
    rel_tol: optional numeric tolerance (relative), see `verify_answer`.
    answer_column: the column holding the reference answers.
  """

  def __init__(self, rel_tol: float | None = None, answer_column: str = "answer"):
    self.rel_tol = rel_tol
    self.answer_column = answer_column
    self.__name__ = "math_answer"

  def __call__(self, prompts, completions, **columns) -> list[float]:
    if self.answer_column not in columns:
      raise KeyError(f"math_answer reward needs the column {self.answer_column!r}; got columns "
                     f"{sorted(columns)}. Pass it as a keyword (RewardRunner(..)(p, c, answer=[..]))")
    answers = columns[self.answer_column]
    return [verify_answer(c, a, self.rel_tol) for c, a in zip(completions, answers, strict=True)]


math_answer_reward = MathAnswerReward()


class FormatReward:
  """TRL-style format reward: 1.0 when the completion carries a well-formed answer, else 0.0.

  Args:
    pattern: a regex the whole stripped completion must match (e.g. r"-?\\d+" for the built-in
      arithmetic tasks). When None, a non-empty, balanced `\\boxed{...}` must be present.
  """

  def __init__(self, pattern: str | None = None):
    self.pattern = pattern
    self._re = re.compile(pattern, re.DOTALL) if pattern is not None else None
    self.__name__ = "format"

  def __getstate__(self):
    return {"pattern": self.pattern}

  def __setstate__(self, state):
    self.__init__(state["pattern"])

  def __call__(self, prompts, completions, **columns) -> list[float]:
    out = []
    for c in completions:
      if not isinstance(c, str):
        out.append(0.0)
      elif self._re is not None:
        out.append(float(self._re.fullmatch(c.strip()) is not None))
      else:
        boxed, _ = _last_boxed(c)
        out.append(float(bool(boxed)))
    return out


format_reward = FormatReward()
