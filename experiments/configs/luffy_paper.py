r"""LUFFY as published (arXiv 2504.14945): offline guide traces, 7 rollouts + 1 trace per group.

Two commands (after the README's default run has built the built-in models in
workdir/default/models): traces from the built-in guide, then LUFFY's switches on the built-in task
  python experiments/make_traces.py --guide=workdir/default/models/guide --task=addition \
      --digits=2 --terms=2 --n_prompts=4096 --n_per_prompt=1 --max_new_tokens=6 \
      --out=workdir/traces.jsonl
  python experiments/train.py --config=luffy_paper --workdir=workdir/luffy_paper \
      --config.builtin_dir=workdir/default/models --config.guide.traces_path=workdir/traces.jsonl
(--guide may be any checkpoint sharing the policy's tokenizer). For LUFFY's own data, point
guide.traces_path at its openr1.parquet (verl schema, detected) and evaluate on a task="file"
set.

mixpo's plain `--config.algo=luffy` is the guide-model variant (m online samples of a guide
checkpoint per prompt, scored by it); this preset is LUFFY's published setting. Each switch and
where LUFFY sets it: its training script exp_scripts/train.sh and its loss
luffy/verl/verl/mix_src/mix_core_alg.py (`compute_token_on_off_policy_loss`), read in the code
released with LUFFY (arXiv 2504.14945):
  guide.source="traces"   the off-policy responses come from the training file
                          (`data.train_files=$DATA_DIR/openr1.parquet`, train.sh line 29).
  rollout.n=7, m=1        `rollout.n=8` (line 54) with `rollout.n_prefix=1` (line 73) and
                          `min_prefix_ratio=1.0` / `max_prefix_ratio=1.0` (lines 74-75): one of the
                          8 responses of a prompt is the whole trace.
  algo="luffy"            `algorithm.adv_estimator=grpo` (line 28) over each prompt's 8 responses,
                          the trace included: on- and off-policy samples normalised together (the
                          table entry's joint pool), every on-policy sample trained.
  advantage.std_normalize=False
                          `algorithm.grpo_use_std=False` (line 82): A = R − mean.
  guide.logp="one"        πϕ ≡ 1: with no target probabilities the off-policy "ratio" is
                          exp(log_prob) (mix_core_alg.py, the `target_probs is None` branch).
  objective.gamma=0.1     `off_policy_reshape="p_div_p_0.1"` (line 80): f = p / (p + 0.1), no clip
                          on it (no off_max_clip / off_min_clip given); mixpo's J_off is unclipped.
  objective.eps_low=0.999999, eps_high=1e9, dual_clip=0
                          `loss_remove_clip=True` (line 84): the on-policy ratio is not clipped
                          (mixpo's clip needs eps_low < 1; a ratio bound of 1e-6 never binds).
  objective.loss_agg="seq-mean-token-sum-norm"
                          `loss_remove_token_mean=True` (line 83): summed token losses divided by
                          the maximum response length T (LUFFY sums over the S rows of its
                          micro-batch where mixpo averages over them: mixpo's J is LUFFY's / S).
  objective.entropy_agg="token-mean", entropy_coef=0.001 / S
                          `actor.entropy_coeff=0.001` (line 59) on a *token mean* of the entropy
                          (mix_actor.py), added to the Σ/T policy loss of the same micro-batch.
                          mixpo's J is that loss / S, so its bonus is too: a token mean weighted
                          0.001 / S, S = the rows of one update = groups·(n + m) / num_minibatches
                          = 128 here (set entropy_coef = 0.001 / S again when changing those).
                          The bonus aggregated like the policy term instead would weigh it
                          (loss tokens of the batch) / T times more than LUFFY does.
  objective.kl_coef=0     `use_kl_loss=False` (line 69), `algorithm.kl_ctrl.kl_coef=0.000` (58).
  rollout.temperature=1.0 `rollout.temperature=1.0` (line 51).
  rollout.dynamic_sampling=False
                          GRPO keeps every group (no DAPO filter in the script).
Scale-dependent settings stay the built-in task's: LUFFY trains Qwen2.5-Math-7B with lr 1e-6
(line 36), 128 prompts a step (line 31) in minibatches of 64 (line 38), 8192 response tokens
(line 34); set optim.learning_rate / rollout.groups / step.num_minibatches /
rollout.max_new_tokens for such a model.
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "luffy"
  c.guide.source = "traces"
  c.guide.traces_path = ""  # required: the trace file (see the commands above).
  c.guide.logp = "one"
  c.rollout.n, c.rollout.m = 7, 1
  c.rollout.groups = 16
  c.advantage.std_normalize = False
  c.objective.gamma = 0.1
  c.objective.eps_low, c.objective.eps_high, c.objective.dual_clip = 0.999999, 1e9, 0.0
  c.objective.loss_agg = "seq-mean-token-sum-norm"
  c.objective.entropy_agg = "token-mean"
  r = c.rollout
  c.objective.entropy_coef = 0.001 / (r.groups * (r.n + r.m) // c.step.num_minibatches)
  c.objective.kl_coef = 0.0
  c.rollout.temperature = 1.0
  c.rollout.dynamic_sampling = False
  # LUFFY differentiates f(π) itself (autograd of p / (p + 0.1)).
  c.objective.shaping_grad = "exact"
  return c
