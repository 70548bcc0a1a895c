"""Shared pytest setup: strict numpy semantics as in nanodo, one CPU device by default."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long runs, excluded from the default suite (-m slow to run)")
