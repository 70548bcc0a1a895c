"""mixpo.hostmem: with mixpo imported, XLA:CPU reuses its temp buffer instead of faulting it in.

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
import mixpo
from mixpo import hostmem
import jax, jax.numpy as jnp

@jax.jit
def f(x):  # the [4096, 4096] float32 product (64 MB) is an XLA temp buffer
  return (x @ x.T) @ x

x = jnp.ones((4096, 64), jnp.float32)
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(hostmem.status, sorted(faults[3:])[2])  # median of the calls after warm-up
"""


def _probe(env_value):
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  if env_value is None:
    env.pop("MIXPO_MALLOC", None)
  else:
    env["MIXPO_MALLOC"] = env_value
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  return out[0], int(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc-specific settings")
def test_temp_buffers_are_reused_not_faulted_in():
  status, faults = _probe(None)
  assert status == "on"
  # 64 MB = 16k pages of 4 KB; a reused buffer faults in (almost) nothing.
  assert faults < 2000, faults
  status, faults = _probe("system")
  assert status.startswith("off")
  assert faults > 8000, faults  # glibc's defaults: a fresh mmap per call (what the setting fixes)


def test_status_says_when_imported_too_late():
  code = ("import jax; jax.numpy.ones(2).block_until_ready()\n"
          "import mixpo; print(mixpo.hostmem.status)")
  env = {k: v for k, v in os.environ.items() if k != "MIXPO_MALLOC"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert "import mixpo first" in out
