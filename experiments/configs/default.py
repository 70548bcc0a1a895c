r"""The default experiment: Mix-2 from a weak tiny policy with a tiny guide on 2-digit addition.

Launch (the README's main command; no download; time it takes: README "The default experiment"):
  python experiments/train.py --config=default --workdir=workdir/default
Any field can be overridden, e.g. --config.algo=dapo --config.objective.gamma=0.5 (or the
short --algo=dapo).
Your own data: --config.task=file --config.task_kwargs.train_path=data.jsonl (options below).
"""

import ml_collections

from mixpo.data import task_options


def builtin_models() -> ml_collections.ConfigDict:
  """Recipe of the built-in char-level guide and weak starting policy (mixpo/builtin.py)."""
  b = ml_collections.ConfigDict()
  b.task = "addition"  # the task both are supervised on (its train split only).
  b.task_kwargs = {"digits": 2, "terms": 2}
  b.hidden = 128  # Qwen2 architecture, tied embeddings, char vocabulary.
  b.layers = 2
  b.heads = 4
  b.kv_heads = 2
  b.intermediate = 384
  b.max_positions = 64
  b.batch_size = 128  # SFT batch (prompts).
  b.learning_rate = 3e-3  # SFT peak learning rate (AdamW, 50 warmup steps).
  b.guide_steps = 1200  # SFT steps of the guide: ~95% eval accuracy.
  b.policy_steps = 120  # SFT steps of the weak start: rarely solves a problem (~5-15%).
  b.seed = 0
  return b


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Groups map onto the dataclasses that validate them: objective → objectives.ObjectiveConfig,
  # rollout → rl.RolloutConfig, optim → train.OptimConfig, step → train.StepConfig, guide →
  # rl.GuideSpec / guide_source.TraceOptions, advantage, reward (README "Config groups").
  # --- algorithm
  c.algo = "mix2"  # an entry of mixpo/algorithms.py's table: grpo | dapo | luffy | mix1 | mix2.
  c.advantage = ml_collections.ConfigDict()
  # ON/ZERO/OFF partition: "paper" (literal, R > 0) or "dapo" (group variance).
  c.advantage.scheme = "dapo"
  # divide every advantage pool by its std; False = Dr. GRPO's R − mean.
  c.advantage.std_normalize = True
  c.objective = ml_collections.ConfigDict()  # objectives.ObjectiveConfig (its docstrings).
  c.objective.eps_low = 0.2  # clip range below 1.
  c.objective.eps_high = 0.28  # clip range above 1 (DAPO clip-higher).
  c.objective.gamma = 0.1  # γ of f(r̂) = r̂ / (r̂ + γ).
  c.objective.on_weight = 0.5  # w in J = w·J_on + (1 − w)·J_off / J_mix.
  # μ in chord's J = (1 − μ)·J_on + μ·J_sft (CHORD's SFT weight, held constant).
  c.objective.sft_coef = 0.1
  # dual-clip constant c > 1 for A < 0 (bounds πθ/πϕ-weighted ZERO terms); 0 = off.
  c.objective.dual_clip = 3.0
  c.objective.max_log_ratio = 20.0  # |log-ratio| bound before exp.
  # "exact": ∇ of f(r̂)·A (eq. 4); "paper_step": f'(r̂)·A·∇log π, the step of the paper's §3.1.2
  # argument. The default experiment uses the latter: with the exact gradient no guided method
  # learns from the weak start (README "Results").
  c.objective.shaping_grad = "paper_step"
  # Mix-2 ZERO-sample ratio: "guide" (paper's πθ/πϕ) or "old" (πθ/πθ_old).
  c.objective.zero_ratio = "guide"
  # --- objective switches (mixpo/objectives.py's docstring; defaults = the algorithms as published)
  # Token aggregation of every set: "default" (the algorithm's own: GRPO seq-mean-token-mean, the
  # others token-mean) | "token-mean" (DAPO) | "seq-mean-token-mean" (GRPO) |
  # "seq-mean-token-sum-norm" (Dr. GRPO, arXiv 2503.20783; constant = rollout.max_new_tokens).
  c.objective.loss_agg = "default"
  # KL(πθ ‖ π_ref) penalty to the frozen starting policy over trained tokens; 0 = none (no
  # reference is loaded).
  c.objective.kl_coef = 0.0
  # x = log π_ref − log πθ: "k1" (−x), "k2" (x²/2), "k3" (exp(x) − 1 − x, verl's low_var_kl).
  c.objective.kl_estimator = "k3"
  c.objective.entropy_coef = 0.0  # entropy bonus on trained tokens (TRL / verl's entropy_coeff).
  # The bonus' aggregation: "loss_agg" (as the policy terms, verl's) or "token-mean" (TRL's,
  # LUFFY's).
  c.objective.entropy_agg = "loss_agg"
  # ON / ZERO ratio: "token" (PPO) or "sequence" (GSPO, arXiv 2507.18071).
  c.objective.ratio_level = "token"
  c.objective.seq_eps_low = 3e-4  # GSPO's clip range below 1 (its paper's value).
  c.objective.seq_eps_high = 4e-4  # GSPO's clip range above 1.
  # ON / ZERO: CISPO's sg(clipped IS weight)·A·log π (MiniMax-M1, arXiv 2506.13585).
  c.objective.cispo = False
  c.objective.cispo_eps_low = 1.0  # CISPO weight >= 1 − this (1.0: no lower bound).
  c.objective.cispo_eps_high = 0.28  # CISPO weight <= 1 + this.
  # --- models
  c.policy = "builtin"  # HF checkpoint directory of the starting policy, or "builtin".
  c.guide = ml_collections.ConfigDict()  # rl.GuideSpec: where OFF rows come from.
  c.guide.path = "builtin"  # HF checkpoint directory of the frozen guide, or "builtin"; "" = none.
  # πϕ of the OFF rows: "model" (score with the guide checkpoint), "one" (πϕ ≡ 1, LUFFY), or,
  # with guide.source="traces", "file" (the per-token log-probs stored in the trace file).
  c.guide.logp = "model"
  # Where OFF rows come from (mixpo/guide_source.py): "model" (m samples of guide.path per
  # prompt, every step) or "traces" (the trace file is the train set; each prompt's stored guide
  # responses, up to m, are its OFF rows; guide.path is loaded only for guide.logp="model").
  c.guide.source = "model"
  c.guide.traces_path = ""  # trace file (.jsonl / .parquet) for guide.source="traces".
  c.guide.traces = ml_collections.ConfigDict()  # how to read it (mixpo.guide_source.TraceOptions):
  # "mixpo" | "verl" (LUFFY) | "openr1" | "auto" (from the first row).
  c.guide.traces.format = "auto"
  # dotted field paths overriding the format's, e.g. {"responses": "outs"}.
  c.guide.traces.fields = {}
  # "auto": chat lists rendered; "always": strings too; "never".
  c.guide.traces.chat_template = "auto"
  # keep only responses the file marks correct (dropped: counted).
  c.guide.traces.only_correct = False
  # responses over max_new_tokens: "drop" or "truncate" (loss-masked).
  c.guide.traces.overlong = "drop"
  c.guide.traces.max_prompt_tokens = 0  # longer prompts are bad rows; 0 = no limit.
  # count and skip bad rows instead of stopping with DataError.
  c.guide.traces.skip_bad_rows = False
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators).
  c.model.param_dtype = "float32"  # parameter storage dtype.
  c.model.remat = False  # rematerialise each decoder layer in the backward pass.
  c.model.attention_impl = "auto"  # auto (by backend) | xla | dot_product_attention | cudnn | pallas
  c.builtin = builtin_models()
  c.builtin_dir = ""  # where built-in models are made / reused; "" = workdir/models.
  # --- task and rewards
  c.task = "addition"  # registered task name (mixpo.data.get_task).
  # Options of the task, declared once in mixpo/data/task_options.py (OPTIONS: help per field):
  # addition: digits, terms, reward; file: train_path, eval_path, prompt_field, answer_field,
  # chat_template, max_prompt_tokens (0 = no limit), skip_bad_rows, eval_fraction.
  # A task gets only the options it takes; changing one it does not take is an error.
  c.task_kwargs = task_options.config_defaults()
  c.task_knobs = ""  # extra knobs of other tasks as k=v,k=v (e.g. rg:countdown's max_numbers=4).
  c.reward = ml_collections.ConfigDict()
  # Reward functions: "" = the task's own verifier; else comma-separated entries, each "task"
  # (the task's verifier), "pkg.module:fn" or "path/to/file.py:fn" (TRL signature), or
  # "verl:pkg.module:compute_score" (verl signature). docs/rewards.md.
  c.reward.functions = ""
  c.reward.weights = ""  # comma-separated weights, one per reward.functions entry ("" = all 1.0).
  c.reward.timeout_s = 5.0  # per-item reward deadline; a timeout scores 0 and is counted.
  # Deadline of one call of the reward runner (a step's rollout batch, an eval batch): items not
  # scored by then score 0 and are counted, so a degenerate policy cannot stall a step. 0 = none.
  c.reward.batch_timeout_s = 300.0
  c.reward.on_error = "raise"  # "raise" or "zero" for a reward function that raises.
  # Warn (log line + summary.json) at the first step where more than this share of reward items
  # scored 0 as blocked / errors / unverifiable / scorer errors / timeouts, not as wrong answers.
  c.reward.failure_warn_ratio = 0.5
  # --- rollout (rl.RolloutConfig)
  c.rollout = ml_collections.ConfigDict()
  c.rollout.groups = 16  # prompt groups per train batch.
  c.rollout.n = 8  # policy samples per prompt.
  c.rollout.m = 8  # guide samples per prompt (luffy, mix1, mix2).
  c.rollout.zero_groups = 16  # Mix-2: zero-variance groups kept as the ZERO set.
  c.rollout.dynamic_sampling = True  # DAPO: redraw until `groups` groups have reward variance.
  c.rollout.max_num_gen_batches = 3  # cap of generation batches per step.
  c.rollout.max_new_tokens = 6  # response budget in tokens.
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.rollout.slots = 0  # decode slots of the policy's sampling stream; 0 = groups × n.
  # Who generates rollouts: "jax" (mixpo's sampler) or "vllm" (in-process vLLM engines, the
  # `vllm` extra; the policy's weights are copied into its engine in place at every step).
  c.rollout.engine = "jax"
  # Parameter + compute dtype of rollout and scoring (policy and guide generation; θ_old, guide
  # and KL-reference log-probs): "model" (the models as loaded, config.model.*), "bfloat16" (θ_old
  # cast from the float32 master weights every step, the guide and reference stored in bf16) or
  # "float32". The update keeps the master weights, AdamW and the objective in float32: its ratios
  # are from float32 log-probs of the trained policy, against the rollout dtype's θ_old log-probs
  # (float32 numbers of bf16 compute). On a CPU host a bf16 copy holds the bf16-rounded weights
  # and computes in float32 (XLA:CPU's bf16 arithmetic is slower than its float32; logged).
  # Eval uses the trained policy as loaded. Not with LoRA.
  c.rollout.dtype = "model"
  # Truncated importance sampling of the sampler / trainer mismatch on the policy's rows (vLLM or
  # rollout.dtype=bfloat16 log-probs vs the trainer's θ_old): "none", "token" or "sequence".
  c.rollout.importance = "none"
  c.rollout.importance_cap = 2.0  # C of the weight min(π_old / π_rollout, C).
  c.rollout.overlong_shaping = False  # DAPO soft overlong penalty (tokens); off: answers are short.
  c.rollout.overlong_cache = 4  # L_cache of the overlong penalty (L_max = max_new_tokens).
  c.rollout.mask_truncated = False  # drop samples without EOS from the loss.
  # --- optimisation (train.OptimConfig; train.StepConfig)
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-4  # RL from the weak start collapses at 1e-3 and above (BUILD_NOTES).
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.step = ml_collections.ConfigDict()
  c.step.epochs = 1  # passes over each batch.
  c.step.num_minibatches = 1  # optimizer updates per epoch (tiny models need the whole batch).
  c.step.num_micro_batches = 1  # gradient accumulation chunks per minibatch.
  # --- run
  c.seed = 0
  c.num_steps = 300
  c.max_policy_tokens = 0  # stop once this many policy tokens are generated (0 = off; compare.py).
  c.eval_every = 50
  c.eval_size = 300
  c.eval_batch_size = 300
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  c.max_consecutive_skips = 5  # stop after this many steps with non-finite updates.
  c.max_skip_ratio = 0.5  # stop when more than this share of steps (after 10) skipped an update.
  c.no_signal_steps = 10  # WARN after this many steps without learning signal (0 = never).
  c.log_samples_every = 10
  c.export_hf = True  # write the final policy in Hugging Face format to workdir/export.
  c.overwrite = False  # allow a workdir holding a different run's checkpoints (deletes them).
  c.progress = True
  # Metric backends besides metrics.jsonl (always written), comma-separated: "tb" (TensorBoard,
  # tb/; viewer: pip install -e ".[tensorboard]"), "wandb" (Weights & Biases, wandb/; pip install
  # -e ".[wandb]"; WANDB_MODE=offline keeps it local); "" = none. docs/tracking.md.
  c.loggers = "tb"
  c.wandb_project = "mixpo"  # the wandb project (entity, credentials: wandb's environment).
  # --- LoRA (docs/scaling.md): train low-rank adapters on a frozen base instead of every weight.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # adapter rank r; 0 = off (full fine-tuning).
  c.lora.alpha = 32.0  # the update x·A·B is scaled by alpha / r.
  # Regex over Linear kernel paths (mixpo/models/hf_io.py): every decoder-block projection.
  c.lora.targets = r"layers/\d+/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$"
  c.lora.dropout = 0.0  # only 0: a stochastic forward breaks ratio = 1 at θ = θ_old.
  # A PEFT adapter directory to start from ("" = fresh: A random, B = 0); its alpha and target
  # modules replace the two above, its r must equal rank. The final adapter is exported to
  # workdir/export_adapter (PEFT) next to the merged weights in workdir/export.
  c.lora.init_from = ""
  # --- scale-out (docs/scaling.md)
  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor) device mesh; -1 = the remaining devices.
  return c
