"""Off-policy guide traces: files of guide responses, in the formats people already have.

A trace file is a dataset whose rows also hold one or more responses of a guide model. Formats
(`TRACE_FORMATS`: the default dotted field path of each key; `fields=` overrides any of them, ""
means "this format has no such field"):

  mixpo   what experiments/make_traces.py writes (.jsonl or .parquet), one object per prompt:
            {"prompt": str, "answer": str, "responses": [str], "correct": [bool],
             "response_tokens": [[int]], "guide_logp": [[float]], "tokenizer": str,
             "logp_temperature": float}
          Rows with one "response" (str; "response_tokens" / "guide_logp" then flat lists,
          "correct" a bool) are read as well.
  verl    verl / LUFFY parquet: "prompt" is a chat list (system messages kept), the reference
          answer is "reward_model.ground_truth", the guide's response LUFFY's "target"
          ([{"role": "assistant", "content": str}]) or several in "target_lst"; "data_source"
          and "extra_info" are kept as metadata.
  openr1  OpenR1-Math: "problem", "answer", "generations" [str], "correctness_math_verify" [bool].

When a row has the list field ("responses" key) it is used, else the single one ("response").
Per-token guide log-probs ("logp") are per token of one tokenization, so they need the tokens
("tokens") next to them and the fingerprint of the tokenizer that made them ("tokenizer",
`tokenizer_fingerprint`); `mixpo.guide_source` refuses them under another tokenizer.

`read_trace_prompts` returns prompt groups (rows with the same prompt and answer merged, in order
of first appearance): the form the RL loop reads. `read_traces` returns one flat `Trace` per
response. Every bad row raises `DataError` naming file, line / row and field, or is skipped and
counted with skip_bad_rows=True.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import numpy as np

from mixpo.data.readers import (DataError, ReadSummary, answer_reason, as_text,
                                check_prompt_length, get_field, iter_rows, parse_reference,
                                render_prompt)

_FLOAT32_LOWEST = float(np.finfo(np.float32).min)  # Finite in float32 down to here.
FIELD_KEYS = ("prompt", "answer", "response", "responses", "correct", "tokens", "logp",
              "tokenizer", "logp_temperature", "data_source", "extra_info")
TRACE_FORMATS = {
    "mixpo": {"prompt": "prompt", "answer": "answer", "response": "response",
              "responses": "responses", "correct": "correct", "tokens": "response_tokens",
              "logp": "guide_logp", "tokenizer": "tokenizer",
              "logp_temperature": "logp_temperature", "data_source": "", "extra_info": ""},
    "verl": {"prompt": "prompt", "answer": "reward_model.ground_truth", "response": "target",
             "responses": "target_lst", "correct": "", "tokens": "", "logp": "", "tokenizer": "",
             "logp_temperature": "", "data_source": "data_source", "extra_info": "extra_info"},
    "openr1": {"prompt": "problem", "answer": "answer", "response": "",
               "responses": "generations", "correct": "correctness_math_verify", "tokens": "",
               "logp": "", "tokenizer": "", "logp_temperature": "", "data_source": "",
               "extra_info": ""},
}
FORMAT_ALIASES = {"luffy": "verl"}
CHAT_ROLES = ("system", "user", "assistant")
# Kept for callers of the one-response API (field paths of "prompt" / "answer" / "response").
MIXPO_FIELDS = {k: TRACE_FORMATS["mixpo"][k] for k in ("prompt", "answer", "response")}
LUFFY_FIELDS = {k: TRACE_FORMATS["verl"][k] for k in ("prompt", "answer", "response")}


def tokenizer_fingerprint(tokenizer) -> str:
  """16 hex digits identifying how `tokenizer` maps text to ids (vocabulary, merges, specials).

  Stored next to per-token log-probs: the same text under another tokenizer is another token
  sequence, so such log-probs are meaningless there. Padding / truncation settings are left out
  (calls may change them); the EOS id is in (the trainer appends it to every response).
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    spec = json.loads(backend.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
  else:
    spec = sorted(tokenizer.get_vocab().items())
  text = json.dumps([spec, tokenizer.eos_token_id], sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class TraceResponse:
  """One guide response. tokens / logp: the stored tokenization and its per-token natural-log
  probabilities (same length, EOS included), or None; correct: the file's correctness mark."""
  text: str
  source: str = ""  # "file:line N" / "file:row N" of the row it came from.
  tokens: list[int] | None = None
  logp: list[float] | None = None
  correct: bool | None = None
  tokenizer: str | None = None  # `tokenizer_fingerprint` of the tokenizer behind tokens / logp.
  logp_temperature: float | None = None  # softmax temperature the log-probs were scored at.


@dataclasses.dataclass
class TracePrompt:
  """A prompt group of a trace file: the rendered prompt, its reference answer, its responses."""
  prompt: str
  answer: str
  responses: list[TraceResponse]
  source: str = ""  # location of the first row of the group.
  data_source: str = ""
  extra_info: Any = None


@dataclasses.dataclass
class Trace:
  """One guide sample. guide_logp: per response token (len == len(response_tokens)) or None."""
  prompt: str
  answer: str
  response: str
  response_tokens: list[int] | None = None
  guide_logp: list[float] | None = None
  source: str = ""

  @property
  def has_guide_logp(self) -> bool:
    return self.guide_logp is not None


@dataclasses.dataclass
class TraceSummary(ReadSummary):
  """ReadSummary (rows read / kept / skipped by reason) plus prompt groups and responses."""
  fmt: str = ""
  prompts: int = 0
  responses: int = 0

  def __str__(self) -> str:
    return (f"{super().__str__()}; format {self.fmt}: {self.prompts} prompts, "
            f"{self.responses} responses")


def resolve_fields(fmt: str, fields: dict | None = None) -> dict:
  """The field paths of `fmt` ("mixpo" | "verl" | "openr1"; "luffy" = "verl") with overrides."""
  fmt = FORMAT_ALIASES.get(fmt, fmt)
  if fmt not in TRACE_FORMATS:
    raise ValueError(f"trace format {fmt!r}: use one of {sorted(TRACE_FORMATS)} or 'auto'")
  unknown = sorted(set(fields or {}) - set(FIELD_KEYS))
  if unknown:
    raise ValueError(f"trace fields {unknown}: unknown keys; the keys are {list(FIELD_KEYS)}")
  f = dict(TRACE_FORMATS[fmt], **(fields or {}))
  if not (f["prompt"] and f["answer"] and (f["response"] or f["responses"])):
    raise ValueError(f"trace fields {f}: 'prompt', 'answer' and one of 'response' / 'responses' "
                     "must name a field")
  return f


def detect_format(row: dict) -> str:
  """The format a row looks like: OpenR1's "generations", verl's "reward_model", else mixpo."""
  if "generations" in row and "problem" in row:
    return "openr1"
  if "reward_model" in row or "target" in row or "target_lst" in row:
    return "verl"
  return "mixpo"


def _optional(row: dict, field: str, where: str):
  """The value at `field`, or None when the format has no such field or the row lacks it."""
  if not field:
    return None
  try:
    return get_field(row, field, where)
  except DataError:
    return None


def _check_text(value: str, field: str, where: str) -> str:
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:  # lone surrogates, e.g. from a JSON "\ud800" escape.
    raise DataError(f"{where}: field {field!r} is not valid UTF-8 text (character {e.start}); "
                    "re-encode the file as UTF-8", "not_utf8") from None
  return value


def _check_chat(messages: list, field: str, where: str, roles=CHAT_ROLES) -> None:
  if not messages:
    raise DataError(f"{where}: field {field!r} is an empty conversation", "empty")
  for i, msg in enumerate(messages):
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
      raise DataError(f"{where}: field {field!r} message {i} must be an object with 'role' and "
                      "'content'", "bad_chat")
    if msg["role"] not in roles:
      raise DataError(f"{where}: field {field!r} message {i} has role {msg['role']!r}; expected "
                      f"one of {list(roles)}", "bad_chat")
    if not isinstance(msg["content"], str):
      raise DataError(f"{where}: field {field!r} message {i} content must be text, got "
                      f"{type(msg['content']).__name__}", "bad_type")
    _check_text(msg["content"], f"{field}.{i}.content", where)


def _prompt(value, field: str, where: str, tokenizer, chat_template: bool | None) -> str:
  """Prompt text: a chat list is checked (roles, last turn the user's) and rendered with the
  tokenizer's chat template; a string is used as it is, or as one user turn with chat_template."""
  if isinstance(value, list):
    _check_chat(value, field, where)
    if value[-1]["role"] != "user":
      raise DataError(f"{where}: field {field!r} ends with a {value[-1]['role']!r} message; a "
                      "prompt ends with the user's turn", "bad_chat")
    if chat_template is False:
      raise DataError(f"{where}: field {field!r} is a list of chat messages; pass chat_template="
                      "True (or None) with a tokenizer that has a chat template, or map the field "
                      "to a string", "bad_type")
    if tokenizer is None:
      raise ValueError(f"{where}: field {field!r} is a chat list: rendering it needs a tokenizer")
    return render_prompt(value, field, where, tokenizer, chat_template=True)
  if isinstance(value, str):
    _check_text(value, field, where)
  return render_prompt(value, field, where, tokenizer, chat_template=bool(chat_template))


def _response(value, field: str, where: str) -> str:
  """A response's text: a non-empty string, or an assistant message / list of them (LUFFY)."""
  if isinstance(value, dict):
    value = [value]
  if isinstance(value, list):
    _check_chat(value, field, where, roles=("assistant",))
    value = value[-1]["content"]
  if isinstance(value, bytes):
    raise DataError(f"{where}: field {field!r} holds bytes, not text; store it as a UTF-8 string",
                    "not_utf8")
  if not isinstance(value, str):
    raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__}",
                    "bad_type")
  if not value.strip():
    raise DataError(f"{where}: field {field!r} is an empty response", "empty")
  return _check_text(value, field, where)


def _int_list(value, field, where):
  if not isinstance(value, list) or not all(
      isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
    raise DataError(f"{where}: field {field!r} must be a list of non-negative token ids", "bad_type")
  return value


def _logp_list(value, n_tokens, where, field="guide_logp", tokens_field="response_tokens"):
  if not isinstance(value, list) or not all(
      isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
    raise DataError(f"{where}: field {field!r} must be a list of floats", "bad_type")
  for i, x in enumerate(value):
    # Range-checked as the float32 the trainer computes in: below -3.4e38 a finite float64
    # becomes -inf there, and the ratios NaN.
    if not math.isfinite(x) or x > 1e-6 or not x >= _FLOAT32_LOWEST:
      raise DataError(f"{where}: field {field!r} holds a non-finite or positive log-prob at "
                      f"entry {i} ({x!r}); store natural-log probabilities <= 0 that are finite "
                      f"in float32 (>= {_FLOAT32_LOWEST:.7g})", "bad_logp")
  if n_tokens is None:
    raise DataError(f"{where}: field {field!r} without {tokens_field!r}; log-probs are per token of"
                    " a tokenization, so store the tokens too (or drop the log-probs)", "bad_logp")
  if len(value) != n_tokens:
    raise DataError(f"{where}: field {field!r} has {len(value)} entries but {tokens_field!r} "
                    f"has {n_tokens}; they must align one log-prob per token", "bad_logp")
  return [float(x) for x in value]


def _per_response(value, k: int, multi: bool, field: str, where: str) -> list:
  """A per-response field as a list of k entries: a list of k in list rows, one value otherwise."""
  if value is None:
    return [None] * k
  if not multi:
    return [value]
  if not isinstance(value, list) or len(value) != k:
    n = len(value) if isinstance(value, list) else type(value).__name__
    raise DataError(f"{where}: field {field!r} must hold one entry per response ({k}), got {n}",
                    "bad_type")
  return value


def parse_row(row: dict, where: str, f: dict, tokenizer=None, chat_template: bool | None = None,
              max_prompt_tokens: int | None = None, check_answers: bool = True) -> TracePrompt:
  """One trace row as a TracePrompt (DataError naming `where` and the field when it is bad)."""
  prompt = _prompt(get_field(row, f["prompt"], where), f["prompt"], where, tokenizer,
                   chat_template)
  answer = as_text(get_field(row, f["answer"], where), f["answer"], where).strip()
  if check_answers:
    try:
      parse_reference(answer)
    except ValueError as e:
      raise DataError(f"{where}: field {f['answer']!r}: {e}", answer_reason(e)) from None
  multi_value = _optional(row, f["responses"], where)
  if multi_value is not None:
    field, multi = f["responses"], True
    if not isinstance(multi_value, list):
      raise DataError(f"{where}: field {field!r} must be a list of responses, got "
                      f"{type(multi_value).__name__}", "bad_type")
    if not multi_value:
      raise DataError(f"{where}: field {field!r} is an empty list of responses", "empty")
    texts = [_response(v, f"{field}.{i}", where) for i, v in enumerate(multi_value)]
  elif f["response"] and _optional(row, f["response"], where) is not None:
    field, multi = f["response"], False
    texts = [_response(get_field(row, field, where), field, where)]
  else:
    names = " or ".join(repr(x) for x in (f["responses"], f["response"]) if x)
    raise DataError(f"{where}: no response: field {names} is missing or null; a trace row needs "
                    "the guide's response (or map the field option to where it is)",
                    "missing_field")
  k = len(texts)
  tok_field, logp_field = f["tokens"], f["logp"]
  tokens = _per_response(_optional(row, tok_field, where), k, multi, tok_field, where)
  logps = _per_response(_optional(row, logp_field, where), k, multi, logp_field, where)
  correct = _per_response(_optional(row, f["correct"], where), k, multi, f["correct"], where)
  fingerprint = _optional(row, f["tokenizer"], where)
  temperature = _optional(row, f["logp_temperature"], where)
  if fingerprint is not None and not isinstance(fingerprint, str):
    raise DataError(f"{where}: field {f['tokenizer']!r} must be a string fingerprint", "bad_type")
  if temperature is not None and (not isinstance(temperature, (int, float))
                                  or isinstance(temperature, bool) or not temperature >= 0):
    raise DataError(f"{where}: field {f['logp_temperature']!r} must be a number >= 0", "bad_type")
  responses = []
  for i in range(k):
    suffix = f".{i}" if multi else ""
    toks = None if tokens[i] is None else _int_list(tokens[i], tok_field + suffix, where)
    logp = None if logps[i] is None else _logp_list(
        logps[i], None if toks is None else len(toks), where, logp_field + suffix,
        tok_field + suffix)
    if correct[i] is not None and not isinstance(correct[i], bool):
      raise DataError(f"{where}: field {f['correct'] + suffix!r} must be true / false, got "
                      f"{correct[i]!r}", "bad_type")
    responses.append(TraceResponse(texts[i], where, toks, logp, correct[i], fingerprint,
                                   None if temperature is None else float(temperature)))
  if max_prompt_tokens is not None:
    check_prompt_length(tokenizer, prompt, max_prompt_tokens, f["prompt"], where)
  data_source = _optional(row, f["data_source"], where)
  return TracePrompt(prompt, answer, responses, where,
                     "" if data_source is None else str(data_source),
                     _optional(row, f["extra_info"], where))


def _iter_parsed(path, fmt, fields, tokenizer, chat_template, max_prompt_tokens, check_answers,
                 skip_bad_rows, summary):
  if max_prompt_tokens is not None and tokenizer is None:
    raise ValueError("reading traces with max_prompt_tokens=... needs a tokenizer to count tokens")
  f = None if fmt == "auto" else resolve_fields(fmt, fields)
  summary.fmt = "" if f is None else FORMAT_ALIASES.get(fmt, fmt)
  for where, row in iter_rows(path):
    summary.rows += 1
    try:
      if isinstance(row, DataError):
        raise row
      if f is None:  # "auto": the first readable row decides for the whole file.
        summary.fmt = detect_format(row)
        f = resolve_fields(summary.fmt, fields)
      yield parse_row(row, where, f, tokenizer, chat_template, max_prompt_tokens, check_answers)
    except DataError as e:
      if not skip_bad_rows:
        raise
      summary.skip(e)
      continue
    summary.kept += 1


def read_trace_prompts(path: str, fmt: str = "auto", fields: dict | None = None, tokenizer=None,
                       chat_template: bool | None = None, max_prompt_tokens: int | None = None,
                       check_answers: bool = True, skip_bad_rows: bool = False,
                       ) -> tuple[list[TracePrompt], TraceSummary]:
  """Reads a trace file (.jsonl / .parquet) into prompt groups.

  Args:
    fmt: "mixpo", "verl" (alias "luffy"), "openr1", or "auto" (detected from the first row).
    fields: overrides of the format's field paths (keys `FIELD_KEYS`).
    tokenizer: renders chat-list prompts (apply_chat_template) and counts prompt tokens.
    chat_template: None = chat lists rendered, strings kept; True = strings become one user turn;
      False = chat lists refused.
    max_prompt_tokens: longer prompts (tokens, specials included) are bad rows ("too_long").
    check_answers: the reference answer must parse with math-verify.
    skip_bad_rows: skip and count bad rows (summary.skipped) instead of raising DataError.
  Returns:
    (groups in order of first appearance, summary).
  """
  summary = TraceSummary(path)
  groups: dict[tuple[str, str], TracePrompt] = {}
  for tp in _iter_parsed(path, fmt, fields, tokenizer, chat_template, max_prompt_tokens,
                         check_answers, skip_bad_rows, summary):
    key = (tp.prompt, tp.answer)
    if key in groups:
      groups[key].responses.extend(tp.responses)
    else:
      groups[key] = tp
  out = list(groups.values())
  summary.prompts, summary.responses = len(out), sum(len(g.responses) for g in out)
  return out, summary


def read_traces(path: str, fmt: str = "mixpo", fields: dict | None = None, tokenizer=None,
                chat_template: bool = False, max_prompt_tokens: int | None = None,
                check_answers: bool = True, skip_bad_rows: bool = False,
                ) -> tuple[list[Trace], ReadSummary]:
  """Reads a trace file as one flat `Trace` per response, in file order.

  Args as `read_trace_prompts` ("prompt" / "answer" / "response" in `fields` keep their meaning);
  a chat-list prompt needs chat_template=True. summary.kept counts the Traces returned.
  """
  summary = TraceSummary(path)
  out = []
  for tp in _iter_parsed(path, fmt, fields, tokenizer, chat_template, max_prompt_tokens,
                         check_answers, skip_bad_rows, summary):
    out += [Trace(tp.prompt, tp.answer, r.text, r.tokens, r.logp, source=r.source)
            for r in tp.responses]
  summary.kept = summary.responses = len(out)
  summary.prompts = len({(t.prompt, t.answer) for t in out})
  return out, summary


def write_traces(path: str, traces) -> None:
  """Writes Traces as mixpo jsonl, one response per line (optional fields omitted when None)."""
  with open(path, "w", encoding="utf-8") as fh:
    for t in traces:
      row = {"prompt": t.prompt, "answer": t.answer, "response": t.response}
      if t.response_tokens is not None:
        row["response_tokens"] = list(map(int, t.response_tokens))
      if t.guide_logp is not None:
        row["guide_logp"] = [float(x) for x in t.guide_logp]
      fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_trace_prompts(path: str, prompts: list[TracePrompt]) -> None:
  """Writes prompt groups as mixpo jsonl, one line per prompt (the loop's input format).

  Tokens, log-probs, correctness, fingerprint and temperature are written when every response of
  the group has them (one row holds one fingerprint / temperature).
  """
  with open(path, "w", encoding="utf-8") as fh:
    for tp in prompts:
      rs = tp.responses
      row = {"prompt": tp.prompt, "answer": tp.answer, "responses": [r.text for r in rs]}
      if all(r.correct is not None for r in rs):
        row["correct"] = [bool(r.correct) for r in rs]
      if all(r.tokens is not None for r in rs):
        row["response_tokens"] = [list(map(int, r.tokens)) for r in rs]
      if all(r.logp is not None for r in rs):
        row["guide_logp"] = [[float(x) for x in r.logp] for r in rs]
      for key, attr in (("tokenizer", "tokenizer"), ("logp_temperature", "logp_temperature")):
        values = {getattr(r, attr) for r in rs}
        if len(values) > 1:
          raise ValueError(f"write_trace_prompts: prompt {tp.prompt[:40]!r} mixes responses with "
                           f"different {attr} values {sorted(map(str, values))}")
        if values != {None}:
          row[key] = values.pop()
      fh.write(json.dumps(row, ensure_ascii=False) + "\n")
