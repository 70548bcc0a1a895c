r"""Equal-budget comparison grid (experiments/compare.py): the default task, guide and weak start.

  python experiments/compare.py --grid=main --seeds=0,1,2 --regimes=weak,moderate
  python experiments/compare.py --grid=gamma --budget_tokens=100000
  python experiments/compare.py --grid=main --small   # minutes on CPU (tests): get_config("small")
Run settings are the default experiment's; tune them here (`c.<field> = ...`). Grid knobs live in
`c.compare` and are stripped before each cell runs (they are not part of a run's fingerprint).
"""

import ml_collections

from experiments.configs import default, smoke


def compare_settings(small: bool = False) -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  # Regime name → builtin.policy_steps (SFT steps of the weak start; more = stronger start).
  g.regimes = ml_collections.ConfigDict({"weak": 3, "moderate": 8} if small else
                                        {"weak": 120, "moderate": 250})
  g.gammas = (0.01, 0.1, 1.0)  # γ values of the "gamma" grid (Mix-2).
  g.threshold_delta = 0.2  # "tokens to threshold" = first eval accuracy ≥ initial + this.
  return g


def get_config(mode: str = "") -> ml_collections.ConfigDict:
  """mode "" = the real grid; "small" = smoke-sized models and a budget of ~2 steps (tests)."""
  if mode not in ("", "small"):
    raise ValueError(f"experiments/configs/compare.py: config mode {mode!r}: expected '' or "
                     "'small' (--config=experiments/configs/compare.py:small).")
  small = mode == "small"
  c = (smoke if small else default).get_config()
  c.num_steps = 100_000  # effectively unbounded: every cell stops at max_policy_tokens.
  c.max_policy_tokens = 400 if small else 100_000  # policy tokens per cell (--budget_tokens).
  c.export_hf = False
  c.progress = False  # compare.py shows one bar over cells.
  c.log_samples_every = 0
  c.compare = compare_settings(small)
  return c
