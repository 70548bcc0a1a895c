"""Device mesh and partition rules: one code path from one CPU to a TPU pod slice.

The mesh has three named axes:
  data    pure data parallelism: batch rows split, parameters replicated;
  fsdp    batch rows split AND parameters / optimizer state split (ZeRO-3 style);
  tensor  Megatron-style model parallelism over heads / the MLP width / the vocabulary.
Activations [B, T, D] are split over data × fsdp at layer borders (`constrain`).

Usage (what `loop.setup` and `loop.run` do):
```
mesh = sharding.make_mesh(config.mesh_shape)          # e.g. (-1, 1, 1): all devices on `data`
state_sh = sharding.train_state_shardings(state, mesh)
state = jax.device_put(state, state_sh)
train_step = train.make_train_step(policy, opt, cfg, shardings=(state_sh, sharding.batch_sharding(mesh)))
with jax.set_mesh(mesh):                              # scoped: model hooks see it inside only
  state, metrics = train_step(state, batch)
```
Parameter shardings come from regex rules over parameter paths ("layers/3/attn/q_proj/kernel",
see mixpo/models/hf_io.py); the optimizer state reuses them (its paths end in the parameter
paths; scalars such as Adam's count are replicated). A mesh axis is dropped from a dimension it
does not divide (e.g. 2 kv heads on tensor=4), so every rule set is valid for every mesh.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both.

# (regex searched in the parameter path, spec of the parameter's dims). First match wins.
# Kernels are [in, out]: column-parallel layers (q/k/v, gate/up) split `out` over tensor,
# row-parallel ones (o, down) split `in`; the other dim goes to fsdp.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embed/embedding$", P(None, ("fsdp", "tensor"))),  # [V, D]: the lookup stays local
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"attn/[qkv]_proj/kernel$", P("fsdp", "tensor")),  # [D, N*H] / [D, K*H]
    (r"attn/[qkv]_proj/bias$", P("tensor")),  # [N*H] / [K*H]
    (r"attn/o_proj/kernel$", P("tensor", "fsdp")),  # [N*H, D]
    (r"attn/o_proj/bias$", P(None)),  # [D]
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),  # [D, F]
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),  # [F, D]
    (r"norm/scale$", P(None)),  # [D] or [H]: tiny, replicated.
)

# LoRA adapters (mixpo/models/lora.py) of the Linear at `<module>`: `<module>/lora/a` [in, r] is
# split like its kernel's input dim, `<module>/lora/b` [r, out] like the output; r never is.
_ADAPTER = re.compile(r"^(.*)/lora/([ab])$")

ACT_BTD = P(BATCH_AXES, None, None)  # activations at layer borders.
KV_LBKSH = P(None, BATCH_AXES, "tensor", None, None)  # KVCache.k / .v (head-major)
ROWS_B = P(BATCH_AXES)  # anything with a leading batch dim (Batch fields, prompts).


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with one −1 replaced by the devices left over."""
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != len(AXES):
    raise ValueError(f"config.mesh_shape={tuple(mesh_shape)} must have {len(AXES)} entries "
                     f"{AXES}, e.g. (-1, 1, 1) for pure data parallelism.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh_shape={shape}: entries are positive sizes and at most one -1 "
                     "(\"the rest of the devices\").")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh_shape={shape}: {num_devices} devices are not divisible by "
                       f"the fixed axes' product {known}; pick sizes that divide {num_devices}.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh_shape={shape} covers {math.prod(shape)} devices but "
                     f"{num_devices} are present; use -1 for one axis or match the device count.")
  return shape


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over all (global) devices; axes are Auto (GSPMD propagation)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def current_mesh():
  """The mesh of the enclosing `with jax.set_mesh(...)`, or None (then every hook in this module
  is a no-op)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return None
  return mesh


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """`spec` padded to len(shape), without the mesh axes that do not divide their dimension."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if len(entries) > len(shape):
    raise ValueError(f"partition spec {spec} has more entries than the array's rank "
                     f"{len(shape)} (shape {tuple(shape)}); fix the rule in sharding.py.")
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  out = []
  for dim, entry in zip(shape, entries):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, prod = [], 1
    for name in names:  # keep the longest prefix of axes that divides the dimension
      if dim % (prod * sizes[name]) == 0:
        kept.append(name)
        prod *= sizes[name]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def _path_str(key_path) -> str:
  parts = []
  for k in key_path:
    k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    if k != "value":  # nnx.Variable's single leaf
      parts.append(str(k))
  return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh, rules=PARAM_RULES) -> P:
  """The fitted spec of one parameter (or optimizer-state leaf) named by its path."""
  if len(shape) == 0:
    return P()
  adapter = _ADAPTER.search(path)
  if adapter:
    kernel = list(_rule(adapter[1] + "/kernel", shape, rules)) + [None, None]
    return fit_spec(P(kernel[0], None) if adapter[2] == "a" else P(None, kernel[1]), shape, mesh)
  return fit_spec(_rule(path, shape, rules), shape, mesh)


def _rule(path: str, shape: Sequence[int], rules) -> P:
  """The spec of the first rule whose regex is found in `path` (not yet fitted to a mesh)."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return spec
  raise ValueError(f"no partition rule matches parameter path {path!r} (shape {tuple(shape)}); "
                   "add a (regex, PartitionSpec) entry to sharding.PARAM_RULES or the rules "
                   "passed in.")


def tree_shardings(tree, mesh, rules=PARAM_RULES):
  """NamedShardings for every array leaf of params / optimizer state / guide params (or their
  ShapeDtypeStructs), by the rules over each leaf's path."""
  def one(key_path, leaf):
    return NamedSharding(mesh, spec_for(_path_str(key_path), np.shape(leaf), mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Rows over data × fsdp; a pytree prefix for a whole `Batch` (every field leads with B)."""
  return NamedSharding(mesh, ROWS_B)


def train_state_shardings(state, mesh, rules=PARAM_RULES):
  """A TrainState of NamedShardings: params and opt_state by the rules, counters replicated."""
  import dataclasses  # noqa: PLC0415  (keeps the module import-light for the model hook)
  return dataclasses.replace(
      state, params=tree_shardings(state.params, mesh, rules),
      opt_state=tree_shardings(state.opt_state, mesh, rules),
      step=replicated(mesh), rng=replicated(mesh), skipped=replicated(mesh))


def abstract(tree, shardings):
  """ShapeDtypeStructs carrying `shardings`: a restore target that allocates nothing."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def path_shardings(mesh, rules=PARAM_RULES) -> Callable[[str, tuple], NamedSharding]:
  """`fn(param_path, shape) -> NamedSharding`, the form `models.from_pretrained(shardings=)`
  takes to place each tensor on its shards as it is read."""
  return lambda path, shape: NamedSharding(mesh, spec_for(path, shape, mesh, rules))


def put_host(x, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds in full (same values everywhere);
  each process copies only the rows of its own devices (multi-host safe, unlike jit on numpy)."""
  x = np.asarray(x)
  spec = fit_spec(sharding.spec, x.shape, sharding.mesh)
  return jax.make_array_from_callback(x.shape, NamedSharding(sharding.mesh, spec),
                                      lambda idx: x[idx])


def shard_rows(tree, mesh=None):
  """Places host (numpy) or device leaves with a leading batch dim over data × fsdp.

  No-op without a mesh (argument or `jax.set_mesh`). Rows that the batch axes do not divide
  stay replicated on that dim (`fit_spec`).
  """
  mesh = mesh if mesh is not None else _concrete_mesh()
  if mesh is None:
    return tree
  def one(x):
    sh = NamedSharding(mesh, fit_spec(ROWS_B, np.shape(x), mesh))
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
      return jax.device_put(x, sh)
    return put_host(x, sh)
  return jax.tree.map(one, tree)


def to_host(tree):
  """numpy copies of every leaf. An array spread over several processes is all-gathered, so
  every process gets the whole of it: a collective, every process must call it (the RL loop's
  host-side logic runs identically in every process, on identical data)."""
  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils  # noqa: PLC0415
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def _concrete_mesh():
  """The concrete mesh of `jax.set_mesh` (needed to place host data), or None."""
  if current_mesh() is None:
    return None
  mesh = jax.sharding.get_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, spec: P = ACT_BTD) -> jax.Array:
  """with_sharding_constraint(x, spec) under a `jax.set_mesh` mesh; identity without one.

  The model's only sharding hook: single-device code never sees a mesh and is unchanged.
  """
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, fit_spec(spec, x.shape, mesh))


def describe(tree) -> dict[str, str]:
  """{path: spec} of a tree of sharded arrays (for logs and tests)."""
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    sh = getattr(leaf, "sharding", None)
    out[_path_str(key_path)] = str(getattr(sh, "spec", sh))
  return out


def bytes_per_device(tree, shardings=None) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs with shardings)."""
  leaves = jax.tree.leaves(tree)
  shs = jax.tree.leaves(shardings) if shardings is not None else [x.sharding for x in leaves]
  total = 0
  for x, sh in zip(leaves, shs):
    total += math.prod(sh.shard_shape(np.shape(x))) * np.dtype(x.dtype).itemsize
  return total


def log_layout(mesh) -> None:
  logging.info("mesh %s over %d devices (%d processes)", dict(zip(mesh.axis_names,
               mesh.axis_sizes)), mesh.size, jax.process_count())

