"""One RL step as named phases, and the typed run spec every phase reads.

  collect_policy  θ_old's prompt groups with DAPO dynamic sampling        → rollout.Collected
  collect_guide   the guide's rows for the same prompts (guided algorithms) → Groups | None
                  (guide_source="traces": collect_traces, the stored responses, + their real_B)
  assemble        padded rows, ON / ZERO / OFF, advantages, padding mask  → Assembled (a Batch)
  score           log-probs under θ_old, the guide, the KL reference      → Batch
                  (rollout and scoring in spec.rollout_dtype: `rollout_view`)
  update          the jitted train_step                                   → (TrainState, metrics)
  report          scalar metrics and logged samples                       → (dict, list)
`rl_step` chains them. `resolve(config)` turns the experiment config into a frozen `RunSpec` once
(validating it); the phases read its fields, never the config's strings. `Experiment` holds what
a run needs besides the `TrainState`; `run` (mixpo/loop.py) adds checkpoints and logs. Which
algorithm runs is a value from mixpo/algorithms.py's table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixpo import advantages, algorithms, objectives, sampling, sharding, train
from mixpo.batch import Batch, make_batch
from mixpo.guide_source import TraceOptions, TraceSource, reward_rows
from mixpo.rewards.overlong import OverlongConfig
from mixpo.rollout import (Collected, Groups, SampleSpec, concat_groups, dynamic_sample,
                           empty_rows, sample_groups)

@dataclasses.dataclass(frozen=True)
class Sizes:
  """Static rollout sizes of one step: n policy and m guide samples per prompt, G groups the
  policy trains on, Z further zero-variance groups (Mix-2's ZERO set)."""

  n: int
  m: int
  groups: int
  zero_groups: int

  @property
  def slots(self) -> int:
    """Prompt-group slots of a batch (G + Z); unfilled ones are padding rows."""
    return self.groups + self.zero_groups

  @property
  def rows(self) -> int:
    """Rows of the train batch: (G + Z) · (n + m)."""
    return self.slots * (self.n + self.m)


@dataclasses.dataclass(frozen=True)
class GuideSpec:
  """Where the OFF rows come from and how their πϕ is known (mixpo/guide_source.py).

  source: "model" (m samples of the checkpoint `path` per prompt, every step), "traces" (the
  trace file `traces.path` is the train set; its stored responses are the OFF rows; an unguided
  algorithm only draws its prompts from it) or "none". logp: "model" (score with the checkpoint),
  "one" (πϕ ≡ 1, LUFFY), "file" (the trace's stored per-token log-probs), "none" (unguided)."""

  source: str
  path: str
  logp: str
  traces: TraceOptions | None = None

  @property
  def needs_model(self) -> bool:
    """The guide checkpoint is loaded: it samples the OFF rows or scores them."""
    return self.source == "model" or (self.source == "traces" and self.logp == "model")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """The experiment config resolved and validated once (`resolve`); frozen and typed."""

  algorithm: algorithms.Algorithm
  scheme: str  # ON / ZERO / OFF partition scheme (advantages.SCHEMES).
  std_normalize: bool  # divide every advantage pool by its std (False: Dr. GRPO).
  sizes: Sizes
  step: train.StepConfig  # its `objective` is the resolved ObjectiveConfig.
  sample: SampleSpec
  guide: GuideSpec
  dynamic_sampling: bool
  max_num_gen_batches: int
  seed: int
  mesh_shape: tuple[int, int, int]  # (data, fsdp, tensor), -1 resolved.
  # Parameter + compute dtype of rollout and scoring (θ_old, guide, KL reference): "model" (the
  # models as loaded, config.model.*) or a dtype name the f32 master weights are cast to each step
  # (`rollout_view`); the update always uses the trained parameters as they are.
  rollout_dtype: str = "model"

  @property
  def objective(self) -> objectives.ObjectiveConfig:
    return self.step.objective

  @property
  def keeps_reference(self) -> bool:
    """A frozen reference policy is loaded and scored only when the KL penalty is on."""
    return self.objective.kl_coef > 0


def _objective_config(config, algo: algorithms.Algorithm) -> objectives.ObjectiveConfig:
  return algo.objective_config(
      loss_agg=config.loss_agg, eps_low=config.eps_low, eps_high=config.eps_high,
      gamma=config.gamma, on_weight=config.on_weight, sft_coef=config.sft_coef,
      dual_clip=config.dual_clip or None,
      max_log_ratio=config.max_log_ratio, zero_ratio=config.zero_ratio,
      shaping_grad=config.shaping_grad, loss_agg_tokens=int(config.max_new_tokens),
      ratio_level=config.ratio_level, seq_eps_low=config.seq_eps_low,
      seq_eps_high=config.seq_eps_high, cispo=bool(config.cispo),
      cispo_eps_low=config.cispo_eps_low, cispo_eps_high=config.cispo_eps_high,
      kl_coef=float(config.kl_coef), kl_estimator=config.kl_estimator,
      entropy_coef=float(config.entropy_coef), entropy_agg=config.entropy_agg)


def resolve(config, num_devices: int | None = None) -> RunSpec:
  """The RunSpec of `config`; raises ValueError naming the field and the fix, before compute.

  num_devices: devices the mesh spans (default: all of jax.devices()); the batch must divide
  into minibatches × micro-batches × the data · fsdp shards.
  """
  algo = algorithms.get(config.algo)
  if config.scheme not in advantages.SCHEMES:
    raise ValueError(f"config.scheme={config.scheme!r}: expected one of {advantages.SCHEMES}.")
  if config.loss_agg != "default" and config.loss_agg not in objectives.LOSS_AGGS:
    raise ValueError(f"config.loss_agg={config.loss_agg!r}: 'default' (the algorithm's own) or "
                     f"one of {objectives.LOSS_AGGS}.")
  try:
    objective = _objective_config(config, algo)
  except ValueError as e:  # ObjectiveConfig.<field> → config.<field> (same names).
    raise ValueError(str(e).replace("ObjectiveConfig.", "config.")) from None
  if config.n < 2:
    raise ValueError(f"config.n={config.n}: group normalisation needs at least 2 policy samples "
                     "per prompt; set --config.n=2 or more.")
  if config.groups < 1:
    raise ValueError(f"config.groups={config.groups}: need at least one prompt per batch.")
  guide = _guide_spec(config, algo)
  if algo.guided and config.m < 1:
    raise ValueError(f"config.algo={algo.name} needs guide rows: set config.m >= 1.")
  if config.zero_groups < 0:
    raise ValueError(f"config.zero_groups={config.zero_groups}: must be >= 0.")
  if config.max_num_gen_batches < 1:
    raise ValueError(f"config.max_num_gen_batches={config.max_num_gen_batches}: must be >= 1.")
  sizes = Sizes(n=int(config.n), m=int(config.m) if algo.guided else 0, groups=int(config.groups),
                zero_groups=int(config.zero_groups) if algo.zero_set else 0)
  mesh_shape = sharding.resolve_mesh_shape(
      tuple(config.get("mesh_shape", (-1, 1, 1))),
      len(jax.devices()) if num_devices is None else num_devices)
  step = train.StepConfig(objective=objective, epochs=config.epochs,
                          num_minibatches=config.num_minibatches,
                          num_micro_batches=config.num_micro_batches,
                          temperature=config.temperature,
                          response_tokens=int(config.max_new_tokens))
  step.check(sizes.rows, batch_shards=mesh_shape[0] * mesh_shape[1])
  overlong = None
  if config.overlong_shaping or config.mask_truncated:
    overlong = OverlongConfig(shaping=config.overlong_shaping, max_len=config.max_new_tokens,
                              cache_len=config.overlong_cache, mask_truncated=config.mask_truncated)
  sample = SampleSpec(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                      top_p=config.top_p, top_k=config.top_k, overlong=overlong)
  return RunSpec(algorithm=algo, scheme=config.scheme, std_normalize=bool(config.std_normalize),
                 sizes=sizes, step=step, sample=sample, guide=guide,
                 dynamic_sampling=bool(config.dynamic_sampling),
                 max_num_gen_batches=int(config.max_num_gen_batches), seed=int(config.seed),
                 mesh_shape=mesh_shape, rollout_dtype=_rollout_dtype(config))


ROLLOUT_DTYPES = ("model", "float32", "bfloat16")


def _rollout_dtype(config) -> str:
  dtype = config.get("rollout_dtype", "model")
  if dtype not in ROLLOUT_DTYPES:
    raise ValueError(f"config.rollout_dtype={dtype!r}: expected one of {ROLLOUT_DTYPES} ('model': "
                     "roll out and score with the models as loaded; 'bfloat16' / 'float32': "
                     "with copies cast to that dtype).")
  lora = config.get("lora")
  if dtype != "model" and lora is not None and lora.get("rank", 0):
    raise ValueError(f"config.rollout_dtype={dtype!r} with config.lora.rank={lora.rank}: a cast "
                     "rollout copy of a LoRA policy is not supported; store the frozen base in "
                     "that dtype instead (config.model.param_dtype) and set "
                     "config.rollout_dtype='model'.")
  return dtype


def rollout_view(spec: RunSpec, model):
  """`model` ((graphdef, state) or CausalLM) as rollout and scoring use it: itself for
  rollout_dtype "model", else its parameters stored and computed in that dtype
  (`sampling.with_dtype`: one jitted cast; a model already in the dtype is not copied). Log-probs
  come out float32 either way; the update never sees the view."""
  if spec.rollout_dtype == "model":
    return model
  return sampling.with_dtype(model, jnp.dtype(spec.rollout_dtype))


def validate(config) -> RunSpec:
  """`resolve` without touching the devices (a -1 mesh axis counts as 1): the binaries' early
  config check, safe before jax.distributed.initialize."""
  mesh = tuple(config.get("mesh_shape", (-1, 1, 1)))
  if len(mesh) != 3 or not all(isinstance(d, int) for d in mesh):
    raise ValueError(f"config.mesh_shape={mesh}: expected 3 integers (data, fsdp, tensor), each "
                     ">= 1 or -1 for the remaining devices, e.g. --config.mesh_shape='(-1,1,1)'.")
  return resolve(config, num_devices=math.prod(abs(d) for d in mesh))


def _guide_spec(config, algo: algorithms.Algorithm) -> GuideSpec:
  source = config.get("guide_source", "model")
  if source not in ("model", "traces"):
    raise ValueError(f"config.guide_source={source!r}: 'model' (sample config.guide online) or "
                     "'traces' (the guide's responses from config.traces_path).")
  logp = config.guide_logp
  if not algo.guided:  # no OFF rows: a trace file only supplies the prompts.
    logp = "none"
  elif source == "model" and logp not in ("model", "one"):
    raise ValueError(f"config.guide_logp={logp!r}: 'model' (score with the guide) or 'one' "
                     "(πϕ ≡ 1, as LUFFY does without guide probabilities); 'file' needs "
                     "config.guide_source='traces'.")
  traces = None
  if source == "traces":
    t = config.traces
    chat = {"auto": None, "always": True, "never": False}
    if t.chat_template not in chat:
      raise ValueError(f"config.traces.chat_template={t.chat_template!r}: 'auto', 'always' or "
                       "'never'.")
    traces = TraceOptions(
        path=config.traces_path, guide_logp="one" if logp == "none" else logp, fmt=t.format, fields=dict(t.fields) or None,
        chat_template=chat[t.chat_template], only_correct=bool(t.only_correct),
        overlong=t.overlong, max_prompt_tokens=int(t.max_prompt_tokens) or None,
        skip_bad_rows=bool(t.skip_bad_rows))
    try:
      traces.validate()
    except ValueError as e:
      raise ValueError(f"config.guide_source='traces': {e} (config.traces_path, "
                       "config.guide_logp, config.traces.*)") from None
  spec = GuideSpec(source=source if algo.guided else ("traces" if traces else "none"),
                   path=config.guide or "", logp=logp, traces=traces)
  if algo.zero_set and source == "traces" and logp == "file" and config.zero_ratio == "guide":
    raise ValueError(
        f"config.algo={algo.name} with guide_logp='file': its ZERO rows are the policy's own "
        "samples, whose πϕ a trace file cannot hold; set config.zero_ratio='old' (πθ/πθ_old), or "
        "guide_logp='model' to score them with config.guide.")
  if algo.guided and spec.needs_model and not config.guide:
    raise ValueError(f"config.algo={algo.name} with guide_source={source!r} and guide_logp="
                     f"{logp!r} needs a guide policy: set config.guide to a checkpoint directory "
                     "(or 'builtin').")
  return spec


def check_vocabularies(policy_vocab: int, guide_vocab: int):
  """r̂ = πθ/πϕ needs both policies over the same tokens."""
  if guide_vocab != policy_vocab:
    raise ValueError(f"the guide's vocabulary ({guide_vocab}) differs from the policy's "
                     f"({policy_vocab}): r̂ = πθ/πϕ needs both over the same tokens; use a guide "
                     "that shares the policy's tokenizer.")


@dataclasses.dataclass
class Experiment:
  """Everything a run holds besides the `TrainState` (the only thing a step changes)."""

  config: Any  # ml_collections.ConfigDict (experiments/configs/default.py documents the fields).
  spec: RunSpec
  policy: train.Policy
  guide: tuple | None  # (graphdef, state) of the frozen guide; never passed to train_step.
  tokenizer: Any
  task: Any
  reward_runner: Any
  train_step: Any
  reference: tuple | None = None  # (graphdef, state) of the frozen KL reference (kl_coef > 0).
  traces: TraceSource | None = None  # guide_source="traces": the train stream and OFF rows.
  mesh: Any = None  # jax.sharding.Mesh the state and train_step are laid out on.


def train_examples(task, seed: int, start: int, count: int):
  """Examples start .. start+count of the run's train stream (so resuming needs one integer)."""
  return task.examples("train", count, seed=seed, start=start)


def draw_key(key, i: int):
  """The key of the i-th sampling call of a step: the i-th split of a chain from `key`."""
  for _ in range(i + 1):
    key, sub = jax.random.split(key)
  return sub


# ------------------------------------------------------------------------------ phases
def collect_policy(exp: Experiment, policy, key, data_pos: int, timer) -> Collected:
  """θ_old's groups: generation batches of G prompts from `data_pos` until dynamic sampling has
  G variance groups (and Z zero groups) or hits its cap. Draw i uses `draw_key(key, i)`."""
  spec, G = exp.spec, exp.spec.sizes.groups

  source = exp.task if exp.traces is None else exp.traces  # traces: the file is the train set.

  def draw(i: int):
    exs = train_examples(source, spec.seed, data_pos + i * G, G)
    return sample_groups(policy, exp.tokenizer, [e.prompt for e in exs], [e.answer for e in exs],
                         spec.sizes.n, draw_key(key, i), spec.sample, exp.reward_runner,
                         {"metadata": [e.metadata for e in exs]}, timer=timer,
                         phase="generate_policy")

  return dynamic_sample(draw, G, spec.sizes.zero_groups, spec.max_num_gen_batches,
                        spec.dynamic_sampling)


def policy_block(collected: Collected, sizes: Sizes) -> tuple[Groups, int]:
  """(rows of the G + Z policy slots, number of real groups): kept groups, Z zero groups, then
  padding rows for the slots dynamic sampling could not fill."""
  kept, zero, n, Z = collected.kept, collected.zero, sizes.n, sizes.zero_groups
  blocks = [kept]
  if Z:
    z_rows = 0 if zero is None else len(zero.rewards_B)
    blocks += [zero] if z_rows else []
    blocks += [empty_rows(kept, Z * n - z_rows)] if z_rows < Z * n else []
  rows = concat_groups(blocks, keep_empty=True)
  return rows, len(rows.prompts)


def collect_guide(exp: Experiment, prompts, answers, key, timer) -> Groups | None:
  """m guide samples of each real group's prompt (None for unguided algorithms)."""
  m = exp.spec.sizes.m
  if not m:
    return None
  rows, _ = sample_groups(exp.guide, exp.tokenizer, prompts, answers, m, key, exp.spec.sample,
                          exp.reward_runner, timer=timer, phase="generate_guide")
  return rows


def collect_traces(exp: Experiment, prompts, answers, timer) -> tuple[Groups, np.ndarray]:
  """(rows, real_B): up to m stored guide responses of each real group's prompt, rewarded; a
  prompt with fewer has padding rows (real_B False). πϕ of "file" rides in rows.guide_logp_BxN."""
  with timer("reward"):
    rows = exp.traces.guide_rows([exp.traces.index_of(p, a) for p, a in zip(prompts, answers)],
                                 exp.spec.sizes.m)
    groups, _ = reward_rows(rows, exp.spec.sample, exp.reward_runner)
  return groups, rows.real_B


@dataclasses.dataclass(frozen=True)
class Assembled:
  """The step's rows: the padded `Batch` (advantages and sets filled, log-probs not yet) and the
  host-side facts `report` needs."""

  batch: Batch
  rows: Groups  # every row, policy slots then guide slots.
  is_guide_B: np.ndarray  # bool [B].
  real_B: np.ndarray  # bool [B]: False on padding rows (= batch.real_B).
  row_prompt: list[str]  # prompt of every real row.


@functools.partial(jax.jit, static_argnames=("algo", "scheme", "std_normalize"))
def kinds_and_advantages(rewards_B, group_B, is_guide_B, real_B, *, algo: algorithms.Algorithm,
                         scheme: str, std_normalize: bool):
  """(kind_B, adv_B) of a batch in one program (op by op, the eager calls cost ~10 ms a step)."""
  kind = advantages.partition(rewards_B, group_B, is_guide_B, scheme)
  if algo.zero_to_on:
    kind = jnp.where(kind == objectives.ZERO, objectives.ON, kind)
  adv = advantages.pooled_advantages(rewards_B, group_B, kind, algo.pools, real_B, std_normalize)
  return kind, adv


def assemble(spec: RunSpec, policy_rows: Groups, n_groups: int, guide_rows: Groups | None,
             guide_real_B: np.ndarray | None = None) -> Assembled:
  """Pads the guide block to the G + Z slots, labels sets, computes advantages, builds the Batch.

  Group id of a row = its slot (0 .. G+Z−1, policy and guide rows of a prompt share it); padding
  rows are marked by `real_B`, so they enter no advantage pool and no loss term. guide_real_B
  ([n_groups·m], traces) marks guide rows of real groups that are padding too. Stored guide
  log-probs (guide_rows.guide_logp_BxN) go into the batch's guide_logp_BxT.
  """
  n, m, slots = spec.sizes.n, spec.sizes.m, spec.sizes.slots
  group_B = np.repeat(np.arange(slots), n)
  real_B = np.arange(slots * n) < n_groups * n
  row_prompt = [policy_rows.prompts[i // n] for i in range(n_groups * n)]
  parts, is_guide = [policy_rows], [np.zeros(slots * n, bool)]
  stored_BxN = None if not m else guide_rows.guide_logp_BxN  # from a trace file ("file")
  if m:
    missing = (slots - n_groups) * m
    if missing:
      guide_rows = concat_groups([guide_rows, empty_rows(guide_rows, missing)], keep_empty=True)
    parts.append(guide_rows)
    is_guide.append(np.ones(slots * m, bool))
    group_B = np.concatenate([group_B, np.repeat(np.arange(slots), m)])
    guide_real = np.arange(slots * m) < n_groups * m
    if guide_real_B is not None:
      guide_real[:n_groups * m] &= np.asarray(guide_real_B, bool)
    real_B = np.concatenate([real_B, guide_real])
    row_prompt += [p for p in guide_rows.prompts for _ in range(m)]
  rows = concat_groups(parts, keep_empty=True)
  guide_logp_BxN = None
  if stored_BxN is not None:  # 0 on policy rows and padding slots (no OFF / ZERO term reads them)
    guide_logp_BxN = np.zeros(rows.tokens_BxN.shape, np.float32)
    guide_logp_BxN[slots * n:slots * n + len(stored_BxN)] = stored_BxN
  is_guide_B = np.concatenate(is_guide)
  kind, adv = kinds_and_advantages(rows.rewards_B, group_B.astype(np.int32), is_guide_B, real_B,
                                   algo=spec.algorithm, scheme=spec.scheme,
                                   std_normalize=spec.std_normalize)
  batch = make_batch(rows.prompt_BxP, rows.prompt_mask_BxP, rows.tokens_BxN, rows.mask_BxN,
                     adv_B=adv, kind_B=kind, group_B=group_B, real_B=real_B,
                     guide_logp_BxN=guide_logp_BxN)
  return Assembled(batch=batch, rows=rows, is_guide_B=is_guide_B, real_B=real_B,
                   row_prompt=row_prompt)


def score(exp: Experiment, policy, batch: Batch, timer) -> Batch:
  """The batch with log-probs under θ_old, the guide (0 when πϕ ≡ 1 or unguided) and, with the
  KL penalty on, the frozen reference; all with `sampling.score` at the sampling temperature."""
  spec = exp.spec
  with timer("score"):
    args = (batch.tokens_BxT, batch.mask_BxT, batch.positions_BxT)
    t = spec.sample.temperature
    old_logp = sampling.score(policy, *args, temperature=t)
    if spec.sizes.m and spec.guide.logp == "model":
      guide_logp = sampling.score(exp.guide, *args, temperature=t)
    elif spec.sizes.m and spec.guide.logp == "file":
      guide_logp = batch.guide_logp_BxT  # stored in the trace, placed by `assemble`.
    else:
      guide_logp = jnp.zeros_like(old_logp)  # πϕ ≡ 1.
    ref_logp = None
    if spec.keeps_reference:
      ref_logp = sampling.score(exp.reference, *args, temperature=t)
    jax.block_until_ready((old_logp, guide_logp, ref_logp))  # time/score holds all three.
  return dataclasses.replace(batch, old_logp_BxT=old_logp, guide_logp_BxT=guide_logp,
                             ref_logp_BxT=ref_logp)


def update(exp: Experiment, state: train.TrainState, batch: Batch, timer):
  """(new state, host metrics of train_step)."""
  with timer("update"):
    # Rows over data × fsdp as global arrays (each process places its own devices' rows).
    state, step_metrics = exp.train_step(state, sharding.shard_rows(batch))
    step_metrics = sharding.to_host(step_metrics)
  return state, step_metrics


def report(spec: RunSpec, collected: Collected, asm: Assembled, step_metrics: dict,
           guide_rows: Groups | None) -> tuple[dict, list[dict]]:
  """Scalar metrics (loss/*, dynamic/*, train/*, token counts) and the step's sample rows."""
  rows, is_guide_B, real_B = asm.rows, asm.is_guide_B, asm.real_B
  kind_np = np.asarray(asm.batch.kind_B)
  on_policy = ~is_guide_B & real_B
  metrics = {k: float(v) for k, v in step_metrics.items()}  # keys named by train.make_train_step
  metrics.update(collected.stats)
  metrics.update({k: float(v) for k, v in collected.reward_metrics.items()})
  metrics.update({
      "train/reward": float(rows.rewards_B[on_policy].mean()),
      "train/accuracy": float(solved(rows.correct_B[on_policy]).mean()),
      "train/response_length": float(rows.lengths_B[on_policy].mean()),
      "train/rows_on": int((kind_np[real_B] == objectives.ON).sum()),
      "train/rows_zero": int((kind_np[real_B] == objectives.ZERO).sum()),
      "train/rows_off": int((kind_np[real_B] == objectives.OFF).sum()),
      "step_policy_tokens": collected.tokens,
      "step_guide_tokens": 0 if guide_rows is None else int(guide_rows.lengths_B.sum()),
  })
  if spec.sizes.m:
    metrics["train/guide_accuracy"] = float(solved(rows.correct_B[is_guide_B & real_B]).mean())
  samples = [{"prompt": asm.row_prompt[i] if i < len(asm.row_prompt) else "",
              "response": rows.completions[i], "reward": float(rows.rewards_B[i]),
              "set": objectives.SET_NAMES[int(kind_np[i])].upper(), "guide": bool(is_guide_B[i])}
             for i in np.flatnonzero(real_B)]
  return metrics, samples


def rl_step(exp: Experiment, state: train.TrainState, data_pos: int, timer):
  """One RL step. Returns (new_state, new_data_pos, metrics, samples).

  `timer` is a `logging.PhaseTimer`; phases: generate_policy, generate_guide, reward, score,
  update. The state's rng drives sampling (via fold_in) and train_step (its own split).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
  # θ_old (the parameters before this step's updates) in the rollout dtype: it samples and scores
  # old_logp; train_step differentiates the float32 master parameters in `state`.
  policy = rollout_view(exp.spec, exp.policy.pair(state.params))
  collected = collect_policy(exp, policy, key, data_pos, timer)
  policy_rows, n_groups = policy_block(collected, exp.spec.sizes)
  guide_real_B = None
  if exp.spec.sizes.m and exp.spec.guide.source == "traces":
    guide_rows, guide_real_B = collect_traces(exp, policy_rows.prompts, policy_rows.answers, timer)
  else:
    guide_rows = collect_guide(exp, policy_rows.prompts, policy_rows.answers,
                               draw_key(key, collected.draws), timer)
  asm = assemble(exp.spec, policy_rows, n_groups, guide_rows, guide_real_B)
  batch = score(exp, policy, asm.batch, timer)
  state, step_metrics = update(exp, state, batch, timer)
  metrics, samples = report(exp.spec, collected, asm, step_metrics, guide_rows)
  return state, data_pos + collected.draws * exp.spec.sizes.groups, metrics, samples


def solved(task_rewards) -> np.ndarray:
  """A sample counts as solved when its (unshaped) task reward is full: 1 (partial credit isn't)."""
  return np.asarray(task_rewards) >= 1.0 - 1e-6


def evaluate(model, tokenizer, examples, reward_runner, max_new_tokens: int, batch_size: int = 256,
             k: int = 1, temperature: float = 0.0, seed: int = 0) -> dict:
  """mean@k and pass@k of `model` on `examples` (greedy when temperature = 0, then k = 1)."""
  if temperature == 0:
    k = 1
  spec = SampleSpec(max_new_tokens=max_new_tokens, temperature=temperature)
  scores, key = [], jax.random.key(seed)
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    key, sub = jax.random.split(key)
    groups, _ = sample_groups(model, tokenizer, [e.prompt for e in chunk],
                              [e.answer for e in chunk], k, sub, spec, reward_runner,
                              {"metadata": [e.metadata for e in chunk]})
    scores.append(solved(groups.correct_B).reshape(len(chunk), k))
  s = np.concatenate(scores) if scores else np.zeros((0, k))
  return {"accuracy": float(s.mean()) if s.size else 0.0,
          f"mean@{k}": float(s.mean()) if s.size else 0.0,
          f"pass@{k}": float(s.any(axis=1).mean()) if s.size else 0.0,
          "num_examples": len(s)}
