"""User reward functions named on the command line (`--config.reward.functions='pkg.module:fn'`).

Two signatures are accepted (docs/rewards.md):
- TRL's `fn(prompts, completions, **columns) -> list[float]`, one float per completion. The
  columns mixpo passes are `answer` (the reference answer) and `metadata` (a dict per row); a
  function without `**kwargs` gets only the columns it names.
- verl's `compute_score(data_source, solution_str, ground_truth, extra_info=None)` -> float (or a
  dict with a "score" key), one completion at a time; named as `verl:pkg.module:compute_score`, or
  recognised by its first parameter being called `data_source`.

A spec is `pkg.module:fn` (imported with the current directory on sys.path) or
`path/to/file.py:fn`. The loaded callable is wrapped in a small picklable object holding only the
spec, so the RewardRunner's worker processes re-import it by name instead of pickling the user's
function (a function loaded from a file path has no importable module name).

Trust: the module is trusted code, like a config file. `reward_fns` imports it in the calling
process (the trainer, when flags are checked: a bad spec fails before any model is built), so
its top-level code runs there unsandboxed, with the trainer's environment and files; each worker
imports it again as it starts, before the guard is armed. Only the calls on completions run under
the workers' sandbox like every reward (no file writes, subprocesses, sockets, code built from
text or reads outside the allow-list: such a call scores 0, counted as blocked). A `prepare`
attribute of the function is called once per worker before its first item (`ImportedReward.
prepare`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

TASK = "task"  # the entry of config.reward.functions that stands for the task's own verifier.
VERL_PREFIX = "verl:"


class RewardSpecError(ValueError):
  """A reward spec that cannot be loaded; the message says which entry and why."""


def _load_callable(spec: str, search_path: str) -> Callable:
  """The callable named by 'pkg.module:fn' or 'path/file.py:fn' (RewardSpecError otherwise)."""
  target, sep, attr = spec.rpartition(":")
  if not sep or not target or not attr:
    raise RewardSpecError(f"{spec!r} is not 'pkg.module:function' or 'path/to/file.py:function'")
  if target.endswith(".py"):
    path = target if os.path.isabs(target) else os.path.join(search_path, target)
    if not os.path.isfile(path):
      raise RewardSpecError(f"{spec!r}: file {path} does not exist")
    name = "mixpo_user_reward_" + os.path.splitext(os.path.basename(path))[0]
    module = sys.modules.get(name)
    if module is None or getattr(module, "__file__", None) != path:
      loader_spec = importlib.util.spec_from_file_location(name, path)
      module = importlib.util.module_from_spec(loader_spec)
      try:
        loader_spec.loader.exec_module(module)
      except Exception as e:  # noqa: BLE001  (the user's module: any error is theirs to see)
        raise RewardSpecError(f"{spec!r}: importing {path} raised {type(e).__name__}: {e}") from e
      sys.modules[name] = module
  else:
    if search_path not in sys.path:
      sys.path.insert(0, search_path)
    try:
      module = importlib.import_module(target)
    except ImportError as e:
      raise RewardSpecError(f"{spec!r}: cannot import module {target!r} ({e}); run from the "
                            "directory holding it, add it to PYTHONPATH, or give a .py path") from e
  fn = getattr(module, attr, None)
  if fn is None:
    names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
    raise RewardSpecError(f"{spec!r}: module {target!r} has no {attr!r} (callables there: "
                          f"{', '.join(names[:10]) or 'none'})")
  if not callable(fn):
    raise RewardSpecError(f"{spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
  return fn


def _is_verl(fn: Callable) -> bool:
  try:
    params = list(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return False
  return bool(params) and params[0] == "data_source"


class ImportedReward:
  """A TRL-style reward that (re)imports the user's function from its spec on first use.

  Pickles as (spec, search_path) only; `__call__(prompts, completions, **columns)` returns one
  float per completion, adapting verl's per-item `compute_score` when the spec names one.
  """

  def __init__(self, spec: str, search_path: str | None = None):
    self.spec = spec.strip()
    self.search_path = os.path.abspath(search_path or os.getcwd())
    self.verl = self.spec.startswith(VERL_PREFIX)
    self.target = self.spec[len(VERL_PREFIX):] if self.verl else self.spec
    self.__name__ = self.spec.rpartition(":")[2] or self.spec
    self._fn = None
    self._load()  # fail now, in the main process, rather than inside a reward worker.

  def _load(self) -> Callable:
    if self._fn is None:
      fn = _load_callable(self.target, self.search_path)
      self.verl = self.verl or _is_verl(fn)
      self._fn = fn
      self._columns = None  # None: pass every column (**kwargs); else the names it takes.
      if not self.verl:
        params = inspect.signature(fn).parameters.values()
        if not any(p.kind == p.VAR_KEYWORD for p in params):
          self._columns = {p.name for p in params}
    return self._fn

  def __getstate__(self) -> dict:
    return {"spec": self.spec, "target": self.target, "search_path": self.search_path,
            "verl": self.verl, "__name__": self.__name__}

  def __setstate__(self, state: dict) -> None:
    # Unpickled as a reward worker starts, before its sandbox (mixpo.rewards.sandbox) is armed:
    # importing here lets the import write its bytecode cache and read the user's files before
    # the worker drops privileges; the sandboxed item calls then only run the function.
    self.__dict__.update(state)
    self._fn = None
    self._load()

  def prepare(self) -> None:
    """The user function's own `prepare()` when it has one (RewardRunner calls this unguarded)."""
    prepare = getattr(self._load(), "prepare", None)
    if prepare is not None:
      prepare()

  def __call__(self, prompts, completions, **columns) -> list[float]:
    fn = self._load()
    if self.verl:
      answers = columns.get("answer", [None] * len(completions))
      metas = columns.get("metadata", [None] * len(completions))
      out = []
      for completion, answer, meta in zip(completions, answers, metas):
        meta = meta if isinstance(meta, dict) else {}
        score = fn(meta.get("data_source", ""), completion, answer, meta)
        out.append(score["score"] if isinstance(score, dict) else score)
      return out
    if self._columns is not None:
      columns = {k: v for k, v in columns.items() if k in self._columns}
    return fn(prompts, completions, **columns)


def parse_weights(text: Any, n: int) -> list[float]:
  """`"1,0.5"` (or a tuple / list) → [1.0, 0.5]; empty → n ones. ValueError naming the problem."""
  if isinstance(text, (list, tuple)):
    parts = list(text)
  else:
    parts = [p for p in str(text or "").split(",") if p.strip()]
  if not parts:
    return [1.0] * n
  try:
    weights = [float(p) for p in parts]
  except ValueError as e:
    raise RewardSpecError(f"weights {text!r} are not comma-separated numbers ({e})") from None
  if len(weights) != n:
    raise RewardSpecError(f"{len(weights)} weights {weights} for {n} reward functions; give one "
                          "weight per entry")
  return weights


def reward_fns(rewards: str, weights: Any, task_reward: Callable) -> list[tuple[Callable, float]]:
  """[(fn, weight)] for the RewardRunner from config.reward.functions / config.reward.weights.

  "" → the task's own verifier alone. Entries are "task" or a spec (module docstring).
  Raises RewardSpecError naming the entry at fault.
  """
  specs = [s.strip() for s in str(rewards or "").split(",") if s.strip()]
  if not specs:
    return [(task_reward, parse_weights(weights, 1)[0])]
  fns = []
  for spec in specs:
    fns.append(task_reward if spec == TASK else ImportedReward(spec))
  return list(zip(fns, parse_weights(weights, len(fns))))
