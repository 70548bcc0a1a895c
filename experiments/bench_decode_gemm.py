r"""Few-row GEMMs as a decode step runs them: float32 vs bfloat16 weights on this backend.

A decode step at batch B multiplies B activation rows by every weight once, so it is bound by
how fast the GEMM kernel streams the weights. This times the MLP GEMMs of --layers decoder
layers (x·W_up [D, F], then ·W_down [F, D], one chain, jitted) with the weights stored

  f32   [in, out]   float32, the layout mixpo's kernels use;
  bf16  [in, out]   bfloat16 weights, float32 accumulation (what `--dtype=bfloat16` runs);
  bf16  [out, in]   bfloat16 weights contracted on their last dim (torch's Linear layout);

and prints the time per chain, the weight bytes read per second and each layout's speed-up
over f32. On a memory-bound kernel bf16 reads half the bytes and approaches 2x; on XLA:CPU the
bf16 path is the kernel's own speed (see BUILD_NOTES.md, "bf16 decode").

  python experiments/bench_decode_gemm.py                 # B = 8, Qwen2.5-0.5B MLP widths
  python experiments/bench_decode_gemm.py --rows=64
"""

import os
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_ROWS = flags.DEFINE_integer("rows", 8, "B: activation rows (sequences decoded at once).")
_HIDDEN = flags.DEFINE_integer("hidden", 896, "D.")
_INTER = flags.DEFINE_integer("intermediate", 4864, "F.")
_LAYERS = flags.DEFINE_integer("layers", 24, "Layers in the chain (weights exceed the caches).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls (median).")

_LAYOUTS = (("f32 [in, out]", jnp.float32, False), ("bf16 [in, out]", jnp.bfloat16, False),
            ("bf16 [out, in]", jnp.bfloat16, True))


def time_layout(dtype, out_in: bool) -> float:
  """Median seconds of one chain of 2·layers GEMMs with weights in `dtype` / layout."""
  d, f = _HIDDEN.value, _INTER.value
  rng = np.random.default_rng(0)

  def weight(rows, cols):
    w = (0.02 * rng.standard_normal((rows, cols), np.float32)).astype(dtype)
    return jnp.asarray(w.T.copy() if out_in else w)

  ups = [weight(d, f) for _ in range(_LAYERS.value)]
  downs = [weight(f, d) for _ in range(_LAYERS.value)]
  contract = (((1,), (1,)), ((), ())) if out_in else (((1,), (0,)), ((), ()))

  @jax.jit
  def chain(x, ups, downs):
    for up, down in zip(ups, downs):
      h = jax.lax.dot_general(x.astype(dtype), up, contract, preferred_element_type=jnp.float32)
      x = x + jax.lax.dot_general(h.astype(dtype), down, contract,
                                  preferred_element_type=jnp.float32)
    return x

  x = jnp.ones((_ROWS.value, d), jnp.float32)
  jax.block_until_ready(chain(x, ups, downs))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(chain(x, ups, downs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  from mixpo import hostmem  # noqa: PLC0415  (first: allocator settings before jax computes)
  hostmem.keep_freed_memory()
  n_weights = 2 * _LAYERS.value * _HIDDEN.value * _INTER.value
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}: B={_ROWS.value}, "
        f"D={_HIDDEN.value}, F={_INTER.value}, {_LAYERS.value} layers "
        f"({n_weights / 1e6:.0f} M weights), median of {_REPEATS.value}")
  base = None
  for name, dtype, out_in in _LAYOUTS:
    try:
      seconds = time_layout(dtype, out_in)
    except jax.errors.JaxRuntimeError as e:  # a backend without a kernel for the combination
      print(f"{name:>15}: not supported here ({str(e).splitlines()[0][:100]})")
      continue
    base = base or seconds
    gbs = n_weights * jnp.dtype(dtype).itemsize / seconds / 1e9
    print(f"{name:>15}: {seconds * 1e3:7.1f} ms  {gbs:5.1f} GB/s of weights  "
          f"{base / seconds:4.2f}x f32")


if __name__ == "__main__":
  app.run(main)
