"""`CausalLM`: the NNX decoder (Llama / Qwen2 / Qwen3), its `KVCache` and random init.

Using it inside jit (e.g. in a `lax.while_loop` rollout) goes through nnx.split / nnx.merge:

  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens_Bx1, positions_Bx1, mask_Bx1, cache):
    model = nnx.merge(graphdef, state)
    h_Bx1xD, cache = model.decode(tokens_Bx1, positions_Bx1, mask_Bx1, cache)
    return model.logits_from_hidden(h_Bx1xD[:, -1]), cache

`nnx.jit(lambda model, *a: model.decode(*a))` works as well. Token ids are range-checked on the
host only when they are concrete (eager calls); inside jit they are NOT checked, so validate them
at the host border (`check_tokens`) before entering a jitted loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixpo import sharding
from mixpo.models import backend
from mixpo.models import remat
from mixpo.models.config import ModelConfig, from_hf_config
from mixpo.models.layers import DecoderLayer, Embed, RMSNorm, Linear, rope_cos_sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Preallocated keys/values of every layer; static shapes, written with dynamic_update_slice.

  Slot s of row b holds the key/value of the token written at decode index s (post-RoPE keys).
  One array per layer: a decode step updates each in place and reads it where it lies (slicing
  a layer out of one stacked [L, ...] array would copy it every step). Head-major
  ([B, K, S, H]): each (row, head) is one contiguous [S, H] block, the layout the q·k and p·v
  contractions consume, so a decode step reads the cache without a transpose copy.
  """
  k_layers: tuple[jax.Array, ...]  # keys per layer, each [batch, kv heads, max_len, head_dim].
  v_layers: tuple[jax.Array, ...]  # values per layer, same layout.
  valid_BxS: jax.Array  # int32 1 where slot s holds a real (non-padding) token.
  index: jax.Array  # int32 scalar: next slot to write.

  # k / v stack the layers ([L, B, K, S, H], a copy): for inspection and eval_shape-based
  # memory plans, not for the decode loop.
  k = property(lambda self: _stacked(self.k_layers))
  v = property(lambda self: _stacked(self.v_layers))


def _stacked(layers):
  """[L, ...] stack of per-layer arrays (or of their ShapeDtypeStructs, under eval_shape)."""
  if isinstance(layers[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(layers),) + tuple(layers[0].shape), layers[0].dtype,
                                sharding=None)
  return jnp.stack(layers)


def check_tokens(tokens_BxT, vocab_size: int, where: str = "tokens_BxT") -> None:
  """Raises on ids outside [0, vocab_size) when `tokens_BxT` is concrete; no-op under tracing."""
  if isinstance(tokens_BxT, jax.core.Tracer):
    return  # Inside jit: not checkable without checkify; callers validate at the host border.
  arr = np.asarray(tokens_BxT)
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{where} must be an integer array of token ids, got dtype {arr.dtype}.")
  if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
    bad = arr.min() if arr.min() < 0 else arr.max()
    raise ValueError(f"{where} holds token id {int(bad)} outside [0, vocab_size={vocab_size}); "
                     "ids are never clamped: fix the tokenizer / checkpoint vocab mismatch.")


def _layer_call(layer, x, cos, sin, key_valid):
  return layer(x, cos, sin, key_valid)[0]


_remat_layer_call = remat.layer_remat(_layer_call)


class CausalLM(nnx.Module):
  """Decoder-only LM. Parameter paths: embed/embedding, layers/{i}/..., final_norm/scale,
  lm_head/kernel (absent when config.tie_word_embeddings); see hf_io.HF_NAME_TABLE."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config=config)
    self.lm_head = (None if config.tie_word_embeddings else
                    Linear(config.hidden_size, config.vocab_size, use_bias=False, config=config,
                           rngs=rngs))

  def _inputs(self, tokens_BxT, positions_BxT, mask_BxT, where):
    check_tokens(tokens_BxT, self.config.vocab_size, f"CausalLM.{where}: tokens_BxT")
    tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
    b, t = tokens_BxT.shape
    if mask_BxT is None:
      mask_BxT = jnp.ones((b, t), jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    positions_BxT, mask_BxT = jnp.asarray(positions_BxT, jnp.int32), jnp.asarray(mask_BxT)
    for name, arr in (("positions_BxT", positions_BxT), ("mask_BxT", mask_BxT)):
      if arr.shape != (b, t):
        raise ValueError(f"CausalLM.{where}: {name} has shape {arr.shape}, expected tokens_BxT's "
                         f"{(b, t)}.")
    return tokens_BxT, positions_BxT, mask_BxT

  def hidden_states(self, tokens_BxT, positions_BxT=None, mask_BxT=None) -> jax.Array:
    """Final-normed hidden states h [B, T, D] (config.dtype) of a causal forward pass.

    tokens_BxT int32 ids; positions_BxT int32 (default 0..T-1; with left padding pass
    cumsum(mask)-1 clamped at 0); mask_BxT 1 = real token, 0 = padding (never attended).
    """
    tokens_BxT, positions_BxT, mask_BxT = self._inputs(tokens_BxT, positions_BxT, mask_BxT,
                                                       "hidden_states")
    key_valid_BxT = mask_BxT != 0  # attention is causal over the real tokens
    cos, sin = rope_cos_sin(positions_BxT, self.config)
    x = sharding.constrain(self.embed(tokens_BxT))  # no-op without jax.set_mesh
    call = _remat_layer_call if self.config.remat else _layer_call
    for layer in self.layers:
      x = sharding.constrain(call(layer, x, cos, sin, key_valid_BxT))
    return self.final_norm(x)

  def decode_head(self) -> jax.Array | None:
    """The LM head as a [D, V] array laid out for a decode loop's `logits_from_hidden`, or None
    (read the head as stored): a tied head's copy on XLA:CPU (`backend.decode_head`), else None.
    """
    if self.lm_head is not None:
      return None
    return backend.decode_head(self.embed.embedding[...], self.config.dtype)

  def logits_from_hidden(self, h_xD: jax.Array, head_DxV: jax.Array | None = None) -> jax.Array:
    """Logits [..., V] float32 from hidden states [..., D] (chunk over T to bound memory).

    head_DxV: `decode_head()`'s copy of the head (a decode loop), or None (read as stored).
    """
    dtype = self.config.dtype
    if head_DxV is not None:
      return jnp.einsum("...d,dv->...v", h_xD.astype(dtype), head_DxV,
                        preferred_element_type=jnp.float32)
    if self.lm_head is None:
      w_VxD = self.embed.embedding[...].astype(dtype)
      return jnp.einsum("...d,vd->...v", h_xD.astype(dtype), w_VxD,
                        preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h_xD.astype(dtype), self.lm_head.kernel[...].astype(dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT, positions_BxT=None, mask_BxT=None) -> jax.Array:
    """Logits [B, T, V] float32; arguments as in `hidden_states`."""
    return self.logits_from_hidden(self.hidden_states(tokens_BxT, positions_BxT, mask_BxT))

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens (dtype: config.dtype)."""
    c = self.config
    shape = (batch_size, c.num_kv_heads, max_len, c.head_dim)
    dtype = dtype or c.dtype
    spec = jax.sharding.PartitionSpec(*sharding.KV_LBKSH[1:])  # a layer of KV_LBKSH
    kv = lambda: tuple(sharding.constrain(jnp.zeros(shape, dtype), spec)
                       for _ in range(c.num_layers))
    return KVCache(kv(), kv(), sharding.constrain(jnp.zeros((batch_size, max_len), jnp.int32),
                                                  sharding.ROWS_B), jnp.zeros((), jnp.int32))

  def decode(self, tokens_BxT, positions_BxT, mask_BxT, cache: KVCache):
    """Appends T tokens to the cache and returns (h [B, T, D] final-normed, new cache).

    Writes keys/values at slots cache.index .. cache.index+T-1, marks them valid where
    mask_BxT == 1, and lets the query at slot s = cache.index+i attend to every valid slot <= s.
    Prefill: T = P, cache.index = 0, left-padded prompt. Step: T = 1. The caller keeps
    cache.index + T <= max_len (writes past the end are clamped by dynamic_update_slice).
    """
    tokens_BxT, positions_BxT, mask_BxT = self._inputs(tokens_BxT, positions_BxT, mask_BxT,
                                                       "decode")
    b, t = tokens_BxT.shape
    if cache.valid_BxS.shape[0] != b:
      raise ValueError(f"CausalLM.decode: cache batch {cache.valid_BxS.shape[0]} != tokens_BxT "
                       f"batch {b}; build it with init_cache({b}, max_len).")
    index = jnp.asarray(cache.index, jnp.int32)
    valid_BxS = jax.lax.dynamic_update_slice(
        cache.valid_BxS, (mask_BxT != 0).astype(jnp.int32), (jnp.zeros((), jnp.int32), index))
    cos, sin = rope_cos_sin(positions_BxT, self.config)
    k_layers, v_layers = list(cache.k_layers), list(cache.v_layers)
    x = sharding.constrain(self.embed(tokens_BxT))
    for i, layer in enumerate(self.layers):
      x, k_layers[i], v_layers[i] = layer(x, cos, sin, valid_BxS != 0,
                                          (k_layers[i], v_layers[i], index))
      x = sharding.constrain(x)
    new_cache = KVCache(tuple(k_layers), tuple(v_layers), valid_BxS, index + t)
    return self.final_norm(x), new_cache


def init_from_config(hf_config_or_dict, rng=0, **options) -> CausalLM:
  """Randomly initialised `CausalLM` from a config.json dict or a transformers PretrainedConfig.

  rng: int seed, jax PRNG key or nnx.Rngs. options: dtype, param_dtype, remat, attention_impl.
  """
  config = (hf_config_or_dict if isinstance(hf_config_or_dict, ModelConfig)
            else from_hf_config(hf_config_or_dict, **options))
  if isinstance(hf_config_or_dict, ModelConfig) and options:
    config = dataclasses.replace(config, **options)
  rngs = rng if isinstance(rng, nnx.Rngs) else nnx.Rngs(params=rng)
  return CausalLM(config, rngs=rngs)
