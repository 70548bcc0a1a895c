r"""Peak host memory (RSS) and time of one RL train step: LoRA vs full fine-tuning, on CPU.

Each mode runs in its own process: build the policy at the given geometry (random weights,
nothing downloaded), its TrainState and one mix2 RL batch; run `train.make_train_step` once
(compiling it), reset the kernel's peak-RSS counter (VmHWM, /proc/self/clear_refs), run one more
step and read the peak: what a step holds resident (model, optimizer state, gradients, the
step's temporaries), without model init or compilation. Then `--steps` more steps are timed.
The children run with MIXPO_MALLOC=system so memory freed before the step (init temporaries)
is returned to the OS instead of being counted. Default geometry: Qwen2.5-0.5B.

  python experiments/bench_lora_memory.py                       # Qwen2.5-0.5B, rank 16
  python experiments/bench_lora_memory.py --layers=4 --vocab=32768 --json_out=lora_mem.json

Reported: peak RSS of each mode, their ratio (LoRA / full), and the median step time of each.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

_MODE = flags.DEFINE_enum("mode", "both", ["both", "full", "lora"], "both: run the two modes "
                          "in child processes and compare; full / lora: one mode (the child).")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank (every block projection adapted).")
_BASE_DTYPE = flags.DEFINE_string("lora_base_dtype", "float32", "LoRA: frozen base storage.")
_ROWS = flags.DEFINE_integer("rows", 8, "Train rows of the RL batch.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_RESPONSE = flags.DEFINE_integer("response_len", 192, "Response tokens per row.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps (>= 1) after the first (compiling) one.")
_REMAT = flags.DEFINE_bool("remat", True, "Rematerialise each decoder layer in the backward.")
# Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B).
_HIDDEN = flags.DEFINE_integer("hidden", 896, "hidden_size.")
_INTER = flags.DEFINE_integer("intermediate", 4864, "intermediate_size.")
_LAYERS = flags.DEFINE_integer("layers", 24, "num_hidden_layers.")
_HEADS = flags.DEFINE_integer("heads", 14, "num_attention_heads.")
_KV = flags.DEFINE_integer("kv_heads", 2, "num_key_value_heads.")
_VOCAB = flags.DEFINE_integer("vocab", 151936, "vocab_size.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the comparison as JSON here.")


def hf_config() -> dict:
  return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": _VOCAB.value,
          "hidden_size": _HIDDEN.value, "intermediate_size": _INTER.value,
          "num_hidden_layers": _LAYERS.value, "num_attention_heads": _HEADS.value,
          "num_key_value_heads": _KV.value, "max_position_embeddings": 32768,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True}


def _rss_now() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux >= 4.0: VmHWM := current RSS


def _peak() -> int:
  with open("/proc/self/status") as f:
    line = next(l for l in f if l.startswith("VmHWM:"))
  return int(line.split()[1]) * 1024


def one_mode(mode: str) -> dict:
  """Runs in the child: builds, steps, measures. Returns the figures (bytes, seconds)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from experiments.configs import default
  from mixpo import algorithms, models, train
  from mixpo.batch import make_batch
  from mixpo.models import lora

  lora_on = mode == "lora"
  param_dtype = jnp.dtype(_BASE_DTYPE.value) if lora_on else jnp.float32
  model = models.init_from_config(hf_config(), rng=0, param_dtype=param_dtype,
                                  remat=_REMAT.value)
  if lora_on:
    lora.apply(model, lora.LoraConfig(rank=_RANK.value, alpha=2.0 * _RANK.value))
  policy = train.Policy(model)
  del model
  optimizer = optax.adamw(1e-5)
  state = train.init_state(policy, optimizer, 0)
  b, p, n = _ROWS.value, _PROMPT.value, _RESPONSE.value
  rng = np.random.default_rng(0)
  logp = -rng.uniform(1.0, 4.0, (b, n)).astype(np.float32)
  batch = make_batch(rng.integers(0, _VOCAB.value, (b, p)), np.ones((b, p), np.int32),
                     rng.integers(0, _VOCAB.value, (b, n)), np.ones((b, n), np.float32),
                     old_logp_BxN=logp, guide_logp_BxN=logp - 0.5,
                     adv_B=rng.standard_normal(b).astype(np.float32),
                     kind_B=np.arange(b, dtype=np.int32) % 3, group_B=np.arange(b) // 2)
  step = train.make_train_step(policy, optimizer, train.StepConfig(
      objective=algorithms.get(default.get_config().algo).objective_config()))
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - t0
  rss_before = _rss_now()
  _reset_peak()
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_peak, second_s = _peak(), time.perf_counter() - t0
  times = [second_s]
  for _ in range(_STEPS.value - 1):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
  return {"mode": mode, "trained_params": count(state.params),
          "frozen_params": count(policy.base) if policy.base is not None else 0,
          "rss_before_step_bytes": rss_before, "peak_rss_bytes": step_peak,
          "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "first_step_s": first_s, "step_s": statistics.median(times),
          "loss": float(metrics["loss/loss"])}


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if _MODE.value != "both":
    print("RESULT " + json.dumps(one_mode(_MODE.value)), flush=True)
    return
  passed = [a for a in sys.argv[1:] if not a.startswith(("--mode", "--json_out"))]
  out = {"geometry": hf_config(), "rows": _ROWS.value, "tokens_per_row":
         _PROMPT.value + _RESPONSE.value, "rank": _RANK.value, "remat": _REMAT.value,
         "lora_base_dtype": _BASE_DTYPE.value}
  for mode in ("full", "lora"):  # one after the other: the two peaks never overlap.
    env = dict(os.environ, MIXPO_MALLOC="system")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--mode={mode}", *passed],
                          capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"--mode={mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out[mode] = json.loads(lines[-1][len("RESULT "):])
  full, lo = out["full"], out["lora"]
  out["peak_rss_ratio"] = lo["peak_rss_bytes"] / full["peak_rss_bytes"]
  out["step_time_ratio"] = lo["step_s"] / full["step_s"]
  gib = 2**30
  for m in (full, lo):
    print(f"{m['mode']:>5}: trained {m['trained_params'] / 1e6:9.2f} M params, step peak RSS "
          f"{m['peak_rss_bytes'] / gib:6.2f} GiB (resident before it "
          f"{m['rss_before_step_bytes'] / gib:.2f}), first step {m['first_step_s']:.1f} s, "
          f"step {m['step_s']:.2f} s")
  print(f"LoRA / full: step peak RSS {out['peak_rss_ratio']:.1%}, step time "
        f"{out['step_time_ratio']:.2f}x")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
