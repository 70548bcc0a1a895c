"""Rollout benchmark: mixpo `generate` / `score` against transformers (PyTorch CPU), one process;
with --work=rl_shaped, mixpo's sampler on long-tailed RL-shaped work against its old static
batch (and vLLM when installed); with --work=rl_step, the policy's rollouts of RL steps of a
config (the dynamic-sampling stream against static generation batches).

--work=fixed (the default):

Both sides run the same random checkpoint (--shape; written by transformers, read back with
`mixpo.models.from_pretrained`) in the same dtype (--dtype; mixpo's bf16 run is the rollout view
`sampling.with_dtype` of float32 weights, transformers' the model cast to bf16) on the same
random prompts, after a warm-up call each; figures
are medians over --repeats. Generation counts exactly B × N new tokens on both sides
(transformers: do_sample, min_new_tokens = max_new_tokens; mixpo: eos_id=None); scoring
counts B × (P + N) tokens (transformers: forward + log_softmax + gather; mixpo:
`sampling.score(model, tokens, mask)`, the call a user makes), timed in alternating rounds
(the order reversed every other round). By default the process is a user's script: it has not
called `mixpo.hostmem.keep_freed_memory()`; --keep_freed_memory applies it first, as mixpo's
binaries do (process-wide: torch's allocations too).

  python experiments/bench_rollout.py --repeats=5
  python experiments/bench_rollout.py --arch=qwen2 --batch=64 --repeats=5
  python experiments/bench_rollout.py --shape=qwen2.5-0.5b --batch=8 --prompt_len=64 --new_tokens=64

--work=rl_shaped: --rl_prompts (8) prompts × --rl_samples (8) samples = 64 rows of random
--prompt_len tokens; row i is forced to length L_i = clip(ceil(LogNormal(4.5, 1.0)), 1, --rl_cap)
(seed --seed: mean 142, 3 rows at the 512 cap, 9101 tokens at the defaults) by its own token
budget (EOS off). Useful tokens/s = Σ L_i / seconds. Timed, alternating, median of --repeats:
  static   the old `sampling.static_generate`: every row decoded to max L_i (one program);
  compact  `sampling.generate`: every row starts at once, ended rows gathered out (buckets);
  slots=S  `mixpo.slots` with S decode slots refilled from the work list (--slots, a list;
           "Snc": the same without compaction of the tail);
  vllm     `mixpo.engines.vllm.VllmEngine` when importable (`vllm_rl_shaped`, the hook).
CPU seconds (all threads) are printed beside the wall time: on a loaded box they are the
steadier measure of work.
  python experiments/bench_rollout.py --work=rl_shaped --dtype=bfloat16 --repeats=3

--work=rl_step: --steps RL steps of --config (default: the default experiment on its built-in
models, --builtin_dir reuses built ones); before each step the policy's rollouts are collected
twice from the same state, alternating: by the stream (`rollout.stream_groups` on mixpo's
sampler) and by static generation batches of groups × n rows (the same stream run through
`engines.run_stream`'s static adapter on `static_generate`: the pre-stream behaviour). Prints
the mean seconds of each and the decode row-steps per kept token (1 = no step on an ended row,
a dropped row or a group dynamic sampling did not keep).
  python experiments/bench_rollout.py --work=rl_step --steps=20 --builtin_dir=/tmp/models
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
from mixpo import engines  # noqa: E402
from mixpo import models  # noqa: E402
from mixpo import sampling  # noqa: E402
from mixpo import slots  # noqa: E402

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
_WORK = flags.DEFINE_enum("work", "fixed", ["fixed", "rl_shaped", "rl_step"],
                         "What to time (module docstring).")
_RL_PROMPTS = flags.DEFINE_integer("rl_prompts", 8, "rl_shaped: prompts.")
_RL_SAMPLES = flags.DEFINE_integer("rl_samples", 8, "rl_shaped: samples per prompt.")
_RL_CAP = flags.DEFINE_integer("rl_cap", 512, "rl_shaped: the length cap (max_new_tokens).")
_SLOTS = flags.DEFINE_list("slots", ["32", "64", "64nc"],
                           "rl_shaped: decode slot counts to time (suffix nc: no compaction).")
_STEPS = flags.DEFINE_integer("steps", 10, "rl_step: RL steps.")
_CONFIG = flags.DEFINE_string("config", "default", "rl_step: experiments/configs/<name>.py.")
_BUILTIN = flags.DEFINE_string("builtin_dir", "", "rl_step: built-in models to reuse.")
_VARIANTS = flags.DEFINE_multi_string(
    "stream", ["default"], "rl_step: stream variants to time, each 'default' or comma-separated "
    "SampleSpec fields, e.g. 'slots=64,refill_at=8,min_steps=1'.")
_KEEP_FREED = flags.DEFINE_bool(
    "keep_freed_memory", False, "Apply mixpo.hostmem.keep_freed_memory() first, as the binaries "
    "do (process-wide glibc settings, torch's allocations included); False (default): what a "
    "library user gets who calls sampling.score without it (glibc's defaults).")
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


def vllm_rl_shaped(hf_dir: str, dtype: str, prompt_BxP, budgets_B, temperature: float):
  """The vLLM side of --work=rl_shaped: a callable generating the rows (row i up to budgets_B[i]
  tokens, EOS ignored) on mixpo's vLLM engine, or None when it is not installed (the engine
  contract's per-row budgets: max_new_tokens as an int [B] array)."""
  try:
    engine = engines.make("vllm", hf_dir=hf_dir, dtype=dtype, seed=0)
  except ValueError:
    return None
  mask = np.ones_like(prompt_BxP)
  calls = iter(range(1 << 30))
  return lambda: engine.generate(prompt_BxP, mask, jax.random.key(next(calls)), budgets_B,
                                 temperature=temperature)


def _timed(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


def rl_shaped(model, hf_dir: str):
  """--work=rl_shaped (module docstring)."""
  rows = _RL_PROMPTS.value * _RL_SAMPLES.value
  cap, temp = _RL_CAP.value, _TEMP.value
  lengths = bench_common.rl_lengths(rows, cap, _SEED.value)
  rng = np.random.default_rng(_SEED.value + 1)
  prompt_BxP = np.repeat(rng.integers(1, model.config.vocab_size,
                                      (_RL_PROMPTS.value, _PROMPT.value)).astype(np.int32),
                         _RL_SAMPLES.value, axis=0)
  mask_BxP = np.ones_like(prompt_BxP)
  pair = sampling.with_dtype(model, jax.numpy.dtype(_DTYPE.value))  # a rollout_dtype run's copy
  calls = iter(range(1 << 30))
  runs = {
      "static": lambda: jax.block_until_ready(sampling.static_generate(
          pair, prompt_BxP, mask_BxP, jax.random.key(next(calls)), cap, temperature=temp,
          row_budgets=lengths)),
      "compact": lambda: jax.block_until_ready(sampling.generate(
          pair, prompt_BxP, mask_BxP, jax.random.key(next(calls)), cap, temperature=temp,
          row_budgets=lengths)),
  }
  stats = {}

  def slot_run(name, n, compact):
    def run():
      work = slots.RowList([slots.Request(i, prompt_BxP[i], int(lengths[i]))
                            for i in range(rows)])
      cfg = slots.SlotConfig(slots=n, prompt_width=prompt_BxP.shape[1], max_new_tokens=cap,
                             compact=compact)
      stats[name] = slots.SlotSampler(pair, cfg, slots.SampleOptions(temperature=temp),
                                      jax.random.key(next(calls))).run(work)
      assert sum(len(r.tokens) for r in work.results.values()) == lengths.sum()
    return run

  for n in _SLOTS.value:  # "32": refill and compaction; "32nc": refill alone
    name = f"slots={n}"
    runs[name] = slot_run(name, int(n.removesuffix("nc")), not n.endswith("nc"))
  if compute_dtype(pair) != jax.numpy.dtype(_DTYPE.value):  # bf16 on CPU: also bf16 compute
    exact = sampling.with_dtype(model, jax.numpy.dtype(_DTYPE.value), exact=True)
    runs["compact " + _DTYPE.value[:4]] = lambda: jax.block_until_ready(sampling.generate(
        exact, prompt_BxP, mask_BxP, jax.random.key(next(calls)), cap, temperature=temp,
        row_budgets=lengths))
  vllm = vllm_rl_shaped(hf_dir, _DTYPE.value, prompt_BxP, lengths, temp)
  if vllm is not None:
    runs["vllm"] = vllm
  for fn in runs.values():
    fn()  # warm-up: compiles (mixpo) / builds CUDA-graph-free kernels (vLLM)
  times = {k: [] for k in runs}
  for _ in range(_REPEATS.value):
    for k, fn in runs.items():  # alternating rounds
      times[k].append(_timed(fn))
  useful = int(lengths.sum())
  print(f"config: {_SHAPE.value} ({describe_model(model)}), rl_shaped: {rows} rows = "
        f"{_RL_PROMPTS.value} prompts x {_RL_SAMPLES.value}, P={prompt_BxP.shape[1]}, lengths "
        f"clip(ceil(LogNormal(4.5, 1.0)), 1, {cap}) seed {_SEED.value}: mean {lengths.mean():.1f}, "
        f"{int((lengths == cap).sum())} at the cap, {useful} useful tokens; T={temp} "
        f"{_DTYPE.value} (mixpo computes in {compute_dtype(pair)}: sampling.with_dtype); jax "
        f"{jax.__version__}; median of {_REPEATS.value} alternating rounds"
        f"{'' if vllm is not None else '; vLLM: not installed'}")
  base = statistics.median(t for t, _ in times["static"])
  for k, ts in times.items():
    wall, cpu = statistics.median(t for t, _ in ts), statistics.median(c for _, c in ts)
    extra = ""
    if k in stats:
      s = stats[k]
      extra = (f"  row-steps {s.slot_steps} ({s.slot_steps / useful:.2f} per useful token), "
               f"{s.steps} steps, {s.returns} returns, {s.compactions} compactions, "
               f"{s.shifts} shifts")
    print(f"rl_shaped {k:10s} {useful / wall:8.0f} useful tok/s  ({wall:.2f} s wall, "
          f"{cpu:.2f} CPU s; {base / wall:.2f}x static){extra}")


def compute_dtype(pair) -> str:
  """The dtype a (graphdef, state) computes in."""
  from flax import nnx  # noqa: PLC0415
  return jax.numpy.dtype(nnx.merge(*pair).config.dtype).name


def describe_model(model) -> str:
  c = model.config
  return (f"hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads}/{c.num_kv_heads} heads, "
          f"vocab {c.vocab_size}")


def decode_parts(work, run) -> dict:
  """The decode row-steps of one stream run (`work`: its `rollout.GroupStream`, `run`: its
  `slots.RunStats`) by what they produced: rows of kept groups (the G + Z groups the step trains
  on), rows of groups rewarded but not kept, rows that ended but whose group was not rewarded
  when the decision came, rows dropped in flight, and idle slot-steps (a slot whose row had ended
  or that held none, computed with the bucket). A row of n tokens took n − 1 decode steps (its
  first token comes from its prefill)."""
  prefix, kept, zero = work.decision
  keep = set(kept) | set(zero)
  k = work.k
  parts = dict.fromkeys(("kept", "not_kept", "unrewarded", "dropped", "idle"), 0)
  tokens = 0
  for row, r in work.rows.items():
    g = row // k
    part = "kept" if g in keep else "not_kept" if g < len(work.has_var) else "unrewarded"
    parts[part] += len(r.tokens) - 1
    tokens += len(r.tokens) if part == "kept" else 0
  dropped_rows = work.next_row - len(work.rows)
  parts["dropped"] = run.dropped_tokens - dropped_rows
  parts["idle"] = run.slot_steps - sum(parts.values())
  parts["kept_tokens"] = tokens
  parts["groups_started"] = -(-work.next_row // k)
  parts["groups_rewarded"] = len(work.has_var)
  parts["prefix"] = prefix
  parts["prefill_rows"] = run.prefill_rows
  parts["returns"] = run.returns
  return parts


class _StaticEngine:
  """The pre-stream policy rollouts: static generation batches of `sampling.static_generate`."""

  def __init__(self):
    self.model = None

  def update_weights(self, model):
    self.model = model

  def generate(self, *args, **kwargs):
    return sampling.static_generate(self.model, *args, **kwargs)


def rl_step():
  """--work=rl_step (module docstring)."""
  import dataclasses as dc  # noqa: PLC0415
  import importlib  # noqa: PLC0415
  from mixpo import logging as mlog  # noqa: PLC0415
  from mixpo import loop, rl, rollout  # noqa: PLC0415
  config = importlib.import_module(f"experiments.configs.{_CONFIG.value}").get_config()
  with tempfile.TemporaryDirectory() as workdir:
    config.builtin_dir = _BUILTIN.value or os.path.join(workdir, "models")
    config.export_hf, config.progress = False, False
    exp, state, ckpt, _ = loop.setup(config, workdir)
    ckpt.close()
    variants = {"static": (_StaticEngine(), exp.spec)}
    for v in _VARIANTS.value:
      fields = {} if v == "default" else {
          k: int(x) for k, x in (kv.split("=") for kv in v.split(","))}
      sample = dc.replace(exp.spec.sample, **fields)
      variants[f"stream {v}"] = (exp.policy_engine, dc.replace(exp.spec, sample=sample))
    seconds = {k: [] for k in variants}
    ratio = {k: [] for k in variants}
    parts = {k: [] for k in variants}
    streams = []

    class Recorded(rollout.GroupStream):  # the bench keeps each run's work list
      def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        streams.append(self)

    rollout.GroupStream = Recorded
    pos, timer = 0, mlog.PhaseTimer()
    with jax.set_mesh(exp.mesh):
      for step in range(_STEPS.value + 1):  # step 0 compiles: not counted
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
        policy = rl.rollout_view(exp.spec, exp.policy.pair(state.params))
        order = list(variants) if step % 2 else list(variants)[::-1]
        for name in order:
          engine, spec = variants[name]
          e = dc.replace(exp, policy_engine=engine, spec=spec)
          t0 = time.perf_counter()
          collected = rl.collect_policy(e, policy, jax.random.fold_in(key, 0), pos, timer)
          if step:
            seconds[name].append(time.perf_counter() - t0)
            rows, n_groups = rl.policy_block(collected, exp.spec.sizes)
            kept = int(rows.lengths_B[:n_groups * exp.spec.sizes.n].sum())
            ratio[name].append(collected.run.slot_steps / max(kept, 1))
            parts[name].append(decode_parts(streams[-1], collected.run))
        state, pos, _, _ = rl.rl_step(exp, state, pos, timer)
    exp.reward_runner.close()
  r = config.rollout
  print(f"config: {_CONFIG.value} (algo {config.algo}, groups {r.groups} x n {r.n}, "
        f"zero_groups {exp.spec.sizes.zero_groups}, max_new_tokens {r.max_new_tokens}, "
        f"cap {r.max_num_gen_batches} batches); {_STEPS.value} steps after one warm-up")
  base = np.mean(seconds["static"])
  for name in variants:
    print(f"rl_step policy rollouts {name:30s} {np.mean(seconds[name]):.3f} s/step "
          f"({base / np.mean(seconds[name]):.2f}x static), decode row-steps per kept token "
          f"{np.mean(ratio[name]):.2f}")
  for name in variants:
    total = {k: sum(p[k] for p in parts[name]) for k in parts[name][0]}
    kept = total["kept_tokens"]
    steps = ", ".join(f"{k} {total[k] / kept:.3f}" for k in
                      ("kept", "not_kept", "unrewarded", "dropped", "idle"))
    print(f"rl_step {name:30s} decode row-steps per kept token: {steps}; per step: groups "
          f"started {total['groups_started'] / len(parts[name]):.1f}, rewarded "
          f"{total['groups_rewarded'] / len(parts[name]):.1f}, decided at "
          f"{total['prefix'] / len(parts[name]):.1f}, prefill rows "
          f"{total['prefill_rows'] / len(parts[name]):.0f}, returns "
          f"{total['returns'] / len(parts[name]):.1f}")


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  if _KEEP_FREED.value:
    hostmem.keep_freed_memory()
  del argv
  if _WORK.value == "rl_step":
    return rl_step()
  if _WORK.value == "rl_shaped":
    hf = hf_model(_ARCH.value, _SEED.value, _SHAPE.value)
    with tempfile.TemporaryDirectory() as tmp:
      hf.save_pretrained(tmp)
      model = models.from_pretrained(tmp)
      return rl_shaped(model, tmp)
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

  graphdef, state = sampling.with_dtype(model, jax.numpy.dtype(_DTYPE.value))  # rollout_dtype's
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

  medians = bench_common.alternating_medians({"hf": hf_score, "mixpo": mixpo_score},
                                             _REPEATS.value)
  t_hf_score, t_mx_score = medians["hf"], medians["mixpo"]
  agree = np.abs(np.asarray(mixpo_score())[:, 1:] - hf_score().numpy()).max()

  decode = {}
  if _DECODE.value and n > 1:
    dtypes = [_DTYPE.value] + (["float32"] if _DTYPE.value != "float32" else [])
    for name in dtypes:  # the dtype computed in (exact: bf16 compute on CPU too)
      gd, st = sampling.with_dtype(model, jax.numpy.dtype(name), exact=True)
      run = lambda k: (lambda: jax.block_until_ready(sampling.generate(
          (gd, st), prompt_BxP, mask_BxP, jax.random.key(next(calls)), k,
          temperature=_TEMP.value)))
      t_steps = median_seconds(run(n), _REPEATS.value) - median_seconds(run(1), _REPEATS.value)
      decode[name] = t_steps / (n - 1)  # seconds per decode step (B tokens)
      del gd, st
    bandwidth = bench_common.copy_bandwidth()

  gen_tokens, score_tokens = b * n, b * (p + n)
  print(f"config: {_SHAPE.value} ({bench_common.describe(hf.config.to_dict())}), B={b} P={p} "
        f"N={n} T={_TEMP.value} {_DTYPE.value} (mixpo computes in "
        f"{compute_dtype((graphdef, state))}); jax {jax.__version__} on {jax.devices()[0].platform}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads); median of {_REPEATS.value} "
        f"(score: alternating rounds); hostmem: {hostmem.status or 'not applied'}; load average "
        f"{os.getloadavg()[0]:.2f}")
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
