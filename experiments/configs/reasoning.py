r"""The reasoning regime: chain-of-thought column arithmetic with a tiny char-level guide and policy.

  python experiments/train.py --config=experiments/configs/reasoning.py --workdir=workdir/reasoning

Responses are worked solutions of 40-170 characters ending in \boxed{answer}; rewards go through
answer extraction and math-verify in the reward runner, with DAPO's overlong shaping on. The
guide is supervised on the same solution style as the policy, or on another one with
--config.builtin.guide_task_kwargs.style=words (the "need not be close" setting).
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.task = "cot_arithmetic"
  c.task_kwargs = {"digits": 3, "ops": "+", "style": "columns"}
  b = c.builtin
  b.task, b.task_kwargs = c.task, dict(c.task_kwargs)
  b.guide_task_kwargs = {}  # e.g. {"style": "words"}: a guide that writes differently
  from mixpo.data.cot import COT_ALPHABET  # noqa: PLC0415
  b.alphabet = COT_ALPHABET
  b.hidden, b.layers, b.heads, b.kv_heads, b.intermediate = 128, 3, 4, 2, 384
  b.max_positions = 192
  b.max_answer_tokens = 176  # the longest solution (words style, 3 digits) plus EOS
  b.batch_size = 64
  b.learning_rate = 3e-3
  b.guide_steps = 1500
  b.policy_steps = 175  # greedy eval accuracy 0.01 after 150 steps, 0.19 after 200 (see BUILD_NOTES)
  c.rollout.max_new_tokens = 176
  c.rollout.overlong_shaping = True
  c.rollout.overlong_cache = 32  # the penalty ramps over the last 32 tokens of the budget
  c.rollout.groups, c.rollout.n, c.rollout.m, c.rollout.zero_groups = 8, 8, 4, 8
  c.eval_size = 200
  c.eval_batch_size = 200
  return c
