"""Experiment configs (ml_collections). Each file's docstring holds its launch command."""


def resolve_config_path(value: str) -> str:
  """'smoke' or 'smoke.py' → the path of experiments/configs/smoke.py; paths pass through.

  A config_flags override suffix (`path:arg`) is kept; an unknown name is returned unchanged
  (the binaries' front door, `mixpo.cli.resolve_config`, reports it with the shipped names).
  """
  from mixpo import cli
  try:
    return cli.resolve_config(value)
  except cli.UserError:
    return value
