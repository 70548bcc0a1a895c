r"""vLLM rollout backend benchmark: useful tokens/s on the RL-shaped batch, and weight-sync time.

--work=rl_shaped: 8 prompts × 8 samples = 64 rows of random prompt tokens (--prompt_len), each
row with its own token budget drawn once from a fixed seed (`bench_common.rl_lengths`, the
workload of bench_rollout.py --work=rl_shaped: log-normal, clipped to [1, 512], mean 142;
printed). Random weights and no EOS, so every row runs
exactly its budget: useful tokens = the sum of the budgets. Two sides on the same engine,
alternating, one warm-up call each, median of --rounds:
  mixpo   `VllmEngine.generate` (padded [B, P] arrays in, a `sampling.Rollout` out)
  vllm    `LLM.generate` on the same engine with the same per-row SamplingParams (no wrapper)
--work=sync: `VllmEngine.update_weights` of a float32 policy into the engine (a bf16 engine by
default: the trainer's master weights, cast by vLLM as it copies), median of --rounds, against
one mixpo-backend generate call of the RL-shaped batch at the same geometry (target ≤ 10 %).

  python experiments/bench_vllm.py --work=rl_shaped --shape=tiny --dtype=bfloat16 --rounds=3
  python experiments/bench_vllm.py --work=sync --shape=qwen2.5-0.5b --rounds=3

Needs the `vllm` extra (README "Install"). Checkpoints are written to a temporary directory.
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import bench_common  # noqa: E402
from mixpo import models  # noqa: E402

_WORK = flags.DEFINE_enum("work", "rl_shaped", ["rl_shaped", "sync"], "What to measure.")
_SHAPE = flags.DEFINE_enum("shape", "tiny", sorted(bench_common.SHAPES), "Model geometry.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", bench_common.DTYPES, "The engine's dtype.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "P, prompt tokens per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed calls per side (median).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, prompts and budgets.")
_EAGER = flags.DEFINE_bool("eager", True, "enforce_eager (no torch.compile); --noeager compiles "
                           "(minutes per engine build on CPU).")
_KV_GIB = flags.DEFINE_float("kv_cache_gib", 1.0, "The engine's KV cache, GiB.")


def _checkpoint(directory: str, shape: str, seed: int, max_positions: int):
  """A random `shape` model written as an HF checkpoint (float32); returns the mixpo model."""
  hf = bench_common.hf_config(shape, max_positions)
  if shape == "tiny":  # the architecture of the rollout figures in BUILD_NOTES
    hf = dict(hf, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
  model = models.init_from_config(hf, rng=seed)
  models.save_pretrained(model, directory)
  return model, hf


def main(argv):
  del argv
  from mixpo.engines.vllm import VllmEngine  # noqa: PLC0415
  from vllm import SamplingParams  # noqa: PLC0415
  from vllm.inputs import TokensPrompt  # noqa: PLC0415
  budget_B = bench_common.rl_lengths(64, 512, _SEED.value)
  b, p = len(budget_B), _PROMPT.value
  with tempfile.TemporaryDirectory() as tmp:
    model, hf = _checkpoint(tmp, _SHAPE.value, _SEED.value, p + int(budget_B.max()) + 1)
    t0 = time.perf_counter()
    engine = VllmEngine(tmp, dtype=_DTYPE.value, seed=_SEED.value, kv_cache_gib=_KV_GIB.value,
                        enforce_eager=_EAGER.value)
    build_s = time.perf_counter() - t0
  rng = np.random.default_rng(_SEED.value)
  prompt_BxP = np.repeat(rng.integers(1, hf["vocab_size"], (b // 8, p)), 8, axis=0)
  mask_BxP = np.ones((b, p), np.int32)
  calls = iter(range(1 << 30))

  def mixpo_generate():
    out = engine.generate(prompt_BxP, mask_BxP, jax.random.key(next(calls)), budget_B)
    assert (out.lengths_B == budget_B).all()

  def vllm_generate():
    seeds = np.random.default_rng(next(calls)).integers(0, 2**31, b)
    params = [SamplingParams(temperature=1.0, max_tokens=int(n), ignore_eos=True, logprobs=0,
                             seed=int(s), detokenize=False) for n, s in zip(budget_B, seeds)]
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=r.tolist()) for r in prompt_BxP],
                               params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == budget_B.tolist()

  useful = int(budget_B.sum())
  print(f"config: {_SHAPE.value} ({bench_common.describe(hf)}), {_DTYPE.value} engine "
        f"(enforce_eager={_EAGER.value}, built in {build_s:.1f} s); RL-shaped batch: {b} rows "
        f"({b // 8} prompts × 8), P={p}, budgets mean {budget_B.mean():.1f}, median "
        f"{np.median(budget_B):.0f}, max {budget_B.max()}, {(budget_B == 512).sum()} at the cap, "
        f"{useful} useful tokens; median of {_ROUNDS.value}, alternating")
  if _WORK.value == "rl_shaped":
    t = bench_common.alternating_medians({"mixpo": mixpo_generate, "vllm": vllm_generate},
                                         _ROUNDS.value, log=lambda line: print(line, flush=True))
    for name, s in t.items():
      print(f"generate  {name:6s} {useful / s:8.0f} useful tok/s  ({s:.2f} s)")
    print(f"mixpo backend / plain vLLM: {t['vllm'] / t['mixpo']:.2f}x")
    return
  t = bench_common.alternating_medians({"sync": lambda: engine.update_weights(model),
                                        "generate": mixpo_generate}, _ROUNDS.value,
                                       log=lambda line: print(line, flush=True))
  sent = engine.update_weights(model)
  print(f"weight sync  {t['sync']:.2f} s ({sent} tensors, float32 → {_DTYPE.value}); generate "
        f"of the RL-shaped batch {t['generate']:.2f} s; sync / generate = "
        f"{t['sync'] / t['generate']:.1%}")


if __name__ == "__main__":
  app.run(main)
