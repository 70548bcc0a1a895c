"""Accelerator throughput and MFU of mixpo: generate, score and a train step, by model shape.

MFU = achieved model FLOP/s ÷ the device's peak (bench_common.DEVICE_PEAK_FLOPS, dense bf16, by
jax device kind). Model FLOPs per token: bench_common.forward_flops_per_token (weights + causal
attention), ×3 for a train step (forward + backward). Random weights (nothing downloaded); the
train step is mixpo's own (chunked token log-probs, masked-mean NLL, AdamW on float32 master
weights, --dtype compute). On CPU MFU is "n/a" unless --cpu_peak_gflops states a peak.

  python experiments/bench_device.py --shape=qwen2.5-0.5b --dtype=bfloat16      # on a GPU / TPU
  python experiments/bench_device.py --shape=tiny --dtype=float32 --batch=4 --new_tokens=16 \
      --train_batch=2 --seq=64                                                  # CPU smoke run

On a lent accelerator with minutes of budget, both geometries in one call (each prints its
table as soon as it is done; the imports need only jax, flax, optax, chex, absl, safetensors):

  for s in qwen2.5-0.5b qwen2.5-1.5b; do timeout 280 python experiments/bench_device.py \
      --shape=$s --dtype=bfloat16 | tee -a "${OUT:-.}/bench_device.txt"; done
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_common  # noqa: E402
from mixpo import models, sampling  # noqa: E402

_SHAPE = flags.DEFINE_enum("shape", "qwen2.5-0.5b", sorted(bench_common.SHAPES), "Geometry.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", bench_common.DTYPES, "Compute dtype.")
_BATCH = flags.DEFINE_integer("batch", 64, "Rows of generate and score.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Generated tokens per row.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 8, "Rows per train step.")
_SEQ = flags.DEFINE_integer("seq", 1024, "Tokens per train row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
_REMAT = flags.DEFINE_bool("remat", True, "Rematerialise each layer in the train step.")
_CPU_PEAK = flags.DEFINE_float("cpu_peak_gflops", None,
                               "Peak GFLOP/s to compute MFU against on a CPU (else n/a).")


def _timed(fn, repeats):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return bench_common.median(times)


def _train_stepper(model, tokens_BxT):
  mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)

  def loss_fn(model, tokens_BxT):
    return -jnp.mean(sampling.token_logp(model, tokens_BxT, mask_BxT)[:, 1:])

  return bench_common.adamw_stepper(model, loss_fn, tokens_BxT, 1e-5)


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  device = jax.devices()[0]
  config = bench_common.hf_config(_SHAPE.value, max(_PROMPT.value + _NEW.value, _SEQ.value) + 1)
  dtype = jnp.dtype(_DTYPE.value)
  peak = bench_common.device_peak_flops(
      device.device_kind, None if _CPU_PEAK.value is None else _CPU_PEAK.value * 1e9)
  b, p, n = _BATCH.value, _PROMPT.value, _NEW.value
  print(f"device {device.platform} ({device.device_kind}), peak "
        f"{'n/a' if peak is None else f'{peak / 1e12:.3g} TFLOP/s'}; shape {_SHAPE.value} "
        f"({bench_common.describe(config)}), {_DTYPE.value}; load {os.getloadavg()[0]:.1f}")
  master = models.init_from_config(config, 0, dtype=dtype, param_dtype=jnp.float32,
                                   remat=_REMAT.value)
  view = sampling.with_dtype(master, dtype)  # rollout / scoring weights
  rng = np.random.default_rng(0)
  prompt_BxP = rng.integers(1, config["vocab_size"], (b, p)).astype(np.int32)
  mask_BxP = np.ones((b, p), np.int32)
  calls = iter(range(1 << 30))
  t_gen = _timed(lambda: jax.block_until_ready(sampling.generate(
      view, prompt_BxP, mask_BxP, jax.random.key(next(calls)), n)), _REPEATS.value)
  tokens_BxT = rng.integers(1, config["vocab_size"], (b, p + n)).astype(np.int32)
  t_score = _timed(lambda: jax.block_until_ready(sampling.score(
      view, tokens_BxT, np.ones_like(tokens_BxT))), _REPEATS.value)
  train_tokens = rng.integers(1, config["vocab_size"], (_TRAIN_BATCH.value, _SEQ.value))
  t_train = _timed(_train_stepper(master, jnp.asarray(train_tokens, jnp.int32)), _REPEATS.value)

  rows = [
      # (what, tokens per call, seconds, FLOPs per token)
      (f"generate B={b} P={p} N={n}", b * n, t_gen,
       bench_common.forward_flops_per_token(config, p + n / 2)),
      (f"score B={b} T={p + n}", b * (p + n), t_score,
       bench_common.forward_flops_per_token(config, (p + n + 1) / 2)),
      (f"train B={_TRAIN_BATCH.value} T={_SEQ.value}", _TRAIN_BATCH.value * _SEQ.value, t_train,
       3 * bench_common.forward_flops_per_token(config, (_SEQ.value + 1) / 2)),
  ]
  print("| what | tokens/s | s/call | model TFLOP/s | MFU |")
  print("|---|---|---|---|---|")
  for what, tokens, seconds, flops in rows:
    achieved = tokens * flops / seconds
    mfu = "n/a" if peak is None else f"{100 * achieved / peak:.1f} %"
    print(f"| {what} | {tokens / seconds:.0f} | {seconds:.3f} | {achieved / 1e12:.3f} | {mfu} |")


if __name__ == "__main__":
  app.run(main)
