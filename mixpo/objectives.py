"""Per-token policy-gradient objectives, the registry of their forms, and the objective J.

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
sums a per-token objective over its sets and divides by its sets' normaliser (`Denominators`);
an empty set contributes 0, never NaN. The per-token objective is a *form* named from `FORMS`:
  "clip"            CLIP(r, A) (PPO / DAPO);
  "sequence-clip"   CLIP(s, A) with GSPO's s = exp(mean_t log r_t) over the row (arXiv 2507.18071),
                    clipped with its own range `seq_eps_low/high`; every token carries its row's;
  "cispo"           sg(clip(r, 1−cispo_eps_low, 1+cispo_eps_high))·A·log π (MiniMax-M1, arXiv
                    2506.13585): every token keeps a gradient, the clipped weight bounds its size;
  "sequence-cispo"  the same with GSPO's s;
  "shaped"          f(r̂)·A, never clipped (LUFFY's policy shaping; `shaping_grad` picks its
                    gradient);
  "sft"             log πθ: supervised learning on the set's tokens (CHORD, arXiv 2508.11408).
A form is `fn(FormInputs, cfg) -> (obj_BxT, {stat: x_BxT})`; the ratio it takes is against the
set's reference log-prob: θ_old for ON, the guide for OFF, `zero_ratio`'s for ZERO. A Term with
form=None uses its set's default: `cfg.ratio_form` on ON and ZERO (the config's `ratio_level` /
`cispo` flags pick it), "shaped" on OFF. A new form is a function, `register_form`, a table row
and a reference test (mixpo/algorithms.py's docstring works one through).

Switches (ObjectiveConfig fields; the defaults are the paper's objective as mixpo has always run):
  loss_agg    how a set's tokens are averaged (verl's `loss_agg_mode` names):
              "token-mean"               Σ_set m·x / Σ_set m (DAPO; every token weighs the same);
              "seq-mean-token-mean"      mean over the set's sequences of each one's token mean
                                         (the original GRPO);
              "seq-mean-token-sum-norm"  Σ_set m·x / (C · sequences of the set), C =
                                         `loss_agg_tokens` = the max response tokens (Dr. GRPO's
                                         constant normaliser, arXiv 2503.20783).
              Applies to every set and term (Mix-2's J_mix: OFF ∪ ZERO share the normaliser).
              Rows counted by the seq-mean modes: those with at least one loss token (`SEQ_ROWS`).
  kl_coef, kl_estimator   −kl_coef · KL(πθ ‖ π_ref) per token over every set the algorithm
              trains, aggregated as `loss_agg` over their union; estimators on
              x = log π_ref − log πθ (Schulman's "Approximating KL divergence"):
              k1 = −x, k2 = x²/2, k3 = exp(x) − 1 − x ("low_var_kl" in verl).
  entropy_coef, entropy_agg   + entropy_coef · H(πθ) per token over the trained sets, aggregated
              as `loss_agg` ("loss_agg", verl's) or as a plain token mean ("token-mean", TRL's and
              LUFFY's: the bonus does not move with the policy term's normaliser).

Log-ratio bound: a log-ratio is clipped to [-max_log_ratio, max_log_ratio] only where an exp is
taken of it (the ratios of "clip" and the CISPO weight; GSPO's after the row mean, not per token;
k3's exp), so that a stale θ_old or a guide that assigns a token ~0 probability cannot overflow to
inf and poison the gradient with inf·0 = NaN. There the ratio is a constant past the bound (zero
gradient through it, verl's ±20 convention), which for the default bound of 20 only affects tokens
that clipping already silences. Everything else sees the exact log-ratio: f(r̂) is a sigmoid in
log space, CISPO's log π carrier and k1 / k2 need no exp. A non-finite log-prob on an unmasked
token (±inf, NaN) is not clipped: it makes the loss NaN, and `train.train_step` then skips the
update and counts it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from mixpo.fields import FieldError

ON, ZERO, OFF = 0, 1, 2
SET_NAMES = {ON: "on", ZERO: "zero", OFF: "off"}
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# The seq-mean modes count the rows of a set that hold at least one loss token (as verl's
# `agg_loss` called alone does); TRL's and verl's trainers divide by every row of the minibatch,
# fully masked ones included. mixpo's batches carry padding rows for the prompt slots dynamic
# sampling left empty, so counting them would scale the loss with the luck of a step's draws.
SEQ_ROWS = "rows with a loss token"
KL_ESTIMATORS = ("k1", "k2", "k3")
ENTROPY_AGGS = ("loss_agg", "token-mean")
RATIO_LEVELS = ("token", "sequence")
# Term weights: 1, the config's on_weight w and 1 − w (Mix-1 / Mix-2), sft_coef μ and 1 − μ (CHORD).
WEIGHTS = ("one", "on", "other", "sft", "rl")
SHAPING_GRADS = ("exact", "paper_step")
ZERO_RATIOS = ("guide", "old")


# ------------------------------------------------------------------------------ the forms
class FormInputs(NamedTuple):
  """What a per-token form reads (shapes in the module docstring)."""

  logp_BxT: jax.Array  # log πθ, differentiated.
  base_logp_BxT: jax.Array  # the set's reference: θ_old (ON), the guide (OFF), zero_ratio's (ZERO).
  adv_B: jax.Array
  mask_BxT: jax.Array  # the set's loss mask.


def log_ratio(logp_BxT, base_logp_BxT, mask_BxT):
  """logp − base on loss tokens, 0 elsewhere, exact (no bound); NaN where it is not finite."""
  # Masked positions may hold anything (padding, -inf); zero them before any arithmetic that
  # could turn into NaN in the backward pass.
  lr = jnp.where(mask_BxT > 0, logp_BxT - base_logp_BxT, 0.0)
  # A non-finite log-prob on a real token is an upstream bug (a sampled token has p > 0): keep it
  # NaN so the trainer skips the update and counts it, rather than clipping it to a finite lie.
  return jnp.where(jnp.isfinite(lr), lr, jnp.nan)


def _bound(lr, cfg):
  return jnp.clip(lr, -cfg.max_log_ratio, cfg.max_log_ratio)


def clip_objective(log_ratio_BxT, adv_B, eps_low, eps_high, dual_clip=None):
  """Per-token CLIP(r, A, ε) with r = exp(log_ratio); returns (objective_BxT, clipped_BxT).

  `clipped_BxT` is 1 where the clipped branch is strictly active (its gradient is zero).
  With `dual_clip` = c, tokens with A < 0 get max(CLIP, c·A) (Ye et al., 2020).
  `log_ratio_BxT` should already be bounded (the caller's exp).
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


def cispo_objective(log_ratio_BxT, adv_B, eps_low, eps_high, bound):
  """Per-token sg(clip(r, 1−eps_low, 1+eps_high))·A·log π (CISPO); returns (obj_BxT, clipped_BxT).

  The value is the clipped weight times A (a surrogate's value: exp(x − sg(x)) = 1); the
  gradient w.r.t. logp is sg(ŵ)·A on every token, clipped or not, and however far its
  log-ratio is: only the weight's exp sees the ±`bound` clip, the log π carrier is exact.
  """
  ratio = jnp.exp(jnp.clip(log_ratio_BxT, -bound, bound))
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
  Takes the exact log-ratio: nothing here exponentiates it.
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


def _clip_form(x: FormInputs, cfg):
  lr = _bound(log_ratio(x.logp_BxT, x.base_logp_BxT, x.mask_BxT), cfg)
  obj, clipped = clip_objective(lr, x.adv_B, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
  return obj, {"clipfrac": clipped, "ratio": jnp.exp(lr)}


def _sequence_clip_form(x: FormInputs, cfg):
  # The row mean of the exact log-ratios, bounded after the mean: one far-off token moves its
  # row's ratio by 1/|y| of its log-ratio, not by a clipped stand-in.
  lr = log_ratio(x.logp_BxT, x.base_logp_BxT, x.mask_BxT)
  lr = _bound(sequence_log_ratio(lr, x.mask_BxT), cfg)
  obj, clipped = clip_objective(lr, x.adv_B, cfg.seq_eps_low, cfg.seq_eps_high, cfg.dual_clip)
  return obj, {"clipfrac": clipped, "ratio": jnp.exp(lr)}


def _cispo_form(x: FormInputs, cfg, sequence=False):
  lr = log_ratio(x.logp_BxT, x.base_logp_BxT, x.mask_BxT)
  if sequence:
    lr = sequence_log_ratio(lr, x.mask_BxT)
  obj, clipped = cispo_objective(lr, x.adv_B, cfg.cispo_eps_low, cfg.cispo_eps_high,
                                 cfg.max_log_ratio)
  return obj, {"clipfrac": clipped, "ratio": jnp.exp(_bound(lr, cfg))}


def _shaped_form(x: FormInputs, cfg):
  lr = log_ratio(x.logp_BxT, x.base_logp_BxT, x.mask_BxT)
  obj, f = shaped_offpolicy(lr, x.adv_B, cfg.gamma, cfg.shaping_grad)
  return obj, {"ratio_guide": jnp.exp(_bound(lr, cfg)), "f_ratio": f}


def _sft_form(x: FormInputs, cfg):
  del cfg
  logp = jnp.where(x.mask_BxT > 0, x.logp_BxT, 0.0)
  return jnp.where(jnp.isfinite(logp), logp, jnp.nan), {}


FormFn = Callable[[FormInputs, "ObjectiveConfig"], tuple[jax.Array, dict]]
FORMS: dict[str, FormFn] = {
    "clip": _clip_form,
    "sequence-clip": _sequence_clip_form,
    "cispo": _cispo_form,
    "sequence-cispo": lambda x, cfg: _cispo_form(x, cfg, sequence=True),
    "shaped": _shaped_form,
    "sft": _sft_form,
}


def register_form(name: str, fn: FormFn, replace: bool = False) -> FormFn:
  """Adds a per-token form `fn(FormInputs, cfg) -> (obj_BxT, {stat: x_BxT})` to `FORMS`.

  `obj_BxT` is the per-token objective J's term sums (maximised); each stat is averaged over the
  set's loss tokens and reported as `<stat>_<set>`. Refuses to shadow a form unless `replace`.
  """
  if name in FORMS and not replace:
    raise ValueError(f"objectives.register_form: {name!r} is already a form; pick another name "
                     "or pass replace=True.")
  FORMS[name] = fn
  return fn


def ratio_form(ratio_level: str = "token", cispo: bool = False) -> str:
  """The ON / ZERO form the config flags `ratio_level` and `cispo` name."""
  if ratio_level not in RATIO_LEVELS:
    raise FieldError("objective.ratio_level", ratio_level, "'token' (PPO) or 'sequence' (GSPO).")
  return {("token", False): "clip", ("sequence", False): "sequence-clip",
          ("token", True): "cispo", ("sequence", True): "sequence-cispo"}[ratio_level, bool(cispo)]


# ------------------------------------------------------------------------------ terms and config
@dataclasses.dataclass(frozen=True)
class Term:
  """One part of J: weight · Σ_{s ∈ sets} Σ_t m·form_s / Σ_{s ∈ norm} N_s (an empty sum is 0).

  `weight`: "one" (1), "on" (ObjectiveConfig.on_weight = w), "other" (1 − w), "sft"
  (ObjectiveConfig.sft_coef = μ) or "rl" (1 − μ). `norm`: the sets whose normalisers
  (`Denominators.of`) divide the term; None = `sets`. `name`: the metric under which the term's
  value (before weighting) is reported, or None. `form`: the per-token objective, a key of
  `FORMS`; None = each set's default (module docstring).
  """

  sets: tuple[int, ...]
  weight: str = "one"
  norm: tuple[int, ...] | None = None
  name: str | None = None
  form: str | None = None

  def __post_init__(self):
    if not self.sets or any(s not in SET_NAMES for s in self.sets + (self.norm or ())):
      raise ValueError(f"Term(sets={self.sets}, norm={self.norm}): sets are ON=0, ZERO=1, OFF=2.")
    if self.weight not in WEIGHTS:
      raise ValueError(f"Term.weight={self.weight!r}: expected one of {WEIGHTS}.")
    if self.form is not None and self.form not in FORMS:
      raise ValueError(f"Term.form={self.form!r}: not a registered form {tuple(FORMS)} "
                       "(objectives.register_form adds one).")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static (hashable) configuration of the objective; safe as a `jax.jit` static argument.

  Built from the config group `config.objective` by `Algorithm.objective_config` (terms from the
  algorithm's table entry) and the one place its fields are checked (FieldError naming
  `objective.<field>`); the defaults equal experiments/configs/default.py's, so a config and the
  library agree.
  """

  # The algorithm's J (mixpo/algorithms.py); the default is J_on alone (PPO / DAPO's form).
  terms: tuple[Term, ...] = (Term(sets=(ON,)),)
  eps_low: float = 0.2  # lower clip range: r >= 1 - eps_low.
  eps_high: float = 0.28  # upper clip range (DAPO clip-higher): r <= 1 + eps_high.
  gamma: float = 0.1  # γ of the shaping f(r̂) = r̂ / (r̂ + γ).
  on_weight: float = 0.5  # w in J = w·J_on + (1 - w)·J_other for mix1 / mix2.
  sft_coef: float = 0.1  # μ in J = (1 − μ)·J_on + μ·J_sft (CHORD's global SFT weight, constant).
  dual_clip: float | None = 3.0  # c > 1: for A < 0 bound the objective below by c·A (off: None).
  max_log_ratio: float = 20.0  # |log-ratio| bound where an exp is taken (module docstring).
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
  # The form of ON / ZERO terms without their own (`ratio_form(ratio_level, cispo)` of the config
  # flags): "clip", "sequence-clip" (GSPO), "cispo", "sequence-cispo" or any registered form.
  ratio_form: str = "clip"
  seq_eps_low: float = 3e-4  # GSPO's clip range below 1 (its paper's value).
  seq_eps_high: float = 4e-4  # GSPO's clip range above 1.
  cispo_eps_low: float = 1.0  # CISPO weight >= 1 − this (1.0: no lower bound, as MiniMax-M1).
  cispo_eps_high: float = 0.28  # CISPO weight <= 1 + this.
  kl_coef: float = 0.0  # weight of the KL penalty to the reference policy (0 = none).
  kl_estimator: str = "k3"  # "k1", "k2" or "k3".
  entropy_coef: float = 0.0  # weight of the entropy bonus (0 = none).
  entropy_agg: str = "loss_agg"  # the bonus' aggregation: "loss_agg" or "token-mean".

  def __post_init__(self):
    if not self.terms:
      raise ValueError("ObjectiveConfig.terms is empty: an objective needs at least one Term.")
    if not 0.0 <= self.eps_low < 1.0:
      raise FieldError("objective.eps_low", self.eps_low, "must lie in [0, 1).")
    if self.eps_high < 0.0:
      raise FieldError("objective.eps_high", self.eps_high, "must be >= 0.")
    if not self.gamma > 0.0:
      raise FieldError("objective.gamma", self.gamma, "the shaping f(r)=r/(r+γ) needs γ > 0.")
    for name, w in (("on_weight", self.on_weight), ("sft_coef", self.sft_coef)):
      if not 0.0 <= w <= 1.0:
        raise FieldError(f"objective.{name}", w, "must lie in [0, 1].")
    if self.dual_clip is not None and not self.dual_clip > 1.0:
      raise FieldError("objective.dual_clip", self.dual_clip, "must be > 1, or 0 (off).")
    if self.shaping_grad not in SHAPING_GRADS:
      raise FieldError("objective.shaping_grad", self.shaping_grad, f"one of {SHAPING_GRADS}.")
    if self.zero_ratio not in ZERO_RATIOS:
      raise FieldError("objective.zero_ratio", self.zero_ratio, "'guide' (paper) or 'old'.")
    if not self.max_log_ratio > 0.0:
      raise FieldError("objective.max_log_ratio", self.max_log_ratio, "must be > 0.")
    if self.loss_agg not in LOSS_AGGS:
      raise FieldError("objective.loss_agg", self.loss_agg,
                       f"'default' (the algorithm's own) or one of {LOSS_AGGS}.")
    if self.loss_agg == "seq-mean-token-sum-norm" and self.loss_agg_tokens < 1:
      raise ValueError(f"ObjectiveConfig.loss_agg_tokens={self.loss_agg_tokens}: "
                       "'seq-mean-token-sum-norm' needs the constant C >= 1 (max response tokens).")
    if self.ratio_form not in FORMS:
      raise ValueError(f"ObjectiveConfig.ratio_form={self.ratio_form!r}: not a registered form "
                       f"{tuple(FORMS)}.")
    for name, low, high, low_max in (("seq_eps", self.seq_eps_low, self.seq_eps_high, 0.999999),
                                     ("cispo_eps", self.cispo_eps_low, self.cispo_eps_high, 1.0)):
      if not 0.0 <= low <= low_max:
        raise FieldError(f"objective.{name}_low", low, f"must lie in [0, {low_max:g}].")
      if high < 0.0:
        raise FieldError(f"objective.{name}_high", high, "must be >= 0.")
    for name, coef in (("kl_coef", self.kl_coef), ("entropy_coef", self.entropy_coef)):
      if coef < 0.0:
        raise FieldError(f"objective.{name}", coef, "must be >= 0.")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise FieldError("objective.kl_estimator", self.kl_estimator, f"one of {KL_ESTIMATORS}.")
    if self.entropy_agg not in ENTROPY_AGGS:
      raise FieldError("objective.entropy_agg", self.entropy_agg, f"one of {ENTROPY_AGGS}.")

  @property
  def trained_sets(self) -> tuple[int, ...]:
    """The sets any term sums over, in ON, ZERO, OFF order (KL / entropy apply to these)."""
    used = {s for t in self.terms for s in t.sets}
    return tuple(s for s in (ON, ZERO, OFF) if s in used)

  def form_of(self, term: Term, k: int) -> str:
    """The form `term` applies to set k (its own, else the set's default)."""
    if term.form is not None:
      return term.form
    return "shaped" if k == OFF else self.ratio_form

  def weight_of(self, term: Term) -> float | None:
    """The term's weight (None = 1, multiplied by nothing)."""
    return {"one": None, "on": self.on_weight, "other": 1.0 - self.on_weight,
            "sft": self.sft_coef, "rl": 1.0 - self.sft_coef}[term.weight]


# ------------------------------------------------------------------------------ normalisers
class Denominators(NamedTuple):
  """Normalisers of every set (float32 scalars): loss tokens, rows with a loss token, and the
  rows of the batch they were counted over.

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
  rows: jax.Array

  def of(self, k: int, loss_agg: str = "token-mean") -> jax.Array:
    """Normaliser of set k: its tokens under "token-mean", its sequences otherwise."""
    return self[k] if loss_agg == "token-mean" else self[3 + k]


def denominators(kind_B, mask_BxT) -> Denominators:
  """Token and sequence counts of ON, ZERO and OFF (see `Denominators`)."""
  tokens_B = jnp.sum(mask_BxT, axis=1)
  tokens = [jnp.sum(tokens_B * (kind_B == k)).astype(jnp.float32) for k in (ON, ZERO, OFF)]
  seqs = [jnp.sum(((tokens_B > 0) & (kind_B == k)).astype(jnp.float32)) for k in (ON, ZERO, OFF)]
  return Denominators(*tokens, *seqs, jnp.asarray(kind_B.shape[0], jnp.float32))


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


def masked_mean(x_BxT, mask_BxT):
  """Σ m·x / Σ m, and 0 (not NaN) when Σ m = 0."""
  return jnp.sum(x_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def kl_penalty(logp_BxT, ref_logp_BxT, estimator: str, bound: float = 20.0):
  """Per-token estimate of KL(πθ ‖ π_ref) at tokens sampled from πθ; x = ref_logp − logp.

  k1 = −x (unbiased, high variance), k2 = x²/2 (biased, its gradient is that of the true KL's
  second-order term), k3 = exp(x) − 1 − x (unbiased, >= 0, low variance). Only k3's exp sees x
  clipped to ±`bound`, so that a ~0-probability token under π_ref cannot overflow; k1, k2 and k3's
  linear part are exact.
  """
  x = ref_logp_BxT - logp_BxT
  if estimator == "k1":
    return -x
  if estimator == "k2":
    return 0.5 * jnp.square(x)
  if estimator == "k3":
    return jnp.exp(jnp.clip(x, -bound, bound)) - 1.0 - x
  raise ValueError(f"kl_penalty(estimator={estimator!r}): expected one of {KL_ESTIMATORS}.")


def set_mask(kind_B, mask_BxT, k):
  """Loss mask of set k: mask_BxT on rows of kind k, 0 elsewhere."""
  return mask_BxT * (kind_B == k).astype(mask_BxT.dtype)[:, None]


# ------------------------------------------------------------------------------ the objective
class Stat(NamedTuple):
  """A metric as (total, count): accumulate by adding both, report total / count once (0 when
  count = 0), so the value over micro-batches and minibatches is exact (`reduce_stats`)."""

  total: jax.Array
  count: jax.Array


def reduce_stats(stats: dict) -> dict:
  """{name: total / count} of a dict of `Stat`s (0 where count = 0)."""
  out = {}
  for name, s in stats.items():
    nonzero = s.count > 0
    out[name] = jnp.where(nonzero, s.total / jnp.where(nonzero, s.count, 1.0), 0.0)
  return out


def objective_stats(logp, old_logp, guide_logp, adv, kind, mask, cfg: ObjectiveConfig,
                    denoms=None, ref_logp=None, entropy=None, is_weight=None):
  """Loss (= −J, to minimise) and the metrics of `cfg.terms` + the KL / entropy switches as
  `Stat`s, which add up exactly over micro-batches (see `objective` for the arguments).

  Set-level stats count this call's own normaliser (a term's tokens or rows here, a form stat's
  set tokens); per-update stats ("loss", "tokens_<set>") count this call's share of the
  `denoms` batch's rows, so either sums to the whole batch's value.
  """
  chex.assert_rank([logp, old_logp, guide_logp, mask], 2)
  chex.assert_equal_shape([logp, old_logp, guide_logp, mask])
  chex.assert_shape([adv, kind], (logp.shape[0],))
  local = denominators(kind, mask)
  d = local if denoms is None else denoms
  share = local.rows / d.rows
  agg = lambda x, m: aggregate_sum(x, m, cfg.loss_agg, cfg.loss_agg_tokens)
  masks = {k: set_mask(kind, mask, k) for k in cfg.trained_sets}
  base = {ON: old_logp, ZERO: old_logp if cfg.zero_ratio == "old" else guide_logp,
          OFF: guide_logp}
  stats, sums = {}, {}
  for term in cfg.terms:
    for k in term.sets:
      form = cfg.form_of(term, k)
      if (k, form) in sums:
        continue
      m = masks[k]
      obj, per_token = FORMS[form](FormInputs(logp, base[k], adv, m), cfg)
      if is_weight is not None:  # 1 on rows the policy did not sample (guide, padding).
        obj = obj * is_weight
      sums[k, form] = agg(obj, m)
      stats[f"tokens_{SET_NAMES[k]}"] = Stat(jnp.sum(m), share)
      for name, x in per_token.items():
        stats[f"{name}_{SET_NAMES[k]}"] = Stat(jnp.sum(x * m), jnp.sum(m))
  j = None
  for term in cfg.terms:
    num = sums[term.sets[0], cfg.form_of(term, term.sets[0])]
    for k in term.sets[1:]:
      num = num + sums[k, cfg.form_of(term, k)]
    norm_sets = term.norm or term.sets
    den = d.of(norm_sets[0], cfg.loss_agg)
    for k in norm_sets[1:]:
      den = den + d.of(k, cfg.loss_agg)
    value = num / jnp.maximum(den, 1.0)
    if term.name:
      stats[term.name] = Stat(num, sum(local.of(k, cfg.loss_agg) for k in norm_sets))
    w = cfg.weight_of(term)
    part = value if w is None else w * value
    j = part if j is None else j + part
  loss = -j
  if cfg.kl_coef > 0 or cfg.entropy_coef > 0:
    trained = cfg.trained_sets
    m_all = sum(masks[k] for k in trained)
    den_of = lambda dd, agg_name: sum(dd.of(k, agg_name) for k in trained)
    if cfg.kl_coef > 0:
      if ref_logp is None:
        raise ValueError("objective: cfg.kl_coef > 0 needs ref_logp (the reference policy's "
                         "log-probs, Batch.ref_logp_BxT).")
      kl = kl_penalty(logp, jnp.where(m_all > 0, ref_logp, logp), cfg.kl_estimator,
                      cfg.max_log_ratio)
      kl_sum = agg(kl, m_all)
      stats["kl"] = Stat(kl_sum, den_of(local, cfg.loss_agg))
      loss = loss + cfg.kl_coef * kl_sum / jnp.maximum(den_of(d, cfg.loss_agg), 1.0)
    if cfg.entropy_coef > 0:
      if entropy is None:
        raise ValueError("objective: cfg.entropy_coef > 0 needs the per-token entropy.")
      e_agg = cfg.loss_agg if cfg.entropy_agg == "loss_agg" else "token-mean"
      ent_sum = aggregate_sum(entropy, m_all, e_agg, cfg.loss_agg_tokens)
      stats["entropy_bonus"] = Stat(ent_sum, den_of(local, e_agg))
      loss = loss - cfg.entropy_coef * ent_sum / jnp.maximum(den_of(d, e_agg), 1.0)
  stats["loss"] = Stat(loss, share)
  return loss, stats


def objective(logp, old_logp, guide_logp, adv, kind, mask, cfg: ObjectiveConfig, denoms=None,
              ref_logp=None, entropy=None, is_weight=None):
  """Loss (= −J, to minimise) and scalar metrics of `cfg.terms` plus the KL / entropy switches.

  Shapes in the module docstring. `denoms` (`denominators(kind, mask)` by default) are the set
  normalisers; pass the whole minibatch's to each micro-batch so that accumulated gradients equal
  the minibatch's (and use `objective_stats` for metrics that add up too). `ref_logp` [B, T] is
  required when cfg.kl_coef > 0, `entropy` [B, T] (the per-token entropy of πθ, differentiable)
  when cfg.entropy_coef > 0. `is_weight` [B, T] (default 1, constant): a per-token importance
  weight that multiplies every set's per-token objective (the truncated πθ_old / π_rollout
  correction of the sampler / trainer mismatch, `rl.correct_rollout`; 1 on rows the policy did
  not sample).
  """
  loss, stats = objective_stats(logp, old_logp, guide_logp, adv, kind, mask, cfg, denoms,
                                ref_logp, entropy, is_weight)
  return loss, reduce_stats(stats)
