"""A task over local dataset files (JSONL / Parquet): real prompts, math-verify rewards.

`get_task("file", train_path=..., eval_path=..., prompt_field=..., answer_field=...,
tokenizer=..., chat_template=True, max_prompt_tokens=...)` reads the rows once (bad rows skipped
and counted in `summary`), then serves the same `Task` interface as the procedural tasks: train
example i of seed s is row perm_s[i mod N] of a seeded permutation (epochs reshuffle), so a resumed
run continues from one integer. Without `eval_path`, a hashed `eval_fraction` of rows is held out.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from mixpo.data.readers import read_examples
from mixpo.data.tasks import EVAL_SEED, Example, check_split, derive_seed, register_task, split_of
from mixpo.rewards.math_answer import math_answer_reward


class FileTask:

  def __init__(self, train_path: str, eval_path: str = "", prompt_field: str = "prompt",
               answer_field: str = "answer", tokenizer=None, chat_template: bool = False,
               max_prompt_tokens: int | None = None, eval_fraction: float = 0.05,
               skip_bad_rows: bool = True):
    read = lambda p: read_examples(p, prompt_field, answer_field, tokenizer=tokenizer,
                                   chat_template=chat_template,
                                   max_prompt_tokens=max_prompt_tokens,
                                   skip_bad_rows=skip_bad_rows)
    rows, self.summary = read(train_path)
    logging.info("%s", self.summary)
    if eval_path:
      self._eval, eval_summary = read(eval_path)
      logging.info("%s", eval_summary)
      self._train = rows
    else:
      self._train = [e for e in rows if split_of(e.prompt, eval_fraction) == "train"]
      self._eval = [e for e in rows if split_of(e.prompt, eval_fraction) == "eval"]
    if not self._train:
      raise ValueError(f"FileTask: no usable train rows in {train_path} ({self.summary})")
    self.name = f"file:{train_path}"
    self.reward_fn = math_answer_reward

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    check_split(split, f"{self.name}.example")
    rows = self._train if split == "train" else self._eval
    if not rows:
      raise ValueError(f"{self.name}: the {split} split is empty; pass eval_path or raise "
                       "eval_fraction")
    epoch, i = divmod(index, len(rows))
    perm = np.random.default_rng(derive_seed(self.name, seed, epoch)).permutation(len(rows))
    return rows[perm[i]]

  def examples(self, split: str, n: int, seed: int = 0, start: int = 0) -> list[Example]:
    return [self.example(split, i, seed) for i in range(start, start + n)]

  def eval_examples(self, n: int) -> list[Example]:
    return self.examples("eval", min(n, len(self._eval)), seed=EVAL_SEED)


register_task("file", FileTask)
