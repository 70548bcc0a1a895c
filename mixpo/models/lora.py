"""LoRA: low-rank adapters on `CausalLM`'s Linear layers (LoRA, arXiv 2106.09685).

  y = x·W (+ b) + (alpha / r)·(x·A)·B      W [in, out] frozen; A [in, r], B [r, out] trained

A is drawn N(0, 1/in) and B is zero, so a freshly adapted model computes exactly the base
model's function. The adapter of the Linear at module path `layers/3/attn/q_proj` lives at
`layers/3/attn/q_proj/lora/a` and `.../lora/b` (`LoraParam`, an `nnx.Param` subclass), which is
how the trainer tells adapters from the frozen base:

  model = models.from_pretrained(path, param_dtype=jnp.bfloat16)   # the base can be bf16
  lora.apply(model, lora.LoraConfig(rank=16, alpha=32.0), rng=0)
  policy = train.Policy(model)     # TrainState / optimizer / gradients: the adapters only
  ref = policy.reference_pair()    # (graphdef, base state): the base alone, adapters off

`merged(model)` folds the adapters into the kernels (a plain `CausalLM`, for
`models.save_pretrained`); `mixpo/models/peft_io.py` reads and writes the adapters alone in
PEFT's layout.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from mixpo.models.layers import Linear

# Every decoder-block projection (not lm_head: the logits bypass Linear.__call__).
DEFAULT_TARGETS = r"layers/\d+/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$"


class LoraParam(nnx.Param):
  """An adapter matrix: the only parameters a LoRA policy trains."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which Linears get adapters and how they are scaled; hashable."""
  rank: int = 16  # r: inner width of A·B (> 0).
  alpha: float = 32.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
  # Regex searched in each Linear kernel's parameter path, e.g. "layers/3/attn/q_proj/kernel"
  # (see mixpo/models/hf_io.py); every match gets an adapter.
  targets: str = DEFAULT_TARGETS
  # Dropout on the adapter's input. Only 0 is supported: in RL a stochastic forward pass makes
  # the ratio π_θ/π_θ_old differ from 1 at θ = θ_old, which the clipped objectives assume.
  dropout: float = 0.0
  use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (PEFT's use_rslora).
  param_dtype: str = "float32"  # storage dtype of A and B (the base keeps its own).

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank={self.rank}: the adapter rank must be >= 1 "
                       "(config.lora.rank=0 means no LoRA at all).")
    if self.dropout != 0.0:
      raise ValueError(f"LoraConfig.dropout={self.dropout}: only 0 is supported (a "
                       "stochastic policy forward breaks ratio = 1 at θ = θ_old); set "
                       "config.lora.dropout=0.0.")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"LoraConfig.targets={self.targets!r} is not a valid regex: {e}.") from e

  @property
  def scaling(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class Adapter(nnx.Module):
  """The low-rank update (x·A)·B·scaling of one Linear; added to its output by Linear."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, scaling: float, dtype,
               param_dtype, key):
    self.dtype = dtype
    self.scaling = float(scaling)
    std = 1.0 / math.sqrt(in_features)
    self.a = LoraParam(std * jax.random.normal(key, (in_features, rank), jnp.float32)
                       .astype(param_dtype))
    self.b = LoraParam(jnp.zeros((rank, out_features), param_dtype))

  def __call__(self, x_xI: jax.Array) -> jax.Array:
    """Delta [..., out] (self.dtype) for input x [..., in]."""
    h_xR = jnp.einsum("...i,ir->...r", x_xI.astype(self.dtype), self.a[...].astype(self.dtype))
    h_xR = h_xR * jnp.asarray(self.scaling, self.dtype)  # on the r-wide side: the cheap one.
    return jnp.einsum("...r,ro->...o", h_xR, self.b[...].astype(self.dtype))

  def delta_kernel(self) -> jax.Array:
    """scaling·A·B [in, out] float32: what `merged` adds to the kernel."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    return self.scaling * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _module_path(path) -> str:
  return "/".join(str(k) for k in path)


def linears(model: nnx.Module) -> dict[str, Linear]:
  """{module path ("layers/0/attn/q_proj"): Linear} of every Linear in `model`."""
  return {_module_path(p): m for p, m in nnx.iter_graph(model) if isinstance(m, Linear)}


def adapters(model: nnx.Module) -> dict[str, Adapter]:
  """{module path: Adapter} of every adapted Linear (empty without LoRA)."""
  return {p: m.lora for p, m in linears(model).items() if m.lora is not None}


def has_adapters(model: nnx.Module) -> bool:
  return bool(adapters(model))


def apply(model: nnx.Module, cfg: LoraConfig, rng=0) -> nnx.Module:
  """Adds a fresh adapter (A random, B = 0) to every Linear whose kernel path matches
  `cfg.targets`; in place, returns `model`. The base's arrays are untouched.

  rng: int seed or jax PRNG key; adapter k (in module-path order) uses fold_in(key, k).
  Raises naming the config flag when nothing matches, lm_head matches, or LoRA is already on.
  """
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  found = linears(model)
  targets = sorted((p for p in found if re.search(cfg.targets, p + "/kernel")),
                   key=_natural_key)
  if not targets:
    raise ValueError(f"config.lora.targets={cfg.targets!r} matches no Linear kernel; paths look "
                     f"like {sorted(found, key=_natural_key)[:3]} + '/kernel'.")
  if "lm_head" in targets:
    raise ValueError(f"config.lora.targets={cfg.targets!r} matches lm_head/kernel, which the "
                     "logits use directly (no adapter hook); restrict the regex to layers/.")
  dtype = jnp.dtype(cfg.param_dtype)
  for k, path in enumerate(targets):
    linear = found[path]
    if linear.lora is not None:
      raise ValueError(f"{path} already has a LoRA adapter; apply LoRA once per model.")
    in_f, out_f = linear.kernel.shape
    linear.lora = Adapter(in_f, out_f, rank=cfg.rank, scaling=cfg.scaling, dtype=linear.dtype,
                          param_dtype=dtype, key=jax.random.fold_in(key, k))
  return model


def _natural_key(path: str):
  return [int(s) if s.isdigit() else s for s in path.split("/")]


def split(model: nnx.Module):
  """(graphdef, adapter state, base state) of an adapted model (`nnx.split` by variable type)."""
  return nnx.split(model, LoraParam, nnx.Param)


def without_adapters(model: nnx.Module) -> nnx.Module:
  """The base model alone: a new module tree sharing the base's variables (no copy), every
  adapter removed. The KL reference of a LoRA policy; `model` itself is unchanged."""
  graphdef, state = nnx.split(model)
  base = nnx.merge(graphdef, state)  # new modules; the variables (arrays) are shared.
  for linear in linears(base).values():
    linear.lora = None
  return base


def merged(model: nnx.Module) -> nnx.Module:
  """A plain model (no adapters) whose kernels are W + scaling·A·B, computed in float32 and
  stored in W's dtype. `model` is unchanged. For `models.save_pretrained`."""
  deltas = {p + "/kernel": a.delta_kernel() for p, a in adapters(model).items()}
  graphdef, state = nnx.split(without_adapters(model))
  flat = []
  for path, var in nnx.to_flat_state(state):
    delta = deltas.pop(_module_path(path), None)
    if delta is not None:  # a new Variable: the model's own kernel stays as it was.
      x = var.get_value()
      var = var.replace((x.astype(jnp.float32) + delta).astype(x.dtype))
    flat.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _leaf_checksums(x: jax.Array) -> jax.Array:
  """uint32 [2]: the sum of x's bit patterns and their position-weighted sum, both mod 2^32.

  Integer sums are exact and order-free, so the result does not depend on how x is sharded or
  in which order XLA reduces it (a float sum would). Positions come from per-dimension iotas,
  not a reshape, which would move a sharded array's data.
  """
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  index, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for d in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
    stride = (stride * x.shape[d]) % 2**32
  weight = index * jnp.uint32(2654435761) + jnp.uint32(1)  # Knuth's multiplicative hash.
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


def fingerprint(state) -> dict:
  """{"num_params", "checksum"} of a parameter state (e.g. `train.Policy.base`): identifies the
  frozen base a LoRA checkpoint was trained on. One jitted pass over the (sharded) arrays on
  device; the same for any mesh layout; changes with any bit, path, shape or dtype."""
  import hashlib  # noqa: PLC0415

  flat = sorted((_module_path(p), v.get_value()) for p, v in nnx.to_flat_state(state))
  sums = jax.device_get(jax.jit(lambda xs: [_leaf_checksums(x) for x in xs])(
      [x for _, x in flat]))
  h = hashlib.sha256()
  for (path, x), s in zip(flat, sums):
    h.update(f"{path}:{tuple(x.shape)}:{jnp.dtype(x.dtype).name}:{int(s[0])}:{int(s[1])};"
             .encode())
  return {"num_params": int(sum(x.size for _, x in flat)), "checksum": h.hexdigest()[:32]}
