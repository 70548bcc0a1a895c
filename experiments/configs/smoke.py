r"""Smoke test: every algorithm end to end in well under 2 minutes on CPU.

  python experiments/train.py --config=smoke --workdir=/tmp/smoke --config.algo=mix1
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  b = c.builtin
  b.hidden, b.layers, b.heads, b.kv_heads, b.intermediate = 32, 1, 2, 1, 64
  b.batch_size, b.guide_steps, b.policy_steps = 32, 20, 5
  c.rollout.groups, c.rollout.n, c.rollout.m, c.rollout.zero_groups = 4, 4, 2, 4
  c.num_steps = 3
  c.eval_every = 2
  c.eval_size = 16
  c.eval_batch_size = 16
  c.checkpoint_every = 2
  c.log_samples_every = 1
  c.progress = False
  return c
