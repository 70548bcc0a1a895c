"""Off-policy guide traces: LUFFY's parquet/jsonl format and mixpo's own jsonl.

mixpo jsonl, one object per line:
  {"prompt": str, "answer": str, "response": str,
   "response_tokens": [int] (optional), "guide_logp": [float] (optional, one per response token)}
LUFFY (e.g. openr1 parquet): "prompt" is a list of chat messages, the reference answer sits at
"reward_model.ground_truth" and the guide's response at "target" (a list of assistant messages).
Field paths are configurable for both. When log-probs are absent, `Trace.guide_logp` is None and
`has_guide_logp` is False: the trainer decides whether to score with a guide model or use πϕ ≡ 1.
"""

from __future__ import annotations

import dataclasses
import json
import math

from mixpo.data.readers import (DataError, ReadSummary, as_text, check_prompt_length, get_field,
                                iter_rows, parse_reference, render_prompt)

MIXPO_FIELDS = {"prompt": "prompt", "answer": "answer", "response": "response"}
LUFFY_FIELDS = {"prompt": "prompt", "answer": "reward_model.ground_truth", "response": "target"}


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


def _int_list(value, field, where):
  if not isinstance(value, list) or not all(isinstance(t, int) and t >= 0 for t in value):
    raise DataError(f"{where}: field {field!r} must be a list of non-negative token ids", "bad_type")
  return value


def _logp_list(value, n_tokens, where):
  if not isinstance(value, list) or not all(isinstance(x, (int, float)) for x in value):
    raise DataError(f"{where}: field 'guide_logp' must be a list of floats", "bad_type")
  if any(not math.isfinite(x) or x > 1e-6 for x in value):
    raise DataError(f"{where}: field 'guide_logp' holds a non-finite or positive log-prob; store "
                    "natural-log probabilities (<= 0)", "bad_logp")
  if n_tokens is None:
    raise DataError(f"{where}: field 'guide_logp' without 'response_tokens'; log-probs are per token"
                    " of a tokenization, so store the tokens too (or drop guide_logp)", "bad_logp")
  if len(value) != n_tokens:
    raise DataError(f"{where}: field 'guide_logp' has {len(value)} entries but 'response_tokens' "
                    f"has {n_tokens}; they must align one log-prob per token", "bad_logp")
  return [float(x) for x in value]


def read_traces(path: str, fmt: str = "mixpo", fields: dict | None = None, tokenizer=None,
                chat_template: bool = False, max_prompt_tokens: int | None = None,
                check_answers: bool = True, skip_bad_rows: bool = False,
                ) -> tuple[list[Trace], ReadSummary]:
  """Reads guide traces from .jsonl / .parquet.

  Args:
    fmt: "mixpo" or "luffy" — picks the default field paths (MIXPO_FIELDS / LUFFY_FIELDS).
    fields: overrides of the "prompt" / "answer" / "response" dotted field paths.
    Other args as in `mixpo.data.readers.read_examples`. A LUFFY chat-list prompt needs
    chat_template=True and a tokenizer with a chat template.
  """
  if fmt not in ("mixpo", "luffy"):
    raise ValueError(f"read_traces(fmt={fmt!r}): use 'mixpo' or 'luffy'")
  f = dict(MIXPO_FIELDS if fmt == "mixpo" else LUFFY_FIELDS, **(fields or {}))
  if max_prompt_tokens is not None and tokenizer is None:
    raise ValueError("read_traces(max_prompt_tokens=...) needs a tokenizer to count tokens")
  summary, out = ReadSummary(path), []
  for where, row in iter_rows(path):
    summary.rows += 1
    try:
      if isinstance(row, DataError):
        raise row
      prompt = render_prompt(get_field(row, f["prompt"], where), f["prompt"], where, tokenizer,
                             chat_template)
      answer = as_text(get_field(row, f["answer"], where), f["answer"], where).strip()
      response = as_text(get_field(row, f["response"], where), f["response"], where)
      if check_answers:
        try:
          parse_reference(answer)
        except ValueError as e:
          raise DataError(f"{where}: field {f['answer']!r}: {e}", "answer_unparsable") from None
      tokens = row.get("response_tokens")
      tokens = None if tokens is None else _int_list(tokens, "response_tokens", where)
      logp = row.get("guide_logp")
      logp = None if logp is None else _logp_list(logp, None if tokens is None else len(tokens), where)
      if max_prompt_tokens is not None:
        check_prompt_length(tokenizer, prompt, max_prompt_tokens, f["prompt"], where)
    except DataError as e:
      if not skip_bad_rows:
        raise
      summary.skip(e)
      continue
    out.append(Trace(prompt, answer, response, tokens, logp, source=where))
    summary.kept += 1
  return out, summary


def write_traces(path: str, traces) -> None:
  """Writes Traces as mixpo jsonl (optional fields omitted when None)."""
  with open(path, "w", encoding="utf-8") as fh:
    for t in traces:
      row = {"prompt": t.prompt, "answer": t.answer, "response": t.response}
      if t.response_tokens is not None:
        row["response_tokens"] = list(map(int, t.response_tokens))
      if t.guide_logp is not None:
        row["guide_logp"] = [float(x) for x in t.guide_logp]
      fh.write(json.dumps(row, ensure_ascii=False) + "\n")
