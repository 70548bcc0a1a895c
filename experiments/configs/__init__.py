"""Experiment configs (ml_collections). Each file's docstring holds its launch command."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def resolve_config_path(value: str) -> str:
  """'smoke' or 'smoke.py' → the path of experiments/configs/smoke.py; paths pass through.

  A config_flags override suffix (`path:arg`) is kept.
  """
  name, sep, arg = value.partition(":")
  if os.path.exists(name):
    return value
  base = name[:-3] if name.endswith(".py") else name
  candidate = os.path.join(_HERE, base.replace(".", "_").replace("-", "_") + ".py")
  if os.path.exists(candidate):
    return candidate + sep + arg
  return value
