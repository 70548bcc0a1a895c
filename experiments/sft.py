r"""Supervised fine-tuning on a task's reference answers; makes the built-in guide and weak policy.

  python experiments/sft.py --init=builtin --out=/tmp/guide --steps=1200
  python experiments/sft.py --init=/path/to/hf_checkpoint --out=/tmp/sft --steps=500 --lr=1e-5

--init=builtin starts from a random tiny char-level model (experiments/configs/default.py's
`builtin` recipe); any other value is a Hugging Face checkpoint directory. The result is written
in Hugging Face format (config.json + safetensors + tokenizer) with an eval summary.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_INIT = flags.DEFINE_string("init", "builtin", "'builtin' or a Hugging Face checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (Hugging Face format).")
_TASK = flags.DEFINE_string("task", "addition", "Registered task name.")
_DIGITS = flags.DEFINE_integer("digits", 2, "Addition task: digits per operand.")
_TERMS = flags.DEFINE_integer("terms", 2, "Addition task: number of operands.")
_STEPS = flags.DEFINE_integer("steps", 1200, "SFT steps.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Examples per step.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 1, "Data / init seed.")
_EVAL = flags.DEFINE_integer("eval_size", 300, "Eval examples (greedy accuracy at the end).")


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  if not _OUT.value:
    raise app.UsageError("--out is required.")
  from experiments.configs import default
  from mixpo import builtin, models, rl
  from mixpo.data import char_tokenizer, get_task
  from mixpo.rewards import RewardRunner
  task = get_task(_TASK.value, digits=_DIGITS.value, terms=_TERMS.value)
  if _INIT.value == "builtin":
    b = default.get_config().builtin
    tokenizer = char_tokenizer()
    hf = builtin.tiny_hf_config(tokenizer, b.hidden, b.layers, b.heads, b.kv_heads,
                                b.intermediate, b.max_positions)
    model = models.init_from_config(hf, rng=_SEED.value)
  else:
    tokenizer = models.load_tokenizer(_INIT.value)
    model = models.from_pretrained(_INIT.value)
  model = builtin.sft(model, tokenizer, task, steps=_STEPS.value, batch_size=_BATCH.value,
                      learning_rate=_LR.value, seed=_SEED.value,
                      log_every=max(_STEPS.value // 10, 1))
  models.save_pretrained(model, _OUT.value)
  tokenizer.save_pretrained(_OUT.value)
  with RewardRunner([(task.reward_fn, 1.0)]) as runner:
    result = rl.evaluate(model, tokenizer, task.eval_examples(_EVAL.value), runner,
                         max_new_tokens=8)
  with open(os.path.join(_OUT.value, "sft_eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  logging.info("eval: %s", result)
  print("eval:", result)


if __name__ == "__main__":
  app.run(main)
