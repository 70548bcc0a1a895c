"""Building blocks of the decoder: Linear, Embed, RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Parameters are `nnx.Param`s stored in `config.param_dtype` and cast to `config.dtype` at use.
Parameter names (kernel / bias / scale / embedding) are the leaves of the sharding-friendly paths
documented in `mixpo/models/hf_io.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixpo import sharding
from mixpo.models import attention
from mixpo.models import backend
from mixpo.models.config import ModelConfig, rope_inv_freq


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] (the transpose of torch's Linear.weight)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, config: ModelConfig,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.dtype = config.dtype
    init = jax.nn.initializers.normal(init_std)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), config.param_dtype))
    self.bias = (nnx.Param(jnp.zeros((out_features,), config.param_dtype)) if use_bias else None)
    self.lora = nnx.data(None)  # optional low-rank adapter (mixpo/models/lora.py).

  def __call__(self, x_xI: jax.Array) -> jax.Array:
    x_xI = x_xI.astype(self.dtype)
    y_xO = backend.matmul(x_xI, self.kernel[...].astype(self.dtype))
    return self.add_bias(self.add_adapter(x_xI, y_xO))

  def add_adapter(self, x_xI: jax.Array, y_xO: jax.Array) -> jax.Array:
    """y + the LoRA update of x (see mixpo/models/lora.py); y unchanged without an adapter."""
    return y_xO if self.lora is None else y_xO + self.lora(x_xI)

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
  x_xI = x_xI.astype(dtype)
  y = backend.matmul(x_xI, kernel)
  outs, start = [], 0
  for p in projections:
    width = p.kernel.shape[1]
    outs.append(p.add_bias(p.add_adapter(x_xI, y[..., start:start + width])))
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

  def __call__(self, x_BxTxD, cos, sin, key_valid_BxS, cache=None):
    """Causal attention; key_valid_BxS: 1 on real keys (the T tokens, or every cache slot).

    cache: None, or (k_BxKxSxH, v_BxKxSxH, index), this layer's cache, to write the new
    keys/values at slots index.. and attend over the cache (query i sees valid slots <=
    index + i). Returns (out_BxTxD, k_BxKxSxH, v_BxKxSxH) (None, None without a cache)."""
    c = self.config
    impl = attention.resolve_impl(c.attention_impl, dtype=c.dtype, head_dim=c.head_dim)
    b, t, _ = x_BxTxD.shape
    q, k, v = fused_linear((self.q_proj, self.k_proj, self.v_proj), x_BxTxD)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
      out = attention.attend(q, k, v, key_valid_BxS, impl)
      return self.o_proj(out), None, None
    k_cache, v_cache, index = cache
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, index, zero)
    # Only the T new rows are transposed to head-major; the cache is updated in place.
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.swapaxes(1, 2).astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.swapaxes(1, 2).astype(v_cache.dtype), start)
    out = attention.attend(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), key_valid_BxS,
                           impl, q_start=index, heads_major=True)
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

  def __call__(self, x_BxTxD, cos, sin, key_valid_BxS, cache=None):
    h, k_cache, v_cache = self.attn(self.attn_norm(x_BxTxD), cos, sin, key_valid_BxS, cache)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return x_BxTxD, k_cache, v_cache
