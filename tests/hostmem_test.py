"""mixpo.hostmem: the explicit `keep_freed_memory()` makes XLA:CPU reuse its temp buffer instead of
faulting it in; `import mixpo` alone changes nothing process-global.

Each case runs in a fresh interpreter (the settings must precede jax's first computation) and
counts the minor page faults of a call (median of five) of a jitted function whose 64 MB
temporary is far above glibc's mmap threshold.
"""

import os
import subprocess
import sys

import pytest

_PROBE = r"""
import resource, sys
import mixpo, mixpo.models, mixpo.sampling, mixpo.train, mixpo.rl, mixpo.loop
from mixpo import hostmem
import jax, jax.numpy as jnp
from jax._src import xla_bridge

untouched = (hostmem.status is None and not xla_bridge.backends_are_initialized()
             and jax.config.values["jax_cpu_enable_async_dispatch"])
if sys.argv[1] == "call":
  hostmem.keep_freed_memory()

@jax.jit
def f(x):  # the [4096, 4096] float32 product (64 MB) is an XLA temp buffer
  return (x @ x.T) @ x

x = jnp.ones((4096, 64), jnp.float32)
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(untouched, jax.config.values["jax_cpu_enable_async_dispatch"], hostmem.status,
      sorted(faults[3:])[2])  # median of the calls after warm-up
"""


def _env(malloc_value=None):
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  env["JAX_PLATFORMS"] = "cpu"
  if malloc_value is None:
    env.pop("MIXPO_MALLOC", None)
  else:
    env["MIXPO_MALLOC"] = malloc_value
  return env


def _probe(mode, malloc_value=None):
  """(import left everything untouched, async dispatch after, status, median faults per call)."""
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=_env(malloc_value),
                       capture_output=True, text=True, timeout=300, check=True).stdout.split()
  return out[0] == "True", out[1] == "True", out[2], int(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc-specific settings")
def test_explicit_call_reuses_temp_buffers():
  untouched, async_dispatch, status, faults = _probe("call")
  assert untouched and status == "on" and not async_dispatch
  # 64 MB = 16k pages of 4 KB; a reused buffer faults in (almost) nothing.
  assert faults < 2000, faults
  _, async_dispatch, status, faults = _probe("call", "system")
  assert status.startswith("off") and async_dispatch
  assert faults > 8000, faults  # glibc's defaults: a fresh mmap per call (what the setting fixes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc-specific settings")
def test_import_mixpo_changes_nothing_process_global():
  """Importing mixpo and its main modules leaves the allocator (still a fresh mmap per call),
  jax's dispatch mode and its backends (not started) as they were."""
  untouched, async_dispatch, status, faults = _probe("no-call")
  assert untouched and async_dispatch and status == "None"
  assert faults > 8000, faults


def test_status_says_when_called_too_late():
  code = ("import jax; jax.numpy.ones(2).block_until_ready()\n"
          "from mixpo import hostmem; hostmem.keep_freed_memory(); print(hostmem.status)")
  out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert "call mixpo.hostmem.keep_freed_memory() first" in out


def test_accelerator_platform_leaves_settings_alone():
  """On an accelerator the settings (for XLA:CPU) are not applied; nothing starts a backend."""
  code = ("import jax; jax.config.update('jax_platforms', 'tpu')\n"
          "from jax._src import xla_bridge\n"
          "from mixpo import hostmem; print(hostmem.keep_freed_memory(), "
          "xla_bridge.backends_are_initialized(), jax.config.values["
          "'jax_cpu_enable_async_dispatch'], hostmem.status)")
  out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert out.startswith("False False True off (jax computes on an accelerator: tpu"), out
