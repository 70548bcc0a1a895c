"""Applies weighted TRL-style reward functions to a batch with a per-item deadline.

Why worker processes: a reward (math-verify on pathological LaTeX, a user function stuck in a
loop or a sleep) can hang; a thread cannot be stopped, and `signal.alarm` only works in the main
thread and cannot interrupt C code. So items run in a small persistent pool of worker processes
(forked from a `forkserver` that preloaded math-verify, so a replacement starts in ~10 ms and
never forks the multi-threaded JAX trainer). An item past its deadline scores 0, is counted, and
its worker is killed and replaced; the step never blocks longer than about `timeout_s` per item.

Functions must pickle (module-level functions, instances of module-level classes, partials of
those). For unpicklable callables (lambdas, closures) `backend="signal"` runs them in-process with
a `setitimer` deadline — main thread only, and it cannot cut off C code that never returns.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import threading
import time
import traceback

import numpy as np

from mixpo.rewards.combine import fn_name
from mixpo.rewards.deadline import DeadlineExceeded, deadline

_PRELOAD = ["mixpo.rewards.math_answer"]


class RewardError(RuntimeError):
  """A reward function raised or returned a bad value and on_error="raise"."""


@dataclasses.dataclass
class RewardResult:
  """Output of `RewardRunner.__call__` for B completions.

  rewards: float32 [B], Σ_k w_k·r_k with timed-out / errored items contributing 0.
  per_fn: name → float32 [B] unweighted values of each function.
  timed_out: bool [B], any function timed out on the item. errored: bool [B], likewise raised.
  timeouts / errors: counts over (function, item) pairs.
  """
  rewards: np.ndarray
  per_fn: dict
  timed_out: np.ndarray
  errored: np.ndarray
  timeouts: int
  errors: int

  def metrics(self) -> dict:
    m = {"reward/mean": float(self.rewards.mean()) if self.rewards.size else 0.0,
         "reward/timeouts": self.timeouts, "reward/errors": self.errors}
    for k, v in self.per_fn.items():
      m[f"reward/{k}"] = float(v.mean()) if v.size else 0.0
    return m


def _check_value(out) -> float:
  if not isinstance(out, (list, tuple, np.ndarray)) or len(out) != 1:
    raise TypeError(f"returned {type(out).__name__} {str(out)[:60]!r} for one completion; a reward "
                    "fn must return a list with one float per completion")
  v = out[0]
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
    raise TypeError(f"returned a {type(v).__name__} ({str(v)[:60]!r}), not a float")
  if not math.isfinite(float(v)):
    raise ValueError(f"returned the non-finite value {v}")
  return float(v)


def _run_one(fn, prompt, completion, cols) -> float:
  return _check_value(fn([prompt], [completion], **{k: [v] for k, v in cols.items()}))


def _worker_main(conn, fns):
  """Worker loop: receives chunks [(task_id, fn_idx, prompt, completion, cols)], streams results."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
  while True:
    try:
      chunk = conn.recv()
    except EOFError:
      return
    if chunk is None:
      return
    for task_id, k, prompt, completion, cols in chunk:
      try:
        conn.send((task_id, True, _run_one(fns[k], prompt, completion, cols)))
      except Exception as e:  # noqa: BLE001 — reported to the parent with the function's name
        tb = traceback.extract_tb(e.__traceback__)[-1]
        conn.send((task_id, False, f"{type(e).__name__}: {e} (at {tb.filename}:{tb.lineno})"))


class _Worker:
  def __init__(self, ctx, fns):
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker_main, args=(child, fns), daemon=True)
    self.proc.start()
    child.close()
    self.inflight = collections.deque()
    self.deadline = math.inf

  def kill(self):
    self.proc.kill()
    self.proc.join(5)
    self.conn.close()


class RewardRunner:
  """Runs weighted reward functions over a batch; see the module docstring for the design.

  Args:
    fns_with_weights: [(fn, weight), ...] of TRL-style callables.
    timeout_s: per (function, item) deadline in seconds; a timeout scores 0 and is counted.
    on_error: "raise" — a function that raises (or returns a non-float / non-finite value) raises
      RewardError naming it after the batch finishes; "zero" — scored 0 and counted.
    num_workers: worker processes (default min(2, cpu count)).
    backend: "process", "signal" (in-process, main thread only) or "auto" (process when every
      fn pickles, else signal).
    split_across_processes: in a multi-process JAX run where every process calls the runner
      with the same items (the RL loop does), each process scores a contiguous 1/P of them and
      the values are all-gathered: the same result everywhere, 1/P of the work each. A
      collective; no-op with one process.
  """

  def __init__(self, fns_with_weights, timeout_s: float = 5.0, on_error: str = "raise",
               num_workers: int | None = None, backend: str = "auto",
               split_across_processes: bool = False):
    if on_error not in ("raise", "zero"):
      raise ValueError(f"RewardRunner(on_error={on_error!r}): use 'raise' or 'zero'")
    if not timeout_s > 0:
      raise ValueError(f"RewardRunner(timeout_s={timeout_s}): must be > 0 seconds")
    self.fns = [fn for fn, _ in fns_with_weights]
    self.weights = np.array([float(w) for _, w in fns_with_weights], np.float64)
    if not self.fns:
      raise ValueError("RewardRunner needs at least one (fn, weight) pair")
    names = [fn_name(fn) for fn in self.fns]
    self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
    self.timeout_s, self.on_error = float(timeout_s), on_error
    self.num_workers = num_workers or max(1, min(2, os.cpu_count() or 1))
    if backend == "auto":
      backend = "process" if self._unpicklable() is None else "signal"
    if backend == "process" and (bad := self._unpicklable()) is not None:
      raise ValueError(f"RewardRunner(backend='process'): reward fn {bad!r} does not pickle; define "
                       "it at module level (or as a module-level class) or use backend='signal'")
    if backend not in ("process", "signal"):
      raise ValueError(f"RewardRunner(backend={backend!r}): use 'process', 'signal' or 'auto'")
    self.backend = backend
    self.split_across_processes = split_across_processes
    self._workers = []
    if backend == "process":
      self._ctx = mp.get_context("forkserver")
      self._ctx.set_forkserver_preload(_PRELOAD)
      self._workers = [_Worker(self._ctx, self.fns) for _ in range(self.num_workers)]

  def _unpicklable(self):
    for fn, name in zip(self.fns, [fn_name(f) for f in self.fns]):
      try:
        pickle.dumps(fn)
      except Exception:  # noqa: BLE001
        return name
    return None

  def close(self):
    for w in self._workers:
      w.kill()
    self._workers = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001
      pass

  def __call__(self, prompts, completions, **columns) -> RewardResult:
    """Scores B completions; `columns` are per-completion lists (e.g. answer=[...] of length B)."""
    b = len(completions)
    if len(prompts) != b:
      raise ValueError(f"RewardRunner: {len(prompts)} prompts vs {b} completions; pass one prompt "
                       "per completion (repeat each prompt n times)")
    for k, v in columns.items():
      if len(v) != b:
        raise ValueError(f"RewardRunner: column {k!r} has {len(v)} entries, expected {b}")
    n_fn = len(self.fns)
    values = np.zeros((n_fn, b), np.float64)
    status = np.zeros((n_fn, b), np.int8)  # 0 ok, 1 timeout, 2 error
    first_error = []
    lo, hi = self._my_items(b)
    tasks = [(k * b + i, k, prompts[i], completions[i], {c: v[i] for c, v in columns.items()})
             for k in range(n_fn) for i in range(lo, hi)]

    def record(task_id, ok, val):
      k, i = divmod(task_id, b)
      if ok:
        values[k, i] = val
      else:
        status[k, i] = 2
        if not first_error:
          first_error.append(f"reward fn {self.names[k]!r} failed on item {i} "
                             f"(completion {str(completions[i])[:60]!r}): {val}")

    if self.backend == "process":
      self._run_pool(tasks, record, status, b)
    else:
      self._run_signal(tasks, record, status, b)
    if (lo, hi) != (0, b):
      values, status = self._gather(values, status, lo, hi)
      if not first_error and (status == 2).any():  # another process's item failed
        k, i = map(int, np.argwhere(status == 2)[0])
        first_error.append(f"reward fn {self.names[k]!r} failed on item {i} (completion "
                           f"{str(completions[i])[:60]!r}) in another process (see its log)")
    if first_error and self.on_error == "raise":
      raise RewardError(first_error[0] + ". Fix the reward fn, or pass RewardRunner(on_error='zero')"
                        " to score such items 0 and count them")
    per_fn = {n: values[k].astype(np.float32) for k, n in enumerate(self.names)}
    total = (self.weights[:, None] * np.where(status == 0, values, 0.0)).sum(0)
    return RewardResult(rewards=total.astype(np.float32), per_fn=per_fn,
                        timed_out=(status == 1).any(0), errored=(status == 2).any(0),
                        timeouts=int((status == 1).sum()), errors=int((status == 2).sum()))

  def _my_items(self, b: int) -> tuple[int, int]:
    """[lo, hi) of the items this process scores (all of them unless split across processes)."""
    if not self.split_across_processes:
      return 0, b
    import jax  # noqa: PLC0415  (worker processes never import jax)
    p, n = jax.process_index(), jax.process_count()
    return (0, b) if n == 1 else (p * b // n, (p + 1) * b // n)

  def _gather(self, values, status, lo, hi):
    """Every process's slice of (values, status), all-gathered into the full arrays."""
    from jax.experimental import multihost_utils  # noqa: PLC0415
    mine = np.zeros(values.shape, bool)
    mine[:, lo:hi] = True
    v, st, m = multihost_utils.process_allgather(
        (np.where(mine, values, 0.0).astype(np.float32),
         np.where(mine, status, 0).astype(np.int32), mine))
    if not (m.sum(0) == 1).all():
      raise RuntimeError("RewardRunner(split_across_processes=True): the processes' item slices "
                         "do not tile the batch; every process must call with the same items")
    return v.sum(0).astype(np.float64), st.sum(0).astype(np.int8)

  def _run_signal(self, tasks, record, status, b):
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("RewardRunner(backend='signal') only works in the main thread; make the "
                         "reward fns picklable and use backend='process'")

    for task_id, k, prompt, completion, cols in tasks:
      try:
        with deadline(self.timeout_s):
          val = _run_one(self.fns[k], prompt, completion, cols)
        record(task_id, True, val)
      except DeadlineExceeded:
        status[divmod(task_id, b)] = 1
      except Exception as e:  # noqa: BLE001
        record(task_id, False, f"{type(e).__name__}: {e}")

  def _run_pool(self, tasks, record, status, b):
    pending = collections.deque(tasks)
    chunk = max(1, min(32, -(-len(tasks) // (4 * len(self._workers)))))
    by_id = {t[0]: t for t in tasks}
    while True:
      now = time.monotonic()
      for w in self._workers:
        if not w.inflight and pending:
          batch = [pending.popleft() for _ in range(min(chunk, len(pending)))]
          w.inflight.extend(t[0] for t in batch)
          w.conn.send(batch)
          w.deadline = now + self.timeout_s
      busy = [w for w in self._workers if w.inflight]
      if not busy:
        return
      wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
      ready = set(mp_connection.wait([w.conn for w in busy], timeout=wait_s))
      for idx, w in enumerate(self._workers):
        if not w.inflight:
          continue
        died = False
        if w.conn in ready:
          try:
            while w.inflight and w.conn.poll():
              task_id, ok, val = w.conn.recv()
              assert task_id == w.inflight[0], (task_id, w.inflight[0])
              w.inflight.popleft()
              record(task_id, ok, val)
              w.deadline = time.monotonic() + self.timeout_s
          except (EOFError, OSError):
            died = True  # e.g. killed by the OOM killer or a segfault in C code
        if died or (w.inflight and time.monotonic() > w.deadline and not w.conn.poll()):
          bad = w.inflight.popleft()
          if died:
            record(bad, False, f"worker process died (exit code {w.proc.exitcode})")
          else:
            status[divmod(bad, b)] = 1
          pending.extendleft(reversed([by_id[t] for t in w.inflight]))
          w.kill()
          self._workers[idx] = _Worker(self._ctx, self.fns)
