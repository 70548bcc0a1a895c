r"""A real run: Mix-2 on Qwen2.5-Math-1.5B with a stronger guide, from local files (not run in CI).

Prepare (once, on a machine with internet): download Qwen/Qwen2.5-Math-1.5B and a guide with
the same tokenizer and vocabulary size (Qwen/Qwen2.5-Math-1.5B-Instruct; the 7B models pad
their vocabulary to 152064 rows, the 1.5B ones to 151936, which the run refuses) to local
directories, and a math dataset as JSONL/Parquet with "prompt" and "answer" fields (e.g.
DAPO-Math-17k). Then:

  python experiments/train.py --config=qwen2.5-math-1.5b --workdir=/ckpt/mix2-qwen1.5b \
      --config.policy=/models/Qwen2.5-Math-1.5B \
      --config.guide.path=/models/Qwen2.5-Math-1.5B-Instruct \
      --config.task_kwargs.train_path=/data/dapo-math-17k.parquet \
      --config.task_kwargs.eval_path=/data/math500.jsonl

On a TPU pod / GPU cluster add --distributed (docs/scaling.md). What it needs per device, without
the hardware: python experiments/aot_compile.py --topology=v5e-16 --config=qwen2.5-math-1.5b
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.policy = "/models/Qwen2.5-Math-1.5B"  # HF checkpoint directory.
  c.guide.path = "/models/Qwen2.5-Math-1.5B-Instruct"  # must share the policy's tokenizer / vocab.
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.task = "file"
  c.task_kwargs.update({
      "train_path": "/data/dapo-math-17k.parquet", "eval_path": "/data/math500.jsonl",
      "prompt_field": "prompt", "answer_field": "answer", "chat_template": True,
      "max_prompt_tokens": 1024,
  })
  c.reward.timeout_s = 10.0
  c.rollout.overlong_shaping = True  # DAPO: soft penalty over the last L_cache tokens of L_max.
  c.rollout.max_new_tokens = 3072  # + 1024 prompt tokens = Qwen2.5-Math's 4096-token context.
  c.rollout.overlong_cache = 512
  # Prompts per batch (DAPO uses 512), sized for a v5e-16 slice (16 GiB chips; raise them with
  # the mesh): θ_old and guide scoring take the whole batch in one program, and at 64 groups
  # (48 rows × 4096 tokens per chip) θ_old's needed 14.69 GiB of temporaries where the run left
  # 14.67 (experiments/aot_compile.py, docs/scaling.md).
  c.rollout.groups = 32
  c.rollout.n = 7
  c.rollout.m = 1  # LUFFY's split: 7 policy samples and one guide trace per prompt.
  c.rollout.zero_groups = 16
  c.rollout.max_num_gen_batches = 3
  c.rollout.temperature = 1.0
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.1
  # (32 + 16) groups × 8 rows = 384 rows: 8 updates of 48 rows, each in 3 micro-batches of 16
  # (rows divide over data × fsdp: one row of 4096 tokens per device on 16 devices; with 3 rows
  # per device the v5e-16 train step needed 16.08 of 16 GiB: docs/scaling.md).
  c.step.num_minibatches = 8
  c.step.num_micro_batches = 3
  c.mesh_shape = (1, -1, 1)  # fsdp over every device: 18.5 GB of fp32 weights + AdamW.
  c.objective.dual_clip = 3.0
  c.num_steps = 500
  c.eval_every = 25
  c.eval_size = 500
  c.eval_batch_size = 128
  c.checkpoint_every = 25
  c.keep_checkpoints = 3
  return c
