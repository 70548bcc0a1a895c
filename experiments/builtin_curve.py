r"""Greedy eval accuracy of a built-in recipe's model along its SFT: how many steps make a guide
or a weak start (the numbers behind a config's `builtin.guide_steps` / `policy_steps`).

  python experiments/builtin_curve.py --config=experiments/configs/reasoning.py --steps=400 \
      --eval_at=150,200,250,300
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 400, "SFT steps (the recipe's learning rate schedule).")
_EVAL_AT = flags.DEFINE_list("eval_at", ["100", "200", "300", "400"], "Steps to evaluate at.")
_EVAL_SIZE = flags.DEFINE_integer("eval_size", 100, "Held-out problems.")
_SEED_OFFSET = flags.DEFINE_integer("seed_offset", 2, "SFT seed = builtin.seed + this (1: the "
                                    "guide's stream, 2: the weak start's).")


def main(argv):
  del argv
  from mixpo import hostmem
  hostmem.keep_freed_memory()
  from mixpo import builtin, models, rl
  from mixpo.data import char_tokenizer, get_task
  from mixpo.data.tokenizer import DEFAULT_ALPHABET
  from mixpo.rewards import RewardRunner
  c = _CONFIG.value
  b = c.builtin
  task = get_task(b.task, **b.task_kwargs)
  tok = char_tokenizer(b.get("alphabet") or DEFAULT_ALPHABET)
  hf = builtin.tiny_hf_config(tok, b.hidden, b.layers, b.heads, b.kv_heads, b.intermediate,
                              b.max_positions)
  model = models.init_from_config(hf, rng=b.seed)
  examples = task.eval_examples(_EVAL_SIZE.value)
  at = {int(s) for s in _EVAL_AT.value}
  t0 = time.time()
  with RewardRunner([(task.reward_fn, 1.0)], timeout_s=60) as runner:

    def report(step, m):
      if step in at:
        acc = rl.evaluate(m, tok, examples, runner, c.rollout.max_new_tokens,
                          batch_size=len(examples))
        print(f"step {step}: greedy eval accuracy {acc['accuracy']:.3f} ({time.time() - t0:.0f} s)",
              flush=True)

    builtin.sft(model, tok, task, steps=_STEPS.value, batch_size=b.batch_size,
                learning_rate=b.learning_rate, seed=b.seed + _SEED_OFFSET.value, log_every=1,
                callback=report, max_answer_tokens=b.get("max_answer_tokens", 5))


if __name__ == "__main__":
  app.run(main)
