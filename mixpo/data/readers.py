"""Local JSONL / Parquet dataset readers with field mapping, chat templates and length filtering.

Field paths are dotted, with integer parts indexing lists: "prompt", "reward_model.ground_truth",
"target.0.content". Every bad row raises `DataError` naming file, line (JSONL, 1-based) or row
(Parquet, 0-based) and field, with the fix; with skip_bad_rows=True it is skipped and counted in
the returned `ReadSummary` instead — never turned into a silent wrong reward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator

from mixpo.data.tasks import Example
from mixpo.rewards.math_answer import parse_gold

# Seconds (whole) allowed to parse one reference answer; past it the row is bad ("answer_unparsable").
ANSWER_PARSE_TIMEOUT_S = 5


# An exponent inside an exponent (10^{10^{10}}, x^x^x): sympy may evaluate such a tower to an
# astronomically large integer inside C code, where no signal-based deadline can interrupt it.
_EXPONENT_TOWER = re.compile(r"\^\s*(\{[^{}]*|\(?\w+\)?\s*)\^")


def parse_reference(answer: str) -> tuple:
  """`parse_gold` with the readers' deadline, so one pathological answer cannot stall a read.

  Reference answers holding an exponent tower are refused up front (ValueError → the row is
  "answer_unparsable"): the deadline is a main-thread alarm, which C code never yields to.
  """
  if _EXPONENT_TOWER.search(answer):
    raise ValueError(f"reference answer {answer[:40]!r} holds an exponent tower (a^{{b^c}}); "
                     "refused rather than risk an uninterruptible evaluation")
  return parse_gold(answer, ANSWER_PARSE_TIMEOUT_S)


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

  def skip(self, error: "DataError") -> None:
    self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
    self.first.setdefault(error.reason, str(error))

  def __str__(self) -> str:
    parts = [f"{self.path}: {self.kept}/{self.rows} rows kept"]
    parts += [f"{n} skipped as {r} (first: {self.first[r]})" for r, n in self.skipped.items()]
    return "; ".join(parts)


def iter_rows(path: str) -> Iterator[tuple[str, Any]]:
  """(location, row-or-DataError) over a .jsonl / .parquet file; location is "file:line N"."""
  if path.endswith((".jsonl", ".json")):
    with open(path, "rb") as f:
      for n, raw in enumerate(f, start=1):
        where = f"{path}:line {n}"
        if not raw.strip():
          continue
        try:
          row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
          yield where, DataError(f"{where}: not valid UTF-8 at byte {e.start}; re-encode the file "
                                 "as UTF-8", "not_utf8")
          continue
        except json.JSONDecodeError as e:
          yield where, DataError(f"{where}: invalid JSON ({e.msg}); fix or remove the line", "bad_json")
          continue
        except (RecursionError, ValueError) as e:  # nesting too deep, an integer of 4300+ digits
          yield where, DataError(f"{where}: JSON that Python cannot load ({type(e).__name__}: "
                                 f"{str(e)[:100]}); fix or remove the line", "bad_json")
          continue
        yield where, row if isinstance(row, dict) else DataError(
            f"{where}: a row must be a JSON object, got {type(row).__name__}", "bad_json")
  elif path.endswith(".parquet"):
    import pyarrow.parquet as pq
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
      for row in batch.to_pylist():
        yield f"{path}:row {n}", row
        n += 1
  else:
    raise DataError(f"{path}: unknown extension; use .jsonl or .parquet")


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
  if isinstance(value, float) and not math.isfinite(value):
    raise DataError(f"{where}: field {field!r} is the non-finite number {value}", "bad_type")
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__}", "bad_type")
  if not value.strip():
    raise DataError(f"{where}: field {field!r} is empty", "empty")
  return value


def render_prompt(value: Any, field: str, where: str, tokenizer=None, chat_template=False) -> str:
  """Prompt text; a chat list (or, with chat_template, a string as one user turn) is rendered
  with tokenizer.apply_chat_template(..., add_generation_prompt=True)."""
  is_chat = isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)
  if not chat_template:
    if is_chat:
      raise DataError(f"{where}: field {field!r} is a list of chat messages; pass chat_template=True"
                      " with a tokenizer that has a chat template, or map the field to a string",
                      "bad_type")
    return as_text(value, field, where)
  if tokenizer is None:
    raise ValueError("chat_template=True needs a tokenizer")
  msgs = value if is_chat else [{"role": "user", "content": as_text(value, field, where)}]
  if not msgs or not any(str(m.get("content", "")).strip() for m in msgs):
    raise DataError(f"{where}: field {field!r} is an empty conversation", "empty")
  return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def check_prompt_length(tokenizer, prompt: str, limit: int, field: str, where: str) -> None:
  """DataError("too_long") when the prompt has more than `limit` tokens (special tokens count)."""
  n = len(tokenizer(prompt)["input_ids"])
  if n > limit:
    raise DataError(f"{where}: field {field!r} has {n} tokens > max_prompt_tokens={limit}; raise the"
                    " limit or pass skip_bad_rows=True to drop such rows", "too_long")


def read_examples(path: str, prompt_field: str = "prompt", answer_field: str = "answer",
                  tokenizer=None, chat_template: bool = False, max_prompt_tokens: int | None = None,
                  check_answers: bool = True, skip_bad_rows: bool = False,
                  ) -> tuple[list[Example], ReadSummary]:
  """Reads a JSONL / Parquet dataset into Examples (metadata holds the row's source location).

  Args:
    prompt_field / answer_field: dotted field paths.
    tokenizer, chat_template: render chat prompts (see `render_prompt`).
    max_prompt_tokens: prompts longer than this (in tokens; needs tokenizer) are bad rows
      (reason "too_long"): with skip_bad_rows=True they are dropped and counted.
    check_answers: the answer must parse with math-verify (else every reward would be 0).
    skip_bad_rows: skip and count bad rows instead of raising DataError.
  """
  if max_prompt_tokens is not None and tokenizer is None:
    raise ValueError("read_examples(max_prompt_tokens=...) needs a tokenizer to count tokens")
  if not os.path.exists(path):
    raise FileNotFoundError(f"read_examples: {path} does not exist")
  summary, out = ReadSummary(path), []
  for where, row in iter_rows(path):
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
          raise DataError(f"{where}: field {answer_field!r}: {e}", "answer_unparsable") from None
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
