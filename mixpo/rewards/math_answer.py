"""Answer extraction and math-verify based answer / format rewards (TRL-style callables).

Every reward here has the TRL signature `fn(prompts, completions, **columns) -> list[float]`
(one float per completion, columns are per-completion lists such as `answer`). They are classes
or module-level functions so they pickle into `RewardRunner`'s worker processes.

None of these functions enforces a time limit of its own: math-verify's built-in limit uses
`signal.alarm`, which only works in the main thread and clobbers any other alarm, so it is
switched off here and `mixpo.rewards.runner.RewardRunner` enforces a per-item deadline instead.
Call them through the runner whenever completions come from a model.

Trust: a reference answer is data, so one that cannot be used (does not parse, undefined, or so
large that comparing against it would run for minutes) raises ValueError. A completion is
untrusted model text: a malformed one scores 0; one on which math-verify itself fails raises
`VerifierError`, so `RewardRunner` counts it (scored 0, `reward/unverifiable`, never raised).

Numbers are read as their text means, on both sides, before math-verify sees them (it reads
"1e-7" as e − 7 with Euler's e, "3e8" as 3·e·8 and "10\\,000" or "1 000" as products with 0):
- exponent forms ("1e-7", "3E8", "1.5e+3") are the decimal numbers they stand for;
- digit groups joined by one separator used throughout (a space, a LaTeX space \\, \\; \\: \\!
  "\\ " ~, {,}, a thin / narrow no-break / no-break / figure space) are one number when every
  group after the first has 3 digits ("2 500 000", "10\\,000"); commas as math-verify reads them
  ("1,000" is a thousand, "1,2" two answers);
- text made only of digits and separators that is neither ("1 2", "10 00", "1,00,000",
  "1.000.000") is refused as a reference (`ReferenceMisread`) and scores 0 as an answer;
- a reference that is a plain number must parse to exactly that number, else `ReferenceMisread`.
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import importlib
import math
import re
import threading

import math_verify
import math_verify.grader
import math_verify.parser
import sympy

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
# A reference is compared with every completion of its prompt, and sympy may evaluate it exactly
# while comparing: 9^{99999999999} or (10^{10})! parse in milliseconds but then keep each comparison
# inside C code (no deadline reaches it) for minutes. A reference whose exact value could need
# more decimal digits than this is refused; at the limit a comparison stays well under a second.
MAX_REFERENCE_DIGITS = 10_000

# Math-mode delimiters: text holding one is parsed as written, anything else as LaTeX math.
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
# One digit-group separator (see the module docstring); a number uses one kind throughout.
_SEP = r"(?:\\[,;:!]|\\ |~|\{,\}|[ \u00a0\u2007\u2008\u2009\u202f])"
_GROUPED = re.compile(rf"(?<![\w.\\])\d{{1,3}}(?P<sep>{_SEP})\d{{3}}(?:(?P=sep)\d{{3}})*"
                      rf"(?!(?P=sep)?\d)")
_EXPONENT = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_COMMAND_BEFORE = re.compile(r"\\[A-Za-z]+\s*$")  # "\frac 1 2": digits as a command's arguments
# A plain number after normalisation (comma grouping as math-verify reads it).
_PLAIN = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_DIGITS_AND_SEPS = re.compile(rf"[+-]?\d(?:\d|\.|,|{_SEP})*")
_LIST_ITEM = re.compile(r"[+-]?(?:0|[1-9]\d*)(?:\.\d+)?")
# Exponents beyond this cannot match an accepted reference (MAX_REFERENCE_DIGITS) and would
# make sympy build a number of that many digits.
_MAX_EXPONENT = 10_000
# The last number of a text: comma or space-grouped, exponent form, decimal or fraction.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?"
                     r"|-?\d{1,3}(?:(?:\\,|[\u00a0\u2009\u202f])\d{3})+(?:\.\d+)?"
                     r"|-?\d+(?:\.\d+)?[eE][+-]?\d+|-?\d+(?:\.\d+)?(?:/\d+)?")


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


def _plain_decimal(match) -> str:
  """An exponent form as exact decimal text: 1e-7 → 0.0000001; a long one as m\\times 10^{e}."""
  d = decimal.Decimal(f"{match.group(1)}e{match.group(2)}")
  _, digits, exp = d.as_tuple()
  if abs(exp) > _MAX_EXPONENT:
    return match.group(0)  # left as written: `huge_exponent` refuses or scores it first
  if -60 <= exp and len(digits) + exp <= 60:
    return format(d, "f")
  return f"{int(''.join(map(str, digits)))}\\times 10^{{{exp}}}"


def _join_groups(text: str) -> str:
  out, last = [], 0
  for m in _GROUPED.finditer(text):
    if _COMMAND_BEFORE.search(text, 0, m.start()):
      continue
    out += [text[last:m.start()], re.sub(r"\D", "", m.group(0))]
    last = m.end()
  return "".join(out) + text[last:]


def normalize_numbers(text: str) -> str:
  """`text` with exponent forms and digit grouping written as plain numbers (module docstring)."""
  return _join_groups(_EXPONENT.sub(_plain_decimal, text))


def huge_exponent(text: str) -> bool:
  """Whether `text` holds an exponent form beyond ±_MAX_EXPONENT ("1e99999999")."""
  return any(abs(int(m.group(2))) > _MAX_EXPONENT for m in _EXPONENT.finditer(text))


def _core(text: str) -> str:
  """`text` without surrounding $...$ or \\(...\\) and one \\boxed{...}: where a plain number
  would be."""
  t = text.strip()
  for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    if len(t) >= len(a) + len(b) and t.startswith(a) and t.endswith(b):
      t = t[len(a):len(t) - len(b)].strip()
      break
  boxed, found = _last_boxed(t)
  if (found and boxed is not None and len(_BOXED.findall(t)) == 1
      and t.startswith(("\\boxed", "\\fbox")) and t.endswith("}")):
    t = boxed
  return t


def grouping_problem(text: str) -> str | None:
  """Why `text`, made only of digits and separators, is not one number nor a comma list."""
  core = normalize_numbers(_core(text))
  if not _DIGITS_AND_SEPS.fullmatch(core) or _PLAIN.fullmatch(core):
    return None
  items = core.split(",")
  if len(items) > 1 and all(_LIST_ITEM.fullmatch(i.strip()) for i in items):
    return None  # "1,2" / "2, 5": several answers
  return (f"{core[:40]!r} is not one number: digit groups after the first need 3 digits and one "
          "separator throughout ('10 000', '10\\,000', '10,000')")


def numeral_value(text: str) -> decimal.Decimal | None:
  """The exact value of `text` when it is a plain number (after `normalize_numbers`), else None."""
  core = normalize_numbers(_core(text))
  if not _PLAIN.fullmatch(core):
    return None
  return decimal.Decimal(core.replace(",", ""))


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


class ReferenceTooLarge(ValueError):
  """A reference answer whose exact value is too large to compare against.

  See MAX_REFERENCE_DIGITS.
  """


class ReferenceMisread(ValueError):
  """A reference answer that does not read as the number its text means (module docstring)."""


class ReferenceTooSlow(ValueError):
  """A reference answer that takes longer to compare with than the per-item reward deadline."""


class VerifierError(RuntimeError):
  """math-verify raised while parsing or comparing a completion's answer.

  The completion is untrusted model text and scores nothing; raising (rather than returning 0)
  lets `RewardRunner` count the failure instead of hiding it. `untrusted_input` marks it as caused
  by the completion, not by the reward code or the data.
  """
  untrusted_input = True


_LOG10_2 = math.log10(2)
# Functions whose exact value grows like n·log10(n) digits in their (first) argument n.
_FACTORIAL_LIKE = (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma,
                   sympy.RisingFactorial, sympy.FallingFactorial)


def _int_digits(n: int) -> float:
  return abs(int(n)).bit_length() * _LOG10_2 + 1


def _log10_abs(node) -> float:
  """log10 |node| for a rational number (0 for |node| ≤ 1); symbols and others count as 1."""
  if isinstance(node, sympy.Rational):
    return sum(math.log10(abs(x)) for x in (int(node.p), int(node.q)) if abs(x) > 1)
  return _cost_digits(node)


def _abs_bound(node) -> float | None:
  """An upper bound on |node| for a symbol-free node (None when it holds symbols)."""
  if node.free_symbols:
    return None
  if isinstance(node, sympy.Rational):  # b^(p/q) grows like b^p at worst
    return float(abs(node.p)) if abs(int(node.p)).bit_length() < 1000 else math.inf
  cost = _cost_digits(node)
  if cost <= 50:  # small enough to evaluate numerically at no risk
    try:
      v = abs(complex(sympy.N(node, 15)))
      return v if math.isfinite(v) else math.inf
    except (TypeError, ValueError, ArithmeticError):
      pass
  return 10.0 ** cost if cost < 300 else math.inf


def _cost_digits(node) -> float:
  """An upper estimate of the decimal digits an exact evaluation of `node` can produce.

  A symbol counts as one digit, so x^{10^{11}} costs like a 10^{11}-digit number (expanding it
  would). Sums and products cost the sum of their parts, a power |exponent|·log10|base|, a
  factorial-like function n·log10 n.
  """
  if isinstance(node, sympy.MatrixBase):
    return sum(_cost_digits(x) for x in node)
  if not isinstance(node, sympy.Basic):
    return 1.0
  if node is sympy.nan or node is sympy.zoo:
    raise ValueError("is undefined (0/0 or a division by zero), not a finite value")
  if isinstance(node, sympy.Integer):
    return _int_digits(node)
  if isinstance(node, sympy.Rational):
    return _int_digits(node.p) + _int_digits(node.q)
  if isinstance(node, sympy.Float):  # evaluated in floating point: a bounded mantissa
    return 1.0 + abs(float(sympy.log(abs(node), 10))) if node else 1.0
  if isinstance(node, sympy.Pow):
    base, exp = node.args
    bound = _abs_bound(exp)
    if bound is None:
      return _cost_digits(base) + _cost_digits(exp)
    return _cost_digits(base) + _cost_digits(exp) + bound * _log10_abs(base)
  if isinstance(node, _FACTORIAL_LIKE + (sympy.binomial,)):
    n = _abs_bound(node.args[0])
    if n is not None:
      per = _LOG10_2 if isinstance(node, sympy.binomial) else math.log10(max(n, 2.0))
      return sum(_cost_digits(a) for a in node.args) + n * per
  return max(1.0, sum(_cost_digits(a) for a in node.args))


def check_reference_size(parsed, text: str) -> None:
  """Raises ValueError (ReferenceTooLarge when too large) for a reference that cannot be used.

  Inspects the parsed tree without evaluating it: an exponent, factorial argument or digit count
  whose exact value would have more than MAX_REFERENCE_DIGITS digits is refused.
  """
  for expr in parsed:
    try:
      cost = _cost_digits(expr)
    except ValueError as e:
      raise ValueError(f"reference answer {text[:80]!r} {e}; fix the dataset's answer") from None
    except RecursionError:
      cost = math.inf
    if not cost <= MAX_REFERENCE_DIGITS:
      raise ReferenceTooLarge(
          f"reference answer {text[:80]!r} has an exact value of about {cost:.3g} digits (limit "
          f"{MAX_REFERENCE_DIGITS} digits: an exponent, factorial argument or number this large "
          "makes every comparison run for minutes); drop the row or state the answer in a form "
          "that needs no evaluation")


@functools.lru_cache(maxsize=65536)
def parse_gold(answer: str, timeout_s: int | None = None) -> tuple:
  """math-verify parse of a reference answer; raises ValueError when it cannot be used.

  A reference that does not parse would score every completion 0 — a silent wrong reward — so
  it is an error here, as is one that is undefined (1/0) or too large to compare against
  (`ReferenceTooLarge`, see MAX_REFERENCE_DIGITS). Text without math delimiters ($, \\(, \\[,
  \\boxed) is parsed as LaTeX math: outside math mode math-verify reads "2\\pi" as its first
  number, 2. Cached: a group of n completions shares one reference.
  timeout_s: seconds for the whole parse, enforced in-process by `mixpo.rewards.deadline` (main
    thread only; elsewhere ignored). Dataset readers set it: a short pathological answer such
    as "x^x^...^2" keeps sympy busy for minutes. Reward workers leave it None (RewardRunner's
    deadline applies there).
  """
  text = str(answer).strip()
  parsed = []
  if timeout_s is not None and threading.current_thread() is not threading.main_thread():
    timeout_s = None
  if huge_exponent(text):
    raise ReferenceTooLarge(f"reference answer {text[:80]!r} has an exponent beyond "
                            f"±{_MAX_EXPONENT} (limit {MAX_REFERENCE_DIGITS} digits); drop the "
                            "row or state the answer in a form that needs no evaluation")
  if (why := grouping_problem(text)) is not None:
    raise ReferenceMisread(f"reference answer {why}; fix the dataset's answer")
  norm = normalize_numbers(text)
  if text:
    try:
      with deadline(timeout_s) if timeout_s is not None else contextlib.nullcontext():
        delimited = _DELIMITED.search(norm) is not None
        parsed = math_verify.parse(norm if delimited else f"${norm}$", parsing_timeout=None)
        if not parsed and not delimited and "\\" not in norm:
          parsed = math_verify.parse(norm, parsing_timeout=None)  # plain text: "The answer is 5"
    except DeadlineExceeded:
      raise ValueError(f"reference answer {text[:80]!r} took over {timeout_s} s to parse "
                       "(pathological LaTeX or a huge power tower?); simplify the dataset's "
                       "answer") from None
  # Only strings back means the LaTeX did not parse ("\\frac{" → ["\\frac{"]): every completion
  # would then be compared as text with the broken reference.
  if all(isinstance(x, str) for x in parsed):
    raise ValueError(f"reference answer {text[:80]!r} does not parse with math-verify; fix the "
                     "dataset's answer field or use a task-specific exact reward")
  check_reference_size(parsed, text)
  _check_number(parsed[0], text)
  return tuple(parsed)


def _check_number(value, text: str) -> None:
  """ReferenceMisread unless a plain-number reference parsed to exactly its number."""
  want = numeral_value(text)
  if want is None:
    return
  exact = sympy.Rational(str(want))
  if isinstance(value, sympy.Rational):
    ok = value == exact
  elif isinstance(value, sympy.Float):  # math-verify keeps some decimals as floats
    ok = abs(float(value) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
  else:
    ok = False
  if not ok:
    raise ReferenceMisread(f"reference answer {text[:80]!r} parses to {str(value)[:40]!r}, not "
                           f"the number {want} its text means; write it as {want}")


def probe_reference(answer: str, timeout_s: float) -> None:
  """Raises ReferenceTooSlow when comparing a plain wrong answer (\\boxed{0}) with the reference
  takes over `timeout_s` seconds: every completion would then time out (2^{\\sum_{k=1}^{10^{12}}
  1/k} parses fast, but sympy sums it to compare). Main thread only (the deadline is SIGALRM);
  elsewhere, and for plain numbers (always fast), it does nothing.
  """
  gold = parse_gold(str(answer))
  if (threading.current_thread() is not threading.main_thread()
      or isinstance(gold[0], sympy.Number)):
    return
  try:
    with deadline(timeout_s):
      math_verify.verify(list(gold), math_verify.parse("$0$", parsing_timeout=None),
                         timeout_seconds=None)
  except DeadlineExceeded:
    raise ReferenceTooSlow(
        f"reference answer {str(answer)[:80]!r}: comparing an answer with it takes over "
        f"{timeout_s} s (the per-item reward deadline), so every completion would time out; "
        "state the answer in evaluated form") from None


def _parse_pred(ans: str) -> list:
  if huge_exponent(ans) or grouping_problem(ans) is not None:
    return []  # no accepted reference is such a number, and "1 2" is not one
  ans = normalize_numbers(ans)
  parsed = math_verify.parse(f"\\boxed{{{ans}}}", parsing_timeout=None, raise_on_error=True)
  return parsed or math_verify.parse(ans, parsing_timeout=None, raise_on_error=True)


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
  Raises ValueError for a reference that cannot be used (see `parse_gold`) and VerifierError when
  math-verify fails on the completion's answer; a malformed or missing answer scores 0.
  """
  gold = parse_gold(str(answer))
  ans = extract_answer(completion)
  if ans is None or len(ans) > MAX_ANSWER_CHARS:
    return 0.0
  try:
    pred = _parse_pred(ans)
    if not pred:
      return 0.0
    if rel_tol is not None:
      g, p = _as_float(gold[0]), _as_float(pred[0])
      if g is not None and p is not None:
        return float(abs(p - g) <= rel_tol * max(abs(g), 1e-12))
    return float(math_verify.verify(list(gold), pred, timeout_seconds=None, raise_on_error=True))
  except Exception as e:  # noqa: BLE001 — any failure inside the verifier, reported by type
    # The message names the (short) answer text only: printing sympy objects can itself hang.
    raise VerifierError(f"math-verify failed on the answer {ans[:60]!r} ({type(e).__name__}: "
                        f"{str(e)[:100]}); the completion gets no reward") from None


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

  def prepare(self) -> None:
    """Called by RewardRunner before its guard is armed: see `warm_up`."""
    warm_up()

  def __call__(self, prompts, completions, **columns) -> list[float]:
    if self.answer_column not in columns:
      raise KeyError(f"math_answer reward needs the column {self.answer_column!r}; got columns "
                     f"{sorted(columns)}. Pass it as a keyword (RewardRunner(..)(p, c, answer=[..]))")
    answers = columns[self.answer_column]
    return [verify_answer(c, a, self.rel_tol) for c, a in zip(completions, answers, strict=True)]


math_answer_reward = MathAnswerReward()

# Modules math-verify reaches lazily whose import builds functions from text (dataclasses), so
# the sandbox's guard refuses them when first imported inside a reward call: an honest
# \int answer would score 0 as blocked. Found by importing every sympy module under the guard.
LAZY_IMPORTS = ("sympy.integrals.manualintegrate",)


def warm_up() -> None:
  """Imports LAZY_IMPORTS; run where no guard is armed (the reward workers' fork server,
  mixpo.rewards.worker_init, and `MathAnswerReward.prepare`)."""
  for name in LAZY_IMPORTS:
    importlib.import_module(name)


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
