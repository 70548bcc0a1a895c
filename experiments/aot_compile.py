r"""Compile a run's programs for a TPU slice or GPU host without the hardware: memory, FLOPs, kernels.

  python experiments/aot_compile.py --topology=v5e-16 --config=qwen2.5-math-1.5b
  python experiments/aot_compile.py --topology=v5p-16 --config=qwen2.5-math-1.5b \
      --model=qwen2.5-7b --config.lora.rank=16 --config.mesh_shape='(1,8,2)' --programs=train
  python experiments/aot_compile.py --topology=h100-8 --config=qwen2.5-math-1.5b --programs=train

What `train.py --config=... ` would run on `--topology`, compiled by that platform's own compiler
(XLA:TPU from libtpu, XLA:GPU from jax's CUDA plugin) on this CPU-only host: the same functions
build it (`rl.resolve(config, num_devices)`, `sharding.make_mesh` over the target's devices,
`train.make_train_step`, `sampling.lower_generate` / `lower_score` for the programs `generate` /
`score` run), at full depth, inside `jax.set_mesh`, so every kernel is the one chosen for the
target (`attention_impl="auto"` → Pallas splash on TPU, cuDNN on GPU; mixpo/models/backend.py).
Programs (--programs): `train` (the update), `score` (θ_old, the guide, the KL reference: one
program each over the train batch), `generate` (the policy's G·n rows and the guide's G·m rows
of prompt width P and max_new_tokens N). Shapes are the run's: rows (G + Z)·(n + m), P =
`sampling.bucket_length(task_kwargs.max_prompt_tokens)` (or --prompt_len), T = P + N.

The model geometry is read from the config's checkpoint directory (`config.policy`,
`config.guide.path`: their config.json), else from the preset in experiments/configs/hf/ named like
the directory (`/models/Qwen2.5-Math-1.5B` → qwen2.5-math-1.5b.json), or from --model /
--guide_model (a preset name, a config.json or a directory); no weights are read or allocated.

Printed per program: per-device bytes from the compiler (arguments / outputs not aliased to an
argument / temporaries / code) plus the run's other resident arrays (the train state, LoRA base,
guide and reference that the program does not take), against the chip's HBM. A TPU program is
compiled into the HBM those other arrays leave (XLA:TPU's scheduler uses the budget it is given
for overlap, so its temporaries are what it chose within that budget, not the least it needs;
that it compiles is the fit check). Then: model FLOPs (an
analytic count: XLA's cost analysis counts a loop body once); XLA's bytes accessed (also per loop
body once); the collectives in the program; the attention kernel compiled (its custom calls);
compile time. Exit status 2 with one line on stderr when the topology or config is wrong, the run
would refuse the config, or a program does not fit (the compiler's RESOURCE_EXHAUSTED, or peak >
HBM). --json_out writes every figure. Needs libtpu (TPU targets) or jax-cuda12-plugin and
jax-cuda12-pjrt (GPU targets): see BUILD_NOTES. Tables made with it: docs/scaling.md.
"""

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mixpo import cli  # noqa: E402
from mixpo import flops as mixpo_flops  # noqa: E402
from mixpo import targets  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (or a short "
                                          "name: default, smoke, qwen2.5-math-1.5b).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile target: v5e-8 / v5e-16 / v5p-16 / "
                                "v5p-32 / v6e-8 / v4-32 / h100-8 / a100-8 / cpu-8 / ... "
                                "(mixpo/targets).")
_MODEL = flags.DEFINE_string("model", None, "Policy geometry: a preset of experiments/configs/hf "
                             "(e.g. qwen2.5-7b), a config.json or a checkpoint directory "
                             "(default: from --config.policy).")
_GUIDE_MODEL = flags.DEFINE_string("guide_model", None, "Guide geometry, as --model (default: "
                                   "from --config.guide.path).")
_PROGRAMS = flags.DEFINE_list("programs", ["train", "score", "generate"], "Which programs.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "Prompt width P (default: bucketed "
                                   "--config.task_kwargs.max_prompt_tokens).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write every figure as JSON here.")

PROGRAMS = ("train", "score", "generate")
_PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "hf")
GIB = 2**30
# Custom-call targets of the fused attention kernels in compiled HLO text.
_KERNEL_CALLS = {"tpu_custom_call": "Mosaic (Pallas)", "__cudnn$fmha": "cuDNN attention"}
# HBM kept out of a TPU program's compile budget for its code (0.08 GiB for the 1.5B train step).
_TPU_CODE_RESERVE = 256 * 2**20
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


class DoesNotFit(Exception):
  """A program needs more device memory than the target has."""


# --------------------------------------------------------------------------- model geometry


def presets() -> list[str]:
  return sorted(f[:-5] for f in os.listdir(_PRESETS) if f.endswith(".json"))


def hf_config_for(value: str, flag: str, builtin_cfg=None) -> dict:
  """The config.json dict `value` names (see the module docstring); UserError naming `flag`."""
  if value == "builtin":
    from mixpo import builtin  # noqa: PLC0415
    from mixpo.data import char_tokenizer  # noqa: PLC0415
    from mixpo.data.tokenizer import DEFAULT_ALPHABET  # noqa: PLC0415
    b = builtin_cfg
    return builtin.tiny_hf_config(char_tokenizer(b.get("alphabet") or DEFAULT_ALPHABET), b.hidden,
                                  b.layers, b.heads, b.kv_heads, b.intermediate, b.max_positions)
  candidates = [os.path.join(value, "config.json"), value,
                os.path.join(_PRESETS, os.path.basename(value.rstrip("/")).lower() + ".json"),
                os.path.join(_PRESETS, value.lower() + ".json")]
  for path in candidates:
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f)
  raise cli.UserError(f"{flag}={value}: not a checkpoint directory, config.json, or a preset "
                      f"of experiments/configs/hf ({', '.join(presets())}); pass --model / "
                      "--guide_model with one of those.")


# --------------------------------------------------------------------------- model FLOPs


def forward_flops(c, tokens: int, context: float, lora_rank: int = 0, head_tokens=None) -> dict:
  """`mixpo.flops.forward_parts` of a `ModelConfig`: per part, the model FLOPs of a forward
  pass over `tokens` tokens that attend to `context` keys on average."""
  hf = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "num_hidden_layers": c.num_layers}
  return mixpo_flops.forward_parts(hf, tokens, context, lora_rank, head_tokens)


def train_flops(c, rows: int, t: int, epochs: int, lora_rank: int, remat: bool,
                head_remat: bool = False) -> float:
  """One update's model FLOPs: forward, backward (weight and input gradients of the trained
  matrices, input gradients only through a frozen LoRA base; attention's backward 2× its
  forward), plus the forward again where it is recomputed (`remat`: the decoder layers;
  `head_remat`: the LM head, when `sampling.token_logp` cuts the logits into chunks)."""
  fwd = forward_flops(c, rows * t, (t + 1) / 2, lora_rank)
  base_backward = 1 if lora_rank else 2
  total = (fwd["layers"] * (1 + base_backward + remat) + fwd["adapters"] * (3 + remat)
           + fwd["attention"] * (3 + remat) + fwd["head"] * (1 + base_backward + head_remat))
  return epochs * total


def score_flops(c, rows: int, t: int) -> float:
  return sum(forward_flops(c, rows * t, (t + 1) / 2).values())


def generate_flops(c, rows: int, p: int, n: int) -> float:
  """Prefill of P tokens (logits of the last only) + N − 1 decode steps of one token, step i
  attending to P + i keys (every row runs all N: the upper bound)."""
  prefill = forward_flops(c, rows * p, (p + 1) / 2, head_tokens=rows)
  decode = forward_flops(c, rows * (n - 1), p + n / 2)
  return sum(prefill.values()) + sum(decode.values())


# --------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Program:
  name: str  # e.g. "train_step", "score_guide", "generate_policy".
  rows: int
  tokens: int  # tokens per row (T, or P + N for generate).
  model_flops: float
  resident_args: int  # bytes/device of its arguments that are the run's resident arrays.
  lower: object  # () -> jax Lowered (called inside the mesh).


def _rollout_view(spec, model_cfg, state):
  """(graphdef, abstract state) of a model as rollout and scoring see it (`rl.rollout_view`:
  a copy cast to the rollout dtype unless it is "model"), and whether it is that copy."""
  import dataclasses as dc  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from mixpo import sampling  # noqa: PLC0415
  if spec.rollout_dtype == "model":
    return sampling._graphdef_for(model_cfg), state, False  # pylint: disable=protected-access
  dtype = jnp.dtype(spec.rollout_dtype)
  if jnp.dtype(model_cfg.dtype) == dtype and jnp.dtype(model_cfg.param_dtype) == dtype:
    return sampling._graphdef_for(model_cfg), state, False  # pylint: disable=protected-access
  cast = dc.replace(model_cfg, dtype=dtype, param_dtype=dtype)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=x.sharding),
                       state)
  return sampling._graphdef_for(cast), state, True  # pylint: disable=protected-access


def resolve_run(config, num_devices: int, policy_hf: dict, guide_hf: dict | None,
                prompt_len: int):
  """(RunSpec, policy ModelConfig, guide ModelConfig or None, LoraConfig or None) of `config` on
  `num_devices` devices, with the checks the run makes before it computes (`rl.resolve`, the
  guide's vocabulary, prompt + response within the models' context); UserError naming the flag."""
  from mixpo import loop, rl  # noqa: PLC0415
  from mixpo.models import from_hf_config  # noqa: PLC0415
  try:
    spec = rl.resolve(config, num_devices=num_devices)
    policy_cfg = from_hf_config(policy_hf, **loop.model_options(config))
    guide_cfg = None
    if spec.guide.needs_model:
      guide_cfg = from_hf_config(guide_hf, **loop.model_options(config, guide=True))
      # Only config.json files here (no tokenizers): the run itself compares the tokenizers by
      # content (preflight); the sizes are what the compiled shapes depend on.
      if guide_cfg.vocab_size != policy_cfg.vocab_size:
        raise ValueError(f"config.guide.path: the guide's vocabulary ({guide_cfg.vocab_size}) "
                         f"differs from the policy's ({policy_cfg.vocab_size}): r̂ = πθ/πϕ needs "
                         "both over the same tokens.")
    lora_cfg = loop.lora_config(config)
  except ValueError as e:
    raise cli.UserError(cli.flagify(str(e))) from None
  t = prompt_len + spec.sample.max_new_tokens
  for name, c in (("--config.policy", policy_cfg), ("--config.guide.path", guide_cfg)):
    if c is not None and t > c.max_position_embeddings:
      raise cli.UserError(
          f"prompts of up to P={prompt_len} tokens + --config.rollout.max_new_tokens="
          f"{spec.sample.max_new_tokens} exceed {name}'s max_position_embeddings="
          f"{c.max_position_embeddings} (its config.json): generate would refuse every "
          "full-width prompt; lower --config.rollout.max_new_tokens / "
          "--config.task_kwargs.max_prompt_tokens (or --prompt_len).")
  return spec, policy_cfg, guide_cfg, lora_cfg


def build(config, target, policy_hf: dict, guide_hf: dict | None, prompt_len: int,
          programs=PROGRAMS):
  """(mesh, programs, resident bytes per device, facts) of `config`'s run on `target`."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415

  from mixpo import sampling, sharding, train  # noqa: PLC0415
  from mixpo.batch import make_batch  # noqa: PLC0415
  from mixpo.models import CausalLM, lora  # noqa: PLC0415

  spec, policy_cfg, guide_cfg, lora_cfg = resolve_run(config, target.num_devices, policy_hf,
                                                      guide_hf, prompt_len)
  p, n = prompt_len, spec.sample.max_new_tokens
  t = p + n
  devices = targets.devices(target)
  mesh = sharding.make_mesh(spec.mesh_shape, devices=devices)

  def abstract_model(cfg, adapters):
    def make():
      model = CausalLM(cfg, rngs=nnx.Rngs(0))
      return lora.apply(model, adapters) if adapters else model
    return nnx.eval_shape(make)

  optimizer = train.make_optimizer(train.OptimConfig(**config.optim))
  policy = train.Policy(abstract_model(policy_cfg, lora_cfg))
  state = jax.eval_shape(lambda params: train.init_state(
      types.SimpleNamespace(params=params), optimizer, 0), policy.params)
  state_sh = sharding.train_state_shardings(state, mesh)
  state = sharding.abstract(state, state_sh)
  base = None if policy.base is None else sharding.abstract(
      policy.base, sharding.tree_shardings(policy.base, mesh))

  def frozen(cfg):  # the guide / reference, held only as their rollout view (loop.setup)
    _, st = nnx.split(abstract_model(cfg, None))
    return _rollout_view(spec, cfg, sharding.abstract(st, sharding.tree_shardings(st, mesh)))

  resident = {"params": sharding.bytes_per_device(state.params),
              "optimizer": sharding.bytes_per_device((state.opt_state, state.step, state.rng,
                                                      state.skipped)),
              "base": 0 if base is None else sharding.bytes_per_device(base)}
  guide = frozen(guide_cfg) if guide_cfg is not None else None
  resident["guide"] = 0 if guide is None else sharding.bytes_per_device(guide[1])
  reference = frozen(dataclasses.replace(policy_cfg, remat=False)) if spec.keeps_reference else None
  resident["reference"] = 0 if reference is None else sharding.bytes_per_device(reference[1])

  # θ_old as rollout and scoring see it: the policy pair (base + adapters), maybe cast.
  pair_state = state.params if base is None else nnx.merge_state(base, state.params)
  old = _rollout_view(spec, policy_cfg, pair_state)
  if policy.base is not None and not old[2]:
    old = (policy.graphdef, pair_state, False)
  old_resident = 0 if old[2] else resident["params"] + resident["base"]

  sizes = spec.sizes
  rows = sizes.rows
  rows_sh = lambda shape: NamedSharding(mesh, sharding.fit_spec(sharding.ROWS_B, shape, mesh))
  tiny = make_batch(*(np.zeros((1, 1), np.int32),) * 4)  # the dtype of every field
  if spec.keeps_reference:
    tiny = dataclasses.replace(tiny, ref_logp_BxT=tiny.old_logp_BxT)
  batch_sh = sharding.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + (t,) * (x.ndim - 1), x.dtype,
                                                      sharding=batch_sh), tiny)
  tokens = jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=rows_sh((rows, t)))
  step_cfg = spec.step
  facts = {"spec": spec, "policy": policy_cfg, "guide": guide_cfg, "mesh": mesh, "P": p, "N": n,
           "T": t, "rows": rows, "lora_rank": 0 if lora_cfg is None else lora_cfg.rank}

  out = []
  if "train" in programs:
    step = train.make_train_step(policy, optimizer, step_cfg, shardings=(state_sh, batch_sh))
    micro = rows // (step_cfg.num_minibatches * step_cfg.num_micro_batches)
    chunk = step_cfg.score_chunk or sampling.auto_chunk_size(micro, t - 1, policy_cfg.vocab_size)
    out.append(Program("train_step", rows, t, train_flops(
        policy_cfg, rows, t, step_cfg.epochs, facts["lora_rank"], policy_cfg.remat,
        head_remat=t - 1 > chunk),
        resident["params"] + resident["optimizer"] + resident["base"],
        lambda: step.lower(state, batch, base)))
  if "score" in programs:
    scored = [("score_policy", old, policy_cfg, old_resident)]
    if guide is not None and spec.guide.logp == "model":
      scored.append(("score_guide", guide, guide_cfg, resident["guide"]))
    if reference is not None:
      scored.append(("score_reference", reference, policy_cfg, resident["reference"]))
    for name, model, cfg, res in scored:
      out.append(Program(name, rows, t, score_flops(cfg, rows, t), res, functools.partial(
          sampling.lower_score, model[:2], tokens, tokens, tokens)))
  if "generate" in programs:
    sample = spec.sample
    draws = [("generate_policy", old, policy_cfg, sizes.groups * sizes.n, old_resident)]
    if guide is not None and spec.guide.source == "model" and sizes.m:
      draws.append(("generate_guide", guide, guide_cfg, sizes.groups * sizes.m,
                    resident["guide"]))
    for name, model, cfg, b, res in draws:
      prompt = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rows_sh((b, p)))
      out.append(Program(name, b, t, generate_flops(cfg, b, p, n), res, functools.partial(
          sampling.lower_generate, model[:2], prompt, prompt, n, temperature=sample.temperature,
          top_p=sample.top_p, top_k=sample.top_k)))
  return mesh, out, resident, facts


def hlo_facts(text: str) -> dict:
  """Kernel custom calls and collectives of a compiled program's HLO text (static counts: an op
  inside a loop counts once)."""
  kernels = {label: text.count(f'custom_call_target="{target}') for target, label in
             _KERNEL_CALLS.items()}
  collectives = {name: len(re.findall(rf"= [^=\n]*\b{name}(-start)?\(", text))
                 for name in _COLLECTIVES}
  return {"kernel_calls": {k: v for k, v in kernels.items() if v},
          "collectives": {k: v for k, v in collectives.items() if v}}


def compile_program(program: Program, mesh, target, resident_total: int) -> dict:
  """Compiles `program` inside `mesh`; its per-device figures. DoesNotFit when the compiler
  runs out of device memory or the peak exceeds the target's HBM."""
  import jax  # noqa: PLC0415
  others = resident_total - program.resident_args
  options = {}
  if target.platform == "tpu":
    # XLA:TPU schedules a program's arguments and temporaries into the HBM it is told it has
    # (overlapping collectives and prefetches while the budget allows): the budget is what the
    # run's other arrays and the program's code (not counted in it) leave.
    budget = target.hbm_bytes - others - _TPU_CODE_RESERVE
    options["xla_tpu_max_hbm_size_mib"] = max(1, budget // 2**20)
  start = time.time()
  try:
    with jax.set_mesh(mesh):
      compiled = program.lower().compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    first = next((l for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l), str(e))
    raise DoesNotFit(f"{program.name} does not fit {target.name} next to the run's other "
                     f"arrays ({_gib(others)} GiB per device): {first.strip()[:300]}") from None
  seconds = time.time() - start
  ma = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  own = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
         + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)
  row = {"program": program.name, "rows": program.rows, "tokens": program.tokens,
         "arguments": ma.argument_size_in_bytes,
         "outputs": ma.output_size_in_bytes - ma.alias_size_in_bytes,
         "temporaries": ma.temp_size_in_bytes, "code": ma.generated_code_size_in_bytes,
         "program_bytes": own, "other_resident": others, "peak": own + others,
         "model_flops": program.model_flops,
         "xla_flops_loop_bodies_once": (cost or {}).get("flops"),  # None: not reported
         "xla_bytes_accessed_loop_bodies_once": (cost or {}).get("bytes accessed"),
         "compile_seconds": seconds, "hbm_budget_mib": options.get("xla_tpu_max_hbm_size_mib"),
         **hlo_facts(compiled.as_text())}
  del compiled
  jax.clear_caches()
  return row


def _gib(x) -> str:
  return f"{x / GIB:.2f}"


def report(config_name, target, mesh, facts, resident, rows, failure=None) -> str:
  """The human-readable summary of `main`."""
  from mixpo.models import attention  # noqa: PLC0415
  c = facts["policy"]
  impl = attention.resolve_impl(c.attention_impl, dtype=c.dtype, head_dim=c.head_dim,
                                platform=target.platform)
  device = mesh.devices.flat[0]
  hbm = "host memory" if target.hbm_bytes is None else f"{_gib(target.hbm_bytes)} GiB HBM each"
  lines = [
      f"{config_name} on {target.name}: {mesh.size} × {device.device_kind} ({hbm}), mesh "
      + " ".join(f"{k}={v}" for k, v in mesh.shape.items()),
      f"  policy {c.num_layers} layers × {c.hidden_size} ({facts['lora_rank'] and 'LoRA r=%d' % facts['lora_rank'] or 'full'}), "
      f"dtype {c.dtype.__name__ if hasattr(c.dtype, '__name__') else c.dtype}, remat {c.remat}; "
      f"attention_impl={c.attention_impl} → {impl}; rows {facts['rows']}, P={facts['P']}, "
      f"N={facts['N']}, T={facts['T']}",
      "  resident GiB/device: " + ", ".join(f"{k} {_gib(v)}" for k, v in resident.items() if v),
      f"  {'program':<17}{'rows×tokens':>13}{'args':>7}{'out':>7}{'temp':>7}{'code':>7}"
      f"{'+resident':>10}{'peak':>7}  {'TFLOPs':>9}{'XLA GB*':>9}{'compile s':>10}  "
      "kernels; collectives*"]
  for r in rows:
    kernels = ", ".join(f"{v} {k}" for k, v in r["kernel_calls"].items()) or "none"
    coll = ", ".join(f"{v} {k}" for k, v in r["collectives"].items()) or "none"
    moved = r["xla_bytes_accessed_loop_bodies_once"]
    lines.append(
        f"  {r['program']:<17}{r['rows']:>6}×{r['tokens']:<6}{_gib(r['arguments']):>7}"
        f"{_gib(r['outputs']):>7}{_gib(r['temporaries']):>7}{_gib(r['code']):>7}"
        f"{_gib(r['other_resident']):>10}{_gib(r['peak']):>7}  {r['model_flops'] / 1e12:>9.1f}"
        f"{'-' if moved is None else f'{moved / 1e9:.1f}':>9}{r['compile_seconds']:>10.0f}  "
        f"{kernels}; {coll}")
  lines.append("  GiB per device; TFLOPs: model FLOPs of the whole program (analytic); * XLA's "
               "count, each loop body once")
  if failure:
    lines.append(f"  fits: NO ({failure})")
  elif target.hbm_bytes is not None and rows:
    worst = max(rows, key=lambda r: r["peak"])
    lines.append(f"  fits: yes, largest peak {_gib(worst['peak'])} of {_gib(target.hbm_bytes)} "
                 f"GiB ({worst['program']})")
  return "\n".join(lines)


def main(argv):
  del argv
  if not _TOPOLOGY.value or _CONFIG.value is None:
    raise cli.UserError("--topology and --config are required, e.g. --topology=v5e-16 "
                        "--config=qwen2.5-math-1.5b.")
  try:
    target = targets.get(_TOPOLOGY.value)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  bad = [p for p in _PROGRAMS.value if p not in PROGRAMS]
  if bad or not _PROGRAMS.value:
    raise cli.UserError(f"--programs={','.join(_PROGRAMS.value)}: expected some of "
                        f"{', '.join(PROGRAMS)}.")
  targets.prepare_process(target)
  config = _CONFIG.value
  policy_hf = hf_config_for(_MODEL.value or config.policy,
                            "--model" if _MODEL.value else "--config.policy", config.builtin)
  guide_hf = None
  if config.guide.path:
    guide_hf = hf_config_for(_GUIDE_MODEL.value or config.guide.path,
                             "--guide_model" if _GUIDE_MODEL.value else "--config.guide.path",
                             config.builtin)
  prompt_len = _PROMPT_LEN.value or int(config.task_kwargs.get("max_prompt_tokens", 0) or 0)
  if prompt_len <= 0:
    raise cli.UserError("--prompt_len: the config sets no task_kwargs.max_prompt_tokens, so give "
                        "the prompt width P to compile for, e.g. --prompt_len=256.")
  from mixpo import sampling  # noqa: PLC0415
  try:
    mesh, programs, resident, facts = build(config, target, policy_hf, guide_hf,
                                            sampling.bucket_length(prompt_len), _PROGRAMS.value)
  except RuntimeError as e:  # a missing compiler package: targets.devices names it
    if "--topology" not in str(e):
      raise
    raise cli.UserError(str(e)) from None
  total = sum(resident.values())
  rows, failure = [], None
  for program in programs:
    try:
      row = compile_program(program, mesh, target, total)
    except DoesNotFit as e:
      failure = str(e)
      break
    except RuntimeError as e:
      if "cuDNN not found" not in str(e):
        raise
      raise cli.UserError(
          f"{program.name}: --config.model.attention_impl={facts['policy'].attention_impl} "
          "compiles cuDNN's fused attention for a GPU target, which needs the cuDNN library at "
          "compile time: pip install 'nvidia-cudnn-cu12>=9.8,<10' (BUILD_NOTES), or pass "
          "--config.model.attention_impl=xla.") from None
    rows.append(row)
    if target.hbm_bytes is not None and row["peak"] > target.hbm_bytes:
      failure = (f"{program.name} does not fit {target.name}: {_gib(row['peak'])} GiB per device "
                 f"(program {_gib(row['program_bytes'])} + other resident arrays "
                 f"{_gib(row['other_resident'])}) of {_gib(target.hbm_bytes)} GiB HBM")
      break
  name = _config_name()
  print(report(name, target, mesh, facts, resident, rows, failure))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"config": name, "topology": target.name, "mesh": dict(mesh.shape),
                 "device_kind": mesh.devices.flat[0].device_kind,
                 "hbm_bytes": target.hbm_bytes, "rows": facts["rows"], "P": facts["P"],
                 "N": facts["N"], "T": facts["T"], "lora_rank": facts["lora_rank"],
                 "num_layers": facts["policy"].num_layers, "resident": resident,
                 "programs": rows, "fits": failure is None, "failure": failure}, f, indent=1)
  if failure:
    raise cli.UserError(f"{failure}; try a mesh that splits more (--config.mesh_shape, e.g. "
                        "'(1,-1,1)' or '(1,-1,4)'), more micro-batches "
                        "(--config.step.num_micro_batches), LoRA (--config.lora.rank) or a larger "
                        "topology.")


def _config_name() -> str:
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      name = os.path.basename(arg.split("=", 1)[1].split(":")[0])
      return name[:-3] if name.endswith(".py") else name
  return "config"


if __name__ == "__main__":
  cli.run(main)
