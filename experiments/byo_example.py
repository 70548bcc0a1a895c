r"""Bring your own model, data and reward: the whole path with flags only, on CPU in minutes.

  python experiments/byo_example.py --workdir=/tmp/byo

Stands in for your real files: builds a tiny Hugging Face checkpoint with a byte-level BPE
tokenizer and a ChatML chat template, a JSONL dataset of word problems
({"question", "answer", "solution"}), and a reward module (`my_rewards.py`, TRL signature). Then
runs, each as the command you would type (printed before it runs):
  1. sft.py        — warm-start the policy on the dataset's worked solutions;
  2. train.py      — DAPO on the file task, the task's math verifier plus the custom reward;
  3. evaluate.py   — mean@4 / pass@4 / maj@4 with 95 % intervals on the held-out file;
and leaves the exported policy in <workdir>/run/export (Hugging Face format). For a real Qwen
checkpoint replace the paths, drop the tiny sizes (--config.rollout.max_new_tokens, ...), and add
--config.guide.path=<guide checkpoint> --config.algo=mix2 for the guided methods.
"""

import json
import os
import random
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mixpo_byo", "Where everything is written.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 150, "SFT steps of the warm start.")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 6, "RL steps.")

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
# ChatML, as Qwen2.5 uses (a string prompt becomes one user turn).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

REWARD_MODULE = '''"""A custom reward (TRL signature): 0.1 for a short answer ending in \\\\boxed{...}."""


def boxed_format(prompts, completions, **columns):
  del prompts, columns
  return [0.1 if "\\\\boxed{" in c and len(c) < 80 else 0.0 for c in completions]
'''


def problems(n: int, seed: int) -> list[dict]:
  """Word problems "Tom has 3 apples and buys 4 more..." with answer and worked solution."""
  rng = random.Random(seed)
  names, things = ["Tom", "Ana", "Li", "Sam"], ["apples", "books", "coins", "cards"]
  rows = []
  for _ in range(n):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    name, thing = rng.choice(names), rng.choice(things)
    rows.append({"question": f"{name} has {a} {thing} and gets {b} more. How many {thing}?",
                 "answer": str(a + b), "solution": f"{a}+{b}={a + b}. \\boxed{{{a + b}}}"})
  return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def make_tokenizer(rows: list[dict], vocab_size: int = 320):
  """A byte-level BPE tokenizer trained on the rows' text, with ChatML specials and template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [r["question"] + " " + r["solution"] for r in rows]
  tok.train_from_iterator(corpus + [CHAT_TEMPLATE], trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", padding_side="left")
  fast.chat_template = CHAT_TEMPLATE
  return fast


def make_checkpoint(directory: str, tokenizer, hidden: int = 64, layers: int = 2,
                    seed: int = 0) -> str:
  """A random tiny Qwen2-architecture checkpoint over `tokenizer`, in Hugging Face format."""
  from mixpo import builtin, models
  hf = builtin.tiny_hf_config(tokenizer, hidden=hidden, layers=layers, heads=4, kv_heads=2,
                              intermediate=2 * hidden, max_positions=128)
  models.save_pretrained(models.init_from_config(hf, rng=seed), directory, tokenizer=tokenizer)
  return directory


def make_files(workdir: str, n_train: int = 256, n_test: int = 32, hidden: int = 64,
               layers: int = 2) -> dict:
  """Checkpoint, tokenizer, train / test JSONL and the reward module under `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  train, test = problems(n_train, seed=0), problems(n_test, seed=1)
  paths = {"train": write_jsonl(os.path.join(workdir, "train.jsonl"), train),
           "test": write_jsonl(os.path.join(workdir, "test.jsonl"), test),
           "reward": os.path.join(workdir, "my_rewards.py")}
  with open(paths["reward"], "w") as f:
    f.write(REWARD_MODULE)
  paths["init"] = make_checkpoint(os.path.join(workdir, "init"), make_tokenizer(train + test),
                                  hidden=hidden, layers=layers)
  return paths


def commands(workdir: str, paths: dict, sft_steps: int, rl_steps: int) -> list[list[str]]:
  """The three command lines of the example (flags only)."""
  py = [sys.executable]
  data = ["--task=file", f"--train_path={paths['train']}", f"--eval_path={paths['test']}",
          "--prompt_field=question", "--chat_template"]
  sft_dir, run_dir = os.path.join(workdir, "sft"), os.path.join(workdir, "run")
  return [
      py + [os.path.join(EXPERIMENTS, "sft.py"), f"--init={paths['init']}", f"--out={sft_dir}",
            *data, "--response_field=solution", "--max_response_tokens=16",
            f"--steps={sft_steps}", "--batch_size=32", "--lr=3e-3", "--eval_size=16"],
      py + [os.path.join(EXPERIMENTS, "train.py"), "--config=default", f"--workdir={run_dir}",
            "--config.algo=dapo", f"--config.policy={sft_dir}", "--config.guide.path=",
            "--config.task=file", f"--config.task_kwargs.train_path={paths['train']}",
            f"--config.task_kwargs.eval_path={paths['test']}",
            "--config.task_kwargs.prompt_field=question", "--config.task_kwargs.chat_template=True",
            f"--config.reward.functions=task,{paths['reward']}:boxed_format",
            "--config.reward.weights=1.0,1.0", "--config.rollout.max_new_tokens=16",
            "--config.rollout.groups=4", "--config.rollout.n=4", "--config.rollout.zero_groups=0",
            f"--config.num_steps={rl_steps}", "--config.eval_every=3", "--config.eval_size=16",
            "--config.eval_batch_size=16", "--config.checkpoint_every=3",
            "--config.optim.learning_rate=1e-4", "--config.progress=False"],
      py + [os.path.join(EXPERIMENTS, "evaluate.py"), f"--model={run_dir}", *data[:1],
            f"--eval_path={paths['test']}", "--prompt_field=question", "--chat_template",
            "--k=4", "--temperature=1.0", "--max_new_tokens=16", "--eval_size=16",
            f"--out={os.path.join(workdir, 'eval.json')}"],
  ]


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  paths = make_files(workdir)
  for cmd in commands(workdir, paths, _SFT_STEPS.value, _RL_STEPS.value):
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)
  print(f"\nexported policy: {os.path.join(workdir, 'run', 'export')}; metrics: "
        f"{os.path.join(workdir, 'eval.json')}")


if __name__ == "__main__":
  app.run(main)
