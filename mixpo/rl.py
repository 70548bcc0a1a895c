"""One RL step as named phases, and the typed run spec every phase reads.

  collect_policy  θ_old's prompt groups with DAPO dynamic sampling        → rollout.Collected
  collect_guide   the guide's rows for the same prompts (guided algorithms) → Groups | None
  assemble        padded rows, ON / ZERO / OFF, advantages, padding mask  → Assembled (a Batch)
  score           log-probs under θ_old, the guide, the KL reference      → Batch
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
from mixpo.rewards.overlong import OverlongConfig
from mixpo.rollout import (Collected, Groups, SampleSpec, concat_groups, dynamic_sample,
                           empty_rows, sample_groups)

SET_NAMES = {objectives.ON: "ON", objectives.ZERO: "ZERO", objectives.OFF: "OFF"}


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
  """Where the guide's rows come from. Today a model (`path`, sampled every step) or none; the
  offline-traces work adds a trace file here. logp: "model" (score with the guide) or "one"
  (πϕ ≡ 1, as LUFFY does without guide probabilities)."""

  source: str  # "model" or "none".
  path: str
  logp: str


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
      gamma=config.gamma, on_weight=config.on_weight, dual_clip=config.dual_clip or None,
      max_log_ratio=config.max_log_ratio, zero_ratio=config.zero_ratio,
      shaping_grad=config.shaping_grad, loss_agg_tokens=int(config.max_new_tokens),
      ratio_level=config.ratio_level, seq_eps_low=config.seq_eps_low,
      seq_eps_high=config.seq_eps_high, cispo=bool(config.cispo),
      cispo_eps_low=config.cispo_eps_low, cispo_eps_high=config.cispo_eps_high,
      kl_coef=float(config.kl_coef), kl_estimator=config.kl_estimator,
      entropy_coef=float(config.entropy_coef))


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
  if algo.guided:
    if not config.guide:
      raise ValueError(f"config.algo={algo.name} needs a guide policy: set config.guide to a "
                       "checkpoint directory (or 'builtin').")
    if config.m < 1:
      raise ValueError(f"config.algo={algo.name} needs guide samples: set config.m >= 1.")
  if config.zero_groups < 0:
    raise ValueError(f"config.zero_groups={config.zero_groups}: must be >= 0.")
  if config.max_num_gen_batches < 1:
    raise ValueError(f"config.max_num_gen_batches={config.max_num_gen_batches}: must be >= 1.")
  if config.guide_logp not in ("model", "one"):
    raise ValueError(f"config.guide_logp={config.guide_logp!r}: 'model' (score with the guide) or "
                     "'one' (πϕ ≡ 1, as LUFFY does without guide probabilities).")
  sizes = Sizes(n=int(config.n), m=int(config.m) if algo.guided else 0, groups=int(config.groups),
                zero_groups=int(config.zero_groups) if algo.zero_set else 0)
  mesh_shape = sharding.resolve_mesh_shape(
      tuple(config.get("mesh_shape", (-1, 1, 1))),
      len(jax.devices()) if num_devices is None else num_devices)
  step = train.StepConfig(objective=objective, epochs=config.epochs,
                          num_minibatches=config.num_minibatches,
                          num_micro_batches=config.num_micro_batches,
                          temperature=config.temperature)
  step.check(sizes.rows, batch_shards=mesh_shape[0] * mesh_shape[1])
  overlong = None
  if config.overlong_shaping or config.mask_truncated:
    overlong = OverlongConfig(shaping=config.overlong_shaping, max_len=config.max_new_tokens,
                              cache_len=config.overlong_cache, mask_truncated=config.mask_truncated)
  sample = SampleSpec(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                      top_p=config.top_p, top_k=config.top_k, overlong=overlong)
  guide = GuideSpec(source="model" if algo.guided else "none", path=config.guide or "",
                    logp=config.guide_logp)
  return RunSpec(algorithm=algo, scheme=config.scheme, std_normalize=bool(config.std_normalize),
                 sizes=sizes, step=step, sample=sample, guide=guide,
                 dynamic_sampling=bool(config.dynamic_sampling),
                 max_num_gen_batches=int(config.max_num_gen_batches), seed=int(config.seed),
                 mesh_shape=mesh_shape)


def validate(config) -> RunSpec:
  """`resolve` without touching the devices (a -1 mesh axis counts as 1): the binaries' early
  config check, safe before jax.distributed.initialize."""
  mesh = tuple(config.get("mesh_shape", (-1, 1, 1)))
  if len(mesh) != 3 or not all(isinstance(d, int) for d in mesh):
    raise ValueError(f"config.mesh_shape={mesh}: expected 3 integers (data, fsdp, tensor), each "
                     ">= 1 or -1 for the remaining devices, e.g. --config.mesh_shape='(-1,1,1)'.")
  return resolve(config, num_devices=math.prod(abs(d) for d in mesh))


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

  def draw(i: int):
    exs = train_examples(exp.task, spec.seed, data_pos + i * G, G)
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


def assemble(spec: RunSpec, policy_rows: Groups, n_groups: int, guide_rows: Groups | None
             ) -> Assembled:
  """Pads the guide block to the G + Z slots, labels sets, computes advantages, builds the Batch.

  Group id of a row = its slot (0 .. G+Z−1, policy and guide rows of a prompt share it); padding
  rows are marked by `real_B`, so they enter no advantage pool and no loss term.
  """
  n, m, slots = spec.sizes.n, spec.sizes.m, spec.sizes.slots
  group_B = np.repeat(np.arange(slots), n)
  real_B = np.arange(slots * n) < n_groups * n
  row_prompt = [policy_rows.prompts[i // n] for i in range(n_groups * n)]
  parts, is_guide = [policy_rows], [np.zeros(slots * n, bool)]
  if m:
    missing = (slots - n_groups) * m
    if missing:
      guide_rows = concat_groups([guide_rows, empty_rows(guide_rows, missing)], keep_empty=True)
    parts.append(guide_rows)
    is_guide.append(np.ones(slots * m, bool))
    group_B = np.concatenate([group_B, np.repeat(np.arange(slots), m)])
    real_B = np.concatenate([real_B, np.arange(slots * m) < n_groups * m])
    row_prompt += [p for p in guide_rows.prompts for _ in range(m)]
  rows = concat_groups(parts, keep_empty=True)
  is_guide_B = np.concatenate(is_guide)
  kind, adv = kinds_and_advantages(rows.rewards_B, group_B.astype(np.int32), is_guide_B, real_B,
                                   algo=spec.algorithm, scheme=spec.scheme,
                                   std_normalize=spec.std_normalize)
  batch = make_batch(rows.prompt_BxP, rows.prompt_mask_BxP, rows.tokens_BxN, rows.mask_BxN,
                     adv_B=adv, kind_B=kind, group_B=group_B, real_B=real_B)
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
    else:
      guide_logp = jnp.zeros_like(old_logp)  # πϕ ≡ 1.
    ref_logp = None
    if spec.keeps_reference:
      ref_logp = sampling.score(exp.reference, *args, temperature=t)
    guide_logp.block_until_ready()
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
  metrics = {f"loss/{k}": float(v) for k, v in step_metrics.items()}
  metrics.update(collected.stats)
  metrics.update({k: float(v) for k, v in collected.reward_metrics.items()})
  metrics.update({
      "train/reward": float(rows.rewards_B[on_policy].mean()),
      "train/accuracy": float(solved(rows.correct_B[on_policy]).mean()),
      "train/response_length": float(rows.lengths_B[on_policy].mean()),
      "train/entropy": float(step_metrics["entropy"]),
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
              "set": SET_NAMES[int(kind_np[i])], "guide": bool(is_guide_B[i])}
             for i in np.flatnonzero(real_B)]
  return metrics, samples


def rl_step(exp: Experiment, state: train.TrainState, data_pos: int, timer):
  """One RL step. Returns (new_state, new_data_pos, metrics, samples).

  `timer` is a `logging.PhaseTimer`; phases: generate_policy, generate_guide, reward, score,
  update. The state's rng drives sampling (via fold_in) and train_step (its own split).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
  policy = exp.policy.pair(state.params)  # θ_old: the parameters before this step's updates.
  collected = collect_policy(exp, policy, key, data_pos, timer)
  policy_rows, n_groups = policy_block(collected, exp.spec.sizes)
  guide_rows = collect_guide(exp, policy_rows.prompts, policy_rows.answers,
                             draw_key(key, collected.draws), timer)
  asm = assemble(exp.spec, policy_rows, n_groups, guide_rows)
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
