r"""The reasoning comparison grids (experiments/compare.py): chain-of-thought column addition.

  python experiments/compare.py --config=compare_reasoning --grid=main --seeds=0,1,2,3,4
  python experiments/compare.py --config=compare_reasoning --grid=style --seeds=0,1,2,3,4
  python experiments/compare.py --config=compare_reasoning --grid=source --seeds=0,1,2,3,4
  python experiments/compare.py --config=compare_reasoning:small --grid=main --seeds=0  # tests
Results go to experiments/results/reasoning/<grid>.{csv,md,png}. The variants of each grid are
experiments/grid.py's REASONING_GRIDS; the models, traces and budgets below are sized so that each
grid runs within an hour on a 2-core CPU with 5 seeds (BUILD_NOTES, "The reasoning grids").
"""

import ml_collections

from experiments.configs import reasoning, smoke


def compare_settings(small: bool = False) -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  g.kind = "reasoning"  # experiments/grid.py: the variants of REASONING_GRIDS, not the table's.
  g.results_subdir = "reasoning"  # experiments/results/<this>/
  # Regime name → builtin.policy_steps of the weak start (SFT steps; more = stronger start).
  g.regimes = ml_collections.ConfigDict({"weak": 3, "moderate": 6} if small else
                                        {"weak": 180, "moderate": 230})
  g.grid_regimes = {"main": ("weak", "moderate"), "style": ("weak",), "source": ("weak",)}
  g.gammas = (0.1,)
  # Every grid holds this unguided entry; the summaries give paired differences to it.
  g.baseline = "dapo"
  g.threshold_delta = 0.1  # "tokens to threshold" = first eval accuracy ≥ initial + this.
  # Guide styles of the style grid: label → builtin.guide_task_kwargs of that guide.
  g.guide_styles = {"same": {}, "words": {"style": "words"}}
  # Offline traces (grid "source", the LUFFY preset, the SFT baseline): guide samples per train
  # prompt, drawn once per guide at the rollout temperature.
  g.trace_prompts = 16 if small else 1536
  g.trace_per_prompt = 2 if small else 4
  # The style grid's words-style guide writes up to 125 characters (3 digits): its own widths.
  g.style_max_new_tokens = 96 if small else 144
  # SFT steps of a guide of another style (its chains are ~3x longer: it learns more slowly; the
  # words-style curve is in BUILD_NOTES). 0 = builtin.guide_steps.
  g.style_guide_steps = 0 if small else 800  # greedy eval accuracy 0.98 (0.92 at 700)
  # LUFFY as published and the SFT baseline keep only the traces the verifier marks correct
  # (LUFFY's data are verified solutions); False in the smoke grid, whose guide solves nothing.
  g.only_correct = not small
  # The SFT baseline: supervised steps on the guide's traces (groups × m rows a step).
  g.sft_learning_rate = 1e-3
  return g


def get_config(mode: str = "") -> ml_collections.ConfigDict:
  """mode "" = the real grids; "small" = smoke-sized models and a one-step budget (tests)."""
  if mode not in ("", "small"):
    raise ValueError(f"experiments/configs/compare_reasoning.py: config mode {mode!r}: expected "
                     "'' or 'small' (--config=experiments/configs/compare_reasoning.py:small).")
  small = mode == "small"
  c = reasoning.get_config()
  b = c.builtin
  # Columns-style solutions of 3 digits are at most 46 characters: 64 tokens leave room for
  # the overlong ramp (last 16 tokens) without ever penalising a correct solution.
  b.max_answer_tokens = 64
  c.rollout.max_new_tokens = 64
  c.rollout.overlong_cache = 16
  b.guide_steps = 600  # greedy eval accuracy 1.00 on 200 held-out problems (BUILD_NOTES)
  if small:
    s = smoke.get_config()
    b.hidden, b.layers, b.heads, b.kv_heads, b.intermediate = 32, 1, 2, 1, 64
    b.batch_size, b.guide_steps = 16, 10
    b.task_kwargs = c.task_kwargs = {"digits": 2, "ops": "+", "style": "columns"}
    b.max_answer_tokens = c.rollout.max_new_tokens = 40
    c.rollout.overlong_cache = 4
    for field in ("groups", "n", "m", "zero_groups"):  # the smoke sizes
      c.rollout[field] = s.rollout[field]
    c.eval_size = c.eval_batch_size = 8
  c.num_steps = 100_000  # effectively unbounded: every cell stops at max_policy_tokens.
  c.max_policy_tokens = 1 if small else 30_000  # policy tokens per cell (--budget_tokens).
  c.eval_every = 4
  c.eval_size = c.eval_batch_size = 8 if small else 100
  c.checkpoint_every = 4
  c.export_hf = False
  c.progress = False
  c.log_samples_every = 0
  c.compare = compare_settings(small)
  return c
