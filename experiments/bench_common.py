"""What the benchmarks share: model shapes by name, dtypes, model FLOPs (mixpo.flops) and device
peak FLOP/s.

Shapes are Hugging Face config.json dicts with random weights (nothing is downloaded):
  tiny          the config the tiny speed figures use (hidden 256, 4 layers, 8/2 heads, vocab 512)
  mid           bench_scaling's CPU shape (hidden 512, 6 layers, 8/2 heads, vocab 8192)
  qwen2.5-0.5b  Qwen2.5-0.5B geometry (hidden 896, 24 layers, 14/2 heads, F 4864, vocab 151936)
  qwen2.5-1.5b  Qwen2.5-1.5B geometry (hidden 1536, 28 layers, 12/2 heads, F 8960, vocab 151936)
"""

from __future__ import annotations

import statistics
import time

import numpy as np

# Model FLOPs per token (weights + causal attention): the library's count, shared with the grids'
# equal-compute accounting.
from mixpo.flops import forward_flops_per_token  # noqa: F401

_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
              rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
              use_sliding_window=False)

SHAPES = {
    "tiny": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512,
                 hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                 rope_theta=10000.0, tie_word_embeddings=True),
    "mid": dict(_QWEN2, vocab_size=8192, hidden_size=512, intermediate_size=1376,
                num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2),
    "qwen2.5-0.5b": dict(_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(_QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}
DTYPES = ("float32", "bfloat16")

# Dense bfloat16 peak FLOP/s by jax `device_kind` (vendor datasheets, no sparsity). Keys are
# matched as lower-case substrings of the device kind.
DEVICE_PEAK_FLOPS = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10g": 125e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def hf_config(shape: str, max_positions: int) -> dict:
  """config.json dict of `shape` with max_position_embeddings = max_positions."""
  if shape not in SHAPES:
    raise ValueError(f"--shape={shape!r}: expected one of {sorted(SHAPES)}")
  return dict(SHAPES[shape], max_position_embeddings=int(max_positions))


def describe(config: dict) -> str:
  return (f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
          f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads, "
          f"F {config['intermediate_size']}, vocab {config['vocab_size']}")


def device_peak_flops(device_kind: str, cpu_peak_flops: float | None = None) -> float | None:
  """Peak FLOP/s of a jax device kind (the table above); CPU: `cpu_peak_flops` or None."""
  kind = device_kind.lower()
  for name, peak in DEVICE_PEAK_FLOPS.items():
    if name in kind:
      return peak
  return cpu_peak_flops


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
  """Host memory copy bandwidth in bytes/s: `nbytes` copied (read once, written once) by one
  np.copyto between preallocated, already-touched arrays, best of `repeats`. The roofline that
  decode's achieved bytes/s is reported against (decode reads each weight once per step)."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # touch every page of both before timing
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return src.nbytes / best


def decode_step_bytes(config: dict, batch: int, context: float, dtype_bytes: int) -> float:
  """Bytes one decode step must read at least: every weight once (the layers, the final norm
  and the LM head, which is the embedding table when tied; the input embedding reads only B
  rows) plus the KV cache over `context` slots, all stored in `dtype_bytes` per element."""
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  n, k = config["num_attention_heads"], config["num_key_value_heads"]
  h = config.get("head_dim") or d // n
  layers = config["num_hidden_layers"]
  qkv_bias = (n + 2 * k) * h if config.get("model_type") == "qwen2" else 0
  layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d + qkv_bias  # + the 2 norms
  weights = layers * layer + d + d * v
  kv_cache = layers * 2 * batch * k * h * context
  return float(weights + kv_cache) * dtype_bytes


def median(xs) -> float:
  return float(np.median(np.asarray(xs, np.float64)))


def adamw_stepper(model, loss_fn, tokens_BxT, learning_rate: float):
  """step() that runs one jitted AdamW update of `model` (state donated) and waits for it.

  loss_fn(model, tokens_BxT) -> scalar loss. Both frameworks' benchmarks time this call.
  """
  import jax  # noqa: PLC0415 — only the jax-side benchmarks need it
  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adamw(learning_rate, weight_decay=0.01)

  def update(state, tokens_BxT):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p, rest), tokens_BxT))(state["params"])
    updates, opt_state = opt.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}, loss

  update = jax.jit(update, donate_argnums=0)
  holder = [{"params": params, "opt": opt.init(params)}]

  def step():
    holder[0], loss = update(holder[0], tokens_BxT)
    return loss.block_until_ready()

  return step


def alternating_medians(fns: dict, repeats: int, log=None) -> dict:
  """{name: median seconds}: one warm-up call each, then `repeats` rounds calling every fn once
  in turn, so load from other jobs and the heap's state fall on all alike; the order is reversed
  every other round, so no fn always runs right after the same one (one framework's idle
  threads or freed memory then weigh on both alike). `log(line)`, when given, gets each call's
  time as it ends (long runs on a loaded box show progress)."""
  for name, fn in fns.items():
    t0 = time.perf_counter()
    fn()
    if log:
      log(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s")
  times = {name: [] for name in fns}
  for i in range(repeats):
    for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
      fn = fns[name]
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
      if log:
        log(f"  round {i} {name}: {times[name][-1]:.2f} s")
  return {name: statistics.median(t) for name, t in times.items()}


def rl_lengths(rows: int, cap: int, seed: int) -> np.ndarray:
  """Per-row response lengths of an RL step's batch, long-tailed as RLVR's are (most rows end
  early, a few reach the cap): clip(ceil(LogNormal(4.5, 1.0)), 1, cap), a fixed draw of `seed`
  (64 rows, cap 512, seed 0: mean 142, 3 rows at the cap)."""
  return np.clip(np.ceil(np.random.default_rng(seed).lognormal(4.5, 1.0, rows)), 1,
                 cap).astype(np.int32)
