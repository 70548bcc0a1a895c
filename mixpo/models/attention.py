"""Causal GQA attention, with the kernel chosen for the compile target: `attend`, `resolve_impl`.

`ModelConfig.attention_impl` names the kernel; "auto" (the default) resolves once per trace for
the platform the program is compiled for (`backend.platform()`: the devices of the enclosing
`jax.set_mesh` mesh, else jax's default backend; so a TPU program compiled on a CPU host gets the
TPU kernel):

  cpu  → "xla"      mixpo's einsum attention, with its CPU kernel (mixpo/models/backend.py)
  gpu  → "cudnn"    when the compute dtype is bfloat16 / float16 and head_dim ≤ 128 (a multiple
                    of 8), the shapes cuDNN's fused attention takes; else "xla"
  tpu  → "pallas"   jax's Pallas splash attention (jax.experimental.pallas.ops.tpu)

The kernels (all: causal; key s visible to query i iff slot(s) ≤ q_start + i and key_valid[s]):
  xla                    On CPU, rows whose float32 scores fit _DENSE_MAX_ROW_SCORE_BYTES run the
                         CPU kernel (`backend.cpu_attention`). Longer rows, and every row on
                         other platforms, run the blockwise (flash) kernel: online softmax over
                         key blocks inside query blocks, forward and backward. Its memory is
                         O(T), see `flash_attention`. XLA partitions it like any other program.
  dot_product_attention  jax.nn.dot_product_attention (XLA), dense mask: O(T·S) memory.
  cudnn                  jax.nn.dot_product_attention(implementation="cudnn", is_causal=True),
                         each row rotated so its left padding becomes right padding (which a
                         causal mask hides from every real query): a row's real tokens must be
                         contiguous (left and/or right padding, as `mixpo.batch` builds rows).
  pallas                 splash attention per row (vmap), causal mask + segment ids (1 real,
                         0 padding); T padded to a multiple of 128. A Mosaic kernel on TPU;
                         Pallas interpret mode on other platforms (tests).
cudnn and pallas are custom calls XLA cannot partition: under a mesh they run per device block
in `jax.shard_map` (`on_shards`: rows over data × fsdp, heads over tensor).
The KV-cache path (prefill, decode steps) runs the backend-neutral einsum forward over the cache
on every platform (the splash kernel's query blocks are multiples of 128, a decode step has one
query), partitioned by XLA under a mesh; a cache longer than _CACHE_KEY_BLOCK slots is read in
key blocks up to the last written slot only (the blockwise forward), so a step does not attend
past the longest valid prefix.

A query with no visible key (e.g. a left-padding query of the CPU kernel) gets a finite,
unspecified output; losses weight such positions 0.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixpo import sharding
from mixpo.models import backend

_log = logging.getLogger(__name__)

# Finite "minus infinity": a fully masked row (a left-padding query) stays finite (uniform
# weights) instead of NaN, so it cannot poison gradients; its output is ignored downstream.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLS = ("auto", "xla", "dot_product_attention", "cudnn", "pallas")

# Above this many bytes of float32 scores per row (N·T·S·4) rows run the blockwise kernel: the
# CPU kernel and the one-block KV-cache forward hold a whole row's scores at once.
_DENSE_MAX_ROW_SCORE_BYTES = 64 << 20


_logged: set = set()


def resolve_impl(impl: str, *, dtype, head_dim: int, platform: str | None = None) -> str:
  """The concrete kernel for `attention_impl` on `platform` (default: `backend.platform()`, the
  platform the program is compiled for); an explicit choice is returned as is. The first
  resolution of each (impl, platform, dtype) is logged."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {IMPLS}; set ModelConfig / "
                     "config.model.attention_impl to one of those.")
  if impl != "auto":
    return impl
  platform = platform or backend.platform()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if platform == "gpu":
    chosen = "cudnn" if half and head_dim <= 128 and head_dim % 8 == 0 else "xla"
  elif platform == "tpu":
    chosen = "pallas"
  else:
    chosen = "xla"
  key = (impl, platform, jnp.dtype(dtype).name, head_dim)
  if key not in _logged:
    _logged.add(key)
    _log.info("attention_impl=auto on %s (dtype %s, head_dim %d): %s", platform,
              jnp.dtype(dtype).name, head_dim, chosen)
  return chosen


def attend(q_BxTxNxH, k, v, key_valid_BxS, impl: str, *, q_start=0, heads_major: bool = False):
  """Causal softmax attention of T queries over S keys (GQA: N query heads share K kv heads).

  k, v: [B, S, K, H] (token-major, as projected: the full-sequence path, T = S, q_start = 0), or
  [B, K, S, H] with `heads_major` (the KV cache: read in place, no per-step transpose of it).
  key_valid_BxS: bool/int, True on real keys. q_start: int32 scalar, the slot of query 0 (query
  i sees slots ≤ q_start + i). impl: a concrete kernel (see `resolve_impl`).
  Returns [B, T, N*H] in the dtype of v.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv = k.shape[1 if heads_major else 2]
  g = n // kv
  scale = h ** -0.5
  key_valid_BxS = key_valid_BxS != 0
  if heads_major:
    impl = "xla"  # the KV-cache path: see the module docstring
  if impl in ("dot_product_attention", "cudnn", "pallas") and not heads_major:
    fn = {"dot_product_attention": _jax_nn_attention, "cudnn": _cudnn_attention,
          "pallas": pallas_attention}[impl]
    return fn(q_BxTxNxH, k, v, key_valid_BxS, scale).reshape(b, t, n * h)
  # The G query heads of a kv head are stacked into one [G*T, H] matrix, so each (row, kv head)
  # is one GEMM against its [S, H] keys (and the probabilities one GEMM against its values).
  q_BxKxMxH = q_BxTxNxH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  if not heads_major:
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
  s = k.shape[2]
  fits = n * t * s * 4 <= _DENSE_MAX_ROW_SCORE_BYTES  # one row's float32 scores
  if heads_major and fits and s <= _CACHE_KEY_BLOCK:  # forward only, the cache in one block
    out_BxKxMxH = attention_block(q_BxKxMxH, k, v, allowed_mask(q_start, t, key_valid_BxS), scale)[0]
  elif heads_major:  # key blocks past slot q_start + T - 1 (not written yet) are skipped
    out = flash_attention(q_BxKxMxH.reshape(b, kv, g, t, h), k, v, key_valid_BxS, q_start, scale,
                          block=_CACHE_KEY_BLOCK)
    out_BxKxMxH = out.reshape(b, kv, g * t, h)
  elif fits and backend.on_cpu():
    out_BxKxMxH = backend.cpu_attention(q_BxKxMxH, k, v, key_valid_BxS, scale)
  else:
    out = flash_attention(q_BxKxMxH.reshape(b, kv, g, t, h), k, v, key_valid_BxS, q_start, scale)
    out_BxKxMxH = out.reshape(b, kv, g * t, h)
  return out_BxKxMxH.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)


def allowed_mask(q_start, t: int, key_valid_BxS):
  """bool [B, T, S]: query i may see key s (s ≤ q_start + i and key s is real)."""
  s = key_valid_BxS.shape[1]
  q_slot_T = jnp.asarray(q_start, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
  causal_TxS = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot_T[:, None]
  return causal_TxS[None] & key_valid_BxS[:, None, :]


def masked_scores(q_BxKxMxH, k_BxKxSxH, allowed_BxTxS, scale):
  """float32 scaled scores [B, K, M, S] (M = G*T), MASK_VALUE where not allowed."""
  b, kv, m, _ = q_BxKxMxH.shape
  t, s = allowed_BxTxS.shape[1:]
  scores = jnp.einsum("bkmh,bksh->bkms", q_BxKxMxH, k_BxKxSxH,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(allowed_BxTxS[:, None, None], scores.reshape(b, kv, m // t, t, s),
                     MASK_VALUE)
  return scores.reshape(b, kv, m, s)


def attention_block(q, k, v, allowed, scale):
  """Forward of one block: (out [b, K, M, H], stats [b, K, M, 2] = (row max, log row sum))."""
  scores = masked_scores(q, k, allowed, scale)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  unnormed = jnp.exp(scores - row_max)
  row_sum = jnp.sum(unnormed, axis=-1, keepdims=True)
  out = jnp.einsum("bkms,bksh->bkmh", unnormed.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / row_sum
  return out.astype(v.dtype), jnp.concatenate([row_max, jnp.log(row_sum)], axis=-1)


# ---------------------------------------------------------------------------------------------
# The blockwise (flash) kernel: any backend, memory linear in T.

# Query and key block length of `flash_attention`'s forward and of its backward. The backward
# holds four score-sized blocks at once (sᵀ, pᵀ, dpᵀ, dsᵀ), so its blocks are smaller, to stay
# in cache (XLA:CPU, T = 4096, B = 2: 0.28 s at 256, 0.34 s at 512; the same at T = 8192, B = 1).
_FLASH_BLOCK = 512
_FLASH_BACKWARD_BLOCK = 256

# Key block of the KV-cache path: a cache longer than this is read block by block, only up to
# the last written slot (a decode step early in a long rollout reads a short prefix).
_CACHE_KEY_BLOCK = 256


def flash_attention(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, key_valid_BxS, q_start, scale,
                    block: int | None = None):
  """Blockwise causal attention with an online softmax, forward and backward (custom VJP).

  Query i (slot q_start + i) sees key s iff s ≤ q_start + i and key_valid[b, s]. The forward
  loops over query blocks and, inside each, over the key blocks up to the causal diagonal only,
  keeping a running (max, sum, output); the backward recomputes each block's probabilities
  from the saved log-sum-exp. Memory, with Bq = Bk the block (_FLASH_BLOCK forward,
  _FLASH_BACKWARD_BLOCK backward) and N = K·G query heads:
  residuals q, k, v, out and the float32 dq accumulator, O(B·T·N·H), and log-sum-exp
  O(B·N·T) — linear in T — plus a few float32 score blocks of B·N·Bq·Bk elements at a time
  (independent of T). block: Bq = Bk of forward and backward (default _FLASH_BLOCK forward,
  _FLASH_BACKWARD_BLOCK backward). Returns out [B, K, G, T, H] in v's dtype.
  """
  blocks = (block, block) if block else (_FLASH_BLOCK, _FLASH_BACKWARD_BLOCK)
  return _flash(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, key_valid_BxS,
                jnp.asarray(q_start, jnp.int32), scale, blocks)


def _pad_to(x, axis: int, multiple: int):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _flash_geometry(t: int, s: int, block: int):
  bq = min(block, t)
  bk = min(block, s)
  return bq, bk, -(-t // bq), -(-s // bk)


def _block_scores(q_i, k_j, valid_j, q_slot0, k_slot0, scale):
  """float32 masked scores [B, K, G, bq, bk] of query block (first slot q_slot0) vs key block."""
  bq, bk = q_i.shape[3], k_j.shape[2]
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
  q_slot = q_slot0 + jnp.arange(bq, dtype=jnp.int32)
  k_slot = k_slot0 + jnp.arange(bk, dtype=jnp.int32)
  allowed_Bxbqxbk = (k_slot[None, :] <= q_slot[:, None])[None] & valid_j[:, None, :]
  return jnp.where(allowed_Bxbqxbk[:, None, None], s, MASK_VALUE)


def _flash_forward(q, k, v, key_valid, q_start, scale, block):
  """(out [B, K, G, T, H], lse [B, K, G, T] float32); see `flash_attention`."""
  b, kv, g, t, h = q.shape
  s = k.shape[2]
  bq, bk, nq, nk = _flash_geometry(t, s, block)
  q_p = _pad_to(q, 3, bq)
  k_p, v_p = _pad_to(k, 2, bk), _pad_to(v, 2, bk)
  valid_p = _pad_to(key_valid, 1, bk)

  def query_block(i):
    q_i = jax.lax.dynamic_slice_in_dim(q_p, i * bq, bq, axis=3)
    q_slot0 = q_start + i * bq
    # Key blocks past the causal diagonal of this query block are skipped.
    n_kv = jnp.clip((q_slot0 + bq - 1) // bk + 1, 1, nk)

    def key_block(j, carry):
      m, l, acc = carry
      k_j = jax.lax.dynamic_slice_in_dim(k_p, j * bk, bk, axis=2)
      v_j = jax.lax.dynamic_slice_in_dim(v_p, j * bk, bk, axis=2)
      valid_j = jax.lax.dynamic_slice_in_dim(valid_p, j * bk, bk, axis=1)
      scores = _block_scores(q_i, k_j, valid_j, q_slot0, j * bk, scale)
      m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(scores - m_new[..., None])
      pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_j,
                      preferred_element_type=jnp.float32)
      return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

    init = (jnp.full((b, kv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g, bq), jnp.float32),
            jnp.zeros((b, kv, g, bq, h), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_kv, key_block, init)
    return (acc / l[..., None]).astype(v.dtype), m + jnp.log(l)

  out, lse = jax.lax.map(query_block, jnp.arange(nq, dtype=jnp.int32))
  # [nq, B, K, G, bq, ...] → [B, K, G, T, ...]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kv, g, nq * bq, h)[:, :, :, :t]
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, nq * bq)[:, :, :, :t]
  return out, lse


def _flash_backward(q, k, v, key_valid, q_start, scale, block, out, lse, dout):
  """(dq, dk, dv): one pass over key blocks; inside, over the query blocks at or below the
  diagonal, accumulating dk, dv of the key block and adding into a float32 dq.

  Every block product is computed key-major, [bk, m] with m = (G query heads × bq queries) as
  one axis: sᵀ = k·qᵀ, dpᵀ = v·doutᵀ, dv += pᵀ·dout, dk += dsᵀ·q and dqᵀ += kᵀ·dsᵀ (dq is
  accumulated transposed, [H, T·G] per kv head, and transposed once at the end). Each GEMM then
  reads both operands in the layout it wants: no per-block transposes, and XLA:CPU's GEMMs run
  at their best rate (query-major products, same 512 blocks, T = 8192: 0.96 s vs 0.56-0.61 s).
  """
  b, kv, g, t, h = q.shape
  s = k.shape[2]
  bq, bk, nq, nk = _flash_geometry(t, s, block)
  m = g * bq
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  # Query-side inputs grouped per query block as [nq, B, K, G·bq, ...]: a block is one index.
  def by_query_block(x):
    x = _pad_to(x, 3, bq)
    x = x.reshape(b, kv, g, nq, bq, *x.shape[4:])
    return jnp.moveaxis(x, 3, 0).reshape(nq, b, kv, m, *x.shape[5:])
  q_blocks, dout_blocks = by_query_block(q), by_query_block(dout)
  lse_blocks, delta_blocks = by_query_block(lse), by_query_block(delta)
  k_p, v_p = _pad_to(k, 2, bk), _pad_to(v, 2, bk)
  valid_p = _pad_to(key_valid, 1, bk)
  # The query slot of each position of m (G copies of the block's bq slots).
  slot_in_block_m = jnp.tile(jnp.arange(bq, dtype=jnp.int32), g)

  def key_block(dq_t, j):
    k_j = jax.lax.dynamic_slice_in_dim(k_p, j * bk, bk, axis=2)
    v_j = jax.lax.dynamic_slice_in_dim(v_p, j * bk, bk, axis=2)
    k_j_t = k_j.swapaxes(-1, -2)  # [B, K, H, bk]: once per key block
    valid_j = jax.lax.dynamic_slice_in_dim(valid_p, j * bk, bk, axis=1)
    k_slot = j * bk + jnp.arange(bk, dtype=jnp.int32)
    # The first query block with a query at or after this key block's first slot.
    first = jnp.clip((j * bk - q_start) // bq, 0, nq)

    def query_block(i, carry):
      dq_t, dk_j, dv_j = carry
      q_i, dout_i = q_blocks[i], dout_blocks[i]
      s_t = jnp.einsum("bksh,bkmh->bksm", k_j, q_i, preferred_element_type=jnp.float32) * scale
      q_slot = q_start + i * bq + slot_in_block_m
      allowed = (k_slot[:, None] <= q_slot[None, :])[None] & valid_j[:, :, None]
      # Masked scores get no probability and no gradient (only a row with no visible key has
      # p > 0 there after the forward's finite mask value).
      p_t = jnp.where(allowed[:, None], jnp.exp(s_t - lse_blocks[i][:, :, None, :]), 0.0)
      dv_j = dv_j + jnp.einsum("bksm,bkmh->bksh", p_t.astype(dout.dtype), dout_i,
                               preferred_element_type=jnp.float32)
      dp_t = jnp.einsum("bksh,bkmh->bksm", v_j, dout_i, preferred_element_type=jnp.float32)
      ds_t = (p_t * (dp_t - delta_blocks[i][:, :, None, :]) * scale).astype(q.dtype)
      dk_j = dk_j + jnp.einsum("bksm,bkmh->bksh", ds_t, q_i, preferred_element_type=jnp.float32)
      dq_t_i = jnp.einsum("bkhs,bksm->bkhm", k_j_t, ds_t, preferred_element_type=jnp.float32)
      dq_t = jax.lax.dynamic_update_slice_in_dim(
          dq_t, jax.lax.dynamic_slice_in_dim(dq_t, i * m, m, axis=3) + dq_t_i, i * m, axis=3)
      return dq_t, dk_j, dv_j

    zeros = jnp.zeros((b, kv, bk, h), jnp.float32)
    dq_t, dk_j, dv_j = jax.lax.fori_loop(first, nq, query_block, (dq_t, zeros, zeros))
    return dq_t, (dk_j, dv_j)

  dq_t0 = jnp.zeros((b, kv, h, nq * m), jnp.float32)
  dq_t, (dk, dv) = jax.lax.scan(key_block, dq_t0, jnp.arange(nk, dtype=jnp.int32))
  # [B, K, H, (nq, G, bq)] → [B, K, G, T, H]
  dq = dq_t.reshape(b, kv, h, nq, g, bq).transpose(0, 1, 4, 3, 5, 2)
  dq = dq.reshape(b, kv, g, nq * bq, h)[:, :, :, :t]
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, kv, nk * bk, h)[:, :, :s]
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, kv, nk * bk, h)[:, :, :s]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, key_valid, q_start, scale, blocks):
  return _flash_forward(q, k, v, key_valid, q_start, scale, blocks[0])[0]


def _flash_fwd(q, k, v, key_valid, q_start, scale, blocks):
  out, lse = _flash_forward(q, k, v, key_valid, q_start, scale, blocks[0])
  return out, (q, k, v, key_valid, q_start, out, lse)


def _flash_bwd(scale, blocks, residuals, dout):
  q, k, v, key_valid, q_start, out, lse = residuals
  dq, dk, dv = _flash_backward(q, k, v, key_valid, q_start, scale, blocks[1], out, lse, dout)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# The backends' own fused kernels (full-sequence path: T = S, q_start = 0).


def _jax_nn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS, scale):
  t = q_BxTxNxH.shape[1]
  mask = allowed_mask(0, t, key_valid_BxS)[:, None]
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask, scale=scale)


def _split_heads(n: int, kv: int, mesh) -> tuple[str | None, int]:
  """(mesh axis of the heads or None, copies of each kv head) for `on_shards`."""
  tensor = mesh.shape["tensor"]
  if tensor == 1 or n % tensor:
    return None, 1
  copies = next(r for r in range(1, n // kv + 1) if (kv * r) % tensor == 0 and n % (kv * r) == 0)
  return "tensor", copies


def on_shards(kernel, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS):
  """`kernel(q, k, v, key_valid) -> [B, T, N, H]` run on each device's block under a mesh.

  A custom-call kernel (Pallas / Mosaic, cuDNN) cannot be partitioned by XLA, so under a
  `jax.set_mesh` mesh of several devices it runs in `jax.shard_map`: rows over data × fsdp, query
  and kv heads over tensor (kv heads repeated, when tensor does not divide them, to the fewest
  copies that it does and that still group the query heads evenly; heads stay whole when tensor
  does not divide the query heads). A mesh axis that does not divide the rows is left out
  (`sharding.fit_spec`): they are then computed whole on each device. No mesh, or one device: a
  plain call.
  """
  mesh = sharding.current_mesh()
  if mesh is None or mesh.size == 1:
    return kernel(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS)
  heads, copies = _split_heads(q_BxTxNxH.shape[2], k_BxSxKxH.shape[2], mesh)
  if copies > 1:
    k_BxSxKxH, v_BxSxKxH = (jnp.repeat(x, copies, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
  rows = sharding.fit_spec(sharding.ROWS_B, key_valid_BxS.shape[:1], mesh)[0]
  by_head = P(rows, None, heads, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(by_head, by_head, by_head, P(rows, None)),
                       out_specs=by_head, check_vma=False)(
                           q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS)


def _rotate_rows(x_BxTx, shift_B, inverse=False):
  """Row b rotated left by shift_B[b] (right with `inverse`) along axis 1."""
  t = x_BxTx.shape[1]
  idx_BxT = (jnp.arange(t, dtype=jnp.int32)[None] + (-1 if inverse else 1) * shift_B[:, None]) % t
  idx = idx_BxT.reshape(idx_BxT.shape + (1,) * (x_BxTx.ndim - 2))
  return jnp.take_along_axis(x_BxTx, idx, axis=1)


def _cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS, scale,
                     implementation="cudnn"):
  """cuDNN's causal fused attention; left padding rotated to the right end of each row, where
  the causal mask keeps it from every real query (a row's real tokens must be contiguous).
  Under a mesh per device block (`on_shards`)."""

  def rows(q, k, v, key_valid_BxS):
    lead_B = jnp.argmax(key_valid_BxS, axis=1).astype(jnp.int32)  # leading padding per row
    q, k, v = (_rotate_rows(x, lead_B) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                       implementation=implementation)
    return _rotate_rows(out, lead_B, inverse=True)

  return on_shards(rows, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS)


# Sequence lengths the splash kernel runs on are padded to a multiple of this (its lane width).
_SPLASH_MULTIPLE = 128


def _splash_kernel(num_heads: int, length: int, interpret: bool):
  """jax's splash kernel for `num_heads` heads of `length` tokens, causal. Made anew in each
  trace (its mask tables are arrays of the trace it is made in; cached across traces they would
  leak as tracers); the numpy work behind the tables is cached by jax."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  block = next(bl for bl in (512, 256, 128) if length % bl == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * num_heads)
  return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=interpret), splash.SegmentIds


def pallas_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS, scale):
  """Pallas splash attention: causal mask, segment ids 1 on real tokens and 0 on padding (a
  padding query sees padding keys: finite, unused). [B, T, N, H]. Compiled as a Mosaic kernel
  for TPU, in Pallas interpret mode for any other platform (tests); under a mesh per device
  block (`on_shards`)."""
  interpret = backend.platform() != "tpu"  # read outside shard_map, where the mesh is whole

  def rows(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS):
    t, n = q_BxTxNxH.shape[1:3]
    kernel, segment_ids = _splash_kernel(n, t + (-t % _SPLASH_MULTIPLE), interpret)
    head_major = lambda x: _pad_to(x, 1, _SPLASH_MULTIPLE).swapaxes(1, 2)  # [B, heads, T', H]
    q = head_major(q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype))
    seg_BxT = _pad_to(key_valid_BxS.astype(jnp.int32), 1, _SPLASH_MULTIPLE)
    out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=segment_ids(seg, seg)))(
        q, head_major(k_BxSxKxH), head_major(v_BxSxKxH), seg_BxT)
    return out.swapaxes(1, 2)[:, :t]

  return on_shards(rows, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, key_valid_BxS)
