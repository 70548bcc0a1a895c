"""TrainState, optimizer and the pure, jitted `train_step(state, batch) -> (state, metrics)`.

The policy is an NNX module split once into a static `graphdef` and its parameters; the jitted
steps close over the graphdef and see only arrays (`TrainState`, `Batch`). The guide never enters
this module: its parameters cannot be updated by construction. With LoRA adapters on the model
(mixpo/models/lora.py) the trained parameters are the adapters alone; the frozen base is held by
`Policy.base` and passed to the jitted steps as a separate, never-differentiated argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mixpo import objectives
from mixpo import sampling
from mixpo import sharding
from mixpo.models import lora
from mixpo.batch import Batch
from mixpo.fields import FieldError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  params: Any  # nnx.State of the trained nnx.Params: all of them, or the LoRA adapters only.
  opt_state: Any  # optax state.
  step: jax.Array  # int32 scalar: number of RL (or SFT) steps taken.
  rng: jax.Array  # uint32 raw PRNG key data (jax.random.key_data), advanced every step.
  skipped: jax.Array  # int32 scalar: updates skipped for non-finite loss / gradients.


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-5  # peak AdamW learning rate.
  warmup_steps: int = 0  # linear warmup from 0 over this many optimizer updates.
  weight_decay: float = 0.0  # decoupled AdamW weight decay.
  b1: float = 0.9
  b2: float = 0.999
  grad_clip: float = 1.0  # global-norm clip; <= 0 disables.

  def __post_init__(self):
    # The non-finite guard decides from the loss and the gradient norm: an infinite learning
    # rate would turn finite gradients into NaN parameters it never sees.
    if not math.isfinite(self.learning_rate) or self.learning_rate < 0:
      raise FieldError("optim.learning_rate", self.learning_rate, "must be a finite number >= 0.")


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  if cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  else:
    lr = cfg.learning_rate
  adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  if cfg.grad_clip > 0:
    return optax.chain(clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (same state, same arithmetic) that takes the gradients' norm as
  the extra argument `grad_norm` when the caller has it: `_guarded_update` applies the optimizer
  inside a `lax.cond`, where XLA cannot share the step's own norm, so it would read every
  gradient once more to recompute it."""

  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    trigger = jnp.squeeze(g_norm < max_norm)
    updates = jax.tree.map(
        lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm), updates)
    return updates, state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static shape of one RL update; hashable."""

  # The resolved objective (mixpo.rl.resolve builds it from the algorithm table and the config).
  objective: objectives.ObjectiveConfig = objectives.ObjectiveConfig()
  epochs: int = 1  # passes over the batch (PPO epochs).
  num_minibatches: int = 1  # optimizer updates per epoch.
  num_micro_batches: int = 1  # gradient-accumulation chunks per minibatch.
  score_chunk: int | None = None  # time-chunk of the logp computation (None: automatic).
  # N, the response columns every row ends with (rl.resolve: max_new_tokens). > 0: the loss, the
  # head and the metrics cover those columns only (the prompt's have loss mask 0); 0: all.
  response_tokens: int = 0
  temperature: float = 1.0  # sampling temperature; log-probs are taken under logits / T.

  def __post_init__(self):
    for name in ("epochs", "num_minibatches", "num_micro_batches"):  # config.step.*
      if getattr(self, name) < 1:
        raise FieldError(f"step.{name}", getattr(self, name), "must be >= 1.")

  def check(self, batch_rows: int, batch_shards: int = 1):
    """The one divisibility rule: rows split into minibatches × micro-batches, and each
    micro-batch over the `batch_shards` = data · fsdp devices of the mesh."""
    per_update = self.num_minibatches * self.num_micro_batches
    if batch_rows % per_update:
      raise ValueError(
          f"train batch of {batch_rows} rows ((groups + zero groups) × (n + m)) is not divisible "
          f"by num_minibatches × num_micro_batches = {self.num_minibatches} × "
          f"{self.num_micro_batches}; change config.step.num_minibatches / "
          "config.step.num_micro_batches or the group sizes.")
    if batch_rows % (per_update * batch_shards):
      raise ValueError(
          f"config.mesh_shape: the {batch_rows} train rows per step, split into {per_update} "
          f"micro-batches, do not divide over data × fsdp = {batch_shards} devices; change "
          "config.rollout.groups / n / m or the mesh.")


class Policy:
  """The policy's static graphdef, its initial trained parameters and (LoRA) its frozen base.

  Every variable of the model must be an `nnx.Param`. Without adapters the whole state is
  trained (`base` is None); with LoRA adapters (`lora.apply`) `params` holds the adapters only and
  `base` every other parameter. `pair(state.params)` is what `sampling.generate` /
  `sampling.score` accept: with LoRA that is base + current adapters (θ_old at no extra memory).
  """

  def __init__(self, model: nnx.Module):
    _, state = nnx.split(model)
    others = [p for p, v in nnx.to_flat_state(state) if not isinstance(v, nnx.Param)]
    if others:
      raise ValueError(f"Policy: non-parameter variables {others[:3]} in the model; the trainer "
                       "treats the whole model state as trainable parameters.")
    self.base, self.reference_graphdef = None, None
    if lora.has_adapters(model):
      self.graphdef, self.params, self.base = lora.split(model)
      self.reference_graphdef = nnx.graphdef(lora.without_adapters(model))
    else:
      self.graphdef, self.params = nnx.split(model)

  def merge(self, params, base=None) -> nnx.Module:
    """The model from trained `params` (+ the frozen base: `base`, default `self.base`)."""
    if self.base is None:
      return nnx.merge(self.graphdef, params)
    base = self.base if base is None else base
    return nnx.merge(self.graphdef, params, base)

  def pair(self, params) -> tuple:
    if self.base is None:
      return (self.graphdef, params)
    return (self.graphdef, nnx.merge_state(self.base, params))

  def reference_pair(self) -> tuple | None:
    """(graphdef, state) of the base alone, adapters off: the KL reference of a LoRA policy,
    scored by the same `sampling.score` and sharing the base's arrays. None without LoRA (a
    full fine-tuning reference needs its own copy of the initial weights)."""
    if self.base is None:
      return None
    return (self.reference_graphdef, self.base)


class BoundStep:
  """`step(state, batch)`: a jitted `step(state, batch, base)` with the policy's frozen LoRA base
  bound (None without LoRA). Closed over instead, jit would embed the base's arrays in the
  program as constants; as an argument they are used in place."""

  def __init__(self, jitted, base):
    self.jitted, self.base = jitted, base

  def __call__(self, state: TrainState, batch: Batch):
    return self.jitted(state, batch, self.base)

  def lower(self, state, batch, base=None):
    """jit's `lower` (e.g. abstract inputs for a memory plan); base: default the bound one."""
    return self.jitted.lower(state, batch, self.base if base is None else base)

  def _cache_size(self) -> int:
    return self.jitted._cache_size()


def init_state(policy: Policy, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(
      params=policy.params,
      opt_state=optimizer.init(policy.params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(seed)),
      skipped=jnp.zeros((), jnp.int32),
  )


def _guarded_update(optimizer, params, opt_state, grads, loss, grad_norm):
  """Applies the update only if the loss and the gradient norm are finite; returns
  (params, opt_state, ok). A skipped update leaves params and optimizer state bit-identical.

  Decided from two scalars the step has computed anyway and taken by `lax.cond`, so a guarded
  step reads and writes the state once, like an unguarded one (a select between the old and the
  new state per leaf moved every parameter and moment twice more). A NaN or inf anywhere in the
  gradients makes their norm non-finite; so does a norm past float32's range (~1.8e19), which
  counts as non-finite too. With finite gradients AdamW's update is finite (the learning rate is
  checked by `make_optimizer`), so the new state needs no check of its own.
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  optimizer = optax.with_extra_args_support(optimizer)

  def apply(operands):
    params, opt_state, grads = operands
    updates, new_opt = optimizer.update(grads, opt_state, params, grad_norm=grad_norm)
    return optax.apply_updates(params, updates), new_opt

  params, opt_state = jax.lax.cond(ok, apply, lambda operands: operands[:2],
                                   (params, opt_state, grads))
  return params, opt_state, ok


def make_train_step(policy: Policy, optimizer: optax.GradientTransformation, cfg: StepConfig,
                    donate: bool = True, shardings: tuple | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns `train_step(state, batch) -> (state, metrics)`, jitted once with donated state
  (a `BoundStep`: the LoRA base, if any, is a separate jit argument, placed by the rules).

  shardings: None (default: placement follows the inputs), or (state_shardings, batch_sharding)
  from `mixpo.sharding` (a TrainState of NamedShardings and one NamedSharding for every Batch
  field); the step is then jitted with those in/out shardings and metrics replicated.

  One call: `cfg.epochs` passes, each a shuffle of the rows into `cfg.num_minibatches` optimizer
  updates; each minibatch's gradient is accumulated over `cfg.num_micro_batches` chunks with the
  minibatch's normalisers (`objectives.denominators`: token and sequence counts per set), so
  accumulation is exact for every `loss_agg`.

  Metrics, each a (total, count) pair (`objectives.Stat`) summed over every micro-batch of every
  update and divided once, so none depends on the micro-batching (keys as logged):
    loss/<term name>, loss/kl, loss/entropy_bonus   J's parts over the step's batch (set-level:
                       their normalisers' tokens or rows, `objectives.objective_stats`);
    loss/clipfrac_<set>, loss/ratio_<set>, loss/ratio_guide_off, loss/f_ratio_off   token means
                       of the forms' stats over the set's loss tokens;
    loss/tokens_<set>  loss tokens of the set per optimizer update;
    loss/loss          −J per optimizer update, mean over the updates;
    loss/grad_norm     global gradient norm, mean over the updates;
    loss/skipped_updates  updates skipped for a non-finite loss or gradient (a count);
    train/entropy      token mean of πθ's entropy over every loss token.
  """
  ocfg = cfg.objective

  def micro_loss(params, mb: Batch, denoms, base):
    model = policy.merge(params, base)
    t = mb.tokens_BxT.shape[1]
    # Only the response columns carry loss tokens: skipping the prompt's spares the vocabulary
    # projection (most of a small model's FLOPs) its share of the row.
    first = t - cfg.response_tokens if 0 < cfg.response_tokens < t else 1
    cut = (lambda x: x) if first == 1 else (lambda x: None if x is None else x[:, first:])
    logp, ent = sampling.token_logp(model, mb.tokens_BxT, mb.mask_BxT, mb.positions_BxT,
                                    temperature=cfg.temperature, chunk_size=cfg.score_chunk,
                                    return_entropy=True, first=first)
    mask = cut(mb.loss_mask_BxT)
    loss, stats = objectives.objective_stats(
        cut(logp), cut(mb.old_logp_BxT), cut(mb.guide_logp_BxT), mb.adv_B, mb.kind_B, mask, ocfg,
        denoms=denoms, ref_logp=cut(mb.ref_logp_BxT), entropy=cut(ent),
        is_weight=cut(mb.is_weight_BxT))
    stats = {f"loss/{name}": stat for name, stat in stats.items()}
    stats["train/entropy"] = objectives.Stat(
        jnp.sum(jax.lax.stop_gradient(cut(ent)) * mask), jnp.sum(mask))
    return loss, stats

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def minibatch_update(carry, mb: Batch, base):
    params, opt_state, skipped = carry
    denoms = objectives.denominators(mb.kind_B, mb.loss_mask_BxT)
    micro = jax.tree.map(
        lambda x: x.reshape((cfg.num_micro_batches, -1) + x.shape[1:]), mb)

    def accumulate(acc, m):
      (loss, stats), grads = grad_fn(params, m, denoms, base)
      acc_loss, acc_grads, acc_stats = acc
      return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads),
              jax.tree.map(jnp.add, acc_stats, stats)), None

    # The stats' structure and shapes, so the accumulation starts from zeros.
    zero_stats = jax.eval_shape(lambda p, m, d, b: micro_loss(p, m, d, b)[1], params,
                                jax.tree.map(lambda x: x[0], micro), denoms, base)
    init = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_stats))
    (loss, grads, stats), _ = jax.lax.scan(accumulate, init, micro)
    grad_norm = optax.tree.norm(grads)
    params, opt_state, ok = _guarded_update(optimizer, params, opt_state, grads, loss, grad_norm)
    stats["loss/grad_norm"] = objectives.Stat(grad_norm, jnp.ones(()))
    skip = (~ok).astype(jnp.int32)
    return (params, opt_state, skipped + skip), (stats, skip)

  def train_step(state: TrainState, batch: Batch, base):
    b = batch.tokens_BxT.shape[0]
    cfg.check(b)
    key = jax.random.wrap_key_data(state.rng)
    key, *epoch_keys = jax.random.split(key, cfg.epochs + 1)
    carry = (state.params, state.opt_state, state.skipped)
    totals, skips = None, jnp.zeros((), jnp.int32)
    for ek in epoch_keys:  # epochs is a small static number
      perm = jax.random.permutation(ek, b)
      mbs = jax.tree.map(
          lambda x: x[perm].reshape((cfg.num_minibatches, -1) + x.shape[1:]), batch)
      carry, (stats, skip) = jax.lax.scan(functools.partial(minibatch_update, base=base), carry,
                                          mbs)
      stats = jax.tree.map(lambda x: jnp.sum(x, axis=0), stats)  # over the epoch's updates
      totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
      skips = skips + jnp.sum(skip)
    params, opt_state, skipped = carry
    metrics = objectives.reduce_stats(totals)
    metrics["loss/skipped_updates"] = skips.astype(jnp.float32)
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1,
                           rng=jax.random.key_data(key), skipped=skipped)
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if shardings is None:
    return BoundStep(jax.jit(train_step, donate_argnums=donate_argnums), policy.base)
  state_sh, batch_sh = shardings
  metrics_sh = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
  base_sh = (None if policy.base is None else
             sharding.tree_shardings(policy.base, batch_sh.mesh))
  return BoundStep(jax.jit(train_step, donate_argnums=donate_argnums,
                           in_shardings=(state_sh, batch_sh, base_sh),
                           out_shardings=(state_sh, metrics_sh)), policy.base)


def make_sft_step(policy: Policy, optimizer: optax.GradientTransformation, score_chunk=None,
                  donate: bool = True):
  """`sft_step(state, batch) -> (state, metrics)`: token-mean NLL of `batch.loss_mask_BxT` tokens.

  Used to make the built-in guide and the weak starting policy from reference solutions.
  """

  def loss_fn(params, batch: Batch, base):
    model = policy.merge(params, base)
    logp = sampling.token_logp(model, batch.tokens_BxT, batch.mask_BxT, batch.positions_BxT,
                               chunk_size=score_chunk)
    return objectives.masked_mean(-logp, batch.loss_mask_BxT)

  def sft_step(state: TrainState, batch: Batch, base):
    chex.assert_rank(batch.tokens_BxT, 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, base)
    grad_norm = optax.tree.norm(grads)
    params, opt_state, ok = _guarded_update(optimizer, state.params, state.opt_state, grads, loss,
                                            grad_norm)
    new_state = dataclasses.replace(state, params=params, opt_state=opt_state,
                                    step=state.step + 1,
                                    skipped=state.skipped + (~ok).astype(jnp.int32))
    return new_state, {"loss": loss, "grad_norm": grad_norm}

  return BoundStep(jax.jit(sft_step, donate_argnums=(0,) if donate else ()), policy.base)


class NonFiniteUpdateError(RuntimeError):
  """Too many consecutive updates were skipped for non-finite loss, gradients or parameters."""
