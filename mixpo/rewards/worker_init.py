"""Preloaded by the reward workers' fork server: it leaves the trainer's session first.

A scheduler preempting a job signals its whole process group (SLURM, Kubernetes, `kill -TERM -PGID`).
The fork server and the workers it forks must outlive that signal: the trainer handles it by
finishing the step (rewards included) and writing a checkpoint, then stops the workers itself.
Importing this module anywhere but in multiprocessing's fork server does nothing.
"""

import os
import signal

from mixpo.rewards import sandbox

if sandbox.in_forkserver():
  try:
    os.setsid()
  except OSError:  # already a session leader
    pass
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
