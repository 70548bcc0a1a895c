"""The platform a program is compiled for, and the tuning that belongs to XLA:CPU alone.

`platform()` is the one switch every backend-dependent choice reads: "cpu", "gpu" or "tpu" of
the devices the program is traced for. Those are the devices of the enclosing
`jax.set_mesh(mesh)` (its abstract mesh carries their platform), so a program traced for a TPU
topology on a CPU-only host (experiments/aot_compile.py) is a TPU program; without a mesh, jax's
default backend. It decides `attention_impl="auto"` and Pallas' interpret mode
(`attention.resolve_impl`, `attention.pallas_attention`) and whether the XLA:CPU tuning below
runs. That tuning runs on CPU only; GPU and TPU get the plain formulation and their own autodiff:

  matmul          x @ W; on CPU with a backward that picks which operand to transpose
  cpu_attention   the CPU attention kernel: a custom VJP that recomputes the probabilities,
                  `optimization_barrier`-guarded transposes, batch row blocks sized for CPU
                  caches (`attention.attend` runs it for rows whose scores fit)
  decode_head     a [D, V] copy of a tied LM head that a decode loop takes once (CPU)
  argmax          argmax over the last axis as two plain reductions (CPU)
  gumbel          Gumbel noise from one Philox `rng_bit_generator` call (every platform: a
                  counter-based generator native to each backend; see its docstring)
  rollout_compute_dtype  a bfloat16 rollout copy computes in float32 on CPU (bf16-rounded
                  weights): XLA:CPU's bf16 decode is slower than its float32
Figures behind each choice are in BUILD_NOTES.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from mixpo import sharding

# Device platform names as jax reports them → the three this module's callers branch on.
_PLATFORMS = {"cuda": "gpu", "rocm": "gpu"}


def platform() -> str:
  """"cpu" | "gpu" | "tpu": the platform of the enclosing `jax.set_mesh` mesh's devices (what a
  program traced there is compiled for), else jax's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  name = jax.default_backend() if device is None else device.platform
  return _PLATFORMS.get(name, name)


def on_cpu() -> bool:
  return platform() == "cpu"


def _attention():
  """mixpo.models.attention (its masks and softmax block); imported here at call time because
  it imports this module for `platform()` and `cpu_attention`."""
  from mixpo.models import attention  # noqa: PLC0415
  return attention


# ---------------------------------------------------------------------------------------------
# matmul


def matmul(x_xI: jax.Array, kernel_IxO: jax.Array) -> jax.Array:
  """x @ kernel over the last axis of x; on XLA:CPU with the backward of `_cpu_matmul`, elsewhere
  left to the backend's autodiff (its GEMMs take transposed operands without a copy)."""
  if on_cpu():
    return _cpu_matmul(x_xI, kernel_IxO)
  return jnp.einsum("...i,io->...o", x_xI, kernel_IxO)


@jax.custom_vjp
def _cpu_matmul(x_xI: jax.Array, kernel_IxO: jax.Array) -> jax.Array:
  """x @ kernel over the last axis of x, with a backward that picks which operand to transpose.

  The weight gradient dW = xᵀ·dy contracts the (batch × time) axis of both operands, and the
  CPU matmul kernels need one of them transposed in memory. Left to itself XLA:CPU transposes
  dy and fuses the producer's elementwise work (e.g. the SwiGLU derivative) into that strided
  copy; for gate/up projections (O = 2.7 I) that copy cost more than the matmul. Here the
  smaller of x and dy is the one transposed: the same numbers, faster (figures in BUILD_NOTES).
  """
  return jnp.einsum("...i,io->...o", x_xI, kernel_IxO)


def _matmul_fwd(x_xI, kernel_IxO):
  return _cpu_matmul(x_xI, kernel_IxO), (x_xI, kernel_IxO)


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


_cpu_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---------------------------------------------------------------------------------------------
# The CPU attention kernel (`attention.attend` calls it on CPU for rows whose scores fit).

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


def _attention_block_grad(q, k, v, allowed, out, stats, dout, scale):
  """Backward of one block from the saved softmax statistics (the probabilities are recomputed
  instead of stored: one extra q·k GEMM, no [K, M, S] residual per layer)."""
  b, kv, m, _ = q.shape
  t, s = allowed.shape[1:]
  scores = _attention().masked_scores(q, k, allowed, scale)
  probs = jnp.exp(scores - stats[..., :1] - stats[..., 1:])
  # dv = pᵀ·dout and dk = dsᵀ·q contract the M axis of both operands; the CPU GEMM wants one of
  # them transposed in memory: the narrow [M, H] one (dout, q), not the [M, S] probabilities.
  # The barrier keeps XLA from folding the transpose back into the dot (whose strided form runs
  # on a slower XLA:CPU kernel).
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


def _causal_forward(q, k, v, key_valid, scale, chunks):
  """`attention.attention_block` over query chunks; chunk [lo, hi) attends to keys [0, hi) only
  (a quarter of the score work skipped with 2 chunks)."""
  attention = _attention()
  t = key_valid.shape[1]
  allowed = attention.allowed_mask(0, t, key_valid)
  if chunks == 1:
    return attention.attention_block(q, k, v, allowed, scale)
  g = q.shape[2] // t
  outs, stats = zip(*(
      attention.attention_block(_split_queries(q, t, lo, hi), k[:, :, :hi], v[:, :, :hi],
                                allowed[:, lo:hi, :hi], scale)
      for lo, hi in _query_chunks(t, chunks)))
  return _join_queries(outs, g), _join_queries(stats, g)


def _causal_backward(q, k, v, key_valid, out, stats, dout, scale, chunks):
  """_attention_block_grad over the query chunks of `_causal_forward`."""
  t = key_valid.shape[1]
  allowed = _attention().allowed_mask(0, t, key_valid)
  if chunks == 1:
    return _attention_block_grad(q, k, v, allowed, out, stats, dout, scale)
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
def _grouped_attention(q_BxKxMxH, k_BxKxSxH, v_BxKxSxH, key_valid_BxS, scale, rows, chunks):
  """softmax(q·kᵀ·scale, causal and key-masked) · v per (row, kv head), in blocks of `rows`
  rows and `chunks` causal query chunks; T = S.

  A custom VJP: autodiff of the plain formula keeps the scores, the mask select and the
  probabilities of every layer and runs about ten elementwise passes over them; this backward
  recomputes the probabilities from (row max, log row sum) and fuses the softmax derivative
  into one pass (figures in BUILD_NOTES).
  """
  return _grouped_attention_fwd(q_BxKxMxH, k_BxKxSxH, v_BxKxSxH, key_valid_BxS, scale, rows,
                                chunks)[0]


def _grouped_attention_fwd(q, k, v, key_valid, scale, rows, chunks):
  out, stats = _over_row_blocks(lambda *a: _causal_forward(*a, scale, chunks), rows, q, k, v,
                                key_valid)
  return out, (q, k, v, key_valid, out, stats)


def _grouped_attention_bwd(scale, rows, chunks, residuals, dout):
  q, k, v, key_valid, out, stats = residuals
  dq, dk, dv = _over_row_blocks(lambda *a: _causal_backward(*a, scale, chunks), rows, q, k, v,
                                key_valid, out, stats, dout)
  return dq, dk, dv, None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def cpu_attention(q_BxKxMxH, k_BxKxSxH, v_BxKxSxH, key_valid_BxS, scale):
  """Causal attention of the G·T queries per kv head (M = G·T, head-major then time) over T = S
  keys with the CPU kernel: [B, K, M, H] in v's dtype. One row's float32 scores are held at once,
  so `attention.attend` calls it only where they fit."""
  b, kv, m, _ = q_BxKxMxH.shape
  t, s = key_valid_BxS.shape[1], k_BxKxSxH.shape[2]
  chunks = 2 if t % 2 == 0 and t >= _MIN_CHUNKED_LEN else 1
  return _grouped_attention(q_BxKxMxH, k_BxKxSxH, v_BxKxSxH, key_valid_BxS, scale,
                            _rows_per_block(b, kv * m * s), chunks)


# ---------------------------------------------------------------------------------------------
# Decoding and sampling.


def decode_head(embedding_VxD: jax.Array, dtype) -> jax.Array | None:
  """A tied LM head laid out [D, V] for a decode loop's logits, or None (read the head as stored).

  On XLA:CPU a tied head ([V, D] embedding) costs a few-row GEMM a third more CPU time than the
  same weights stored [D, V] (its kernel re-packs the transposed operand at every call; figures
  in BUILD_NOTES): a decode loop takes this transposed copy once, outside the loop, and passes
  it to every step (memory: one extra V × D array in `dtype`). Other backends: None.
  """
  if not on_cpu():
    return None
  # The barrier keeps XLA from folding the transpose back into the dot (a copy is the point).
  return jax.lax.optimization_barrier(embedding_VxD.astype(dtype).T)


def argmax(x_BxV: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (first index of the maximum; a NaN counts as the maximum). On
  XLA:CPU as two plain reductions: argmax's (value, index) pair reduction runs there as a scalar
  loop, 4x slower than a max and a min at V = 512."""
  if not on_cpu():
    return jnp.argmax(x_BxV, axis=-1).astype(jnp.int32)
  max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
  iota_BxV = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, x_BxV.ndim - 1)
  hit_BxV = (x_BxV == max_Bx1) | jnp.isnan(x_BxV)
  return jnp.min(jnp.where(hit_BxV, iota_BxV, x_BxV.shape[-1] - 1), axis=-1)


def gumbel(seed_4: jax.Array, shape) -> jax.Array:
  """Standard Gumbel noise float32 `shape` from XLA's Philox bit generator, key seed_4 (uint32 [4]).

  One counter-based `rng_bit_generator` call per decode step: jax.random's threefry lowers to a
  nested loop of small ops on CPU, which costs more than the sampling it feeds. Kept on every
  platform (each has the generator natively), so a seed names one stream of draws everywhere.
  """
  _, bits = jax.lax.rng_bit_generator(seed_4, shape, dtype=jnp.uint32,
                                      algorithm=jax.lax.RandomAlgorithm.RNG_PHILOX)
  # 23 random bits -> bin centres of (0, 1): never 0 or 1, so both logs are finite.
  u = ((bits >> 9).astype(jnp.float32) + 0.5) * (2.0 ** -23)
  return -jnp.log(-jnp.log(u))


# ---------------------------------------------------------------------------------------------
# rollout_compute_dtype


@functools.cache
def _say_bf16_computes_in_f32() -> None:
  logging.info("rollout dtype bfloat16 on CPU: weights rounded to bfloat16, computed in float32 "
               "(activations and KV cache float32): XLA:CPU's bf16 decode is slower than its "
               "float32 (BUILD_NOTES, 'Rollouts at RL shape')")


def rollout_compute_dtype(dtype) -> jnp.dtype:
  """The dtype a rollout copy asked for in `dtype` computes in (`sampling.with_dtype`): `dtype`
  itself, except bfloat16 on CPU, which computes in float32 on weights rounded to bfloat16.

  bf16 is chosen on accelerators for speed and memory. XLA:CPU does not run these decode dots on
  the CPU's bf16 units; converting operands makes its bf16 decode 1.4-2.6x slower than float32
  on the RL-shaped benchmark (BUILD_NOTES). The bf16-rounded weights keep the numbers a bf16
  copy holds, and float32 compute on them is closer to the trainer's float32 than bf16 compute
  is (a smaller sampler / trainer mismatch)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16 and on_cpu():
    _say_bf16_computes_in_f32()
    return jnp.dtype(jnp.float32)
  return dtype
