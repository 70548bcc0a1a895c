"""The `Batch` pytree: one padded, static-shape training batch as it crosses module borders.

Layout of a row: a left-padded prompt followed by the response, `T = P + N` tokens. Per-token
log-prob arrays follow `sampling.score`'s convention: entry t is log p(token_t | tokens_<t)
(entry 0 is unused and 0). `loss_mask` is 1 exactly on the response tokens that enter the loss.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  tokens_BxT: jax.Array  # int32 prompt (left-padded) + response tokens.
  mask_BxT: jax.Array  # int32 1 = real token (prompt or response), 0 = padding.
  positions_BxT: jax.Array  # int32 position ids (0 at the first real token).
  loss_mask_BxT: jax.Array  # float32 1 on response tokens that enter the loss.
  old_logp_BxT: jax.Array  # float32 log-probs under θ_old.
  guide_logp_BxT: jax.Array  # float32 log-probs under the guide ϕ (0 when πϕ ≡ 1).
  adv_B: jax.Array  # float32 advantage per sequence.
  kind_B: jax.Array  # int32 ON=0 / ZERO=1 / OFF=2.
  group_B: jax.Array  # int32 prompt-group id (the row's slot in the batch).
  # bool, False on padding rows (unfilled static slots): they enter no advantage pool, and their
  # loss mask is 0, so they enter no loss term.
  real_B: jax.Array
  # float32 log-probs under the frozen KL reference; None when the KL penalty is off.
  ref_logp_BxT: jax.Array | None = None
  # float32 truncated importance weights min(π_old/π_rollout, C) of the sampler / trainer
  # mismatch (`rl.correct_rollout`), 1 on rows the policy's engine did not sample; they multiply
  # the per-token objectives. None: no correction (config.rollout.importance="none").
  is_weight_BxT: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, int]:
    return self.tokens_BxT.shape

  def check(self) -> "Batch":
    """chex shape/dtype checks at the module border; returns self for chaining."""
    b, t = self.tokens_BxT.shape
    chex.assert_shape(
        [self.tokens_BxT, self.mask_BxT, self.positions_BxT, self.loss_mask_BxT,
         self.old_logp_BxT, self.guide_logp_BxT], (b, t))
    chex.assert_shape([self.adv_B, self.kind_B, self.group_B, self.real_B], (b,))
    chex.assert_type(self.real_B, jnp.bool_)
    for optional in (self.ref_logp_BxT, self.is_weight_BxT):
      if optional is not None:
        chex.assert_shape(optional, (b, t))
        chex.assert_type(optional, jnp.float32)
    chex.assert_type([self.tokens_BxT, self.positions_BxT, self.kind_B, self.group_B], jnp.int32)
    chex.assert_type([self.loss_mask_BxT, self.old_logp_BxT, self.guide_logp_BxT, self.adv_B],
                     jnp.float32)
    return self

  def take(self, idx) -> "Batch":
    """Rows `idx` of every field (e.g. one minibatch)."""
    return jax.tree.map(lambda x: x[idx], self)


def positions_from_mask(mask_BxT):
  """Position ids for left-padded rows: 0 at the first real token, clamped to 0 on padding."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0).astype(jnp.int32)


def make_batch(prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN, *,
               old_logp_BxN=None, guide_logp_BxN=None, adv_B=None, kind_B=None,
               group_B=None, real_B=None) -> Batch:
  """Concatenates prompts and responses into a `Batch`; response-aligned log-probs are padded
  on the left with P zeros so that they align with the full token row. real_B (bool [B], default
  all True) marks padding rows False; their loss mask is zeroed here."""
  prompt_BxP = np.asarray(prompt_BxP, np.int32)
  response_BxN = np.asarray(response_BxN, np.int32)
  b, p = prompt_BxP.shape
  n = response_BxN.shape[1]
  chex.assert_shape([prompt_mask_BxP], (b, p))
  chex.assert_shape([response_mask_BxN], (b, n))

  def pad_left(x, fill=0.0):
    x = np.zeros((b, n), np.float32) if x is None else np.asarray(x, np.float32)
    chex.assert_shape(x, (b, n))
    return np.concatenate([np.full((b, p), fill, np.float32), x], axis=1)

  tokens = np.concatenate([prompt_BxP, response_BxN], axis=1)
  real = np.ones(b, bool) if real_B is None else np.asarray(real_B, bool)
  chex.assert_shape(real, (b,))
  resp_mask = np.asarray(response_mask_BxN, np.float32) * real[:, None]
  mask = np.concatenate([np.asarray(prompt_mask_BxP, np.int32), resp_mask.astype(np.int32)], 1)
  return Batch(
      tokens_BxT=jnp.asarray(tokens),
      mask_BxT=jnp.asarray(mask),
      positions_BxT=positions_from_mask(jnp.asarray(mask)),
      loss_mask_BxT=jnp.asarray(pad_left(resp_mask)),
      old_logp_BxT=jnp.asarray(pad_left(old_logp_BxN)),
      guide_logp_BxT=jnp.asarray(pad_left(guide_logp_BxN)),
      adv_B=jnp.asarray(np.zeros(b, np.float32) if adv_B is None else adv_B, jnp.float32),
      kind_B=jnp.asarray(np.zeros(b, np.int32) if kind_B is None else kind_B, jnp.int32),
      group_B=jnp.asarray(np.arange(b) if group_B is None else group_B, jnp.int32),
      real_B=jnp.asarray(real),
  ).check()
