"""Per-token policy-gradient objectives of GRPO, DAPO, LUFFY and the paper's Mix-1 / Mix-2.

All functions are pure and jittable; nothing branches in Python on array values. Shapes:
`logp_BxT`, `old_logp_BxT`, `guide_logp_BxT`, `mask_BxT` are float [B, T] (mask 1 on response
tokens that enter the loss), `adv_B` float [B], `kind_B` int32 [B] with ON=0, ZERO=1, OFF=2.

Conventions (see DESIGN.md, "The objective, precisely"):
  ratio_on  r  = exp(logp - old_logp)           (on-policy importance ratio, PPO's r)
  ratio_gd  r̂  = exp(logp - guide_logp)         (the paper's r̂ and r^(2), guide ϕ is frozen)
  CLIP(r,A)    = min(r·A, clip(r, 1-eps_low, 1+eps_high)·A)  (DAPO clip-higher, optional dual clip)
  f(r̂)         = r̂ / (r̂ + γ) = sigmoid(logp - guide_logp - log γ)   (computed in log space)
Every "mean" is a masked token mean over the named set; an empty set contributes 0, never NaN.

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

import chex
import jax
import jax.numpy as jnp

ON, ZERO, OFF = 0, 1, 2
ALGOS = ("grpo", "dapo", "luffy", "mix1", "mix2")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static (hashable) configuration of the objective; safe as a `jax.jit` static argument."""

  algo: str = "mix2"  # one of ALGOS.
  eps_low: float = 0.2  # lower clip range: r >= 1 - eps_low.
  eps_high: float = 0.28  # upper clip range (DAPO clip-higher): r <= 1 + eps_high.
  gamma: float = 0.1  # γ of the shaping f(r̂) = r̂ / (r̂ + γ).
  on_weight: float = 0.5  # w in J = w·J_on + (1 - w)·J_other for mix1 / mix2.
  dual_clip: float | None = None  # c > 1: for A < 0 bound the objective below by c·A (off: None).
  max_log_ratio: float = 20.0  # |log-ratio| bound applied before any exp (see module docstring).
  # Importance ratio of Mix-2's ZERO samples: "guide" = the paper's r^(2) = πθ/πϕ (literal);
  # "old" = πθ/πθ_old, the ratio that actually corrects for their sampling distribution (they are
  # drawn from θ_old, not from ϕ). See README "Results" for why this matters.
  zero_ratio: str = "guide"
  # Gradient of the shaped off-policy term: "exact" = ∇ of f(r̂)·A (eq. 4), whose weight on
  # ∇log πθ is γ r̂/(r̂+γ)² ≤ 1/4 and vanishes as r̂ → 0; "paper_step" = the step the paper's
  # "adaptive step size" argument (§3.1.2) assumes, f'(r̂)·A·∇log πθ = γ/(r̂+γ)²·A·∇log πθ,
  # i.e. up to 1/γ when πθ ≪ πϕ. Same loss value, different gradient; an ablation of the claim.
  shaping_grad: str = "exact"

  def __post_init__(self):
    if self.algo not in ALGOS:
      raise ValueError(f"ObjectiveConfig.algo={self.algo!r}: expected one of {ALGOS}.")
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
    if self.shaping_grad not in ("exact", "paper_step"):
      raise ValueError(f"ObjectiveConfig.shaping_grad={self.shaping_grad!r}: 'exact' or 'paper_step'.")
    if self.zero_ratio not in ("guide", "old"):
      raise ValueError(f"ObjectiveConfig.zero_ratio={self.zero_ratio!r}: 'guide' (paper) or 'old'.")
    if not self.max_log_ratio > 0.0:
      raise ValueError(f"ObjectiveConfig.max_log_ratio={self.max_log_ratio}: must be > 0.")


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


def denominators(kind_B, mask_BxT):
  """Normalisers of every set, float32 [4]: tokens in ON, ZERO, OFF, and ON rows with a token.

  `objective(..., denoms=denominators(kind, mask))` is the default; a trainer that splits a
  minibatch into micro-batches passes the minibatch's denominators to every micro-batch.
  """
  tokens_B = jnp.sum(mask_BxT, axis=1)
  counts = [jnp.sum(tokens_B * (kind_B == k)) for k in (ON, ZERO, OFF)]
  seqs_on = jnp.sum(((tokens_B > 0) & (kind_B == ON)).astype(jnp.float32))
  return jnp.stack(counts + [seqs_on]).astype(jnp.float32)


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


def _set_mask(kind_B, mask_BxT, k):
  return mask_BxT * (kind_B == k).astype(mask_BxT.dtype)[:, None]


def _denoms(kind_B, mask_BxT, denoms):
  return denominators(kind_B, mask_BxT) if denoms is None else denoms


def j_on(logp_BxT, old_logp_BxT, adv_B, kind_B, mask_BxT, cfg: ObjectiveConfig, denoms=None):
  """J_on: token mean over ON of CLIP(exp(logp − old_logp), A). Returns (J, metrics).

  `denoms` ([4], see `denominators`) overrides the normalisers for gradient accumulation.
  """
  d = _denoms(kind_B, mask_BxT, denoms)
  m = _set_mask(kind_B, mask_BxT, ON)
  lr = _bounded_log_ratio(logp_BxT, old_logp_BxT, m, cfg.max_log_ratio)
  obj, clipped = clip_objective(lr, adv_B, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
  j, _ = masked_mean(obj, m, d[ON])
  metrics = {
      "tokens_on": jnp.sum(m),
      "clipfrac_on": masked_mean(clipped, m)[0],
      "ratio_on": masked_mean(jnp.exp(lr), m)[0],
  }
  return j, metrics


def _shaped_sum(logp_BxT, guide_logp_BxT, adv_B, m_BxT, cfg):
  lr = _bounded_log_ratio(logp_BxT, guide_logp_BxT, m_BxT, cfg.max_log_ratio)
  obj, f = shaped_offpolicy(lr, adv_B, cfg.gamma, cfg.shaping_grad)
  metrics = {
      "tokens_off": jnp.sum(m_BxT),
      "ratio_guide_off": masked_mean(jnp.exp(lr), m_BxT)[0],
      "f_ratio_off": masked_mean(f, m_BxT)[0],
  }
  return jnp.sum(obj * m_BxT), metrics


def j_off(logp_BxT, guide_logp_BxT, adv_B, kind_B, mask_BxT, cfg: ObjectiveConfig, denoms=None):
  """J_off: token mean over OFF of f(r̂)·A, r̂ = exp(logp − guide_logp); no clipping."""
  d = _denoms(kind_B, mask_BxT, denoms)
  m = _set_mask(kind_B, mask_BxT, OFF)
  total, metrics = _shaped_sum(logp_BxT, guide_logp_BxT, adv_B, m, cfg)
  return total / jnp.maximum(d[OFF], 1.0), metrics


def j_mix(logp_BxT, guide_logp_BxT, adv_B, kind_B, mask_BxT, cfg: ObjectiveConfig, denoms=None,
          old_logp_BxT=None):
  """J_mix (paper eq. 8): (Σ_OFF f(r̂)·A + Σ_ZERO CLIP(r2, A)) / (tokens OFF + tokens ZERO).

  r2 = exp(logp − guide_logp) with cfg.zero_ratio="guide": the zero-reward samples come from θ_old
  but are importance-weighted against the guide ϕ, literally as the paper writes r^(2). With
  cfg.zero_ratio="old" (needs `old_logp_BxT`) r2 = exp(logp − old_logp) instead.
  """
  d = _denoms(kind_B, mask_BxT, denoms)
  m_off = _set_mask(kind_B, mask_BxT, OFF)
  m_zero = _set_mask(kind_B, mask_BxT, ZERO)
  off_total, metrics = _shaped_sum(logp_BxT, guide_logp_BxT, adv_B, m_off, cfg)
  if cfg.zero_ratio == "old":
    if old_logp_BxT is None:
      raise ValueError("j_mix: cfg.zero_ratio='old' needs old_logp_BxT.")
    zero_ref = old_logp_BxT
  else:
    zero_ref = guide_logp_BxT
  lr = _bounded_log_ratio(logp_BxT, zero_ref, m_zero, cfg.max_log_ratio)
  obj, clipped = clip_objective(lr, adv_B, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
  j = (off_total + jnp.sum(obj * m_zero)) / jnp.maximum(d[OFF] + d[ZERO], 1.0)
  metrics.update({
      "tokens_zero": jnp.sum(m_zero),
      "clipfrac_zero": masked_mean(clipped, m_zero)[0],
      "ratio_zero": masked_mean(jnp.exp(lr), m_zero)[0],
  })
  return j, metrics


def _grpo(logp_BxT, old_logp_BxT, adv_B, kind_B, mask_BxT, cfg, denoms):
  m = _set_mask(kind_B, mask_BxT, ON)
  lr = _bounded_log_ratio(logp_BxT, old_logp_BxT, m, cfg.max_log_ratio)
  obj, clipped = clip_objective(lr, adv_B, cfg.eps_low, cfg.eps_low, cfg.dual_clip)
  seq_tokens_B = jnp.sum(m, axis=1)
  seq_mean_B = jnp.sum(obj * m, axis=1) / jnp.maximum(seq_tokens_B, 1.0)
  j = jnp.sum(seq_mean_B) / jnp.maximum(denoms[3], 1.0)  # rows without tokens add 0.
  metrics = {
      "tokens_on": jnp.sum(m),
      "clipfrac_on": masked_mean(clipped, m)[0],
      "ratio_on": masked_mean(jnp.exp(lr), m)[0],
  }
  return j, metrics


def objective(logp, old_logp, guide_logp, adv, kind, mask, cfg: ObjectiveConfig, denoms=None):
  """Loss (= −J, to minimise) and scalar metrics for `cfg.algo`. Shapes in the module docstring.

  `denoms` (float [4], `denominators(kind, mask)` by default) are the set normalisers; pass the
  whole minibatch's to each micro-batch so that accumulated gradients equal the minibatch's.
  """
  chex.assert_rank([logp, old_logp, guide_logp, mask], 2)
  chex.assert_equal_shape([logp, old_logp, guide_logp, mask])
  chex.assert_shape([adv, kind], (logp.shape[0],))
  d = _denoms(kind, mask, denoms)
  w = cfg.on_weight
  if cfg.algo == "grpo":
    j, metrics = _grpo(logp, old_logp, adv, kind, mask, cfg, d)
  elif cfg.algo == "dapo":
    j, metrics = j_on(logp, old_logp, adv, kind, mask, cfg, d)
  elif cfg.algo == "mix1":
    jon, metrics = j_on(logp, old_logp, adv, kind, mask, cfg, d)
    joff, m_off = j_off(logp, guide_logp, adv, kind, mask, cfg, d)
    metrics.update(m_off, j_on=jon, j_off=joff)
    j = w * jon + (1.0 - w) * joff
  elif cfg.algo == "mix2":
    jon, metrics = j_on(logp, old_logp, adv, kind, mask, cfg, d)
    jmix, m_mix = j_mix(logp, guide_logp, adv, kind, mask, cfg, d, old_logp_BxT=old_logp)
    metrics.update(m_mix, j_on=jon, j_mix=jmix)
    j = w * jon + (1.0 - w) * jmix
  else:  # luffy: one joint token mean over on- and off-policy tokens.
    n_on, n_off = d[ON], d[OFF]
    joint = jnp.stack([n_on, jnp.zeros_like(n_on), n_on + n_off, d[3]])
    # Both parts divided by the joint count: j_on's normaliser is d[ON], j_off's is d[OFF].
    jon, metrics = j_on(logp, old_logp, adv, kind, mask, cfg, joint.at[ON].set(n_on + n_off))
    joff, m_off = j_off(logp, guide_logp, adv, kind, mask, cfg, joint.at[OFF].set(n_on + n_off))
    metrics.update(m_off)
    j = jon + joff
  loss = -j
  metrics["loss"] = loss
  return loss, metrics
