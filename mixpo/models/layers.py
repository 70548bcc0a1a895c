"""Building blocks of the decoder: Linear, Embed, RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Parameters are `nnx.Param`s stored in `config.param_dtype` and cast to `config.dtype` at use.
Parameter names (kernel / bias / scale / embedding) are the leaves of the sharding-friendly paths
documented in `mixpo/models/hf_io.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mixpo import sharding
from mixpo.models.config import ModelConfig, rope_inv_freq

# Finite "minus infinity": a fully masked row (a left-padding query) stays finite (uniform
# weights) instead of NaN, so it cannot poison gradients; its output is ignored downstream.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.custom_vjp
def matmul(x_xI: jax.Array, kernel_IxO: jax.Array) -> jax.Array:
  """x @ kernel over the last axis of x, with a backward that picks which operand to transpose.

  The weight gradient dW = xᵀ·dy contracts the (batch × time) axis of both operands, and the
  CPU matmul kernels need one of them transposed in memory. Left to itself XLA:CPU transposes
  dy and fuses the producer's elementwise work (e.g. the SwiGLU derivative) into that strided
  copy; for gate/up projections (O = 2.7 I) that copy cost more than the matmul. Here the
  smaller of x and dy is the one transposed: the same numbers (bench_model: the SwiGLU block's
  fwd+bwd 175 → 111 ms at B×T = 8192, hidden 256, intermediate 688).
  """
  return jnp.einsum("...i,io->...o", x_xI, kernel_IxO)


def _matmul_fwd(x_xI, kernel_IxO):
  return matmul(x_xI, kernel_IxO), (x_xI, kernel_IxO)


def _matmul_bwd(res, dy_xO):
  x_xI, kernel_IxO = res
  i, o = kernel_IxO.shape
  x_NxI, dy_NxO = x_xI.reshape(-1, i), dy_xO.reshape(-1, o)
  dx_xI = jnp.einsum("...o,io->...i", dy_xO, kernel_IxO)
  contract_rows = (((0,), (0,)), ((), ()))
  if i < o:  # dWᵀ = dyᵀ·x: x, the narrower operand, is the one laid out transposed.
    dkernel = jax.lax.dot_general(dy_NxO, x_NxI, contract_rows).T
  else:
    dkernel = jax.lax.dot_general(x_NxI, dy_NxO, contract_rows)
  return dx_xI, dkernel.astype(kernel_IxO.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] (the transpose of torch's Linear.weight)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, config: ModelConfig,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.dtype = config.dtype
    init = jax.nn.initializers.normal(init_std)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), config.param_dtype))
    self.bias = (nnx.Param(jnp.zeros((out_features,), config.param_dtype)) if use_bias else None)

  def __call__(self, x_xI: jax.Array) -> jax.Array:
    return self.add_bias(matmul(x_xI.astype(self.dtype), self.kernel[...].astype(self.dtype)))

  def add_bias(self, y_xO: jax.Array) -> jax.Array:
    """y + bias (broadcast over the leading axes); y unchanged without a bias."""
    if self.bias is None:
      return y_xO
    return y_xO + self.bias[...].astype(self.dtype).reshape((1,) * (y_xO.ndim - 1) + (-1,))


def fused_linear(projections, x_xI: jax.Array) -> tuple[jax.Array, ...]:
  """Several Linears of the same input as one matmul over their concatenated kernels (one
  dispatch instead of several per decode step; the concatenation of loop-invariant weights is
  hoisted out of the decode loop by XLA). Returns each projection's output.

  Under a mesh with a tensor axis > 1 the kernels are split over their output dim, and a
  concatenation (then slicing) along that dim would need resharding: there the projections
  stay separate.
  """
  mesh = sharding.current_mesh()
  if mesh is not None and mesh.shape["tensor"] > 1:
    return tuple(p(x_xI) for p in projections)
  dtype = projections[0].dtype
  kernel = jnp.concatenate([p.kernel[...].astype(dtype) for p in projections], axis=1)
  y = matmul(x_xI.astype(dtype), kernel)
  outs, start = [], 0
  for p in projections:
    width = p.kernel.shape[1]
    outs.append(p.add_bias(y[..., start:start + width]))
    start += width
  return tuple(outs)


class Embed(nnx.Module):
  """Token embedding table embedding [V, D]."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = config.dtype
    init = jax.nn.initializers.normal(0.02)
    self.embedding = nnx.Param(
        init(rngs.params(), (config.vocab_size, config.hidden_size), config.param_dtype))

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, statistics in float32 (as transformers' LlamaRMSNorm)."""

  def __init__(self, dim: int, *, config: ModelConfig):
    self.eps = config.rms_norm_eps
    self.dtype = config.dtype
    self.scale = nnx.Param(jnp.ones((dim,), config.param_dtype))

  def __call__(self, x_xD: jax.Array) -> jax.Array:
    x32 = x_xD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(self.dtype).reshape((1,) * (x_xD.ndim - 1) + (-1,))
    return scale * x32.astype(self.dtype)


def rope_cos_sin(positions_BxT: jax.Array, config: ModelConfig):
  """cos, sin [B, T, 1, H] float32 for the rotate-half RoPE convention of transformers."""
  inv_freq = jnp.asarray(rope_inv_freq(config))
  freqs_BxTxh = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  emb_BxTxH = jnp.concatenate([freqs_BxTxh, freqs_BxTxh], axis=-1)[:, :, None, :]
  return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTx1xH: jax.Array, sin_BxTx1xH: jax.Array):
  half = x_BxTxNxH.shape[-1] // 2
  x32 = x_BxTxNxH.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos_BxTx1xH + rotated * sin_BxTx1xH).astype(x_BxTxNxH.dtype)


def attend(q_BxTxNxH, k, v, allowed_BxTxS, impl: str, *, heads_major: bool = False,
           causal: bool = False):
  """Softmax attention of T queries over S keys (GQA: N query heads share K kv heads).

  k, v: [B, S, K, H] (token-major, as projected), or [B, K, S, H] with `heads_major` (the KV
  cache layout: the contractions read it in place, no per-step transpose of the whole cache).
  allowed_BxTxS: bool, True where query t may see key s (causality and padding folded in).
  causal: the caller promises allowed[:, t, s] is False for s > t (self-attention over the same
  T = S tokens); the later half of the queries is then computed apart from the earlier half,
  which needs only the first half of the keys (a quarter of the score work skipped).
  A query with no allowed key at all (left padding) gets a finite, unspecified output.
  Returns [B, T, N*H] in the dtype of v.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv = k.shape[1 if heads_major else 2]
  g = n // kv
  scale = h ** -0.5
  if impl == "dot_product_attention":
    if heads_major:  # jax.nn wants [B, S, K, H]
      k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    out = jax.nn.dot_product_attention(q_BxTxNxH, k, v, mask=allowed_BxTxS[:, None], scale=scale)
    return out.reshape(b, t, n * h)
  # The G query heads of a kv head are stacked into one [G*T, H] matrix, so each (row, kv head)
  # is one GEMM against its [S, H] keys (and the probabilities one GEMM against its values).
  q_BxKxMxH = q_BxTxNxH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  if heads_major:  # KV-cache path (prefill / decode step): forward only, the cache read in place.
    out_BxKxMxH = _attention_block(q_BxKxMxH, k, v, allowed_BxTxS, scale)[0]
  else:  # Full-sequence path (training, scoring).
    s = k.shape[1]
    chunks = 2 if causal and t == s and t % 2 == 0 and t >= _MIN_CHUNKED_LEN else 1
    out_BxKxMxH = _grouped_attention(q_BxKxMxH, k.swapaxes(1, 2), v.swapaxes(1, 2), allowed_BxTxS,
                                     scale, _rows_per_block(b, kv * g * t * s), chunks)
  return out_BxKxMxH.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)


# Causal query chunking pays for its slicing from this many tokens on.
_MIN_CHUNKED_LEN = 64

# Rows per block of `_grouped_attention`: keeps a block's float32 scores [rows, K, G*T, S] near
# this size, so the softmax passes run in cache and peak memory does not grow with the batch.
_BLOCK_SCORE_BYTES = 8 << 20


def _rows_per_block(batch: int, scores_per_row: int) -> int:
  """The largest divisor of `batch` whose block of scores fits _BLOCK_SCORE_BYTES (>= 1). Under
  a mesh the batch axis is sharded and the whole batch is one block (no loop over shards)."""
  if sharding.current_mesh() is not None:
    return batch
  rows = max(1, min(batch, _BLOCK_SCORE_BYTES // (4 * scores_per_row)))
  while batch % rows:
    rows -= 1
  return rows


def _masked_scores(q_BxKxMxH, k_BxKxSxH, allowed_BxTxS, scale):
  """float32 scaled scores [B, K, M, S] (M = G*T), _MASK_VALUE where not allowed."""
  b, kv, m, _ = q_BxKxMxH.shape
  t, s = allowed_BxTxS.shape[1:]
  scores = jnp.einsum("bkmh,bksh->bkms", q_BxKxMxH, k_BxKxSxH,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(allowed_BxTxS[:, None, None], scores.reshape(b, kv, m // t, t, s),
                     _MASK_VALUE)
  return scores.reshape(b, kv, m, s)


def _attention_block(q, k, v, allowed, scale):
  """Forward of one block: (out [b, K, M, H], stats [b, K, M, 2] = (row max, log row sum))."""
  scores = _masked_scores(q, k, allowed, scale)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  unnormed = jnp.exp(scores - row_max)
  row_sum = jnp.sum(unnormed, axis=-1, keepdims=True)
  out = jnp.einsum("bkms,bksh->bkmh", unnormed.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / row_sum
  return out.astype(v.dtype), jnp.concatenate([row_max, jnp.log(row_sum)], axis=-1)


def _attention_block_grad(q, k, v, allowed, out, stats, dout, scale):
  """Backward of one block from the saved softmax statistics (the probabilities are recomputed
  instead of stored: one extra q·k GEMM, no [K, M, S] residual per layer)."""
  b, kv, m, _ = q.shape
  t, s = allowed.shape[1:]
  probs = jnp.exp(_masked_scores(q, k, allowed, scale) - stats[..., :1] - stats[..., 1:])
  # dv = pᵀ·dout and dk = dsᵀ·q contract the M axis of both operands; the CPU GEMM wants one of
  # them transposed in memory: the narrow [M, H] one (dout, q), not the [M, S] probabilities.
  # The barrier keeps XLA from folding the transpose back into the dot (whose strided form runs
  # on a slower kernel: 75 vs 170 GFLOP/s here, transpose included).
  dout_t, q_t = jax.lax.optimization_barrier((dout.swapaxes(-1, -2), q.swapaxes(-1, -2)))
  dv_t = jnp.einsum("bkhm,bkms->bkhs", dout_t, probs.astype(dout.dtype),
                    preferred_element_type=jnp.float32)
  dprobs = jnp.einsum("bkmh,bksh->bkms", dout, v, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dscores = probs * (dprobs - row_dot) * scale
  # Masked scores get no gradient (this matters only for rows with no allowed key at all,
  # whose uniform weights are not a function of the scores).
  dscores = jnp.where(allowed[:, None, None], dscores.reshape(b, kv, m // t, t, s), 0.0)
  dscores = dscores.reshape(b, kv, m, s).astype(q.dtype)
  dq = jnp.einsum("bkms,bksh->bkmh", dscores, k, preferred_element_type=jnp.float32)
  dk_t = jnp.einsum("bkhm,bkms->bkhs", q_t, dscores, preferred_element_type=jnp.float32)
  dk, dv = (x.swapaxes(-1, -2) for x in jax.lax.optimization_barrier((dk_t, dv_t)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _query_chunks(t: int, chunks: int):
  return [(c * t // chunks, (c + 1) * t // chunks) for c in range(chunks)]


def _split_queries(x_BxKxMxC, t: int, lo: int, hi: int):
  """Rows of queries lo..hi-1 of an [B, K, G*T, C] array (M ordered head-major, then time)."""
  b, kv, m, c = x_BxKxMxC.shape
  return x_BxKxMxC.reshape(b, kv, m // t, t, c)[:, :, :, lo:hi].reshape(b, kv, -1, c)


def _join_queries(parts, g: int):
  """Inverse of `_split_queries` over consecutive chunks: [B, K, G*T_c, C] parts → [B, K, M, C]."""
  b, kv, _, c = parts[0].shape
  joined = jnp.concatenate([x.reshape(b, kv, g, -1, c) for x in parts], axis=3)
  return joined.reshape(b, kv, -1, c)


def _causal_forward(q, k, v, allowed, scale, chunks):
  """_attention_block over query chunks; chunk [lo, hi) attends to keys [0, hi) only."""
  if chunks == 1:
    return _attention_block(q, k, v, allowed, scale)
  t = allowed.shape[1]
  g = q.shape[2] // t
  outs, stats = zip(*(
      _attention_block(_split_queries(q, t, lo, hi), k[:, :, :hi], v[:, :, :hi],
                       allowed[:, lo:hi, :hi], scale) for lo, hi in _query_chunks(t, chunks)))
  return _join_queries(outs, g), _join_queries(stats, g)


def _causal_backward(q, k, v, allowed, out, stats, dout, scale, chunks):
  """_attention_block_grad over the query chunks of `_causal_forward`."""
  if chunks == 1:
    return _attention_block_grad(q, k, v, allowed, out, stats, dout, scale)
  t = allowed.shape[1]
  g = q.shape[2] // t
  s = k.shape[2]
  dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for lo, hi in _query_chunks(t, chunks):
    part = lambda x: _split_queries(x, t, lo, hi)
    dq_c, dk_c, dv_c = _attention_block_grad(part(q), k[:, :, :hi], v[:, :, :hi],
                                             allowed[:, lo:hi, :hi], part(out), part(stats),
                                             part(dout), scale)
    dqs.append(dq_c)
    pad = ((0, 0), (0, 0), (0, s - hi), (0, 0))
    dk = dk + jnp.pad(dk_c.astype(jnp.float32), pad)
    dv = dv + jnp.pad(dv_c.astype(jnp.float32), pad)
  return _join_queries(dqs, g), dk.astype(k.dtype), dv.astype(v.dtype)


def _over_row_blocks(fn, rows: int, *arrays):
  """fn over blocks of `rows` leading rows (lax.map), results re-joined; one call if rows = B."""
  if rows >= arrays[0].shape[0]:
    return fn(*arrays)
  split = lambda x: x.reshape((x.shape[0] // rows, rows) + x.shape[1:])
  outs = jax.lax.map(lambda blocks: fn(*blocks), tuple(split(x) for x in arrays))
  return tuple(o.reshape((-1,) + o.shape[2:]) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _grouped_attention(q_BxKxMxH, k_BxKxSxH, v_BxKxSxH, allowed_BxTxS, scale, rows, chunks):
  """softmax(q·kᵀ·scale, masked) · v per (row, kv head), in blocks of `rows` rows and `chunks`
  causal query chunks (see `attend`).

  A custom VJP: autodiff of the plain formula keeps the scores, the mask select and the
  probabilities of every layer and runs about ten elementwise passes over them; this backward
  recomputes the probabilities from (row max, log row sum) and fuses the softmax derivative
  into one pass (bench_model train step 1063 → 820 ms, see BUILD_NOTES).
  """
  return _grouped_attention_fwd(q_BxKxMxH, k_BxKxSxH, v_BxKxSxH, allowed_BxTxS, scale, rows,
                                chunks)[0]


def _grouped_attention_fwd(q, k, v, allowed, scale, rows, chunks):
  out, stats = _over_row_blocks(lambda *a: _causal_forward(*a, scale, chunks), rows, q, k, v,
                                allowed)
  return out, (q, k, v, allowed, out, stats)


def _grouped_attention_bwd(scale, rows, chunks, residuals, dout):
  q, k, v, allowed, out, stats = residuals
  dq, dk, dv = _over_row_blocks(lambda *a: _causal_backward(*a, scale, chunks), rows, q, k, v,
                                allowed, out, stats, dout)
  return dq, dk, dv, None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


class Attention(nnx.Module):
  """GQA self-attention with RoPE, optional q/k RMSNorm (Qwen3) and an optional KV cache."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    d, n, kv, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    self.q_proj = Linear(d, n * h, use_bias=c.qkv_bias, config=c, rngs=rngs)
    self.k_proj = Linear(d, kv * h, use_bias=c.qkv_bias, config=c, rngs=rngs)
    self.v_proj = Linear(d, kv * h, use_bias=c.qkv_bias, config=c, rngs=rngs)
    self.o_proj = Linear(n * h, d, use_bias=c.o_bias, config=c, rngs=rngs)
    self.q_norm = RMSNorm(h, config=c) if c.qk_norm else None
    self.k_norm = RMSNorm(h, config=c) if c.qk_norm else None

  def __call__(self, x_BxTxD, cos, sin, allowed_BxTxS, cache=None):
    """cache: None, or (k_LxBxKxSxH, v_LxBxKxSxH, layer, index) to write the new keys/values
    at slots index.. and attend over the whole cache. Returns (out_BxTxD, k_L.., v_L..)."""
    c = self.config
    b, t, _ = x_BxTxD.shape
    q, k, v = fused_linear((self.q_proj, self.k_proj, self.v_proj), x_BxTxD)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
      out = attend(q, k, v, allowed_BxTxS, c.attention_impl, causal=True)
      return self.o_proj(out), None, None
    k_cache, v_cache, layer, index = cache
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(layer, jnp.int32), zero, zero, index, zero)
    # Only the T new rows are transposed to head-major; the cache itself is never copied.
    k_1xBxKxTxH = k.swapaxes(1, 2)[None].astype(k_cache.dtype)
    v_1xBxKxTxH = v.swapaxes(1, 2)[None].astype(v_cache.dtype)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_1xBxKxTxH, start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_1xBxKxTxH, start)
    out = attend(q, k_cache[layer].astype(q.dtype), v_cache[layer].astype(q.dtype),
                 allowed_BxTxS, c.attention_impl, heads_major=True)
    return self.o_proj(out), k_cache, v_cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(d, f, use_bias=False, config=config, rngs=rngs)
    self.up_proj = Linear(d, f, use_bias=False, config=config, rngs=rngs)
    self.down_proj = Linear(f, d, use_bias=False, config=config, rngs=rngs)

  def __call__(self, x_BxTxD):
    gate, up = fused_linear((self.gate_proj, self.up_proj), x_BxTxD)
    return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(attn_norm(x)); x + mlp(mlp_norm(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, config=config)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config=config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x_BxTxD, cos, sin, allowed_BxTxS, cache=None):
    h, k_cache, v_cache = self.attn(self.attn_norm(x_BxTxD), cos, sin, allowed_BxTxS, cache)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return x_BxTxD, k_cache, v_cache
