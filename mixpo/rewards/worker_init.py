"""Preloaded by the reward workers' fork server: it scrubs its environment, leaves the
trainer's session and imports what rewards need, before it forks any worker.

- Environment: the fork server re-executes itself with the scrubbed environment
  (`sandbox.restart_scrubbed`), so the start-up block every worker inherits (/proc/self/environ,
  and the fork server's own /proc/<ppid>/environ) holds no token or credential of the trainer.
- Session: a scheduler preempting a job signals its whole process group (SLURM, Kubernetes,
  `kill -TERM -PGID`). The fork server and the workers it forks must outlive that signal: the
  trainer handles it by finishing the step (rewards included) and writing a checkpoint, then
  stops the workers itself.
- Imports: math-verify, and what it imports lazily (`math_answer.warm_up`), so that a worker
  starts in milliseconds and no lazy import happens under the workers' guard.
Importing this module anywhere but in multiprocessing's fork server does nothing.
"""

import os
import signal

from mixpo.rewards import sandbox

if sandbox.in_forkserver():
  sandbox.restart_scrubbed()  # returns only once the environment is scrubbed
  try:
    os.setsid()
  except OSError:  # already a session leader
    pass
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  from mixpo.rewards import math_answer  # noqa: E402
  math_answer.warm_up()
