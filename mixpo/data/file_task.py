"""A task over local dataset files (JSONL / Parquet): real prompts, math-verify rewards.

`get_task("file", train_path=..., eval_path=..., prompt_field=..., answer_field=...,
tokenizer=..., chat_template=True, max_prompt_tokens=...)` reads the rows once (bad rows skipped,
counted by reason in `data_summary()` and logged as a WARNING), then serves the same `Task`
interface as the procedural tasks: train example i of seed s is row perm_s[i mod N] of a seeded
permutation (epochs reshuffle), so a resumed run continues from one integer. Without `eval_path`,
a hashed `eval_fraction` of rows is held out.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from mixpo.data.readers import MAX_LINE_BYTES, DataError, ReadSummary, read_examples
from mixpo.data.schemas import dataset_fields
from mixpo.data.tasks import (EVAL_SEED, Example, GeneratedTask, check_split, derive_seed,
                              register_task, split_of)
from mixpo.rewards.math_answer import math_answer_reward


def _log_summary(summary: ReadSummary) -> None:
  """INFO when every row was kept; a WARNING with the counts by reason when some were dropped."""
  if not summary.dropped:
    logging.info("%s", summary)
    return
  counts = ", ".join(f"{r}: {n}" for r, n in sorted(summary.skipped.items()))
  logging.warning("%s: dropped %d of %d rows (%s); first of each: %s. Fix the rows, or pass "
                  "skip_bad_rows=False to stop at the first one", summary.path, summary.dropped,
                  summary.rows, counts, "; ".join(summary.first.values()))


class FileTask(GeneratedTask):
  """Args as in `mixpo.data.readers.read_examples`, plus eval_path / eval_fraction (the held-out
  split), eval_prompt_field / eval_answer_field (the eval file's fields when they differ; "" =
  the train file's), max_line_bytes (the JSONL line cap) and schema (mixpo.data.schemas: "verl"
  reads a verl parquet as it is). No usable train row, or an empty eval split, is a DataError
  (reason "no_rows") naming the file and what was dropped: a run never evaluates on nothing."""

  def __init__(self, train_path: str, eval_path: str = "", prompt_field: str | None = None,
               answer_field: str | None = None, tokenizer=None, chat_template: bool | None = None,
               max_prompt_tokens: int | None = None, eval_fraction: float = 0.05,
               skip_bad_rows: bool = True, max_line_bytes: int = MAX_LINE_BYTES,
               schema: str = "plain", eval_prompt_field: str = "", eval_answer_field: str = ""):
    prompt_field, answer_field, chat_template = dataset_fields(schema, prompt_field, answer_field,
                                                               chat_template)
    read = lambda p, pf, af: read_examples(p, pf, af, tokenizer=tokenizer,
                                           chat_template=chat_template,
                                           max_prompt_tokens=max_prompt_tokens,
                                           skip_bad_rows=skip_bad_rows,
                                           max_line_bytes=max_line_bytes)
    rows, self.summary = read(train_path, prompt_field, answer_field)
    _log_summary(self.summary)
    self.eval_summary = None
    if eval_path:
      self._eval, self.eval_summary = read(eval_path, eval_prompt_field or prompt_field,
                                           eval_answer_field or answer_field)
      _log_summary(self.eval_summary)
      self._train = rows
      if not self._eval:
        raise DataError(f"no usable eval rows in {eval_path} ({self.eval_summary})", "no_rows")
    else:
      self._train = [e for e in rows if split_of(e.prompt, eval_fraction) == "train"]
      self._eval = [e for e in rows if split_of(e.prompt, eval_fraction) == "eval"]
    if not self._train:
      raise DataError(f"no usable train rows in {train_path} ({self.summary})", "no_rows")
    self.name = f"file:{train_path}"
    self.reward_fn = math_answer_reward

  def data_summary(self) -> dict:
    """What the reads kept and dropped, JSON-ready (for a run's summary.json):
    {"train": {"path", "rows", "kept", "skipped": {reason: count}}, "eval": {...} or None}."""
    return {"train": self.summary.as_dict(),
            "eval": self.eval_summary.as_dict() if self.eval_summary else None}

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    check_split(split, f"{self.name}.example")
    rows = self._train if split == "train" else self._eval
    if not rows:
      raise ValueError(f"{self.name}: the {split} split is empty; pass eval_path or raise "
                       "eval_fraction")
    epoch, i = divmod(index, len(rows))
    perm = np.random.default_rng(derive_seed(self.name, seed, epoch)).permutation(len(rows))
    return rows[perm[i]]

  def eval_examples(self, n: int) -> list[Example]:
    return self.examples("eval", min(n, len(self._eval)), seed=EVAL_SEED)


register_task("file", FileTask)
