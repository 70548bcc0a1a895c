"""Training throughput of mixpo's CausalLM vs transformers + torch on the same config.

One step = forward + backward + AdamW update on a [batch, seq] next-token loss. Both sides train
the same random checkpoint (written by transformers, read back by `mixpo.models.from_pretrained`).
The mixpo step is --mixpo_step: `donated` (default) a jitted step over the split parameters and
optax state, donated (what mixpo's trainer does: `train.make_sft_step` donates its state too);
`nnx` the Flax guide's `nnx.jit` over the model and an `nnx.Optimizer` (nothing donated: every
step allocates a new copy of the parameters and both AdamW moments). By default the process is
a user's script (no `mixpo.hostmem.keep_freed_memory()`); --keep_freed_memory is the binaries'
setting. --dtype=bfloat16:
mixpo computes in bf16 from float32 master weights and optimizer state; torch runs under
bf16 autocast (float32 weights). Both sides are warmed up and timed in alternating rounds (the
median round is reported) so a machine shared with other jobs disturbs both alike; the warm-up
alternates step by step so that the process's heap is already in the layout the timed rounds
run in (BUILD_NOTES: with one side warmed up after the other, mixpo's first timed round paged
its buffers back in).

  python experiments/bench_model.py
  python experiments/bench_model.py --batch=64 --seq=128 --steps=5 --rounds=3
  python experiments/bench_model.py --shape=qwen2.5-0.5b --batch=4 --seq=256 --steps=2
"""

import contextlib
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import bench_common  # noqa: E402
from mixpo import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "tiny", sorted(bench_common.SHAPES),
                  "Model geometry; tiny takes --hidden/--layers/... (untied Llama).")
flags.DEFINE_enum("dtype", "float32", bench_common.DTYPES, "Compute dtype (both frameworks).")
flags.DEFINE_integer("batch", 64, "Sequences per step.")
flags.DEFINE_integer("seq", 128, "Tokens per sequence.")
flags.DEFINE_integer("steps", 5, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Alternating timed rounds per framework (median reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per framework before timing.")
flags.DEFINE_integer("hidden", 256, "hidden_size.")
flags.DEFINE_integer("layers", 4, "num_hidden_layers.")
flags.DEFINE_integer("heads", 8, "num_attention_heads.")
flags.DEFINE_integer("kv_heads", 2, "num_key_value_heads.")
flags.DEFINE_integer("intermediate", 688, "intermediate_size.")
flags.DEFINE_integer("vocab", 512, "vocab_size.")
flags.DEFINE_enum("attention_impl", "auto", list(models.config.ATTENTION_IMPLS), "mixpo attention.")
flags.DEFINE_bool("remat", False, "mixpo: rematerialise each layer.")
flags.DEFINE_bool("torch", True, "Also time transformers + torch.")
flags.DEFINE_bool("keep_freed_memory", False, "Apply mixpo.hostmem.keep_freed_memory() first, "
                  "as the binaries do (process-wide glibc settings, torch's allocations included); "
                  "False (default): a process that has not (a notebook, a user's own script).")
flags.DEFINE_enum("mixpo_step", "donated", ["donated", "nnx"], "mixpo's train step (docstring).")


def hf_config_dict():
  if FLAGS.shape != "tiny":
    return bench_common.hf_config(FLAGS.shape, 2 * FLAGS.seq)
  return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=FLAGS.vocab,
              hidden_size=FLAGS.hidden, intermediate_size=FLAGS.intermediate,
              num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.heads,
              num_key_value_heads=FLAGS.kv_heads, max_position_embeddings=2 * FLAGS.seq,
              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


def hf_model():
  """The random transformers model both sides train (seed 0)."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf = hf_config_dict()
  config = transformers.AutoConfig.for_model(
      hf["model_type"], **{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
  return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def mixpo_stepper(hf, tokens_BxT):
  """Returns step() running one jitted train step (--mixpo_step, --shape, --dtype, ...) of `hf`'s
  weights as `mixpo.models.from_pretrained` loads them."""
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model = models.from_pretrained(tmp, remat=FLAGS.remat, attention_impl=FLAGS.attention_impl,
                                   dtype=jnp.dtype(FLAGS.dtype), param_dtype=jnp.float32)
  tokens_BxT = jnp.asarray(tokens_BxT)

  def loss_fn(model, tokens_BxT):
    logits_BxTxV = model(tokens_BxT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT[:, 1:]).mean()

  if FLAGS.mixpo_step == "donated":
    return bench_common.adamw_stepper(model, loss_fn, tokens_BxT, 1e-4)
  from flax import nnx
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.01), wrt=nnx.Param)

  @nnx.jit
  def update(model, optimizer, tokens_BxT):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens_BxT)
    optimizer.update(model, grads)
    return loss

  return lambda: update(model, optimizer, tokens_BxT).block_until_ready()


def torch_stepper(model, tokens_BxT):
  import torch
  model = model.train()
  autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)
              if FLAGS.dtype == "bfloat16" else contextlib.nullcontext())
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  tokens = torch.tensor(np.asarray(tokens_BxT), dtype=torch.long)

  def step():
    with autocast():
      loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss  # HF shifts labels itself.
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  return step


def timed(step, n):
  start = time.perf_counter()
  for _ in range(n):
    step()
  return time.perf_counter() - start


def main(_):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  if FLAGS.keep_freed_memory:
    hostmem.keep_freed_memory()
  vocab = hf_config_dict()["vocab_size"]
  tokens_BxT = np.random.RandomState(0).randint(
      0, vocab, (FLAGS.batch, FLAGS.seq + 1)).astype(np.int32)
  print(f"shape {FLAGS.shape} ({bench_common.describe(hf_config_dict())}), {FLAGS.dtype}, "
        f"B={FLAGS.batch} T={FLAGS.seq}")
  tokens_per_step = FLAGS.batch * FLAGS.seq
  hf = hf_model()
  steppers = {"mixpo": mixpo_stepper(hf, tokens_BxT)}
  if FLAGS.torch:
    import torch
    steppers["transformers"] = torch_stepper(hf, tokens_BxT)
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}")
  else:
    del hf
  print(f"jax {jax.__version__} devices={jax.devices()}; hostmem: {hostmem.status or 'not applied'}"
        f"; mixpo step: {FLAGS.mixpo_step}; load average {os.getloadavg()[0]:.2f}")
  for _ in range(FLAGS.warmup):
    for step in steppers.values():
      timed(step, 1)
  rates = {name: [] for name in steppers}
  for i in range(FLAGS.rounds):
    for name in (list(steppers) if i % 2 == 0 else list(steppers)[::-1]):  # order alternates
      step = steppers[name]
      rates[name].append(FLAGS.steps * tokens_per_step / timed(step, FLAGS.steps))
  for name, r in rates.items():
    print(f"{name:>12}: {statistics.median(r):10.0f} train tokens/s "
          f"(rounds: {', '.join(f'{x:.0f}' for x in r)})")
  if FLAGS.torch:
    ratio = statistics.median(rates["mixpo"]) / statistics.median(rates["transformers"])
    print(f"ratio mixpo / transformers: {ratio:.2f}x")


if __name__ == "__main__":
  app.run(main)
