"""A cross-check of bench_rollout / bench_model written the way a user's own script would be.

Nothing here comes from the repo's benchmarks (no bench_common, no hostmem call unless
--keep_freed_memory): one random-weight Qwen2 checkpoint per layer count is written by
transformers (`Qwen2Config`, `save_pretrained`), then read back by both libraries' public loaders
(`mixpo.models.from_pretrained`; `AutoModelForCausalLM.from_pretrained(..., dtype=float32)`).

  score  mixpo: `sampling.score(model, tokens, mask)` on numpy inputs, result waited for with
         `jax.block_until_ready`; transformers (eval, inference_mode): forward with the
         attention mask + log_softmax + gather of the next tokens.
  train  one step of next-token cross-entropy, forward + backward + AdamW (lr 1e-4, weight decay
         0.01) in both: mixpo as a user writes it with flax.nnx (`nnx.Optimizer` over
         `optax.adamw`, `nnx.jit`, `nnx.value_and_grad`, the model's own logits and optax's
         integer-label cross-entropy); transformers: `model(ids, labels=ids).loss`,
         `loss.backward()`, `torch.optim.AdamW`.

Random tokens over the whole vocabulary; --mask=ones (every token real) or --mask=response (a
left-padded prompt of 1/4..1/2 of T, then the response: the rows an RL batch scores). Each pair
of calls is warmed up (mixpo's compile is not timed), then timed in --rounds alternating rounds
(the order flips every round); the median of each is printed with the ratio and `uptime`'s
load, one `result {json}` line per measurement.

  python experiments/bench_independent.py --layers=2,6,24 --rounds=3
  python experiments/bench_independent.py --layers=6,24 --what=train --batch=8 --seq=256
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LAYERS = flags.DEFINE_list("layers", ["2", "6", "24"], "Layer counts (Qwen2.5-0.5B width).")
_WHAT = flags.DEFINE_list("what", ["score"], "score and/or train.")
_BATCH = flags.DEFINE_integer("batch", 8, "B.")
_SEQ = flags.DEFINE_integer("seq", 256, "T (tokens per row, scored or trained on).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating timed rounds (median reported).")
_MASK = flags.DEFINE_enum("mask", "ones", ["ones", "response"], "Score mask (docstring).")
_HIDDEN = flags.DEFINE_integer("hidden", 896, "hidden_size (smoke tests shrink the model).")
_FFN = flags.DEFINE_integer("intermediate", 4864, "intermediate_size.")
_HEADS = flags.DEFINE_integer("heads", 14, "num_attention_heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "num_key_value_heads.")
_VOCAB = flags.DEFINE_integer("vocab", 151936, "vocab_size.")
_KEEP_FREED = flags.DEFINE_bool(
    "keep_freed_memory", False, "Call mixpo.hostmem.keep_freed_memory() first, as the repo's "
    "binaries do (default: a user's script, which does not).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: default).")
_SEPARATE = flags.DEFINE_enum(
    "only", "both", ["both", "mixpo", "transformers"],
    "Time one library alone (the other's model is not built): the single-framework process.")
_ATTN = flags.DEFINE_string("hf_attn", "sdpa", "transformers attn_implementation.")
_MIXPO_TRAIN = flags.DEFINE_enum(
    "mixpo_train", "nnx", ["nnx", "donated", "sft"],
    "mixpo's train step: nnx = `nnx.jit` over model and `nnx.Optimizer`, as Flax's guide writes "
    "it (nothing donated); donated = bench_model.py's step (`bench_common.adamw_stepper`: "
    "jax.jit over split params + optax state, donated); sft = mixpo's own public step "
    "(`train.make_sft_step`: chunked token_logp NLL, state donated, non-finite guard).")


def load_avg() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_checkpoint(layers: int, path: str) -> None:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  torch.manual_seed(layers)
  config = transformers.Qwen2Config(
      vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, intermediate_size=_FFN.value,
      num_hidden_layers=layers, num_attention_heads=_HEADS.value,
      num_key_value_heads=_KV_HEADS.value, max_position_embeddings=max(1024, _SEQ.value),
      rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
      use_sliding_window=False)
  transformers.Qwen2ForCausalLM(config).save_pretrained(path)


def inputs(vocab: int):
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(0)
  b, t = _BATCH.value, _SEQ.value
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  if _MASK.value == "response":
    for i in range(b):  # left padding: a prompt of length t/4..t/2 starts at column pad
      pad = int(rng.integers(0, t // 4 + 1))
      mask[i, :pad] = 0
      tokens[i, :pad] = 0
  return tokens, mask


def score_fns(path: str):
  """{name: fn} of each built library's score call, and a check of their agreement."""
  import numpy as np  # noqa: PLC0415
  tokens, mask = inputs(_VOCAB.value)
  fns = {}
  out = {}
  if _SEPARATE.value in ("both", "mixpo"):
    import jax  # noqa: PLC0415
    from mixpo import models, sampling  # noqa: PLC0415
    model = models.from_pretrained(path)

    def mixpo_score():
      out["mixpo"] = jax.block_until_ready(sampling.score(model, tokens, mask))
    fns["mixpo"] = mixpo_score
  if _SEPARATE.value in ("both", "transformers"):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=_ATTN.value).eval()
    ids, am = torch.from_numpy(tokens).long(), torch.from_numpy(mask).long()

    def hf_score():
      with torch.inference_mode():
        logits = hf(ids, attention_mask=am).logits[:, :-1]
        logp = torch.log_softmax(logits, dim=-1)
        out["transformers"] = torch.gather(logp, -1, ids[:, 1:, None])[..., 0]
    fns["transformers"] = hf_score

  def agreement():
    if len(out) < 2:
      return None
    real = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    diff = np.abs(np.asarray(out["mixpo"])[:, 1:] - out["transformers"].numpy())
    return float(diff[real].max())
  return fns, agreement


def train_fns(path: str):
  tokens, _ = inputs(_VOCAB.value)
  fns = {}
  if _SEPARATE.value in ("both", "mixpo"):
    import jax  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415
    from mixpo import models  # noqa: PLC0415
    model = models.from_pretrained(path)
    ids = jax.numpy.asarray(tokens)
    if _MIXPO_TRAIN.value == "donated":
      from experiments import bench_common  # noqa: PLC0415
      loss = lambda m, x: optax.softmax_cross_entropy_with_integer_labels(
          m(x[:, :-1]), x[:, 1:]).mean()
      fns["mixpo"] = bench_common.adamw_stepper(model, loss, ids, 1e-4)
    elif _MIXPO_TRAIN.value == "sft":
      import numpy as np  # noqa: PLC0415
      from mixpo import batch as mbatch, train  # noqa: PLC0415
      policy = train.Policy(model)
      opt = optax.adamw(1e-4, weight_decay=0.01)
      holder = [train.init_state(policy, opt, 0)]
      sft_step = train.make_sft_step(policy, opt)
      ones = np.ones_like(tokens)
      batch = mbatch.make_batch(tokens[:, :1], ones[:, :1], tokens[:, 1:], ones[:, 1:])

      def mixpo_sft():
        holder[0], metrics = sft_step(holder[0], batch)
        return float(metrics["loss"])
      fns["mixpo"] = mixpo_sft
    else:
      optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.01), wrt=nnx.Param)

      @nnx.jit
      def train_step(model, optimizer, ids):
        def loss_fn(model):
          logits = model(ids[:, :-1])
          return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

      fns["mixpo"] = lambda: float(train_step(model, optimizer, ids))
  if _SEPARATE.value in ("both", "transformers"):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=_ATTN.value).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01)
    ids_t = torch.from_numpy(tokens).long()

    def hf_step():
      loss = hf(ids_t, labels=ids_t).loss  # transformers shifts the labels itself
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      return loss.item()
    fns["transformers"] = hf_step
  return fns, lambda: None


def alternate(fns: dict, rounds: int) -> dict:
  """{name: median seconds}: one warm-up call each, then `rounds` rounds of one call each, the
  order reversed every other round so neither always runs right after the other."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  names = list(fns)
  for i in range(rounds):
    for name in (names if i % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}, times


def main(argv):
  del argv
  if _KEEP_FREED.value:
    from mixpo import hostmem  # noqa: PLC0415
    hostmem.keep_freed_memory()
  import torch  # noqa: PLC0415
  if _TORCH_THREADS.value:
    torch.set_num_threads(_TORCH_THREADS.value)
  for what in _WHAT.value:
    for layers in map(int, _LAYERS.value):
      with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(layers, tmp)
        fns, agreement = (score_fns if what == "score" else train_fns)(tmp)
        load_before = load_avg()
        medians, times = alternate(fns, _ROUNDS.value)
        tokens = _BATCH.value * _SEQ.value
        row = dict(what=what, layers=layers, batch=_BATCH.value, seq=_SEQ.value,
                   mask=_MASK.value, rounds=_ROUNDS.value,
                   seconds={k: round(v, 4) for k, v in medians.items()},
                   rounds_s={k: [round(x, 3) for x in v] for k, v in times.items()},
                   tok_s={k: round(tokens / v, 1) for k, v in medians.items()},
                   torch_threads=torch.get_num_threads(),
                   keep_freed_memory=_KEEP_FREED.value, hf_attn=_ATTN.value,
                   mixpo_train=_MIXPO_TRAIN.value if what == "train" else None,
                   load=f"{load_before} -> {load_avg()}")
        if len(medians) == 2:
          row["ratio"] = round(medians["transformers"] / medians["mixpo"], 3)
          row["max_abs_dlogp"] = agreement()
        print("result " + json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
