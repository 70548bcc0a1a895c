"""Shared pytest setup: strict numpy semantics as in nanodo, one CPU device by default."""

import os
import tempfile

# A persistent XLA cache shared by this process and the binaries the tests launch in
# subprocesses (they inherit the environment): the same tiny programs compile once per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mixpo-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite computes on the host CPU (JAX_PLATFORMS=tpu / cuda, set by the caller, overrides).
# The test extra installs libtpu and jax's CUDA plugin for compile-only targets
# (aot_compile_test.py): with the CPU forced, neither starts a runtime, looks for a chip or
# driver, or logs at start-up, here or in the binaries the tests launch (they inherit this).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata-server lookups

import jax  # noqa: E402
import pytest

from mixpo import hostmem  # noqa: E402

# As the binaries do: XLA:CPU host-allocator settings before jax's first computation.
hostmem.keep_freed_memory()

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long runs, excluded from the default suite (-m slow to run)")


@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory):
  """The smoke config's built-in policy / guide / tokenizer, built once for the whole run."""
  from experiments.configs import smoke  # noqa: PLC0415
  from mixpo import builtin  # noqa: PLC0415
  d = str(tmp_path_factory.mktemp("builtin"))
  builtin.ensure_builtin_models(d, smoke.get_config().builtin)
  return d


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
  """(path, transformers model) of a tiny llama GGUF laid out as llama.cpp writes one, the
  stand-in for SmolLM2-135M-Instruct's file (tests/tiny_gguf.py)."""
  import tiny_gguf as writer  # noqa: PLC0415  (tests/ is on sys.path: rootdir conftest)
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  return path, writer.write(path)


@pytest.fixture(scope="session")
def tiny_converted(tiny_gguf, tmp_path_factory):
  """(directory, transformers model, tokenizer): `tiny_gguf` converted by
  experiments/convert_gguf.py's `convert` into a Hugging Face directory mixpo loads."""
  from experiments import convert_gguf  # noqa: PLC0415
  out = str(tmp_path_factory.mktemp("converted"))
  model, tokenizer = convert_gguf.convert(tiny_gguf[0], out)
  return out, model, tokenizer
