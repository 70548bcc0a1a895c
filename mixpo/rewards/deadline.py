"""An in-process SIGALRM deadline that cannot be lost in a garbage-collector callback.

A one-shot `signal.alarm` raises its exception wherever the main thread happens to be when the
signal is handled. If that is inside a gc callback or a `__del__` (JAX registers
`_xla_gc_callback`; sympy parsing creates plenty of garbage), Python prints "Exception ignored"
and carries on: the deadline is silently gone and a pathological parse runs for minutes
(observed: math-verify's own `parsing_timeout` on a 5000-"(" answer under pytest, 8 minutes).
`deadline` re-arms every `repeat_s` until the block exits, so a swallowed alarm is followed by
another. It raises `DeadlineExceeded`, a BaseException, so library code that catches Exception
(math-verify, latex2sympy) cannot swallow it either. Inside the block, a swallowed
`DeadlineExceeded` is not passed to `sys.unraisablehook`: formatting its traceback there (pytest's
hook does) could itself be cut by the next alarm, and the hook's own failure is then reported.

Main thread only, and it cannot interrupt C code that never returns to the interpreter (sympy
evaluating a huge integer power): work that may do that belongs in a worker process
(`RewardRunner`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


class DeadlineExceeded(BaseException):
  """Raised in the main thread when a `deadline` block runs past its time."""


@contextlib.contextmanager
def deadline(seconds: float, repeat_s: float = 0.05):
  """Raises DeadlineExceeded inside the block once `seconds` have passed (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError("deadline() uses SIGALRM and only works in the main thread")
  if not seconds > 0:
    raise ValueError(f"deadline(seconds={seconds!r}) must be > 0")

  def on_alarm(signum, frame):
    raise DeadlineExceeded(f"over {seconds} s")

  old_hook = sys.unraisablehook

  def unraisable(info):
    if not isinstance(info.exc_value, DeadlineExceeded):  # ours is expected and re-armed
      old_hook(info)

  sys.unraisablehook = unraisable
  old = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds, repeat_s)
  try:
    yield
  finally:
    # A re-armed alarm may still land while disarming; retry until the timer is off so the
    # handler is always restored (a late alarm means the block overran anyway).
    while True:
      try:
        signal.setitimer(signal.ITIMER_REAL, 0)
        break
      except DeadlineExceeded:
        continue
    signal.signal(signal.SIGALRM, old)
    sys.unraisablehook = old_hook
