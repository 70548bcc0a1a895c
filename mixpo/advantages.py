"""Group-normalised advantages and the ON / ZERO / OFF partition of a rollout batch.

All functions take flat [B] arrays (one entry per sampled sequence) and are jittable with a
static B: groups are handled with a [B, B] same-group matrix, never a Python loop over groups.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from mixpo.objectives import OFF, ON, ZERO

SCHEMES = ("paper", "dapo")


def group_advantages(rewards, group_ids, pool_mask, eps=1e-6):
  """(R − mean) / (std + eps) within each group, over the members where `pool_mask` is true.

  The std is the sample std (ddof=1). Members outside the pool, and every member of a group with
  fewer than 2 pool members, get 0. All arguments are [B]; returns float32 [B].
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
  adv = (r - mean_B) / (jnp.sqrt(var_B) + eps)
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


def advantages_for(rewards, group_ids, kind, algo, scheme):
  """Advantages of every sample, normalised over the pool its algorithm uses (per prompt group).

  grpo / dapo: over the whole on-policy group (ON ∪ ZERO); ZERO groups have no variance → 0.
  mix1: A over ON, B over OFF (paper eqs. 1-2).
  mix2: A over ON, B and C jointly over OFF ∪ ZERO (paper eqs. 6-7).
  luffy: jointly over all on- and off-policy samples of the group (LUFFY's mixed normalisation).
  `scheme` only decides `kind` upstream (see `partition`); it is accepted here so that callers
  state which partition produced `kind`, and validated.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"advantages scheme={scheme!r}: expected one of {SCHEMES}.")
  on, zero, off = kind == ON, kind == ZERO, kind == OFF
  if algo in ("grpo", "dapo"):
    return group_advantages(rewards, group_ids, on | zero)
  if algo == "luffy":
    return group_advantages(rewards, group_ids, on | zero | off)
  if algo == "mix1":
    return group_advantages(rewards, group_ids, on) + group_advantages(rewards, group_ids, off)
  if algo == "mix2":
    return group_advantages(rewards, group_ids, on) + group_advantages(rewards, group_ids, off | zero)
  raise ValueError(f"advantages algo={algo!r}: expected grpo, dapo, luffy, mix1 or mix2.")
