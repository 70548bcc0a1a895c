"""Task protocol, `Example` record, split hashing and the task registry.

A task is a deterministic, procedurally generated problem source: `example(split, index, seed)`
is a pure function of its arguments, so a resumed run continues from a data-position integer. The
train/eval split of a *problem* is decided by a keyed hash of its canonical form, so no eval
problem can ever be drawn for training, whatever the seed (disjoint by construction).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Protocol

SPLITS = ("train", "eval")
EVAL_SEED = 20250101  # the fixed stream the eval set is drawn from


@dataclasses.dataclass
class Example:
  """One problem: the prompt text, the reference answer text and task-specific metadata."""
  prompt: str
  answer: str
  metadata: dict = dataclasses.field(default_factory=dict)


def split_of(key: str, eval_fraction: float, salt: str = "mixpo-split-v1") -> str:
  """"eval" for a stable eval_fraction of canonical problem keys, else "train"."""
  h = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
  return "eval" if int.from_bytes(h, "big") / 2.0**64 < eval_fraction else "train"


def derive_seed(*parts) -> int:
  """A 63-bit seed from any tuple of ints / strings, stable across processes and Python runs."""
  h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
  return int.from_bytes(h, "big") >> 1


def check_split(split: str, where: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"{where}: split={split!r}; use one of {SPLITS}")


class Task(Protocol):
  name: str
  reward_fn: Callable[..., list]

  def example(self, split: str, index: int, seed: int = 0) -> Example: ...

  def examples(self, split: str, n: int, seed: int = 0, start: int = 0) -> list[Example]: ...

  def eval_examples(self, n: int) -> list[Example]: ...


def reward_columns(examples: list[Example], repeat: int = 1) -> dict[str, list]:
  """TRL reward columns for examples each sampled `repeat` times: {"answer": [...], "metadata": [...]}."""
  return {"answer": [e.answer for e in examples for _ in range(repeat)],
          "metadata": [e.metadata for e in examples for _ in range(repeat)]}


class GeneratedTask:
  """The stream methods of a task whose problems are made from (split, index, seed) by its
  `example`: train examples in index order (a resumed run needs only the position) and a fixed
  eval set of distinct prompts (the same for every run and seed)."""

  name: str

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    raise NotImplementedError

  def examples(self, split: str, n: int, seed: int = 0, start: int = 0) -> list[Example]:
    return [self.example(split, i, seed) for i in range(start, start + n)]

  def eval_examples(self, n: int) -> list[Example]:
    return distinct_eval_examples(self, n, max_tries=50 * n + 1000)


def distinct_eval_examples(task, n: int, max_tries: int) -> list[Example]:
  """The first n distinct-prompt eval-split examples of the fixed eval stream."""
  out, seen = [], set()
  for i in range(max_tries):
    e = task.example("eval", i, seed=EVAL_SEED)
    if e.prompt not in seen:
      seen.add(e.prompt)
      out.append(e)
      if len(out) == n:
        return out
  raise ValueError(f"task {task.name!r}: found only {len(out)} distinct eval problems in {max_tries} "
                   f"draws, {n} requested; ask for fewer or raise the difficulty / eval_fraction")


_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_task(name: str, factory: Callable[..., Any]) -> None:
  _REGISTRY[name] = factory


def registered_tasks() -> dict[str, Callable[..., Any]]:
  """Name → factory of every registered task (importing the built-in ones registers them)."""
  import mixpo.data.arithmetic  # noqa: F401  (registers built-ins)
  import mixpo.data.rg_tasks  # noqa: F401
  import mixpo.data.file_task  # noqa: F401
  import mixpo.data.cot  # noqa: F401
  import mixpo.data.word_problems  # noqa: F401
  return dict(_REGISTRY)


def get_task(name: str, **knobs) -> Task:
  """The task registered as `name`, built with its difficulty knobs (e.g. digits=2, terms=2)."""
  registered_tasks()
  import mixpo.data.rg_tasks  # noqa: F401
  if name not in _REGISTRY and name.startswith("rg:"):
    return mixpo.data.rg_tasks.ReasoningGymTask(name[3:], **knobs)
  if name not in _REGISTRY:
    raise KeyError(f"get_task: unknown task {name!r}; registered: {sorted(_REGISTRY)} (reasoning-gym "
                   "datasets as 'rg:<name>', e.g. 'rg:countdown')")
  return _REGISTRY[name](**knobs)
