"""Local JSONL / Parquet dataset readers with field mapping, chat templates and length filtering.

Field paths are dotted, with integer parts indexing lists: "prompt", "reward_model.ground_truth",
"target.0.content". Every bad row raises `DataError` naming file, line (JSONL, 1-based) or row
(Parquet, 0-based) and field, with the fix; with skip_bad_rows=True it is skipped and counted in
the returned `ReadSummary` instead — never turned into a silent wrong reward. A file that cannot
be read as a whole (not Parquet, not JSON Lines) raises DataError whatever skip_bad_rows says.

Numbers become exact decimal text, never exponent notation: math-verify reads "1e-07" as E − 7
(Euler's number). JSON numbers keep the digits they were written with; a binary float (a Parquet
double) is used only when its value is known exactly, see `number_text`.

Reference answers (`parse_reference`, also used for trace files) are checked as they are read:
they must parse with math-verify, within a deadline, to a value small enough to compare against;
a plain number must read as the number its text means (exponent forms and digit grouping: see
`mixpo.rewards.math_answer`; "1 2" or "1,00,000" are refused as "answer_misread"); and comparing
an answer with it must finish within the default per-item reward deadline ("answer_too_slow").
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import math
import os
import re
from typing import Any, Iterator

from mixpo.data import chat_render
from mixpo.data.tasks import Example
from mixpo.rewards.math_answer import (MAX_REFERENCE_DIGITS, ReferenceMisread, ReferenceTooLarge,
                                       ReferenceTooSlow, parse_gold, probe_reference)

# Seconds (whole) allowed to parse one reference answer; past it the row is bad ("answer_unparsable").
ANSWER_PARSE_TIMEOUT_S = 5
# Seconds allowed to compare an answer with a reference: the default per-item reward deadline
# (config.reward.timeout_s); a reference slower than that would time out every completion.
ANSWER_VERIFY_TIMEOUT_S = 5.0
# DataError reasons of the reference checks, by the ValueError subclass that parse_gold raised.
_ANSWER_REASONS = ((ReferenceTooLarge, "answer_too_large"), (ReferenceMisread, "answer_misread"),
                   (ReferenceTooSlow, "answer_too_slow"), (ValueError, "answer_unparsable"))

# Default cap on one JSONL line, in bytes: a real row (a prompt, an answer, a trace with per-token
# log-probs) is far smaller; without a cap a corrupt file with no newline is read into memory whole
# (bytes).
MAX_LINE_BYTES = 8 << 20

# Every integer up to 2**53 is a float64 exactly; above it a float stands for a range of integers.
_EXACT_FLOAT_INT = 2**53
# A decimal of at most 15 significant digits survives float64 and back (DBL_DIG): the float's
# shortest repr gives back exactly the written digits. Longer ones may not.
_FLOAT_DIGITS = 15
_EXACT = decimal.Context(prec=decimal.MAX_PREC)


# An exponent inside an exponent (10^{10^{10}}, x^x^x): sympy may evaluate such a tower to an
# astronomically large integer inside C code, where no signal-based deadline can interrupt it.
_EXPONENT_TOWER = re.compile(r"\^\s*(\{[^{}]*|\(?\w+\)?\s*)\^")


def parse_reference(answer: str) -> tuple:
  """`parse_gold` with the readers' deadline, then `probe_reference` within the per-item reward
  deadline, so one pathological answer can stall neither the read nor every reward against it.

  Reference answers holding an exponent tower are refused up front (ReferenceTooLarge): the
  deadline is a main-thread alarm, which C code never yields to. Raises ValueError (subclasses:
  see `answer_reason`).
  """
  if _EXPONENT_TOWER.search(answer):
    raise ReferenceTooLarge(f"reference answer {answer[:40]!r} holds an exponent tower "
                            "(a^{b^c}); refused rather than risk an uninterruptible evaluation "
                            "of its digits")
  gold = parse_gold(answer, ANSWER_PARSE_TIMEOUT_S)
  probe_reference(answer, ANSWER_VERIFY_TIMEOUT_S)
  return gold


def answer_reason(error: ValueError) -> str:
  """The DataError reason of a reference that `parse_reference` refused."""
  return next(r for cls, r in _ANSWER_REASONS if isinstance(error, cls))


class DataError(ValueError):
  """A dataset row that cannot be used; the message names file, line/row and field.

  `reason` is a short key ("missing_field", "not_utf8", ...) under which skips are counted.
  """

  def __init__(self, message: str, reason: str = "bad_row"):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class ReadSummary:
  """What a reader kept and dropped; `skipped` maps a reason to its count, `first` a sample message."""
  path: str
  rows: int = 0
  kept: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)
  first: dict = dataclasses.field(default_factory=dict)

  @property
  def too_long(self) -> int:
    return self.skipped.get("too_long", 0)

  @property
  def dropped(self) -> int:
    return sum(self.skipped.values())

  def as_dict(self) -> dict:
    """JSON-ready counts: {"path", "rows", "kept", "skipped": {reason: count}}."""
    return {"path": self.path, "rows": self.rows, "kept": self.kept, "skipped": dict(self.skipped)}

  def skip(self, error: "DataError") -> None:
    self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
    self.first.setdefault(error.reason, str(error))

  def __str__(self) -> str:
    parts = [f"{self.path}: {self.kept}/{self.rows} rows kept"]
    parts += [f"{n} skipped as {r} (first: {self.first[r]})" for r, n in self.skipped.items()]
    return "; ".join(parts)


class JsonNumber(float):
  """A JSON number with a fraction or exponent: a float that keeps the literal it was written as.

  Code that wants a float gets one; `number_text` uses `literal`, so "1e-7" becomes "0.0000001"
  and "1.50" stays "1.50" whatever binary rounding the float went through.
  """

  def __new__(cls, literal):
    self = super().__new__(cls, literal)
    self.literal = literal
    return self


def _loads(text: str):
  return json.loads(text, parse_float=JsonNumber)


def _check_json_lines(f, path: str, max_line_bytes: int) -> None:
  """Raises DataError when the file is one JSON document (an array, a pretty-printed object).

  Read line by line, a pretty-printed array keeps the odd complete line and drops the rest, with
  no sign that the file was never JSON Lines; refusing says what is wrong and how to convert.
  Arrays are not read as rows: JSON Lines streams, caps lines and names lines in errors. Checked
  on the file's first MiB (any size for an array that opens with a lone "[" line).
  """
  head = f.read(min(max_line_bytes, 1 << 20)).decode("utf-8", errors="replace").lstrip()
  f.seek(0)
  first = head.split("\n", 1)[0].strip()
  doc, spans_lines = None, False
  if head.startswith(("[", "{")):
    try:
      doc, end = json.JSONDecoder().raw_decode(head)
      spans_lines = "\n" in head[:end]
    except (ValueError, RecursionError):  # not one document, or cut off at the first MiB
      pass
  one_line_array = (isinstance(doc, list) and not spans_lines and doc
                    and all(isinstance(r, dict) for r in doc))
  if first == "[" or one_line_array or (isinstance(doc, list) and spans_lines):
    raise DataError(f"{path}: a JSON array, not JSON Lines (one JSON object per line); convert it "
                    f"with `jq -c '.[]' {path} > rows.jsonl`", "not_jsonl")
  if spans_lines:
    raise DataError(f"{path}: a JSON document spread over several lines, not JSON Lines (one "
                    f"JSON object per line); convert it with `jq -c . {path} > rows.jsonl`",
                    "not_jsonl")


def _iter_jsonl(path: str, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
  with open(path, "rb") as f:
    _check_json_lines(f, path, max_line_bytes)
    n = 0
    while raw := f.readline(max_line_bytes + 1):
      n += 1
      where = f"{path}:line {n}"
      if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
        while raw and not raw.endswith(b"\n"):  # skip the rest of the line, bounded memory
          raw = f.readline(1 << 20)
        yield where, DataError(f"{where}: the line is over max_line_bytes={max_line_bytes} bytes;"
                               " split the row, or raise max_line_bytes if rows this long are "
                               "intended", "line_too_long")
        continue
      if not raw.strip():
        continue
      try:
        row = _loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        yield where, DataError(f"{where}: not valid UTF-8 at byte {e.start}; re-encode the file "
                               "as UTF-8", "not_utf8")
        continue
      except json.JSONDecodeError as e:
        yield where, DataError(f"{where}: invalid JSON ({e.msg}); fix or remove the line",
                               "bad_json")
        continue
      except (RecursionError, ValueError) as e:  # nesting too deep, an integer of 4300+ digits
        yield where, DataError(f"{where}: JSON that Python cannot load ({type(e).__name__}: "
                               f"{str(e)[:100]}); fix or remove the line", "bad_json")
        continue
      yield where, row if isinstance(row, dict) else DataError(
          f"{where}: a row must be a JSON object, got {type(row).__name__}", "bad_json")


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  def unreadable(e, n):
    return DataError(f"{path}: not a readable Parquet file ({type(e).__name__} at row {n}: "
                     f"{str(e)[:200]}); the file is empty, truncated or corrupt: write or copy it "
                     "again", "bad_file")

  n = 0
  try:
    batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
  except (pa.ArrowException, OSError) as e:
    raise unreadable(e, n) from None
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except (pa.ArrowException, OSError) as e:
      raise unreadable(e, n) from None
    for row in batch.to_pylist():
      yield f"{path}:row {n}", row
      n += 1


def iter_rows(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, Any]]:
  """(location, row-or-DataError) over a .jsonl / .parquet file; location is "file:line N".

  A bad row comes back as a DataError in place of the row; a file that cannot be read as rows
  at all (an unreadable Parquet file, a JSON document that is not JSON Lines) raises DataError.
  JSON numbers with a fraction or exponent come back as `JsonNumber` (a float).
  """
  if path.endswith((".jsonl", ".json")):
    yield from _iter_jsonl(path, max_line_bytes)
  elif path.endswith(".parquet"):
    yield from _iter_parquet(path)
  else:
    raise DataError(f"{path}: unknown extension; use .jsonl or .parquet", "bad_file")


def get_field(row: dict, field: str, where: str) -> Any:
  """The value at a dotted field path; DataError naming the missing part otherwise."""
  cur: Any = row
  for part in field.split("."):
    if isinstance(cur, dict) and part in cur:
      cur = cur[part]
    elif isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
      cur = cur[int(part)]
    else:
      keys = sorted(cur)[:10] if isinstance(cur, dict) else type(cur).__name__
      raise DataError(f"{where}: field {field!r} is missing (no {part!r} in {keys}); fix the row or "
                      "point the field option at the right path", "missing_field")
  if cur is None:
    raise DataError(f"{where}: field {field!r} is null", "missing_field")
  return cur


def as_text(value: Any, field: str, where: str) -> str:
  """A non-empty string from a str / number, or the last assistant message of a chat list."""
  if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
    value = value[-1]["content"]
  if isinstance(value, bytes):
    raise DataError(f"{where}: field {field!r} holds bytes, not text; store it as a UTF-8 string", "not_utf8")
  if isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool):
    value = number_text(value, field, where)
  if not isinstance(value, str):
    raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__}", "bad_type")
  if not value.strip():
    raise DataError(f"{where}: field {field!r} is empty", "empty")
  return value


def number_text(value: int | float | decimal.Decimal, field: str, where: str) -> str:
  """Exact plain decimal text of a number ("0.0000001", never "1e-07"), or DataError.

  A JSON literal and an int or Decimal are exact. A binary float is exact only when it stands for
  one decimal: an integer up to 2**53, or a fraction whose shortest repr has at most 15
  significant digits; any other (an integer column stored as float64 above 2**53, the residue of
  float arithmetic such as 0.30000000000000004) is refused as "inexact_number".
  """
  store_as_text = "store the answer as a string (or an integer) column"
  if isinstance(value, JsonNumber):
    d = decimal.Decimal(value.literal)
  elif isinstance(value, (int, decimal.Decimal)):
    d = decimal.Decimal(value)
  elif not math.isfinite(value):
    raise DataError(f"{where}: field {field!r} is the non-finite number {value}", "bad_type")
  elif value.is_integer():
    if abs(value) > _EXACT_FLOAT_INT:
      raise DataError(f"{where}: field {field!r} is the float {value!r}, an integer above 2**53 "
                      f"that a float cannot hold exactly (which integer was meant is lost); "
                      f"{store_as_text}", "inexact_number")
    d = decimal.Decimal(int(value))
  else:
    d = decimal.Decimal(repr(value))
    # An explicit context: normalize() rounds to the thread's decimal precision, which other
    # code may have lowered (reasoning-gym's decimal_arithmetic sets it to 6..12 digits).
    if len(d.normalize(_EXACT).as_tuple().digits) > _FLOAT_DIGITS:
      raise DataError(f"{where}: field {field!r} is the float {value!r}, whose digits past the "
                      f"{_FLOAT_DIGITS}th are float rounding, not data; {store_as_text}",
                      "inexact_number")
  if not d.is_finite():
    raise DataError(f"{where}: field {field!r} is the non-finite number {value}", "bad_type")
  sign, digits, exp = d.as_tuple()
  length = len(digits) + exp if exp >= 0 else max(len(digits), -exp) + 1
  if length > MAX_REFERENCE_DIGITS:
    raise DataError(f"{where}: field {field!r} is a number of {length} digits written out (limit "
                    f"{MAX_REFERENCE_DIGITS} digits); store it in a bounded form as a string",
                    "number_too_long")
  return format(d, "f")


def render_prompt(value: Any, field: str, where: str, tokenizer=None, chat_template=False) -> str:
  """Prompt text; a chat list (or, with chat_template, a string as one user turn) is rendered
  with tokenizer.apply_chat_template(..., add_generation_prompt=True), bounded in time, memory
  and size (`chat_render.render`)."""
  is_chat = isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)
  if not chat_template:
    if is_chat:
      raise DataError(f"{where}: field {field!r} is a list of chat messages; pass chat_template=True"
                      " with a tokenizer that has a chat template, or map the field to a string",
                      "bad_type")
    return as_text(value, field, where)
  if tokenizer is None:
    raise ValueError("chat_template=True needs a tokenizer")
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"{where}: field {field!r} is to be rendered with a chat template, but the "
                     "policy's tokenizer has none (tokenizer_config.json 'chat_template'); use a "
                     "tokenizer with one, or turn chat rendering off (--config.guide.traces."
                     "chat_template=never for traces, chat_template=False for datasets)")
  msgs = value if is_chat else [{"role": "user", "content": as_text(value, field, where)}]
  if not msgs or not any(str(m.get("content", "")).strip() for m in msgs):
    raise DataError(f"{where}: field {field!r} is an empty conversation", "empty")
  return chat_render.render(tokenizer, msgs, where)


def check_prompt_length(tokenizer, prompt: str, limit: int, field: str, where: str) -> None:
  """DataError("too_long") when the prompt has more than `limit` tokens (special tokens count)."""
  n = len(tokenizer(prompt)["input_ids"])
  if n > limit:
    raise DataError(f"{where}: field {field!r} has {n} tokens > max_prompt_tokens={limit}; raise the"
                    " limit or pass skip_bad_rows=True to drop such rows", "too_long")


def read_examples(path: str, prompt_field: str = "prompt", answer_field: str = "answer",
                  tokenizer=None, chat_template: bool = False, max_prompt_tokens: int | None = None,
                  check_answers: bool = True, skip_bad_rows: bool = False,
                  max_line_bytes: int = MAX_LINE_BYTES) -> tuple[list[Example], ReadSummary]:
  """Reads a JSONL / Parquet dataset into Examples (metadata holds the row's source location).

  Args:
    prompt_field / answer_field: dotted field paths.
    tokenizer, chat_template: render chat prompts (see `render_prompt`).
    max_prompt_tokens: prompts longer than this (in tokens; needs tokenizer) are bad rows
      (reason "too_long"): with skip_bad_rows=True they are dropped and counted.
    check_answers: the answer must parse with math-verify (else every reward would be 0), be
      small enough to compare against (else "answer_too_large", see MAX_REFERENCE_DIGITS), read
      as the number its text means ("answer_misread") and compare within the per-item reward
      deadline ("answer_too_slow"); see `parse_reference`.
    skip_bad_rows: skip and count bad rows instead of raising DataError. File-level errors (an
      unreadable Parquet file, a JSON document that is not JSON Lines) raise regardless.
    max_line_bytes: a longer JSONL line is a bad row ("line_too_long").
  """
  if max_prompt_tokens is not None and tokenizer is None:
    raise ValueError("read_examples(max_prompt_tokens=...) needs a tokenizer to count tokens")
  if not os.path.exists(path):
    raise FileNotFoundError(f"read_examples: {path} does not exist")
  summary, out = ReadSummary(path), []
  for where, row in iter_rows(path, max_line_bytes):
    summary.rows += 1
    try:
      if isinstance(row, DataError):
        raise row
      prompt = render_prompt(get_field(row, prompt_field, where), prompt_field, where, tokenizer,
                             chat_template)
      answer = as_text(get_field(row, answer_field, where), answer_field, where).strip()
      if check_answers:
        try:
          parse_reference(answer)
        except ValueError as e:
          raise DataError(f"{where}: field {answer_field!r}: {e}", answer_reason(e)) from None
      if max_prompt_tokens is not None:
        check_prompt_length(tokenizer, prompt, max_prompt_tokens, prompt_field, where)
    except DataError as e:
      if not skip_bad_rows:
        raise
      summary.skip(e)
      continue
    out.append(Example(prompt=prompt, answer=answer, metadata={"source": where}))
    summary.kept += 1
  return out, summary
