r"""Per-device memory plan of an RL run for a Hugging Face config.json and a mesh; no weights.

  python experiments/memory_plan.py --config=experiments/configs/hf/qwen2.5-7b.json \
      --mesh=1,16,1 --device_memory_gib=16 [--lora_rank=16] [--topology=v5e-16]

The quick plan for a checkpoint geometry and a mesh; `experiments/aot_compile.py` compiles a
whole run (its config's rows, sequence lengths, guide, generation) for a target and is what
docs/scaling.md's tables come from. With --lora_rank=r > 0 (default 16) the LoRA plan is
reported next to the full one: the frozen base in --lora_base_dtype (`base`), rank-r float32
adapters on every block projection as the trained `params` with their AdamW `optimizer` state,
the same guide / KV cache, and the step's temporaries compiled with adapters (no base weight
gradients). θ_old scoring and a KL reference (the base with adapters off) reuse the base.

How each figure is obtained (nothing is allocated at model size):
  params / optimizer / guide  nnx.eval_shape of the model and jax.eval_shape of optimizer.init,
                              each leaf's shard shape under sharding.PARAM_RULES on the mesh;
  base (LoRA)                 the frozen base's shard shapes under the same rules;
  kv_cache                    eval_shape of CausalLM.init_cache(rollout_rows, rollout_len)
                              sharded by sharding.KV_LBKSH;
  step_temp (activations)     temp_size_in_bytes of the compiled, sharded train_step at full depth
                              (jit(...).lower(abstract sharded inputs).compile().memory_analysis())
                              on --topology's devices (mixpo/targets: a TPU slice or GPU host,
                              compiled by its own compiler; default "cpu": simulated host devices,
                              XLA:CPU's buffer assignment standing in for the accelerator's). It
                              covers everything the step holds besides its inputs: activations
                              kept for backward (remat per layer), gradients, the logits chunk and
                              XLA workspace.
"""

import json
import math
import os
import resource
import sys

from absl import app, flags


def peak_rss_bytes() -> int:
  """This process's peak resident memory. Linux: VmHWM, whose mark a new program starts afresh;
  getrusage's ru_maxrss survives execve, so a plan launched from a large process (a test runner)
  would report that process's size."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _define_flags() -> None:
  """The binary's flags, defined when it runs (not on import: experiments/aot_compile.py
  defines --config / --topology / --json_out too, and tests import both)."""
  global _CONFIG, _MESH, _DEVICES, _MEMORY, _PARAM_DTYPE, _DTYPE, _GUIDE_DTYPE, _TRAIN_ROWS
  global _SEQ_LEN, _ROLLOUT_ROWS, _ROLLOUT_LEN, _REMAT, _JSON_OUT, _COMPILE, _TOPOLOGY
  global _LORA_RANK, _LORA_BASE_DTYPE
  _CONFIG = flags.DEFINE_string("config", None, "Path of a Hugging Face config.json.")
  _MESH = flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor sizes (-1: the rest).")
  _DEVICES = flags.DEFINE_integer("devices", 0, "Simulated devices (0: the mesh's product).")
  _MEMORY = flags.DEFINE_float("device_memory_gib", 16.0, "Memory of one device, GiB.")
  _PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "Policy parameter (and Adam) dtype.")
  _DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of activations.")
  _GUIDE_DTYPE = flags.DEFINE_string("guide_dtype", "bfloat16", "Frozen guide's parameter dtype.")
  _TRAIN_ROWS = flags.DEFINE_integer("train_rows", 0, "Rows of one micro-batch (global); "
                                     "0: one row per data×fsdp shard.")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Prompt + response tokens of a train row.")
  _ROLLOUT_ROWS = flags.DEFINE_integer("rollout_rows", 0, "Rows generated at once (global); "
                                       "0: 4 per data×fsdp shard.")
  _ROLLOUT_LEN = flags.DEFINE_integer("rollout_len", 0, "KV-cache length (0: seq_len).")
  _REMAT = flags.DEFINE_bool("remat", True, "Rematerialise each layer in the backward pass.")
  _JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the plan as JSON here.")
  _COMPILE = flags.DEFINE_bool("compile", True, "Compile the step for step_temp (minutes at 7B); "
                               "--nocompile reports the other figures only (step_temp 0).")
  _TOPOLOGY = flags.DEFINE_string("topology", "cpu", "Compile target of step_temp: cpu (simulated "
                                  "host devices) or a mixpo/targets name (v5e-16, h100-8, ...).")
  _LORA_RANK = flags.DEFINE_integer("lora_rank", 16, "Also plan LoRA at this rank (0: full only).")
  _LORA_BASE_DTYPE = flags.DEFINE_string("lora_base_dtype", "bfloat16",
                                         "Storage dtype of the frozen base under LoRA.")

GIB = 2**30


def _mesh_shape():
  return tuple(int(s) for s in _MESH.value.split(","))


def _target():
  """The compile target (mixpo/targets); `cpu` is cpu-N with N the mesh's devices. Its process
  settings (simulated host devices, compile-only runtimes) precede jax's backend."""
  from mixpo import targets
  if _TOPOLOGY.value == "cpu":
    n = _DEVICES.value or math.prod(s for s in _mesh_shape() if s > 0)
    if -1 in _mesh_shape() and not _DEVICES.value:
      raise app.UsageError("--mesh has -1: give --devices (the simulated device count).")
    target = targets.get(f"cpu-{n}")
  else:
    try:
      target = targets.get(_TOPOLOGY.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  targets.prepare_process(target)
  return target


def plan(hf_config: dict, mesh_shape, *, param_dtype, dtype, guide_dtype, train_rows, seq_len,
         rollout_rows, rollout_len, remat, lora_rank=0, lora_base_dtype="bfloat16",
         compile_step=True, devices=None) -> dict:
  """The full fine-tuning plan; with lora_rank > 0 the LoRA plan under the key "lora".
  devices: the mesh's devices (default jax.devices(); `targets.devices(...)` for a target)."""
  kw = dict(dtype=dtype, guide_dtype=guide_dtype, train_rows=train_rows, seq_len=seq_len,
            rollout_rows=rollout_rows, rollout_len=rollout_len, remat=remat,
            compile_step=compile_step, devices=devices)
  out = _plan(hf_config, mesh_shape, param_dtype=param_dtype, lora_rank=0, **kw)
  if lora_rank:
    out["lora"] = _plan(hf_config, mesh_shape, param_dtype=lora_base_dtype, lora_rank=lora_rank,
                        **kw)
  return out


def _plan(hf_config: dict, mesh_shape, *, param_dtype, dtype, guide_dtype, train_rows, seq_len,
          rollout_rows, rollout_len, remat, lora_rank, compile_step, devices) -> dict:
  import types

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mixpo import sharding, train
  from mixpo.batch import Batch
  from mixpo.models import CausalLM, from_hf_config, lora

  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch_shards = shape["data"] * shape["fsdp"]
  train_rows = train_rows or batch_shards
  rollout_rows = rollout_rows or 4 * batch_shards
  rollout_len = rollout_len or seq_len
  config = from_hf_config(hf_config, param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype),
                          remat=remat)
  optimizer = train.make_optimizer(train.OptimConfig())

  def abstract_state(cfg):
    def build():
      model = CausalLM(cfg, rngs=nnx.Rngs(0))
      return lora.apply(model, lora.LoraConfig(rank=lora_rank)) if lora_rank else model
    model = nnx.eval_shape(build)
    policy = train.Policy(model)
    state = jax.eval_shape(lambda p: train.init_state(types.SimpleNamespace(params=p), optimizer,
                                                      0), policy.params)
    return policy, model, state

  policy, model, state = abstract_state(config)
  state_sh = sharding.train_state_shardings(state, mesh)
  params_b = sharding.bytes_per_device(state.params, state_sh.params)
  opt_b = sharding.bytes_per_device(state.opt_state, state_sh.opt_state)
  base = policy.base if lora_rank else None  # LoRA's frozen base; else `params` is the model
  base_b = 0 if base is None else sharding.bytes_per_device(
      base, sharding.tree_shardings(base, mesh))
  guide_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(guide_dtype)),
                              state.params if base is None else base)
  guide_b = sharding.bytes_per_device(guide_params, sharding.tree_shardings(guide_params, mesh))
  cache = jax.eval_shape(lambda: model.init_cache(rollout_rows, rollout_len))
  kv_sh = jax.sharding.NamedSharding(mesh, sharding.fit_spec(sharding.KV_LBKSH, cache.k.shape,
                                                             mesh))
  kv_b = 2 * sharding.bytes_per_device(cache.k, kv_sh)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves((state.params, base)))
  num_trained = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))

  def step_temp():
    pol, _, st = abstract_state(config)
    st_sh = sharding.train_state_shardings(st, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    f32, i32 = jnp.float32, jnp.int32
    bt = lambda d: jax.ShapeDtypeStruct((train_rows, seq_len), d, sharding=batch_sh)
    b_ = lambda d: jax.ShapeDtypeStruct((train_rows,), d, sharding=batch_sh)
    batch = Batch(bt(i32), bt(i32), bt(i32), bt(f32), bt(f32), bt(f32), b_(f32), b_(i32), b_(i32),
                  b_(jnp.bool_))
    step = train.make_train_step(pol, optimizer, train.StepConfig(), shardings=(st_sh, batch_sh))
    with jax.set_mesh(mesh):
      compiled = step.lower(sharding.abstract(st, st_sh), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  act_b = step_temp() if compile_step else 0
  per_device = {"params": params_b, "optimizer": opt_b, "base": base_b, "guide": guide_b,
                "kv_cache": kv_b, "step_temp": act_b}
  return {"mesh": shape, "num_params": num_params, "num_trained_params": num_trained,
          "lora_rank": lora_rank, "train_rows": train_rows, "seq_len": seq_len,
          "rollout_rows": rollout_rows, "rollout_len": rollout_len,
          "per_device": per_device, "total": sum(per_device.values())}


def main(argv):
  del argv
  if not _CONFIG.value:
    raise app.UsageError("--config (a Hugging Face config.json) is required.")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  target = _target()
  from mixpo import targets
  with open(_CONFIG.value) as f:
    hf_config = json.load(f)
  out = plan(hf_config, _mesh_shape(), param_dtype=_PARAM_DTYPE.value, dtype=_DTYPE.value,
             guide_dtype=_GUIDE_DTYPE.value, train_rows=_TRAIN_ROWS.value,
             seq_len=_SEQ_LEN.value, rollout_rows=_ROLLOUT_ROWS.value,
             rollout_len=_ROLLOUT_LEN.value, remat=_REMAT.value, lora_rank=_LORA_RANK.value,
             lora_base_dtype=_LORA_BASE_DTYPE.value, compile_step=_COMPILE.value,
             devices=targets.devices(target))
  budget = _MEMORY.value * GIB
  plans = [out] + ([out["lora"]] if "lora" in out else [])
  for p in plans:
    p["fits"] = p["total"] <= budget
  out.update(config=_CONFIG.value, device_memory_gib=_MEMORY.value,
             peak_rss_bytes=peak_rss_bytes())
  print(f"{os.path.basename(_CONFIG.value)}  mesh {out['mesh']}  "
        f"({out['num_params'] / 1e9:.2f}B params)  GiB per device")
  names = ["full"] + [f"LoRA r={p['lora_rank']}" for p in plans[1:]]
  print(f"  {'':<12}" + "".join(f"{n:>12}" for n in names))
  for k in out["per_device"]:
    print(f"  {k:<12}" + "".join(f"{p['per_device'][k] / GIB:12.2f}" for p in plans))
  print(f"  {'total':<12}" + "".join(f"{p['total'] / GIB:12.2f}" for p in plans)
        + f"   of {_MEMORY.value:g} GiB" + ("" if _COMPILE.value else " (step_temp not compiled)"))
  print(f"  {'fits':<12}" + "".join(f"{'yes' if p['fits'] else 'NO':>12}" for p in plans))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
