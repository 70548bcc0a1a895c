"""Per-token policy-gradient objectives and the pieces the algorithm table composes them from.

All functions are pure and jittable; nothing branches in Python on array values. Shapes:
`logp_BxT`, `old_logp_BxT`, `guide_logp_BxT`, `ref_logp_BxT`, `entropy_BxT`, `mask_BxT` are
float [B, T] (mask 1 on response tokens that enter the loss), `adv_B` float [B], `kind_B` int32
[B] with ON=0, ZERO=1, OFF=2.

Conventions (arXiv 2507.12931):
  ratio_on  r  = exp(logp - old_logp)           (on-policy importance ratio, PPO's r)
  ratio_gd  r̂  = exp(logp - guide_logp)         (the paper's r̂ and r^(2), guide ϕ is frozen)
  CLIP(r,A)    = min(r·A, clip(r, 1-eps_low, 1+eps_high)·A)  (DAPO clip-higher, optional dual clip)
  f(r̂)         = r̂ / (r̂ + γ) = sigmoid(logp - guide_logp - log γ)   (computed in log space)
An algorithm's J is a weighted sum of `Term`s (mixpo/algorithms.py holds each algorithm's); a term
sums the per-token objectives of its sets and divides by its sets' normaliser (`Denominators`);
an empty set contributes 0, never NaN. Per set, the per-token objective is:
  ON    CLIP(r, A) (or the sequence ratio / CISPO below), r against θ_old;
  ZERO  CLIP(r2, A) with r2 against the guide (`zero_ratio="guide"`, the paper's r^(2)) or θ_old;
  OFF   f(r̂)·A, never clipped (LUFFY's policy shaping).

Switches (ObjectiveConfig fields; the defaults are the paper's objective as mixpo has always run):
  loss_agg    how a set's tokens are averaged (verl's `loss_agg_mode` names):
              "token-mean"               Σ_set m·x / Σ_set m (DAPO; every token weighs the same);
              "seq-mean-token-mean"      mean over the set's sequences of each one's token mean
                                         (the original GRPO);
              "seq-mean-token-sum-norm"  Σ_set m·x / (C · sequences of the set), C =
                                         `loss_agg_tokens` = the max response tokens (Dr. GRPO's
                                         constant normaliser, arXiv 2503.20783).
              Applies to every set and term (Mix-2's J_mix: OFF ∪ ZERO share the normaliser).
  ratio_level "token" (PPO) or "sequence" (GSPO, arXiv 2507.18071): on ON and ZERO rows the
              ratio is exp(mean_t log r_t) over the row's tokens, clipped with its own range
              `seq_eps_low/high`, and every token of the row carries CLIP(s, A). Never applies to
              OFF's shaped term f(r̂) (it is not a ratio against the sampler).
  cispo       CISPO (MiniMax-M1, arXiv 2506.13585) on ON and ZERO rows: the per-token objective
              is sg(clip(r, 1−cispo_eps_low, 1+cispo_eps_high))·A·log π — every token keeps a
              gradient, the clipped weight only bounds its size. Ratio as for `ratio_level`.
  kl_coef, kl_estimator   −kl_coef · KL(πθ ‖ π_ref) per token over every set the algorithm
              trains, aggregated as `loss_agg` over their union; estimators on
              x = log π_ref − log πθ (Schulman's "Approximating KL divergence"):
              k1 = −x, k2 = x²/2, k3 = exp(x) − 1 − x ("low_var_kl" in verl).
  entropy_coef  + entropy_coef · H(πθ) per token over the trained sets (aggregated likewise).

Log-ratio bound: every log-ratio is clipped to [-max_log_ratio, max_log_ratio] *before* exp, so
that a stale θ_old or a guide that assigns a token ~0 probability cannot overflow to inf and poison
the gradient with inf·0 = NaN. Inside the bound gradients are exact; outside it the ratio is
treated as a constant (zero gradient through the ratio), which for the default bound of 20
(r up to e^20 ≈ 5e8) only affects tokens that PPO clipping would already have silenced or that
are numerically meaningless. f(r̂) needs no exp and is not affected by the bound. A non-finite
log-prob on an unmasked token (±inf, NaN) is not clipped: it makes the loss NaN, and
`train.train_step` then skips the update and counts it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

ON, ZERO, OFF = 0, 1, 2
SET_NAMES = {ON: "on", ZERO: "zero", OFF: "off"}
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
WEIGHTS = ("one", "on", "other")
SHAPING_GRADS = ("exact", "paper_step")
ZERO_RATIOS = ("guide", "old")


@dataclasses.dataclass(frozen=True)
class Term:
  """One part of J: weight · Σ_{s ∈ sets} Σ_t m·obj_s / Σ_{s ∈ norm} N_s (an empty sum is 0).

  `weight`: "one" (1), "on" (ObjectiveConfig.on_weight = w) or "other" (1 − w). `norm`: the sets
  whose normalisers (`Denominators.of`) divide the term; None = `sets`. `name`: the metric under
  which the term's value (before weighting) is reported, or None.
  """

  sets: tuple[int, ...]
  weight: str = "one"
  norm: tuple[int, ...] | None = None
  name: str | None = None

  def __post_init__(self):
    if not self.sets or any(s not in SET_NAMES for s in self.sets + (self.norm or ())):
      raise ValueError(f"Term(sets={self.sets}, norm={self.norm}): sets are ON=0, ZERO=1, OFF=2.")
    if self.weight not in WEIGHTS:
      raise ValueError(f"Term.weight={self.weight!r}: expected one of {WEIGHTS}.")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static (hashable) configuration of the objective; safe as a `jax.jit` static argument.

  Built from the experiment config by `mixpo.rl.resolve` (terms from the algorithm's table
  entry); the defaults equal experiments/configs/default.py's, so a config and the library agree.
  """

  # The algorithm's J (mixpo/algorithms.py); the default is J_on alone (PPO / DAPO's form).
  terms: tuple[Term, ...] = (Term(sets=(ON,)),)
  eps_low: float = 0.2  # lower clip range: r >= 1 - eps_low.
  eps_high: float = 0.28  # upper clip range (DAPO clip-higher): r <= 1 + eps_high.
  gamma: float = 0.1  # γ of the shaping f(r̂) = r̂ / (r̂ + γ).
  on_weight: float = 0.5  # w in J = w·J_on + (1 - w)·J_other for mix1 / mix2.
  dual_clip: float | None = 3.0  # c > 1: for A < 0 bound the objective below by c·A (off: None).
  max_log_ratio: float = 20.0  # |log-ratio| bound applied before any exp (see module docstring).
  # Importance ratio of Mix-2's ZERO samples: "guide" = the paper's r^(2) = πθ/πϕ (literal);
  # "old" = πθ/πθ_old, the ratio that actually corrects for their sampling distribution (they are
  # drawn from θ_old, not from ϕ). See README "Results" for why this matters.
  zero_ratio: str = "guide"
  # Gradient of the shaped off-policy term: "exact" = ∇ of f(r̂)·A (eq. 4), whose weight on
  # ∇log πθ is γ r̂/(r̂+γ)² ≤ 1/4 and vanishes as r̂ → 0; "paper_step" = the step the paper's
  # "adaptive step size" argument (§3.1.2) assumes, f'(r̂)·A·∇log πθ = γ/(r̂+γ)²·A·∇log πθ,
  # i.e. up to 1/γ when πθ ≪ πϕ. Same loss value, different gradient; an ablation of the claim.
  shaping_grad: str = "paper_step"
  loss_agg: str = "token-mean"  # see the module docstring.
  loss_agg_tokens: int = 0  # C of "seq-mean-token-sum-norm" (max response tokens); > 0 there.
  ratio_level: str = "token"  # "token" or "sequence" (GSPO) on ON / ZERO rows.
  seq_eps_low: float = 3e-4  # GSPO's clip range below 1 (its paper's value).
  seq_eps_high: float = 4e-4  # GSPO's clip range above 1.
  cispo: bool = False  # CISPO's clipped, stop-gradient weight on log π for ON / ZERO rows.
  cispo_eps_low: float = 1.0  # CISPO weight >= 1 − this (1.0: no lower bound, as MiniMax-M1).
  cispo_eps_high: float = 0.28  # CISPO weight <= 1 + this.
  kl_coef: float = 0.0  # weight of the KL penalty to the reference policy (0 = none).
  kl_estimator: str = "k3"  # "k1", "k2" or "k3".
  entropy_coef: float = 0.0  # weight of the entropy bonus (0 = none).

  def __post_init__(self):
    if not self.terms:
      raise ValueError("ObjectiveConfig.terms is empty: an objective needs at least one Term.")
    if not 0.0 <= self.eps_low < 1.0:
      raise ValueError(f"ObjectiveConfig.eps_low={self.eps_low}: must lie in [0, 1).")
    if self.eps_high < 0.0:
      raise ValueError(f"ObjectiveConfig.eps_high={self.eps_high}: must be >= 0.")
    if not self.gamma > 0.0:
      raise ValueError(f"ObjectiveConfig.gamma={self.gamma}: the shaping f(r)=r/(r+γ) needs γ > 0.")
    if not 0.0 <= self.on_weight <= 1.0:
      raise ValueError(f"ObjectiveConfig.on_weight={self.on_weight}: must lie in [0, 1].")
    if self.dual_clip is not None and not self.dual_clip > 1.0:
      raise ValueError(f"ObjectiveConfig.dual_clip={self.dual_clip}: must be > 1 or None.")
    if self.shaping_grad not in SHAPING_GRADS:
      raise ValueError(f"ObjectiveConfig.shaping_grad={self.shaping_grad!r}: 'exact' or 'paper_step'.")
    if self.zero_ratio not in ZERO_RATIOS:
      raise ValueError(f"ObjectiveConfig.zero_ratio={self.zero_ratio!r}: 'guide' (paper) or 'old'.")
    if not self.max_log_ratio > 0.0:
      raise ValueError(f"ObjectiveConfig.max_log_ratio={self.max_log_ratio}: must be > 0.")
    if self.loss_agg not in LOSS_AGGS:
      raise ValueError(f"ObjectiveConfig.loss_agg={self.loss_agg!r}: expected one of {LOSS_AGGS}.")
    if self.loss_agg == "seq-mean-token-sum-norm" and self.loss_agg_tokens < 1:
      raise ValueError(f"ObjectiveConfig.loss_agg_tokens={self.loss_agg_tokens}: "
                       "'seq-mean-token-sum-norm' needs the constant C >= 1 (max response tokens).")
    if self.ratio_level not in RATIO_LEVELS:
      raise ValueError(f"ObjectiveConfig.ratio_level={self.ratio_level!r}: 'token' or 'sequence'.")
    for name, low, high, low_max in (("seq_eps", self.seq_eps_low, self.seq_eps_high, 0.999999),
                                     ("cispo_eps", self.cispo_eps_low, self.cispo_eps_high, 1.0)):
      if not 0.0 <= low <= low_max:
        raise ValueError(f"ObjectiveConfig.{name}_low={low}: must lie in [0, {low_max:g}].")
      if high < 0.0:
        raise ValueError(f"ObjectiveConfig.{name}_high={high}: must be >= 0.")
    if self.kl_coef < 0.0 or self.entropy_coef < 0.0:
      raise ValueError(f"ObjectiveConfig.kl_coef={self.kl_coef}, entropy_coef="
                       f"{self.entropy_coef}: must be >= 0.")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"ObjectiveConfig.kl_estimator={self.kl_estimator!r}: one of "
                       f"{KL_ESTIMATORS}.")

  @property
  def trained_sets(self) -> tuple[int, ...]:
    """The sets any term sums over, in ON, ZERO, OFF order (KL / entropy apply to these)."""
    used = {s for t in self.terms for s in t.sets}
    return tuple(s for s in (ON, ZERO, OFF) if s in used)


class Denominators(NamedTuple):
  """Normalisers of every set (float32 scalars): loss tokens and rows with a loss token.

  `objective(..., denoms=denominators(kind, mask))` is the default; a trainer that splits a
  minibatch into micro-batches passes the minibatch's to every micro-batch, which makes the sum
  of micro-batch losses (and gradients) equal the minibatch's for every `loss_agg`.
  """

  tokens_on: jax.Array
  tokens_zero: jax.Array
  tokens_off: jax.Array
  seqs_on: jax.Array
  seqs_zero: jax.Array
  seqs_off: jax.Array

  def of(self, k: int, loss_agg: str = "token-mean") -> jax.Array:
    """Normaliser of set k: its tokens under "token-mean", its sequences otherwise."""
    return self[k] if loss_agg == "token-mean" else self[3 + k]


def denominators(kind_B, mask_BxT) -> Denominators:
  """Token and sequence counts of ON, ZERO and OFF (see `Denominators`)."""
  tokens_B = jnp.sum(mask_BxT, axis=1)
  tokens = [jnp.sum(tokens_B * (kind_B == k)).astype(jnp.float32) for k in (ON, ZERO, OFF)]
  seqs = [jnp.sum(((tokens_B > 0) & (kind_B == k)).astype(jnp.float32)) for k in (ON, ZERO, OFF)]
  return Denominators(*tokens, *seqs)


def _bounded_log_ratio(logp_BxT, ref_logp_BxT, mask_BxT, bound):
  # Masked positions may hold anything (padding, -inf); zero them before any arithmetic that
  # could turn into NaN in the backward pass.
  lr = jnp.where(mask_BxT > 0, logp_BxT - ref_logp_BxT, 0.0)
  # A non-finite log-prob on a real token is an upstream bug (a sampled token has p > 0): keep it
  # NaN so the trainer skips the update and counts it, rather than clipping it to a finite lie.
  return jnp.where(jnp.isfinite(lr), jnp.clip(lr, -bound, bound), jnp.nan)


def masked_mean(x_BxT, mask_BxT, count=None):
  """Σ m·x / count with count = Σ m by default, and 0 (not NaN) when count = 0.

  Passing `count` (the token count of the *whole* minibatch) makes the sum over micro-batches of
  micro-batch means equal the minibatch mean: gradient accumulation weighted by token counts.
  """
  count = jnp.sum(mask_BxT) if count is None else count
  return jnp.sum(x_BxT * mask_BxT) / jnp.maximum(count, 1.0), count


def aggregate_sum(x_BxT, m_BxT, loss_agg: str, loss_agg_tokens: int = 0):
  """The numerator of a set under `loss_agg` (its denominator is `Denominators.of`).

  token-mean: Σ m·x; seq-mean-token-mean: Σ_i Σ_t m·x / max(Σ_t m, 1); seq-mean-token-sum-norm:
  Σ m·x / C. Every form is a sum over rows, so micro-batches add up exactly.
  """
  if loss_agg == "token-mean":
    return jnp.sum(x_BxT * m_BxT)
  if loss_agg == "seq-mean-token-mean":
    seq_tokens_B = jnp.sum(m_BxT, axis=1)
    return jnp.sum(jnp.sum(x_BxT * m_BxT, axis=1) / jnp.maximum(seq_tokens_B, 1.0))
  if loss_agg == "seq-mean-token-sum-norm":
    return jnp.sum(x_BxT * m_BxT) / float(loss_agg_tokens)
  raise ValueError(f"aggregate_sum(loss_agg={loss_agg!r}): expected one of {LOSS_AGGS}.")


def clip_objective(log_ratio_BxT, adv_B, eps_low, eps_high, dual_clip=None):
  """Per-token CLIP(r, A, ε) with r = exp(log_ratio); returns (objective_BxT, clipped_BxT).

  `clipped_BxT` is 1 where the clipped branch is strictly active (its gradient is zero).
  With `dual_clip` = c, tokens with A < 0 get max(CLIP, c·A) (Ye et al., 2020).
  `log_ratio_BxT` should already be bounded (see `_bounded_log_ratio`).
  """
  chex.assert_rank(log_ratio_BxT, 2)
  chex.assert_rank(adv_B, 1)
  ratio = jnp.exp(log_ratio_BxT)
  adv = adv_B[:, None]
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  obj = jnp.minimum(unclipped, clipped)
  is_clipped = clipped < unclipped
  if dual_clip is not None:
    lower = dual_clip * adv
    dual_active = (adv < 0) & (obj < lower)
    obj = jnp.where(dual_active, lower, obj)
    is_clipped = is_clipped | dual_active
  return obj, is_clipped.astype(jnp.float32)


def sequence_log_ratio(log_ratio_BxT, mask_BxT):
  """GSPO's log s_i = mean_t log r_t over row i's masked tokens, broadcast to [B, T] (0 on rows
  without tokens). Its gradient reaches every token of the row with weight 1 / |y_i|."""
  tokens_B = jnp.sum(mask_BxT, axis=1)
  lr_B = jnp.sum(log_ratio_BxT * mask_BxT, axis=1) / jnp.maximum(tokens_B, 1.0)
  return jnp.broadcast_to(lr_B[:, None], log_ratio_BxT.shape)


def cispo_objective(log_ratio_BxT, adv_B, eps_low, eps_high):
  """Per-token sg(clip(r, 1−eps_low, 1+eps_high))·A·log π (CISPO); returns (obj_BxT, clipped_BxT).

  The value is the clipped weight times A (a surrogate's value: exp(x − sg(x)) = 1); the
  gradient w.r.t. logp is sg(ŵ)·A on every token, clipped or not.
  """
  ratio = jnp.exp(log_ratio_BxT)
  w = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
  unit = jnp.exp(log_ratio_BxT - jax.lax.stop_gradient(log_ratio_BxT))
  clipped = (ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)
  return w * adv_B[:, None] * unit, clipped.astype(jnp.float32)


def shaped_offpolicy(log_ratio_BxT, adv_B, gamma, grad="exact"):
  """Per-token f(r̂)·A with f(r̂) = r̂/(r̂+γ) = sigmoid(log r̂ − log γ); returns (obj_BxT, f_BxT).

  d f / d log r̂ = γ r̂ / (r̂ + γ)², so the gradient w.r.t. logp carries the factor r̂ that the
  paper's "adaptive step" argument omits: it vanishes (not 1/γ) as r̂ → 0. With
  grad="paper_step" the value is the same but the gradient w.r.t. log r̂ is f'(r̂)·A =
  γ/(r̂+γ)²·A (computed as sigmoid(x)·sigmoid(−x)/r̂ in log space), the step the paper argues for.
  """
  chex.assert_rank(log_ratio_BxT, 2)
  x = log_ratio_BxT - math.log(gamma)
  f = jax.nn.sigmoid(x)
  obj = f * adv_B[:, None]
  if grad == "paper_step":
    # γ/(r̂+γ)² = σ(x)σ(−x)/r̂ = σ(−x)² / γ, stable for any x.
    weight = jax.lax.stop_gradient(jnp.square(jax.nn.sigmoid(-x)) / gamma)
    lr = log_ratio_BxT
    obj = jax.lax.stop_gradient(obj) + weight * adv_B[:, None] * (lr - jax.lax.stop_gradient(lr))
  elif grad != "exact":
    raise ValueError(f"shaped_offpolicy(grad={grad!r}): 'exact' or 'paper_step'.")
  return obj, f


def kl_penalty(logp_BxT, ref_logp_BxT, estimator: str):
  """Per-token estimate of KL(πθ ‖ π_ref) at tokens sampled from πθ; x = ref_logp − logp.

  k1 = −x (unbiased, high variance), k2 = x²/2 (biased, its gradient is that of the true KL's
  second-order term), k3 = exp(x) − 1 − x (unbiased, >= 0, low variance). x is clipped to
  ±20 before exp (k3) so that a ~0-probability token under π_ref cannot overflow.
  """
  x = jnp.clip(ref_logp_BxT - logp_BxT, -20.0, 20.0)
  if estimator == "k1":
    return -x
  if estimator == "k2":
    return 0.5 * jnp.square(x)
  if estimator == "k3":
    return jnp.exp(x) - 1.0 - x
  raise ValueError(f"kl_penalty(estimator={estimator!r}): expected one of {KL_ESTIMATORS}.")


def set_mask(kind_B, mask_BxT, k):
  """Loss mask of set k: mask_BxT on rows of kind k, 0 elsewhere."""
  return mask_BxT * (kind_B == k).astype(mask_BxT.dtype)[:, None]


def _clipped_set(logp_BxT, ref_logp_BxT, adv_B, m_BxT, cfg, suffix, metrics):
  """Per-token objective of a clipped set (ON against θ_old, ZERO against its `zero_ratio`)."""
  lr = _bounded_log_ratio(logp_BxT, ref_logp_BxT, m_BxT, cfg.max_log_ratio)
  eps_low, eps_high = cfg.eps_low, cfg.eps_high
  if cfg.ratio_level == "sequence":
    lr = sequence_log_ratio(lr, m_BxT)
    eps_low, eps_high = cfg.seq_eps_low, cfg.seq_eps_high
  if cfg.cispo:
    obj, clipped = cispo_objective(lr, adv_B, cfg.cispo_eps_low, cfg.cispo_eps_high)
  else:
    obj, clipped = clip_objective(lr, adv_B, eps_low, eps_high, cfg.dual_clip)
  metrics.update({
      f"tokens_{suffix}": jnp.sum(m_BxT),
      f"clipfrac_{suffix}": masked_mean(clipped, m_BxT)[0],
      f"ratio_{suffix}": masked_mean(jnp.exp(lr), m_BxT)[0],
  })
  return obj


def _shaped_set(logp_BxT, guide_logp_BxT, adv_B, m_BxT, cfg, metrics):
  lr = _bounded_log_ratio(logp_BxT, guide_logp_BxT, m_BxT, cfg.max_log_ratio)
  obj, f = shaped_offpolicy(lr, adv_B, cfg.gamma, cfg.shaping_grad)
  metrics.update({
      "tokens_off": jnp.sum(m_BxT),
      "ratio_guide_off": masked_mean(jnp.exp(lr), m_BxT)[0],
      "f_ratio_off": masked_mean(f, m_BxT)[0],
  })
  return obj


def set_objective(k, logp_BxT, old_logp_BxT, guide_logp_BxT, adv_B, m_BxT, cfg, metrics):
  """Per-token objective [B, T] of set k (see the module docstring); adds the set's metrics."""
  if k == ON:
    return _clipped_set(logp_BxT, old_logp_BxT, adv_B, m_BxT, cfg, "on", metrics)
  if k == ZERO:
    ref = old_logp_BxT if cfg.zero_ratio == "old" else guide_logp_BxT
    return _clipped_set(logp_BxT, ref, adv_B, m_BxT, cfg, "zero", metrics)
  return _shaped_set(logp_BxT, guide_logp_BxT, adv_B, m_BxT, cfg, metrics)


def _weight(term: Term, cfg: ObjectiveConfig):
  return {"one": None, "on": cfg.on_weight, "other": 1.0 - cfg.on_weight}[term.weight]


def objective(logp, old_logp, guide_logp, adv, kind, mask, cfg: ObjectiveConfig, denoms=None,
              ref_logp=None, entropy=None, is_weight=None):
  """Loss (= −J, to minimise) and scalar metrics of `cfg.terms` plus the KL / entropy switches.

  Shapes in the module docstring. `denoms` (`denominators(kind, mask)` by default) are the set
  normalisers; pass the whole minibatch's to each micro-batch so that accumulated gradients equal
  the minibatch's. `ref_logp` [B, T] is required when cfg.kl_coef > 0, `entropy` [B, T] (the
  per-token entropy of πθ, differentiable) when cfg.entropy_coef > 0. `is_weight` [B, T]
  (optional, constant): truncated importance weights of the sampler / trainer mismatch that
  multiply every set's per-token objective (1 on rows the policy did not sample).
  """
  chex.assert_rank([logp, old_logp, guide_logp, mask], 2)
  chex.assert_equal_shape([logp, old_logp, guide_logp, mask])
  chex.assert_shape([adv, kind], (logp.shape[0],))
  d = denominators(kind, mask) if denoms is None else denoms
  agg = lambda x, m: aggregate_sum(x, m, cfg.loss_agg, cfg.loss_agg_tokens)
  metrics, sums = {}, {}
  for k in cfg.trained_sets:
    m = set_mask(kind, mask, k)
    obj = set_objective(k, logp, old_logp, guide_logp, adv, m, cfg, metrics)
    if is_weight is not None:
      obj = obj * is_weight
    sums[k] = agg(obj, m)
  j = None
  for term in cfg.terms:
    num = sums[term.sets[0]]
    for k in term.sets[1:]:
      num = num + sums[k]
    norm_sets = term.norm or term.sets
    den = d.of(norm_sets[0], cfg.loss_agg)
    for k in norm_sets[1:]:
      den = den + d.of(k, cfg.loss_agg)
    value = num / jnp.maximum(den, 1.0)
    if term.name:
      metrics[term.name] = value
    w = _weight(term, cfg)
    part = value if w is None else w * value
    j = part if j is None else j + part
  loss = -j
  if cfg.kl_coef > 0 or cfg.entropy_coef > 0:
    trained = cfg.trained_sets
    m_all = sum(set_mask(kind, mask, k) for k in trained)
    den = jnp.maximum(sum(d.of(k, cfg.loss_agg) for k in trained), 1.0)
    if cfg.kl_coef > 0:
      if ref_logp is None:
        raise ValueError("objective: cfg.kl_coef > 0 needs ref_logp (the reference policy's "
                         "log-probs, Batch.ref_logp_BxT).")
      kl = kl_penalty(logp, jnp.where(m_all > 0, ref_logp, logp), cfg.kl_estimator)
      metrics["kl"] = agg(kl, m_all) / den
      loss = loss + cfg.kl_coef * metrics["kl"]
    if cfg.entropy_coef > 0:
      if entropy is None:
        raise ValueError("objective: cfg.entropy_coef > 0 needs the per-token entropy.")
      metrics["entropy_bonus"] = agg(entropy, m_all) / den
      loss = loss - cfg.entropy_coef * metrics["entropy_bonus"]
  metrics["loss"] = loss
  return loss, metrics
