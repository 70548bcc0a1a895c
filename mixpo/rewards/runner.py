"""Applies weighted TRL-style reward functions to a batch with a per-item deadline.

Why worker processes: a reward (math-verify on pathological LaTeX, a user function stuck in a
loop or a sleep) can hang; a thread cannot be stopped, and `signal.alarm` only works in the main
thread and cannot interrupt C code. So items run in a small persistent pool of worker processes
(forked from a `forkserver` that preloaded math-verify, so a replacement starts in ~10 ms and
never forks the multi-threaded JAX trainer). An item past its deadline scores 0, is counted, and
its worker is killed and replaced. A whole call has a deadline too (`batch_timeout_s`): past it
the items not yet scored score 0 and are counted, so a step's reward phase is bounded whatever
the completions are. A worker that dies (OOM killer, segfault in C code) is replaced and its item
retried once before the item counts as an error.

Completions are untrusted: workers are contained by `mixpo.rewards.sandbox` (own session, so a
scheduler's group-wide SIGTERM leaves them to the trainer; resource limits; scrubbed environment,
down to the fork server's own start-up block; an unprivileged user where possible; an audit hook
that refuses to run code built from text and reads outside an allow-list). An item the hook
refuses scores 0 and is counted as `blocked`, never raised.

Set-up before the guard: a reward fn may define `prepare()`, called once in each worker (and
once in-process for the signal backend) after it is unpickled and hardened, before its first
item and before the guard is armed. Imports and one-time construction belong there: modules
that build code from text as they import (dataclasses, namedtuples: reasoning-gym, sympy's
integrals) would otherwise be refused inside the guarded call, and every correct answer would
score 0 as blocked. A `prepare()` that raises stops the runner with its message.

Failures, by whose fault: an exception marked `untrusted_input = True` is the completion's
(math-verify failing on it: `unverifiable`; a task scorer raising on it, `ScorerError`:
`scorer_errors`): scored 0, counted, never raised. Any other exception is the reward code's
(`errors`), governed by `on_error`.

Functions must pickle (module-level functions, instances of module-level classes, partials of
those). For unpicklable callables (lambdas, closures) `backend="signal"` runs them in-process with
a `setitimer` deadline — main thread only, and it cannot cut off C code that never returns.
"""

from __future__ import annotations

import atexit
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

from mixpo.fields import FieldError
from mixpo.rewards import sandbox
from mixpo.rewards.combine import fn_name
from mixpo.rewards.deadline import DeadlineExceeded, deadline

# The fork server re-executes itself with a scrubbed environment, then imports math-verify and
# runs its warm-up (mixpo.rewards.worker_init) and this module, so every worker starts with them.
_PRELOAD = ["mixpo.rewards.worker_init", "mixpo.rewards.runner"]

# A new worker's first item gets its deadline once the worker has started (forking, unpickling
# the reward fns and hardening take well under a second, several on a loaded machine).
WORKER_START_TIMEOUT_S = 60.0
ON_ERROR = ("raise", "zero")  # what a reward function that raises does to the call

# Per-item status codes. UNVERIFIABLE / SCORER_ERROR: the reward fn raised an exception marked
# `untrusted_input = True` (math-verify failing on a completion; a task's scorer raising on it):
# the completion's fault, not the reward code's, so it scores 0 and is counted but never raised.
OK, TIMEOUT, ERROR, BLOCKED, BATCH_TIMEOUT, UNVERIFIABLE, SCORER_ERROR = 0, 1, 2, 3, 4, 5, 6


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """config.reward: what scores a rollout and how its failures count (the one place these fields
  are checked; `loop.build_reward_runner` builds the runner from it)."""

  functions: str = ""  # "" = the task's verifier; else entries parsed by rewards.custom.
  weights: str = ""  # comma-separated, one per entry of `functions` ("" = all 1.0).
  timeout_s: float = 5.0  # per-item deadline; a timeout scores 0 and is counted.
  batch_timeout_s: float = 300.0  # deadline of one runner call; 0 = none.
  on_error: str = "raise"  # ON_ERROR: a function that raises stops the run, or scores 0.
  failure_warn_ratio: float = 0.5  # warn when more than this share of items failed to score.

  def __post_init__(self):
    if self.on_error not in ON_ERROR:
      raise FieldError("reward.on_error", self.on_error, f"expected one of {ON_ERROR}.")
    if not self.timeout_s > 0:
      raise FieldError("reward.timeout_s", self.timeout_s, "must be > 0 seconds.")
    if not self.batch_timeout_s >= 0:
      raise FieldError("reward.batch_timeout_s", self.batch_timeout_s,
                       "must be >= 0 seconds (0 = no deadline).")
    if not 0 <= self.failure_warn_ratio <= 1:
      raise FieldError("reward.failure_warn_ratio", self.failure_warn_ratio,
                       "a share of the reward items, in [0, 1].")


class RewardError(RuntimeError):
  """A reward function raised or returned a bad value and on_error="raise"."""


class ScorerError(RuntimeError):
  """A task's scorer raised on a completion's answer ("None" for a factorisation, "{}" for a
  grid): a wrong answer, scored 0 and counted as `reward/scorer_errors`, never raised."""
  untrusted_input = True


@dataclasses.dataclass
class RewardResult:
  """Output of `RewardRunner.__call__` for B completions.

  rewards: float32 [B], Σ_k w_k·r_k with timed-out / errored items contributing 0.
  per_fn: name → float32 [B] unweighted values of each function.
  timed_out: bool [B], any function timed out on the item (its own deadline or the batch's).
  errored: bool [B], likewise raised.
  timeouts / errors: counts over (function, item) pairs.
  blocked: (function, item) pairs the sandbox refused (the text tried to run code), scored 0.
  batch_timeouts: pairs not scored before the call's deadline, scored 0 (also in `timeouts`).
  retries: pairs re-run once because their worker died.
  unverifiable: pairs whose completion made the verifier fail (scored 0, never raised).
  scorer_errors: pairs whose completion made a task's scorer raise (ScorerError; scored 0,
    never raised).
  items: (function, item) pairs this call scored: the denominator of the counts above.
  """
  rewards: np.ndarray
  per_fn: dict
  timed_out: np.ndarray
  errored: np.ndarray
  timeouts: int
  errors: int
  blocked: int = 0
  batch_timeouts: int = 0
  retries: int = 0
  unverifiable: int = 0
  scorer_errors: int = 0
  items: int = 0

  # Metrics that are counts over (function, item) pairs: summed when calls are combined (e.g.
  # over a step's dynamic-sampling draws); the others are means.
  COUNTERS = ("reward/items", "reward/timeouts", "reward/errors", "reward/blocked",
              "reward/batch_timeouts", "reward/retries", "reward/unverifiable",
              "reward/scorer_errors")

  def metrics(self) -> dict:
    m = {"reward/mean": float(self.rewards.mean()) if self.rewards.size else 0.0,
         "reward/items": self.items, "reward/timeouts": self.timeouts,
         "reward/errors": self.errors, "reward/blocked": self.blocked,
         "reward/batch_timeouts": self.batch_timeouts, "reward/retries": self.retries,
         "reward/unverifiable": self.unverifiable, "reward/scorer_errors": self.scorer_errors}
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


def _run_guarded(fn, prompt, completion, cols, guard: bool) -> tuple[int, object]:
  """(status, value or message) of one item, under the sandbox's audit hook when `guard`."""
  g = sandbox.guarded() if guard else None
  try:
    if g is None:
      return OK, _run_one(fn, prompt, completion, cols)
    with g:
      val = _run_one(fn, prompt, completion, cols)
    if g.violation:  # refused, but the function caught it and returned anyway
      return BLOCKED, g.violation
    return OK, val
  except sandbox.SandboxViolation as e:
    return BLOCKED, str(e)
  except Exception as e:  # noqa: BLE001 — reported with the function's name
    tb = traceback.extract_tb(e.__traceback__)[-1]
    status = ERROR
    if getattr(e, "untrusted_input", False):
      status = SCORER_ERROR if isinstance(e, ScorerError) else UNVERIFIABLE
    return status, f"{type(e).__name__}: {e} (at {tb.filename}:{tb.lineno})"


def prepare_all(fns) -> str | None:
  """Calls each fn's `prepare()` (unguarded); the first failure's message, or None."""
  for fn in fns:
    prepare = getattr(fn, "prepare", None)
    if prepare is None:
      continue
    try:
      prepare()
    except Exception as e:  # noqa: BLE001 — the reward code's own set-up: its author must see it
      return (f"reward fn {fn_name(fn)!r}: prepare() raised {type(e).__name__}: {e} (at "
              f"{traceback.extract_tb(e.__traceback__)[-1].filename})")
  return None


def _worker_main(conn, fns, limits, guard):
  """Worker loop: receives chunks [(task_id, fn_idx, prompt, completion, cols)], streams results.

  The first message is the sandbox's report (what took effect) or, when a `prepare()` failed,
  ERROR with its message; then one (task_id, status, value) per item.
  """
  report = sandbox.harden_worker(limits)
  failed = prepare_all(fns)
  conn.send(("hello", OK, report) if failed is None else ("hello", ERROR, failed))
  if failed is not None:
    return
  while True:
    try:
      chunk = conn.recv()
    except EOFError:
      return
    if chunk is None:
      return
    for task_id, k, prompt, completion, cols in chunk:
      sandbox.set_cpu_backstop(limits.cpu_s_per_item)
      conn.send((task_id, *_run_guarded(fns[k], prompt, completion, cols, guard)))


class _Worker:
  def __init__(self, ctx, fns, limits, guard):
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker_main, args=(child, fns, limits, guard), daemon=True)
    self.proc.start()
    child.close()
    self.inflight = collections.deque()
    self.deadline = math.inf
    self.sandbox = None  # the worker's first message says what containment took effect

  def wait_started(self, timeout_s: float = WORKER_START_TIMEOUT_S) -> dict:
    if self.sandbox is None:
      if not self.conn.poll(timeout_s):
        raise RuntimeError(f"RewardRunner: a reward worker did not start within {timeout_s} s")
      try:
        tag, status, report = self.conn.recv()
      except (EOFError, OSError):
        raise RuntimeError(f"RewardRunner: a reward worker died while starting (exit code "
                           f"{self.proc.exitcode}); a reward fn that cannot be unpickled or "
                           "imported in a fresh process does this") from None
      assert tag == "hello", tag
      self.started(status, report)
    return self.sandbox

  def started(self, status: int, report):
    if status != OK:
      raise RuntimeError(f"RewardRunner: {report}")
    self.sandbox = report

  def kill(self):
    self.proc.kill()
    self.proc.join(5)
    self.conn.close()


class RewardRunner:
  """Runs weighted reward functions over a batch; see the module docstring for the design.

  Args:
    fns_with_weights: [(fn, weight), ...] of TRL-style callables.
    timeout_s: per (function, item) deadline in seconds; a timeout scores 0 and is counted.
    batch_timeout_s: deadline of a whole call in seconds (None: none); items not scored by then
      score 0 and are counted (`batch_timeouts`). A call returns within about this time plus the
      time to replace the workers it stops (tens of ms each).
    on_error: "raise" — a function that raises (or returns a non-float / non-finite value) raises
      RewardError naming it after the batch finishes; "zero" — scored 0 and counted. Exceptions
      the completion caused (`untrusted_input`: VerifierError, ScorerError) are counted zeros
      under either.
    num_workers: worker processes (default min(2, cpu count)).
    backend: "process", "signal" (in-process, main thread only) or "auto" (process when every
      fn pickles, else signal).
    split_across_processes: in a multi-process JAX run where every process calls the runner
      with the same items (the RL loop does), each process scores a contiguous 1/P of them and
      the values are all-gathered: the same result everywhere, 1/P of the work each. A
      collective; no-op with one process.
    limits: the workers' `sandbox.WorkerLimits` (memory, CPU backstop, unprivileged user).
    guard: run each item under `sandbox.guarded()` (refuses code built from text, process
      spawning, file writes, sockets, reads outside an allow-list). Turn off only for trusted
      reward fns that need those.
  """

  def __init__(self, fns_with_weights, timeout_s: float = 5.0, on_error: str = "raise",
               num_workers: int | None = None, backend: str = "auto",
               split_across_processes: bool = False, batch_timeout_s: float | None = None,
               limits: sandbox.WorkerLimits = sandbox.WorkerLimits(), guard: bool = True):
    if on_error not in ON_ERROR:
      raise ValueError(f"RewardRunner(on_error={on_error!r}): use 'raise' or 'zero'")
    if not timeout_s > 0:
      raise ValueError(f"RewardRunner(timeout_s={timeout_s}): must be > 0 seconds")
    if batch_timeout_s is not None and not batch_timeout_s > 0:
      raise ValueError(f"RewardRunner(batch_timeout_s={batch_timeout_s}): must be > 0 seconds "
                       "(or None for no batch deadline)")
    self.batch_timeout_s, self.limits, self.guard = batch_timeout_s, limits, guard
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
    self.sandbox = {"in_process": True, "guard": guard}  # the signal backend runs in this process
    if backend == "signal":
      sandbox.allow_reads(*limits.read_paths)
      if (failed := prepare_all(self.fns)) is not None:
        raise RuntimeError(f"RewardRunner: {failed}")
    if backend == "process":
      self._ctx = mp.get_context("forkserver")
      self._ctx.set_forkserver_preload(_PRELOAD)
      self._workers = [self._new_worker() for _ in range(self.num_workers)]
      # Workers ignore SIGTERM, which is how multiprocessing's exit handler stops daemon
      # processes before joining them: stop them first (atexit runs handlers last-in first-out).
      atexit.register(self.close)
      try:
        self.sandbox = self._workers[0].wait_started()
      except BaseException:
        self.close()
        raise

  def _new_worker(self) -> _Worker:
    return _Worker(self._ctx, self.fns, self.limits, self.guard)

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
    atexit.unregister(self.close)

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
    status = np.zeros((n_fn, b), np.int8)  # OK / TIMEOUT / ... (the status codes above)
    first_error = []
    lo, hi = self._my_items(b)
    tasks = [(k * b + i, k, prompts[i], completions[i], {c: v[i] for c, v in columns.items()})
             for k in range(n_fn) for i in range(lo, hi)]
    end = math.inf if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s

    def record(task_id, st, val=None):
      k, i = divmod(task_id, b)
      status[k, i] = st
      if st == OK:
        values[k, i] = val
      elif st == ERROR and not first_error:
        first_error.append(f"reward fn {self.names[k]!r} failed on item {i} "
                           f"(completion {str(completions[i])[:60]!r}): {val}")

    if self.backend == "process":
      retries = self._run_pool(tasks, record, end)
    else:
      retries = self._run_signal(tasks, record, end)
    if (lo, hi) != (0, b):
      values, status = self._gather(values, status, lo, hi)
      if not first_error and (status == ERROR).any():  # another process's item failed
        k, i = map(int, np.argwhere(status == ERROR)[0])
        first_error.append(f"reward fn {self.names[k]!r} failed on item {i} (completion "
                           f"{str(completions[i])[:60]!r}) in another process (see its log)")
    if first_error and self.on_error == "raise":
      raise RewardError(first_error[0] + ". Fix the reward fn, or pass RewardRunner(on_error='zero')"
                        " to score such items 0 and count them")
    values = np.where(status == OK, values, 0.0)
    per_fn = {n: values[k].astype(np.float32) for k, n in enumerate(self.names)}
    total = (self.weights[:, None] * values).sum(0)
    timed_out = (status == TIMEOUT) | (status == BATCH_TIMEOUT)
    return RewardResult(rewards=total.astype(np.float32), per_fn=per_fn,
                        timed_out=timed_out.any(0), errored=(status == ERROR).any(0),
                        timeouts=int(timed_out.sum()), errors=int((status == ERROR).sum()),
                        blocked=int((status == BLOCKED).sum()),
                        batch_timeouts=int((status == BATCH_TIMEOUT).sum()), retries=retries,
                        unverifiable=int((status == UNVERIFIABLE).sum()),
                        scorer_errors=int((status == SCORER_ERROR).sum()), items=int(status.size))

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

  def _run_signal(self, tasks, record, end) -> int:
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("RewardRunner(backend='signal') only works in the main thread; make the "
                         "reward fns picklable and use backend='process'")
    for n, (task_id, k, prompt, completion, cols) in enumerate(tasks):
      left = end - time.monotonic()
      if left <= 0:
        for t in tasks[n:]:
          record(t[0], BATCH_TIMEOUT)
        return 0
      try:
        with deadline(min(self.timeout_s, left)):
          st, val = _run_guarded(self.fns[k], prompt, completion, cols, self.guard)
        record(task_id, st, val)
      except DeadlineExceeded:
        record(task_id, TIMEOUT if left > self.timeout_s else BATCH_TIMEOUT)
    return 0

  def _run_pool(self, tasks, record, end) -> int:
    """Scores `tasks` on the workers; returns how many items were retried after a worker died."""
    pending = collections.deque(tasks)
    chunk = max(1, min(32, -(-len(tasks) // (4 * len(self._workers)))))
    by_id = {t[0]: t for t in tasks}
    retried = set()
    while True:
      now = time.monotonic()
      if now >= end:
        self._abandon(pending, record)
        return len(retried)
      for w in self._workers:
        if not w.inflight and pending:
          batch = [pending.popleft() for _ in range(min(chunk, len(pending)))]
          w.inflight.extend(t[0] for t in batch)
          w.conn.send(batch)
          w.deadline = now + (self.timeout_s if w.sandbox is not None else WORKER_START_TIMEOUT_S)
      busy = [w for w in self._workers if w.inflight]
      if not busy:
        return len(retried)
      wait_s = max(0.0, min(min(w.deadline for w in busy), end) - time.monotonic())
      ready = set(mp_connection.wait([w.conn for w in busy], timeout=wait_s))
      for idx, w in enumerate(self._workers):
        if not w.inflight:
          continue
        died = False
        if w.conn in ready:
          try:
            while w.inflight and w.conn.poll():
              task_id, st, val = w.conn.recv()
              if task_id == "hello":
                w.started(st, val)
                w.deadline = time.monotonic() + self.timeout_s
                continue
              assert task_id == w.inflight[0], (task_id, w.inflight[0])
              w.inflight.popleft()
              record(task_id, st, val)
              w.deadline = time.monotonic() + self.timeout_s
          except (EOFError, OSError):
            died = True  # e.g. killed by the OOM killer, RLIMIT_CPU or a segfault in C code
        if died or (w.inflight and time.monotonic() > w.deadline and not w.conn.poll()):
          bad = w.inflight.popleft()
          if not died:
            record(bad, TIMEOUT)
          elif bad not in retried:  # once: a crash of the worker need not be the item's fault
            retried.add(bad)
            pending.appendleft(by_id[bad])
          else:
            record(bad, ERROR, f"worker process died twice on this item (exit code "
                               f"{w.proc.exitcode})")
          pending.extendleft(reversed([by_id[t] for t in w.inflight]))
          w.kill()
          self._workers[idx] = self._new_worker()

  def _abandon(self, pending, record):
    """The batch deadline passed: unscored items score 0 (counted); busy workers are replaced."""
    for t in pending:
      record(t[0], BATCH_TIMEOUT)
    pending.clear()
    for idx, w in enumerate(self._workers):
      if w.inflight:
        for task_id in w.inflight:
          record(task_id, BATCH_TIMEOUT)
        w.kill()
        self._workers[idx] = self._new_worker()
