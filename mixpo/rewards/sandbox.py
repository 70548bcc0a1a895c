"""Containment for code that reads untrusted text: reward workers and scorers that call `eval`.

Threat model: completions are written by the policy being trained and dataset / trace rows by
whoever made the file; both are untrusted. Rewards parse them with third-party scorers (sympy's
`parse_expr`, reasoning-gym scorers that `eval` the answer), on machines that hold credentials
and checkpoints. Three layers, each useful without the others:

1. `guarded()`: a Python audit hook, armed per thread around a reward call, refuses to execute
   any code object that does not come from a source file unless it is a pure expression (literals,
   operators, subscripts and bare names: no call, attribute, import or store) or every name it
   uses is one of sympy's number/symbol constructors (what `parse_expr` emits for arithmetic), and
   refuses process spawning, signals, sockets, native-library loading, file writes and pickle /
   marshal loading. A refusal raises `SandboxViolation` (a BaseException, so a scorer's
   `except Exception` cannot swallow it); the runner scores the item 0 and counts it as blocked.
2. `harden_worker()`: reward worker processes run in their own session (a scheduler's group-wide
   SIGTERM does not reach them; the trainer decides when they stop), ignore SIGINT / SIGTERM, have
   no core files, an address-space limit and a CPU-time backstop, an environment scrubbed of
   everything but locale / path variables (no tokens or cloud credentials), and, when started as
   root and the interpreter's files are readable by an unprivileged user, run as that user.
3. Callers validate answers with a strict grammar before scorers that `eval` them
   (`mixpo.data.rg_tasks`).

An audit hook cannot stop C code, and a determined attacker with arbitrary code execution can
defeat in-process hooks; layer 1 exists so that such execution never starts, layers 2 bound the
damage if it did.
"""

from __future__ import annotations

import dataclasses
import dis
import os
import pwd
import resource
import signal
import stat
import sys
import threading
import types

# What sympy's `parse_expr` emits for numbers, fractions and symbols ("Integer (3 )/Integer (4 )",
# "Symbol ('x' )") plus its `from sympy import *` preamble; nothing here reaches builtins.
SAFE_EVAL_NAMES = frozenset({"Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow",
                             "sympy"})

# Bytecode of a pure expression: `eval` of such text can compute (a deadline bounds that) and look
# up a name, but cannot call, import, read an attribute or assign.
_PURE_OPS = frozenset({"RESUME", "NOP", "CACHE", "LOAD_CONST", "LOAD_NAME", "BUILD_LIST",
                       "BUILD_TUPLE", "BUILD_SET", "BUILD_MAP", "BUILD_CONST_KEY_MAP",
                       "LIST_EXTEND", "SET_UPDATE", "LIST_TO_TUPLE", "BINARY_OP", "BINARY_SUBSCR",
                       "UNARY_NEGATIVE", "UNARY_POSITIVE", "UNARY_INVERT", "UNARY_NOT",
                       "COMPARE_OP", "IS_OP", "CONTAINS_OP", "RETURN_VALUE", "RETURN_CONST",
                       "POP_TOP", "COPY", "SWAP", "BUILD_SLICE"})

# Audit events refused while armed (prefix match): anything that leaves the process's own memory.
_REFUSED_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                   "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
                   "socket.", "ctypes.", "os.remove", "os.unlink", "os.rename", "os.rmdir",
                   "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.symlink", "os.link",
                   "os.putenv", "os.unsetenv", "shutil.", "pickle.find_class",
                   "urllib.Request", "http.client.", "webbrowser.open", "sqlite3.connect",
                   "os.setuid", "os.setgid", "resource.setrlimit", "sys.addaudithook")

# Environment variables a reward worker keeps; everything else (API tokens, cloud credentials,
# proxy settings) is dropped.
KEPT_ENV = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ", "TMPDIR",
            "PYTHONHASHSEED", "PYTHONIOENCODING", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# Library functions that exec code they generate from their own templates, never from input:
# sympy's polynomial rings build monomial arithmetic this way (reached by math-verify's simplify).
TRUSTED_CODEGEN = (("sympy/polys/monomials.py", "_build"),)


class SandboxViolation(BaseException):
  """Untrusted text tried to run code or touch the system; the item scores 0 and is counted."""


_state = threading.local()
_installed = False
_install_lock = threading.Lock()
_violations = 0  # per process; the runner reports them per item.


def text_code_refusal(code: types.CodeType) -> str | None:
  """Why running `code` (compiled from text, not a file) is refused; None when it may run."""
  if any(isinstance(c, types.CodeType) for c in code.co_consts):
    return "refused to run code built from text (it defines a function or comprehension)"
  if set(code.co_names) <= SAFE_EVAL_NAMES:
    return None
  ops = {i.opname for i in dis.get_instructions(code)}
  if ops <= _PURE_OPS:
    return None
  return (f"refused to run code built from text (names {sorted(code.co_names)[:5]}, operations "
          f"{sorted(ops - _PURE_OPS)[:3]})")


def _trusted_caller(frame) -> bool:
  code = frame.f_code if frame is not None else None
  return code is not None and any(
      code.co_filename.replace(os.sep, "/").endswith(f) and code.co_name == fn
      for f, fn in TRUSTED_CODEGEN)


def _refuse(what: str):
  global _violations
  _violations += 1
  if getattr(_state, "violation", None) is None:
    _state.violation = what
  raise SandboxViolation(what)


def _hook(event: str, args: tuple):
  if not getattr(_state, "armed", False):
    return
  if event == "exec":
    code = args[0]
    if isinstance(code, types.CodeType) and not os.path.isfile(code.co_filename):
      why = text_code_refusal(code)
      if why and not _trusted_caller(sys._getframe(1)):  # noqa: SLF001
        _refuse(why)
  elif event == "open":
    mode = args[1] if len(args) > 1 else "r"
    flags = args[2] if len(args) > 2 else 0
    writes = (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
    if writes:
      _refuse(f"refused to open {str(args[0])[:80]!r} for writing")
  elif event.startswith(_REFUSED_EVENTS):
    _refuse(f"refused {event}")


def install():
  """Adds the audit hook to this process (idempotent; a hook cannot be removed, it stays off
  until `guarded()` arms it for the calling thread)."""
  global _installed
  with _install_lock:
    if not _installed:
      sys.addaudithook(_hook)
      _installed = True


class guarded:  # noqa: N801 — used as a context manager, like contextlib's
  """Arms the audit hook for the calling thread; see the module docstring.

  After the block, `violation` holds the first refusal's message (or None), also when the
  guarded code caught the SandboxViolation with a bare `except:` and carried on (it stays refused:
  the hook remains armed until the block ends).
  """

  def __init__(self):
    self.violation = None

  def __enter__(self):
    install()
    self._was = (getattr(_state, "armed", False), getattr(_state, "violation", None))
    _state.armed, _state.violation = True, None
    return self

  def __exit__(self, *exc):
    self.violation = _state.violation
    _state.armed, outer = self._was
    _state.violation = outer or self.violation
    return False


def violations() -> int:
  """SandboxViolations raised in this process so far."""
  return _violations


@dataclasses.dataclass(frozen=True)
class WorkerLimits:
  """Resource limits and identity of a reward worker.

  memory_bytes: RLIMIT_AS (virtual address space); 0 = unlimited.
  cpu_s_per_item: RLIMIT_CPU backstop, re-armed before each item (the runner's wall-clock
    deadline normally ends an item long before it).
  drop_privileges: "auto" (as root, become `user` when the interpreter's files are readable by
    it), True (always when root; lazy imports of unreadable modules then fail) or False.
  user: the unprivileged account.
  """
  memory_bytes: int = 8 << 30
  cpu_s_per_item: float = 60.0
  drop_privileges: bool | str = "auto"
  user: str = "nobody"


def _world_readable_path(path: str) -> bool:
  """Whether every directory from / to `path` is world-searchable (o+x)."""
  path = os.path.realpath(path)
  parts = path.split(os.sep)
  for i in range(1, len(parts) + 1):
    p = os.sep.join(parts[:i]) or os.sep
    try:
      st = os.stat(p)
    except OSError:
      return False
    if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
      return False
  return True


def privilege_drop_blocker(limits: WorkerLimits) -> str | None:
  """Why the worker keeps its user (None: it will drop to `limits.user`)."""
  if os.geteuid() != 0:
    return "not running as root (nothing to drop)"
  if limits.drop_privileges is False:
    return "disabled (drop_privileges=False)"
  try:
    pwd.getpwnam(limits.user)
  except KeyError:
    return f"no user {limits.user!r} on this machine"
  if limits.drop_privileges == "auto":
    roots = [p for p in sys.path if p and os.path.isdir(p)]
    unreadable = [p for p in roots if not _world_readable_path(p)]
    if unreadable:
      return (f"{unreadable[0]} is not readable by {limits.user!r} (a parent directory lacks o+x);"
              " install Python and mixpo outside a private home directory to get this layer")
  return None


def set_cpu_backstop(seconds: float):
  """RLIMIT_CPU soft limit = CPU used so far + `seconds` (SIGXCPU then ends the process)."""
  if seconds <= 0:
    return
  used = resource.getrusage(resource.RUSAGE_SELF)
  soft = int(used.ru_utime + used.ru_stime + seconds) + 1
  _, hard = resource.getrlimit(resource.RLIMIT_CPU)
  if hard != resource.RLIM_INFINITY:
    soft = min(soft, hard)
  resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def harden_worker(limits: WorkerLimits) -> dict:
  """Applies layer 2 to the calling process (a reward worker); returns what took effect."""
  done = {}
  try:
    os.setsid()
    done["own_session"] = True
  except OSError:  # already a session / group leader
    done["own_session"] = os.getsid(0) != os.getsid(os.getppid())
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer handles Ctrl-C and preemption
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  if limits.memory_bytes:
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
  for k in list(os.environ):
    if k not in KEPT_ENV:
      del os.environ[k]
  blocker = privilege_drop_blocker(limits)
  if blocker is None:
    pw = pwd.getpwnam(limits.user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = "/nonexistent"
  done["user"] = pwd.getpwuid(os.getuid()).pw_name
  done["privilege_drop"] = "done" if blocker is None else f"skipped: {blocker}"
  install()
  return done


def in_forkserver() -> bool:
  """Whether this code runs while multiprocessing's fork server imports its preload modules."""
  f = sys._getframe(1)  # noqa: SLF001 — the only way to tell who is importing us
  while f is not None:
    if f.f_code.co_name == "main" and f.f_code.co_filename.endswith(
        os.path.join("multiprocessing", "forkserver.py")):
      return True
    f = f.f_back
  return False
