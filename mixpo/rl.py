"""The RL loop: rollout → rewards → dynamic sampling → partition → advantages → score → update.

One function composes pure pieces (DESIGN.md): `Experiment` holds what a run needs (policy
graphdef, frozen guide, tokenizer, task, reward runner, the jitted `train_step`), `rl_step` does
one step, `evaluate` measures greedy accuracy, `run` (in `mixpo/loop.py`) adds checkpoints and
logs. GRPO, DAPO, LUFFY, Mix-1 and Mix-2 differ only by config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixpo import advantages, objectives, sampling, sharding, train
from mixpo.batch import make_batch
from mixpo.rollout import (Groups, SampleSpec, concat_groups, dynamic_sample, empty_rows,
                           sample_groups)

GUIDED = ("luffy", "mix1", "mix2")
SET_NAMES = {objectives.ON: "ON", objectives.ZERO: "ZERO", objectives.OFF: "OFF"}


@dataclasses.dataclass
class Experiment:
  """Everything a run holds besides the `TrainState` (the only thing a step changes)."""

  config: Any  # ml_collections.ConfigDict (experiments/configs/default.py documents the fields).
  policy: train.Policy
  guide: tuple | None  # (graphdef, state) of the frozen guide; never passed to train_step.
  tokenizer: Any
  task: Any
  reward_runner: Any
  train_step: Any
  spec: SampleSpec


def objective_config(config) -> objectives.ObjectiveConfig:
  return objectives.ObjectiveConfig(
      algo=config.algo, eps_low=config.eps_low, eps_high=config.eps_high, gamma=config.gamma,
      on_weight=config.on_weight, dual_clip=config.dual_clip or None,
      max_log_ratio=config.max_log_ratio, zero_ratio=config.zero_ratio,
      shaping_grad=config.shaping_grad)


def num_guide(config) -> int:
  """Guide samples per prompt (m); only the guided algorithms draw them."""
  return config.m if config.algo in GUIDED else 0


def num_zero_groups(config) -> int:
  """ZERO-set group slots of a batch; only Mix-2 trains on them."""
  return config.zero_groups if config.algo == "mix2" else 0


def batch_rows(config) -> int:
  return (config.groups + num_zero_groups(config)) * (config.n + num_guide(config))


def validate(config, policy_vocab: int | None = None, guide_vocab: int | None = None):
  """Raises ValueError naming the field and the fix for an inconsistent config, before compute."""
  objective_config(config)  # validates algo, eps, gamma, weights.
  if config.scheme not in advantages.SCHEMES:
    raise ValueError(f"config.scheme={config.scheme!r}: expected one of {advantages.SCHEMES}.")
  if config.n < 2:
    raise ValueError(f"config.n={config.n}: group normalisation needs at least 2 policy samples "
                     "per prompt; set --config.n=2 or more.")
  if config.groups < 1:
    raise ValueError(f"config.groups={config.groups}: need at least one prompt per batch.")
  if config.algo in GUIDED:
    if not config.guide:
      raise ValueError(f"config.algo={config.algo} needs a guide policy: set config.guide to a "
                       "checkpoint directory (or 'builtin').")
    if config.m < 1:
      raise ValueError(f"config.algo={config.algo} needs guide samples: set config.m >= 1.")
  if config.zero_groups < 0:
    raise ValueError(f"config.zero_groups={config.zero_groups}: must be >= 0.")
  if config.max_num_gen_batches < 1:
    raise ValueError(f"config.max_num_gen_batches={config.max_num_gen_batches}: must be >= 1.")
  if config.guide_logp not in ("model", "one"):
    raise ValueError(f"config.guide_logp={config.guide_logp!r}: 'model' (score with the guide) or "
                     "'one' (πϕ ≡ 1, as LUFFY does without guide probabilities).")
  if guide_vocab is not None and policy_vocab is not None and guide_vocab != policy_vocab:
    raise ValueError(f"the guide's vocabulary ({guide_vocab}) differs from the policy's "
                     f"({policy_vocab}): r̂ = πθ/πϕ needs both over the same tokens; use a guide "
                     "that shares the policy's tokenizer.")
  rows, per_update = batch_rows(config), config.num_minibatches * config.num_micro_batches
  if rows % per_update:
    raise ValueError(
        f"the train batch has {rows} rows ((groups + zero groups) × (n + m)), not divisible by "
        f"config.num_minibatches × config.num_micro_batches = {per_update}; change one of them.")


def train_examples(task, seed: int, start: int, count: int):
  """Examples start .. start+count of the run's train stream (so resuming needs one integer)."""
  return task.examples("train", count, seed=seed, start=start)


@functools.partial(jax.jit, static_argnames=("algo", "scheme"))
def _kinds_and_advantages(rewards_B, group_B, is_guide_B, *, algo, scheme):
  """(kind_B, adv_B) of a batch in one program (op by op, the eager calls cost ~10 ms a step)."""
  kind = advantages.partition(rewards_B, group_B, is_guide_B, scheme)
  if algo == "luffy":  # LUFFY trains on every on-policy sample: no ZERO set.
    kind = jnp.where(kind == objectives.ZERO, objectives.ON, kind)
  return kind, advantages.advantages_for(rewards_B, group_B, kind, algo, scheme)


def rl_step(exp: Experiment, state: train.TrainState, data_pos: int, timer):
  """One RL step. Returns (new_state, new_data_pos, metrics, samples).

  `timer` is a `logging.PhaseTimer`; phases: generate_policy, generate_guide, reward, score,
  update. The state's rng drives sampling (via fold_in) and train_step (its own split).
  """
  cfg = exp.config
  n, m, G, Z = cfg.n, num_guide(cfg), cfg.groups, num_zero_groups(cfg)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
  policy = exp.policy.pair(state.params)  # θ_old: the parameters before this step's updates.
  draws = {"pos": data_pos, "tokens": 0, "key": key, "reward": {}}

  def draw() -> Groups:
    draws["key"], sub = jax.random.split(draws["key"])
    exs = train_examples(exp.task, cfg.seed, draws["pos"], G)
    draws["pos"] += G
    groups, draws["reward"] = sample_groups(
        policy, exp.tokenizer, [e.prompt for e in exs], [e.answer for e in exs], n, sub,
        exp.spec, exp.reward_runner, {"metadata": [e.metadata for e in exs]}, timer=timer,
        phase="generate_policy")
    draws["tokens"] += int(groups.lengths_B.sum())
    return groups

  kept, zero, dyn = dynamic_sample(draw, G, Z, cfg.max_num_gen_batches, cfg.dynamic_sampling)
  blocks = [kept]
  if Z:
    z_rows = 0 if zero is None else len(zero.rewards_B)
    blocks += [zero] if z_rows else []
    blocks += [empty_rows(kept, Z * n - z_rows)] if z_rows < Z * n else []
  policy_rows = concat_groups(blocks, keep_empty=True)
  n_groups = len(policy_rows.prompts)  # real groups; the rest of the G + Z slots are padding.
  group_B = np.repeat(np.arange(G + Z), n)
  group_B[n_groups * n:] = -1 - np.arange((G + Z - n_groups) * n)  # padding: singleton groups.
  row_prompt = [policy_rows.prompts[i // n] for i in range(n_groups * n)]

  parts, is_guide = [policy_rows], [np.zeros(len(group_B), bool)]
  guide_tokens = 0
  if m:
    draws["key"], sub = jax.random.split(draws["key"])
    guide_rows, _ = sample_groups(exp.guide, exp.tokenizer, policy_rows.prompts,
                                  policy_rows.answers, m, sub, exp.spec, exp.reward_runner,
                                  timer=timer, phase="generate_guide")
    guide_tokens = int(guide_rows.lengths_B.sum())
    g_ids = np.repeat(np.arange(n_groups), m)
    missing = (G + Z) * m - len(g_ids)
    if missing:
      guide_rows = concat_groups([guide_rows, empty_rows(guide_rows, missing)], keep_empty=True)
      g_ids = np.concatenate([g_ids, -1 - (G + Z) * n - np.arange(missing)])
    parts.append(guide_rows)
    is_guide.append(np.ones(len(g_ids), bool))
    group_B = np.concatenate([group_B, g_ids])
    row_prompt += [p for p in guide_rows.prompts for _ in range(m)]
  rows = concat_groups(parts, keep_empty=True)
  is_guide_B = np.concatenate(is_guide)
  real_B = group_B >= 0

  kind, adv = _kinds_and_advantages(rows.rewards_B, group_B.astype(np.int32), is_guide_B,
                                    algo=cfg.algo, scheme=cfg.scheme)
  batch = make_batch(rows.prompt_BxP, rows.prompt_mask_BxP, rows.tokens_BxN, rows.mask_BxN,
                     adv_B=adv, kind_B=kind, group_B=group_B)

  with timer("score"):
    pos = batch.positions_BxT
    old_logp = sampling.score(policy, batch.tokens_BxT, batch.mask_BxT, pos,
                              temperature=exp.spec.temperature)
    if m and cfg.guide_logp == "model":
      guide_logp = sampling.score(exp.guide, batch.tokens_BxT, batch.mask_BxT, pos,
                                  temperature=exp.spec.temperature)
    else:
      guide_logp = jnp.zeros_like(old_logp)  # πϕ ≡ 1.
    guide_logp.block_until_ready()
  batch = dataclasses.replace(batch, old_logp_BxT=old_logp, guide_logp_BxT=guide_logp)

  with timer("update"):
    # Rows over data × fsdp as global arrays (each process places its own devices' rows).
    state, step_metrics = exp.train_step(state, sharding.shard_rows(batch))
    step_metrics = sharding.to_host(step_metrics)

  kind_np = np.asarray(kind)
  on_policy = ~is_guide_B & real_B
  metrics = {f"loss/{k}": float(v) for k, v in step_metrics.items()}
  metrics.update(dyn)
  metrics.update({k: float(v) for k, v in draws["reward"].items()})
  metrics.update({
      "train/reward": float(rows.rewards_B[on_policy].mean()),
      "train/accuracy": float(solved(rows.correct_B[on_policy]).mean()),
      "train/response_length": float(rows.lengths_B[on_policy].mean()),
      "train/entropy": float(step_metrics["entropy"]),
      "train/rows_on": int((kind_np[real_B] == objectives.ON).sum()),
      "train/rows_zero": int((kind_np[real_B] == objectives.ZERO).sum()),
      "train/rows_off": int((kind_np[real_B] == objectives.OFF).sum()),
      "step_policy_tokens": draws["tokens"],
      "step_guide_tokens": guide_tokens,
  })
  if m:
    metrics["train/guide_accuracy"] = float(solved(rows.correct_B[is_guide_B & real_B]).mean())
  samples = [{"prompt": row_prompt[i] if i < len(row_prompt) else "",
              "response": rows.completions[i], "reward": float(rows.rewards_B[i]),
              "set": SET_NAMES[int(kind_np[i])], "guide": bool(is_guide_B[i])}
             for i in np.flatnonzero(real_B)]
  return state, draws["pos"], metrics, samples


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
