"""reasoning-gym adapter: any `reasoning_gym.create_dataset(name, ...)` as a mixpo Task.

Registered as "rg:<name>" (e.g. get_task("rg:countdown", min_numbers=3, max_numbers=4)); knobs
are passed to reasoning-gym's dataset config. Each example is item 0 of a size-1 dataset whose seed
is derived from (seed, index, attempt), so access by index is O(1) and deterministic; the split is
decided by the hash of the question text, as for the built-in tasks. Scoring is reasoning-gym's own
`score_answer` (it may give partial credit, e.g. 0.05 for a well-formed wrong countdown answer).
"""

from __future__ import annotations

import functools
import re

from mixpo.data.tasks import Example, check_split, derive_seed, distinct_eval_examples, split_of

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@functools.lru_cache(maxsize=64)
def _scorer(name: str, knobs: tuple):
  import reasoning_gym  # deferred: ~1 s import, only for rg tasks
  return reasoning_gym.create_dataset(name, seed=0, size=1, **dict(knobs))


def rg_answer(completion: str) -> str:
  """The answer part of a completion: the last <answer>...</answer> if any, else the last line."""
  tags = _ANSWER_TAG.findall(completion)
  if tags:
    return tags[-1].strip()
  lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
  return lines[-1].strip() if lines else ""


class ReasoningGymReward:
  """TRL-style reward: reasoning-gym's score_answer(answer, entry) with entry from `metadata`."""

  def __init__(self, name: str, knobs: dict):
    self.name, self.knobs = name, tuple(sorted(knobs.items()))
    self.__name__ = f"rg_{name}"

  def __call__(self, prompts, completions, metadata, **_) -> list[float]:
    ds = _scorer(self.name, self.knobs)
    out = []
    for c, m in zip(completions, metadata, strict=True):
      if "rg_entry" not in m:
        raise KeyError(f"{self.__name__}: metadata lacks 'rg_entry'; build the columns with "
                       "mixpo.data.reward_columns(examples) from this task's examples")
      ans = rg_answer(c) if isinstance(c, str) else ""
      out.append(float(ds.score_answer(answer=ans, entry=m["rg_entry"]) or 0.0) if ans else 0.0)
    return out


class ReasoningGymTask:
  """A reasoning-gym dataset with hash-disjoint train/eval splits; knobs go to its config."""

  def __init__(self, dataset: str, eval_fraction: float = 0.1, **knobs):
    import reasoning_gym
    if dataset not in reasoning_gym.factory.DATASETS:
      raise KeyError(f"rg:{dataset}: not a reasoning-gym dataset; known: "
                     f"{sorted(reasoning_gym.factory.DATASETS)[:20]}...")
    self.dataset, self.knobs, self.eval_fraction = dataset, knobs, eval_fraction
    self.name = f"rg:{dataset}"
    self.reward_fn = ReasoningGymReward(dataset, knobs)

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    import reasoning_gym
    check_split(split, f"{self.name}.example")
    for attempt in range(1000):
      s = derive_seed(self.name, seed, index, attempt)
      entry = reasoning_gym.create_dataset(self.dataset, seed=s, size=1, **self.knobs)[0]
      if split_of(f"{self.name}:{entry['question']}", self.eval_fraction) == split:
        return Example(prompt=entry["question"], answer=str(entry["answer"]),
                       metadata={"rg_entry": entry})
    raise RuntimeError(f"{self.name}: no {split} problem in 1000 draws; raise eval_fraction")

  def examples(self, split: str, n: int, seed: int = 0, start: int = 0) -> list[Example]:
    return [self.example(split, i, seed) for i in range(start, start + n)]

  def eval_examples(self, n: int) -> list[Example]:
    return distinct_eval_examples(self, n, max_tries=50 * n + 1000)
