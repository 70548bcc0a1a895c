"""Group-normalised advantages and the ON / ZERO / OFF partition of a rollout batch.

All functions take flat [B] arrays (one entry per sampled sequence) and are jittable with a
static B: groups are handled with a [B, B] same-group matrix, never a Python loop over groups.
"""

from __future__ import annotations

import dataclasses

import chex
import jax.numpy as jnp

from mixpo.fields import FieldError
from mixpo.objectives import OFF, ON, ZERO

SCHEMES = ("paper", "dapo")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """config.advantage: the ON / ZERO / OFF partition scheme (`partition`) and whether every pool
  is divided by its std (`group_advantages`)."""

  scheme: str
  std_normalize: bool

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise FieldError("advantage.scheme", self.scheme, f"expected one of {SCHEMES}.")


def group_advantages(rewards, group_ids, pool_mask, eps=1e-6, std_normalize=True):
  """(R − mean) / (std + eps) within each group, over the members where `pool_mask` is true.

  The std is the sample std (ddof=1). Members outside the pool, and every member of a group with
  fewer than 2 pool members, get 0. With `std_normalize=False` the advantage is R − mean (Dr. GRPO,
  arXiv 2503.20783: dividing by the std up-weights groups that are almost all right or all wrong).
  All arguments are [B]; returns float32 [B].
  """
  chex.assert_rank([rewards, group_ids, pool_mask], 1)
  chex.assert_equal_shape([rewards, group_ids, pool_mask])
  r = rewards.astype(jnp.float32)
  pool = pool_mask.astype(bool)
  same_BxB = (group_ids[:, None] == group_ids[None, :]) & pool[None, :]
  w_BxB = same_BxB.astype(jnp.float32)
  count_B = jnp.sum(w_BxB, axis=1)
  mean_B = (w_BxB @ r) / jnp.maximum(count_B, 1.0)
  sq_BxB = jnp.square(r[None, :] - mean_B[:, None]) * w_BxB
  var_B = jnp.sum(sq_BxB, axis=1) / jnp.maximum(count_B - 1.0, 1.0)
  adv = (r - mean_B) / (jnp.sqrt(var_B) + eps) if std_normalize else r - mean_B
  return jnp.where(pool & (count_B >= 2), adv, 0.0)


def _group_has_variance(rewards, group_ids, member_mask):
  """[B] bool: the member's group (restricted to `member_mask`) has non-identical rewards."""
  r = rewards.astype(jnp.float32)
  same_BxB = (group_ids[:, None] == group_ids[None, :]) & member_mask[None, :]
  big = jnp.finfo(jnp.float32).max
  hi = jnp.max(jnp.where(same_BxB, r[None, :], -big), axis=1)
  lo = jnp.min(jnp.where(same_BxB, r[None, :], big), axis=1)
  return hi > lo


def partition(rewards, group_ids, is_guide, scheme):
  """ON=0 / ZERO=1 / OFF=2 label of every sample; guide samples are always OFF.

  scheme "paper": the literal partition of the paper's Method 2: ON = on-policy samples with
    R > 0, ZERO = on-policy samples with R <= 0 (R = 0 for binary rewards; a negative shaped reward
    counts as "no reward" too).
  scheme "dapo": ON = on-policy samples of groups DAPO's dynamic sampling keeps (non-zero reward
    variance within the group's on-policy samples), ZERO = on-policy samples of the groups DAPO
    would discard.
  Why both: with binary rewards every ON sample of the literal scheme has R = 1, so the ON pool has
  zero variance and the advantage Â of eq. (1) is 0/0 — J_on carries no signal. The "dapo" scheme is
  what a DAPO implementation actually feeds its loss, and the paper's "discarded zero-reward
  samples" are then exactly the samples dynamic sampling throws away.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"partition scheme={scheme!r}: expected one of {SCHEMES}.")
  chex.assert_equal_shape([rewards, group_ids, is_guide])
  guide = is_guide.astype(bool)
  if scheme == "paper":
    on = rewards > 0
  else:
    on = _group_has_variance(rewards, group_ids, ~guide)
  kind = jnp.where(on, ON, ZERO)
  return jnp.where(guide, OFF, kind).astype(jnp.int32)


def pooled_advantages(rewards, group_ids, kind, pools, real_B=None, std_normalize=True):
  """Σ over `pools` of the group advantages normalised over each pool (per prompt group).

  pools: a tuple of pools, each a tuple of set kinds (e.g. ((ON,), (OFF, ZERO)) is Mix-2's: A over
  ON, B and C jointly over OFF ∪ ZERO); a sample outside every pool gets 0. The algorithm table
  (mixpo/algorithms.py) names each algorithm's pools. real_B: bool [B], False on padding rows,
  which then never enter a pool (their advantage is 0 and they move no group's mean or std).
  """
  chex.assert_equal_shape([rewards, group_ids, kind])
  real = jnp.ones(kind.shape, bool) if real_B is None else real_B.astype(bool)
  total = None
  for pool in pools:
    member = kind == pool[0]
    for k in pool[1:]:
      member = member | (kind == k)
    a = group_advantages(rewards, group_ids, member & real, std_normalize=std_normalize)
    total = a if total is None else total + a
  return jnp.zeros(rewards.shape, jnp.float32) if total is None else total
