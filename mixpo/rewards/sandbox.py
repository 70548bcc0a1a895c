"""Containment for code that reads untrusted text: reward workers and scorers that call `eval`.

Threat model: completions are written by the policy being trained and dataset / trace rows by
whoever made the file; both are untrusted. Rewards parse them with third-party scorers (sympy's
`parse_expr`, reasoning-gym scorers that `eval` the answer), on machines that hold credentials
and checkpoints. Reward code itself (mixpo's scorers, a `--config.reward.functions` module) is
trusted, like the config file: the layers contain what the text makes that code do. Three
layers, each useful without the others:

1. `guarded()`: a Python audit hook, armed per thread around a reward call, refuses to execute
   any code object that does not come from a source file unless it is a pure expression (literals,
   operators, subscripts and bare names: no call, attribute, import or store) or every name it
   uses is one of sympy's number/symbol constructors (what `parse_expr` emits for arithmetic), and
   refuses process spawning, signals, sockets, native-library loading, file writes, pickle /
   marshal loading and reads outside an allow-list (the Python installation, site-packages,
   mixpo's package, the files of modules already loaded, `allow_reads()` paths): no
   `/proc/*/environ`, no home directory, no run directory. A refusal raises `SandboxViolation`
   (a BaseException, so a scorer's `except Exception` cannot swallow it); the runner scores the
   item 0 and counts it as blocked. Because imports run module code that builds functions from
   text (dataclasses, namedtuples), everything a scorer imports must be imported before the hook
   is armed: the runner calls each reward fn's `prepare()` first (see `mixpo.rewards.runner`).
2. `harden_worker()`: reward worker processes run in their own session (a scheduler's group-wide
   SIGTERM does not reach them; the trainer decides when they stop), ignore SIGINT / SIGTERM, have
   no core files, an address-space limit and a CPU-time backstop, an environment scrubbed of
   everything but locale / path variables (no tokens or cloud credentials), and, when started as
   root and the interpreter's files are readable by an unprivileged user, run as that user. The
   fork server they are forked from re-executes itself with the scrubbed environment
   (`restart_scrubbed`, run by `mixpo.rewards.worker_init`), so not even the environment block a
   process starts with (`/proc/self/environ`, the fork server's `/proc/<ppid>/environ`) holds the
   trainer's secrets.
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
import site
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
# What the fork server keeps on top: where Python and its libraries are (paths, not secrets);
# without them the re-executed interpreter may not start or may import another copy of mixpo.
FORKSERVER_ENV = KEPT_ENV + ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONNOUSERSITE",
                             "PYTHONSAFEPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX",
                             "LD_LIBRARY_PATH")
# Device files a scorer may read (random numbers); everything else under /dev and /proc is not.
_DEVICE_READS = ("/dev/null", "/dev/urandom", "/dev/random")


# Library functions that exec code they generate from their own templates, never from input:
# sympy's polynomial rings build monomial arithmetic this way (reached by math-verify's simplify).
TRUSTED_CODEGEN = (("sympy/polys/monomials.py", "_build"),)


class SandboxViolation(BaseException):
  """Untrusted text tried to run code or touch the system; the item scores 0 and is counted."""


_state = threading.local()
_installed = False
_install_lock = threading.Lock()
_violations = 0  # per process; the runner reports them per item.
_extra_reads: list[str] = []  # allow_reads()
_roots: tuple[str, ...] | None = None  # read_roots(), computed once
_module_files: tuple[int, frozenset] = (-1, frozenset())  # (len(sys.modules), their files)
# Set in the fork server's environment once it has re-executed itself (restart_scrubbed), so a
# variable that Python's own start-up adds (a .pth file) cannot make it re-execute forever.
SCRUBBED_MARK = "MIXPO_REWARD_ENV_SCRUBBED"


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


def _under(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def allow_reads(*paths: str) -> None:
  """Adds files or directories a guarded reward may read (`WorkerLimits.read_paths`)."""
  _extra_reads.extend(os.path.realpath(p) for p in paths)


def read_roots() -> tuple[str, ...]:
  """Directories a guarded reward may read under: the Python installation, site-packages and
  mixpo's package, minus any that would hold the home or the working directory (a Python
  installed at "/" must not open up the whole disk)."""
  global _roots
  if _roots is None:
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    cands.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
    cands.update(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))
    private = [os.path.realpath(os.path.expanduser("~")), os.path.realpath(os.getcwd())]
    real = {os.path.realpath(c) for c in cands if c}
    _roots = tuple(sorted(r for r in real if not any(_under(p, r) for p in private)))
  return _roots


def _loaded_files() -> frozenset:
  """Source files of the modules already imported (tracebacks and warnings read them)."""
  global _module_files
  mods = list(sys.modules.values())
  if _module_files[0] != len(mods):
    files = set()
    for m in mods:
      f = m.__dict__.get("__file__") if isinstance(m, types.ModuleType) else None
      if isinstance(f, str):
        files.add(os.path.realpath(f))
    _module_files = (len(mods), frozenset(files))
  return _module_files[1]


def read_refusal(path) -> str | None:
  """Why a guarded reward may not open `path` for reading; None when it may."""
  if isinstance(path, int):
    return f"refused to open the inherited file descriptor {path}"
  try:
    real = os.path.realpath(os.fsdecode(path))
  except (TypeError, ValueError):
    return f"refused to open {str(path)[:80]!r}"
  if (real in _DEVICE_READS or any(_under(real, r) for r in read_roots() + tuple(_extra_reads))
      or real in _loaded_files()):
    return None
  return (f"refused to read {real[:80]!r}: outside the reward sandbox's read allow-list (the "
          "Python installation, site-packages, mixpo, loaded modules' files, "
          "WorkerLimits.read_paths)")


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
    why = read_refusal(args[0])
    if why:
      _refuse(why)
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
  read_paths: files or directories a guarded reward may read on top of the default allow-list
    (see `read_roots`), e.g. a lookup table a user reward opens per call.
  """
  memory_bytes: int = 8 << 30
  cpu_s_per_item: float = 60.0
  drop_privileges: bool | str = "auto"
  user: str = "nobody"
  read_paths: tuple = ()


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
  done["environ"] = environ_report()
  allow_reads(*limits.read_paths)
  read_roots()  # computed now, while the working directory is the trainer's
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


def restart_scrubbed() -> None:
  """Re-executes this process with only the FORKSERVER_ENV variables of its environment.

  Run by the reward workers' fork server (`mixpo.rewards.worker_init`) before it imports
  anything else: deleting from `os.environ` would leave the values in the environment block the
  kernel shows as /proc/<pid>/environ, which every worker would inherit. The process keeps its
  pid and the descriptors multiprocessing passed it. Falls back to scrubbing `os.environ` when
  it was already re-executed or exec fails (`environ_report` then says what the block holds).
  """
  if os.environ.get(SCRUBBED_MARK) != "1":
    env = {k: v for k, v in os.environ.items() if k in FORKSERVER_ENV}
    env[SCRUBBED_MARK] = "1"
    try:
      os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
      pass
  for k in list(os.environ):
    if k not in FORKSERVER_ENV and k != SCRUBBED_MARK:
      del os.environ[k]


def environ_report() -> str:
  """What the environment block this process started with holds (its /proc/self/environ)."""
  try:
    with open("/proc/self/environ", "rb") as f:
      names = {v.split(b"=", 1)[0].decode(errors="replace") for v in f.read().split(b"\0") if v}
  except OSError:
    return "unknown (no /proc)"
  extra = names - set(FORKSERVER_ENV) - {SCRUBBED_MARK}
  if not extra:
    return "scrubbed"
  return (f"the start-up block still holds {len(extra)} other variables (e.g. {sorted(extra)[0]})"
          ": the fork server was not started with mixpo.rewards.worker_init preloaded")
