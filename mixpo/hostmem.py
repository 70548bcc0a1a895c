"""Host allocator settings that keep XLA:CPU from page-faulting its buffers in at every call.

XLA:CPU mallocs each executable's temporary buffer when the executable runs and frees it when
the call ends (1.04 GB for bench_model's train step). glibc serves any block over 32 MB with a
fresh `mmap` and returns it with `munmap`, so every call touches brand-new pages: bench_model's
train step took 380k minor page faults per step, a third of its CPU time spent in the kernel.
`keep_freed_memory()` makes the process reuse that memory instead:

  M_MMAP_MAX = 0            large blocks come from the heap, not from mmap;
  M_TRIM_THRESHOLD = 2 GiB  freed memory at the top of the heap stays mapped for the next call;
  jax_cpu_enable_async_dispatch = False
                            XLA:CPU runs a computation on the calling thread. Only the main
                            thread allocates from glibc's main heap: a worker thread has its
                            own arena, which cannot hold a block over 64 MB and falls back to
                            mmap whatever M_MMAP_MAX says. (One arena for every thread,
                            M_ARENA_MAX = 1, also works but costs `generate` 15 % in lock
                            contention.)

The cost: memory the process frees is not returned to the OS below that threshold, and a jax
call on the CPU backend returns once its result is ready. Both are process-global, so
`import mixpo` does NOT apply them: a binary (experiments/train.py, bench_*.py, ...) calls
`keep_freed_memory()` first in its main, before jax's first computation (the CPU client reads
the dispatch mode once; `status` says what took effect). They are for XLA:CPU only: where jax
will run on an accelerator (jax_platforms / JAX_PLATFORMS names one first, or an accelerator
plugin is installed, its chip is present and no platform is forced) nothing is changed. MIXPO_MALLOC=system keeps
all defaults; anywhere other than Linux/glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

ENV_VAR = "MIXPO_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))

# What the last call did: None (not attempted), or a short reason string.
status: str | None = None


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return None  # musl and friends
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  return libc


# jax's accelerator plugins (and TPU runtime) and the hardware each computes on; one importable
# with its hardware present means jax's default backend will be an accelerator unless
# jax_platforms forces the CPU. Installed without it (libtpu and the CUDA plugin compile for TPU /
# GPU targets on a CPU host: experiments/aot_compile.py) jax computes on the CPU.
def _tpu_chips() -> bool:
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def _nvidia_gpus() -> bool:
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  return hardware_utils.has_visible_nvidia_gpu()


def _amd_gpus() -> bool:
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  return hardware_utils.num_available_amd_gpus(stop_at=1) > 0


_ACCELERATOR_MODULES = (("jax_cuda12_plugin", _nvidia_gpus), ("jax_cuda13_plugin", _nvidia_gpus),
                        ("jax_rocm60_plugin", _amd_gpus), ("jax_rocm7_plugin", _amd_gpus),
                        ("libtpu", _tpu_chips))


def _accelerator_backend() -> str | None:
  """The accelerator jax will compute on by default, or None for the CPU; never starts a backend
  (that would fix the dispatch mode before it is set)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    backend = jax.default_backend()
    return None if backend == "cpu" else backend
  platforms = (jax.config.values.get("jax_platforms") or os.environ.get("JAX_PLATFORMS") or "")
  first = platforms.split(",")[0].strip().lower()
  if first:
    return None if first == "cpu" else first
  for name, hardware_present in _ACCELERATOR_MODULES:
    try:
      if importlib.util.find_spec(name) is not None and hardware_present():
        return name
    except (ImportError, ValueError, OSError):
      continue
  return None


def _skip_idle_runtimes() -> None:
  """Sets jax_platforms=cpu when no platform is forced and accelerator runtimes are installed
  (libtpu, a CUDA / ROCm plugin: e.g. for compile-only targets) but none of their chips is
  present. jax would compute on the CPU anyway, after starting each runtime, which fails with a
  page of warnings (libtpu's TPU-VM lookups, the CUDA plugin's missing-library traceback) at the
  start of every binary."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if (xla_bridge.backends_are_initialized() or jax.config.values.get("jax_platforms")
      or os.environ.get("JAX_PLATFORMS")):
    return
  installed = []
  for name, _ in _ACCELERATOR_MODULES:
    try:
      installed += [name] if importlib.util.find_spec(name) is not None else []
    except (ImportError, ValueError):
      continue
  if installed and _accelerator_backend() is None:
    jax.config.update("jax_platforms", "cpu")


def keep_freed_memory() -> bool:
  """Applies the settings above (XLA:CPU only); True when they are in effect. Idempotent.

  Call it first in a binary's main; `import mixpo` never calls it. It also keeps jax from
  starting accelerator runtimes that have no chip here (`_skip_idle_runtimes`).
  """
  global status
  _skip_idle_runtimes()
  if os.environ.get(ENV_VAR, "").strip().lower() in ("system", "default", "0", "off"):
    status = f"off ({ENV_VAR}={os.environ[ENV_VAR]})"
    return False
  accelerator = _accelerator_backend()
  if accelerator is not None:
    status = f"off (jax computes on an accelerator: {accelerator}; the settings are for XLA:CPU)"
    return False
  libc = _glibc()
  if libc is None:
    status = "off (not glibc)"
    return False
  if not all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS):
    status = "off (mallopt refused a setting)"
    return False
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if jax.config.values["jax_cpu_enable_async_dispatch"]:
    if xla_bridge.backends_are_initialized():  # the CPU client already exists: too late
      status = ("heap only (jax's backend was initialised before keep_freed_memory() was "
                "called; its CPU computations run on worker threads, whose temp buffers over "
                "64 MB are still mmap'ed per call: call mixpo.hostmem.keep_freed_memory() first "
                "in main)")
      return True
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  status = "on"
  return True
