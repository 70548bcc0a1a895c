"""Rollout benchmark: mixpo `generate` / `score` against transformers (PyTorch CPU), one process.

Both sides run the same random checkpoint (--shape; written by transformers, read back with
`mixpo.models.from_pretrained`) in the same dtype (--dtype; mixpo's bf16 run is the rollout view
`sampling.with_dtype` of float32 weights, transformers' the model cast to bf16) on the same
random prompts, after a warm-up call each; figures
are medians over --repeats. Generation counts exactly B × N new tokens on both sides
(transformers: do_sample, min_new_tokens = max_new_tokens; mixpo: eos_id=None); scoring
counts B × (P + N) tokens (transformers: forward + log_softmax + gather; mixpo:
`sampling.score(model, tokens, mask)`, the call a user makes), timed in alternating rounds.
--keep_freed_memory=false measures a process that has not called
`mixpo.hostmem.keep_freed_memory()` (a notebook, a user's own script), as the binaries do.

  python experiments/bench_rollout.py --repeats=5
  python experiments/bench_rollout.py --arch=qwen2 --batch=64 --repeats=5
  python experiments/bench_rollout.py --shape=qwen2.5-0.5b --batch=8 --prompt_len=64 --new_tokens=64
"""

import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import bench_common  # noqa: E402
from mixpo import models  # noqa: E402
from mixpo import sampling  # noqa: E402

_SHAPE = flags.DEFINE_enum("shape", "tiny", sorted(bench_common.SHAPES), "Model geometry.")
_ARCH = flags.DEFINE_enum("arch", "llama", ["llama", "qwen2"],
                          "transformers architecture of --shape=tiny (the others are qwen2).")
_BATCH = flags.DEFINE_integer("batch", 64, "B, sequences per call.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "P, prompt tokens per row (no padding).")
_NEW = flags.DEFINE_integer("new_tokens", 96, "N, generated tokens per row.")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (both sides).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and prompts.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", bench_common.DTYPES,
                           "Compute and weight dtype of both frameworks.")
_KEEP_FREED = flags.DEFINE_bool(
    "keep_freed_memory", True, "Apply mixpo.hostmem.keep_freed_memory() first, as the binaries "
    "do (process-wide glibc settings, torch's allocations included); False: what a library user "
    "gets who calls sampling.score without it (glibc's defaults).")
_DECODE = flags.DEFINE_bool(
    "decode", True, "Also time mixpo's decode steps alone (generate of N tokens minus generate "
    "of 1: prefill cancels) and report bytes/s against the measured copy bandwidth; with "
    "--dtype=bfloat16 also mixpo's float32 decode, for the bf16 / f32 ratio.")

# The tiny config used across the model and rollout benchmarks.
TINY = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, intermediate_size=688, max_position_embeddings=1024,
            tie_word_embeddings=True, torch_dtype="float32")


def hf_model(arch: str, seed: int, shape: str = "tiny"):
  torch.manual_seed(seed)
  if shape != "tiny":
    hf = bench_common.hf_config(shape, 4096)
    config = transformers.Qwen2Config(**{k: v for k, v in hf.items()
                                         if k not in ("model_type", "architectures")})
    return transformers.Qwen2ForCausalLM(config).eval()
  if arch == "llama":
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
  return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()


def median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (compilation on the JAX side, allocator / kernel selection on the torch side)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def alternating_medians(fns: dict, repeats: int) -> dict:
  """{name: median seconds}: one warm-up call each, then `repeats` rounds calling every fn once
  in turn, so load from other jobs and the heap's state fall on all alike."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  if _KEEP_FREED.value:
    hostmem.keep_freed_memory()
  del argv
  b, p, n = _BATCH.value, _PROMPT.value, _NEW.value
  hf = hf_model(_ARCH.value, _SEED.value, _SHAPE.value)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model = models.from_pretrained(tmp)
  if _DTYPE.value == "bfloat16":
    hf = hf.to(torch.bfloat16)
  vocab = hf.config.vocab_size
  rng = np.random.default_rng(_SEED.value)
  prompt_BxP = rng.integers(1, vocab, (b, p)).astype(np.int32)
  mask_BxP = np.ones((b, p), np.int32)
  prompt_t, mask_t = torch.from_numpy(prompt_BxP).long(), torch.from_numpy(mask_BxP).long()

  # --- generate ---
  def hf_generate():
    with torch.no_grad():
      out = hf.generate(prompt_t, attention_mask=mask_t, do_sample=True, max_new_tokens=n,
                        min_new_tokens=n, temperature=_TEMP.value, top_k=0, top_p=1.0,
                        pad_token_id=0)
    assert out.shape == (b, p + n), out.shape

  graphdef, state = sampling.with_dtype(model, jax.numpy.dtype(_DTYPE.value))
  calls = iter(range(1 << 30))

  def mixpo_generate():
    rollout = sampling.generate((graphdef, state), prompt_BxP, mask_BxP,
                                jax.random.key(next(calls)), n, temperature=_TEMP.value)
    jax.block_until_ready(rollout)
    assert rollout.tokens_BxN.shape == (b, n)

  t_hf_gen = median_seconds(hf_generate, _REPEATS.value)
  t_mx_gen = median_seconds(mixpo_generate, _REPEATS.value)

  # --- score: the same full rows (prompt + a sampled response) ---
  rollout = sampling.generate((graphdef, state), prompt_BxP, mask_BxP, jax.random.key(0), n)
  tokens_BxT = np.concatenate([prompt_BxP, np.asarray(rollout.tokens_BxN)], axis=1)
  mask_BxT = np.concatenate([mask_BxP, np.asarray(rollout.mask_BxN)], axis=1)
  tokens_t, mask_tt = torch.from_numpy(tokens_BxT).long(), torch.from_numpy(mask_BxT).long()

  def hf_score():
    with torch.no_grad():
      logits = hf(tokens_t, attention_mask=mask_tt).logits[:, :-1]
      logp = torch.log_softmax(logits.float(), dim=-1)
      return torch.gather(logp, -1, tokens_t[:, 1:, None])[..., 0]

  # What a user calls: the loaded model itself (float32) or its rollout view (bf16).
  scored = model if _DTYPE.value == "float32" else (graphdef, state)

  def mixpo_score():
    return jax.block_until_ready(sampling.score(scored, tokens_BxT, mask_BxT))

  medians = alternating_medians({"hf": hf_score, "mixpo": mixpo_score}, _REPEATS.value)
  t_hf_score, t_mx_score = medians["hf"], medians["mixpo"]
  agree = np.abs(np.asarray(mixpo_score())[:, 1:] - hf_score().numpy()).max()

  decode = {}
  if _DECODE.value and n > 1:
    dtypes = [_DTYPE.value] + (["float32"] if _DTYPE.value != "float32" else [])
    for name in dtypes:
      gd, st = sampling.with_dtype(model, jax.numpy.dtype(name))
      run = lambda k: (lambda: jax.block_until_ready(sampling.generate(
          (gd, st), prompt_BxP, mask_BxP, jax.random.key(next(calls)), k,
          temperature=_TEMP.value)))
      t_steps = median_seconds(run(n), _REPEATS.value) - median_seconds(run(1), _REPEATS.value)
      decode[name] = t_steps / (n - 1)  # seconds per decode step (B tokens)
      del gd, st
    bandwidth = bench_common.copy_bandwidth()

  gen_tokens, score_tokens = b * n, b * (p + n)
  print(f"config: {_SHAPE.value} ({bench_common.describe(hf.config.to_dict())}), B={b} P={p} "
        f"N={n} T={_TEMP.value} {_DTYPE.value}; jax {jax.__version__} on {jax.devices()[0].platform}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads); median of {_REPEATS.value} "
        f"(score: alternating rounds); hostmem: {hostmem.status or 'not applied'}")
  print(f"generate  transformers {gen_tokens / t_hf_gen:9.0f} tok/s  ({t_hf_gen:.3f} s)")
  print(f"generate  mixpo        {gen_tokens / t_mx_gen:9.0f} tok/s  ({t_mx_gen:.3f} s)  "
        f"ratio {t_hf_gen / t_mx_gen:.2f}x")
  print(f"score     transformers {score_tokens / t_hf_score:9.0f} tok/s  ({t_hf_score:.3f} s)")
  print(f"score     mixpo        {score_tokens / t_mx_score:9.0f} tok/s  ({t_mx_score:.3f} s)  "
        f"ratio {t_hf_score / t_mx_score:.2f}x  (max |Δ logp| vs transformers {agree:.1e})")
  for name, step_s in decode.items():
    nbytes = bench_common.decode_step_bytes(hf.config.to_dict(), b, p + n / 2,
                                            jax.numpy.dtype(name).itemsize)
    print(f"decode    mixpo {name:8s} {b / step_s:9.1f} tok/s  ({step_s * 1e3:.1f} ms/step, "
          f"{nbytes / 1e9:.2f} GB/step read: {nbytes / step_s / 1e9:.1f} GB/s = "
          f"{nbytes / step_s / bandwidth:.0%} of the measured copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s)")
  if len(decode) == 2:
    print(f"decode    mixpo {_DTYPE.value} / float32: "
          f"{decode['float32'] / decode[_DTYPE.value]:.2f}x")


if __name__ == "__main__":
  app.run(main)
