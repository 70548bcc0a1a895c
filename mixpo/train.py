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
from mixpo.models import remat
from mixpo.batch import Batch


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


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  if cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  else:
    lr = cfg.learning_rate
  adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  if cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static shape of one RL update; hashable."""

  # The resolved objective (mixpo.rl.resolve builds it from the algorithm table and the config).
  objective: objectives.ObjectiveConfig = objectives.ObjectiveConfig()
  epochs: int = 1  # passes over the batch (PPO epochs).
  num_minibatches: int = 1  # optimizer updates per epoch.
  num_micro_batches: int = 1  # gradient-accumulation chunks per minibatch.
  score_chunk: int | None = None  # time-chunk of the logp computation (None: automatic).
  temperature: float = 1.0  # sampling temperature; log-probs are taken under logits / T.

  def check(self, batch_rows: int, batch_shards: int = 1):
    """The one divisibility rule: rows split into minibatches × micro-batches, and each
    micro-batch over the `batch_shards` = data · fsdp devices of the mesh."""
    per_update = self.num_minibatches * self.num_micro_batches
    if batch_rows % per_update:
      raise ValueError(
          f"train batch of {batch_rows} rows ((groups + zero groups) × (n + m)) is not divisible "
          f"by num_minibatches × num_micro_batches = {self.num_minibatches} × "
          f"{self.num_micro_batches}; change config.num_minibatches / config.num_micro_batches "
          "or the group sizes.")
    if batch_rows % (per_update * batch_shards):
      raise ValueError(
          f"config.mesh_shape: the {batch_rows} train rows per step, split into {per_update} "
          f"micro-batches, do not divide over data × fsdp = {batch_shards} devices; change "
          "config.groups / n / m or the mesh.")


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


def _all_finite(tree) -> jax.Array:
  """True iff every floating entry of `tree` is finite, as one scalar computed once.

  Σ x·0 over a leaf is 0, or NaN if any entry is ±inf or NaN (no overflow, unlike a norm). The
  flag feeds the `where` of every parameter and moment leaf; combined by `jnp.all` over stacked
  per-leaf flags, XLA:CPU copied the whole chain into each of them: O(leaves²) instructions, and
  a 24-layer LoRA step took 11 minutes to compile and held 7 GiB of program (BUILD_NOTES.md).
  """
  sums = [jnp.sum(x * jnp.zeros((), x.dtype), dtype=jnp.float32) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not sums:
    return jnp.array(True)
  return jnp.isfinite(remat.finite_zero(sums))


def _guarded_update(optimizer, params, opt_state, grads, loss):
  """Applies the update only if loss, gradients and the new parameters are all finite.

  A skipped update leaves params and optimizer state bit-identical (no partial moment update).
  """
  updates, new_opt = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_params) & _all_finite(new_opt)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  return keep(new_params, params), keep(new_opt, opt_state), ok


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
  Metrics are means over the updates (token-count weighting is not applied to diagnostics).
  """
  ocfg = cfg.objective

  def micro_loss(params, mb: Batch, denoms, base):
    model = policy.merge(params, base)
    logp, ent = sampling.token_logp(model, mb.tokens_BxT, mb.mask_BxT, mb.positions_BxT,
                                    temperature=cfg.temperature, chunk_size=cfg.score_chunk,
                                    return_entropy=True)
    loss, metrics = objectives.objective(logp, mb.old_logp_BxT, mb.guide_logp_BxT, mb.adv_B,
                                         mb.kind_B, mb.loss_mask_BxT, ocfg, denoms=denoms,
                                         ref_logp=mb.ref_logp_BxT, entropy=ent,
                                         is_weight=mb.is_weight_BxT)
    metrics["entropy"] = objectives.masked_mean(ent, mb.loss_mask_BxT)[0]
    return loss, metrics

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def minibatch_update(carry, mb: Batch, base):
    params, opt_state, skipped = carry
    denoms = objectives.denominators(mb.kind_B, mb.loss_mask_BxT)
    micro = jax.tree.map(
        lambda x: x.reshape((cfg.num_micro_batches, -1) + x.shape[1:]), mb)

    def accumulate(acc, m):
      (loss, metrics), grads = grad_fn(params, m, denoms, base)
      acc_loss, acc_grads, acc_metrics = acc
      return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads),
              jax.tree.map(jnp.add, acc_metrics, metrics)), None

    # The metrics' structure and shapes, so the accumulation starts from zeros.
    zero_metrics = jax.eval_shape(lambda p, m, d, b: micro_loss(p, m, d, b)[1], params,
                                  jax.tree.map(lambda x: x[0], micro), denoms, base)
    init = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics))
    (loss, grads, metrics), _ = jax.lax.scan(accumulate, init, micro)
    metrics = jax.tree.map(lambda x: x / cfg.num_micro_batches, metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    params, opt_state, ok = _guarded_update(optimizer, params, opt_state, grads, loss)
    metrics["update_ok"] = ok.astype(jnp.float32)
    return (params, opt_state, skipped + (~ok).astype(jnp.int32)), metrics

  def train_step(state: TrainState, batch: Batch, base):
    b = batch.tokens_BxT.shape[0]
    cfg.check(b)
    key = jax.random.wrap_key_data(state.rng)
    key, *epoch_keys = jax.random.split(key, cfg.epochs + 1)
    carry = (state.params, state.opt_state, state.skipped)
    all_metrics = []
    for ek in epoch_keys:  # epochs is a small static number
      perm = jax.random.permutation(ek, b)
      mbs = jax.tree.map(
          lambda x: x[perm].reshape((cfg.num_minibatches, -1) + x.shape[1:]), batch)
      carry, metrics = jax.lax.scan(functools.partial(minibatch_update, base=base), carry, mbs)
      all_metrics.append(metrics)
    params, opt_state, skipped = carry
    metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.concatenate(xs)), *all_metrics)
    metrics["skipped_updates"] = jnp.sum(jnp.stack(
        [1.0 - m["update_ok"] for m in all_metrics]))
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
    nll, _ = objectives.masked_mean(-logp, batch.loss_mask_BxT)
    return nll

  def sft_step(state: TrainState, batch: Batch, base):
    chex.assert_rank(batch.tokens_BxT, 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, base)
    params, opt_state, ok = _guarded_update(optimizer, state.params, state.opt_state, grads, loss)
    new_state = dataclasses.replace(state, params=params, opt_state=opt_state,
                                    step=state.step + 1,
                                    skipped=state.skipped + (~ok).astype(jnp.int32))
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  return BoundStep(jax.jit(sft_step, donate_argnums=(0,) if donate else ()), policy.base)


class NonFiniteUpdateError(RuntimeError):
  """Too many consecutive updates were skipped for non-finite loss, gradients or parameters."""
