r"""Supervised fine-tuning on a task's reference answers or a dataset's responses.

  python experiments/sft.py --init=builtin --out=/tmp/guide --steps=1200
  python experiments/sft.py --init=/path/to/hf_checkpoint --out=/tmp/sft --steps=500 --lr=1e-5 \
      --task=file --train_path=data/train.jsonl --response_field=solution --chat_template \
      --max_response_tokens=512

--init=builtin starts from a random tiny char-level model (experiments/configs/default.py's
`builtin` recipe; the addition task only); any other value is a Hugging Face checkpoint
directory. With --task=file the targets are the --response_field of each --train_path row (a
worked solution, or a guide trace's response) after the prompt (--prompt_field, rendered with the
chat template under --chat_template) — e.g. make_traces.py's output, whose prompts are already
rendered: --train_path=traces.jsonl --response_field=responses.0; with a procedural task they are
its reference answers. The
task / dataset flags are train.py's --config.task_kwargs.* fields (mixpo/data/task_options.py).
The result is written in Hugging Face format (config.json + safetensors + tokenizer) with an eval
summary (greedy accuracy on the eval split / --eval_path, scored against --answer_field).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from mixpo import cli  # noqa: E402

_INIT = flags.DEFINE_string("init", "builtin", "'builtin' or a Hugging Face checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (Hugging Face format).")
cli.define_task_flags()
_RESPONSE_FIELD = flags.DEFINE_string("response_field", "", "--task=file: dotted field of the "
                                      "target response (default: --answer_field).")
_MAX_RESPONSE = flags.DEFINE_integer("max_response_tokens", 5, "Target tokens per example (EOS "
                                     "included); longer targets are an error naming the row.")
_STEPS = flags.DEFINE_integer("steps", 1200, "SFT steps.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Examples per step.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 1, "Data / init seed.")
_EVAL = flags.DEFINE_integer("eval_size", 300, "Eval examples (greedy accuracy at the end).")
_EVAL_TOKENS = flags.DEFINE_integer("eval_max_new_tokens", 0, "Response budget of the final "
                                    "eval (0 = --max_response_tokens).")


class ResponseData:
  """Rows of a dataset as SFT targets: `examples("train", n, seed, start)` cycles over a seeded
  permutation per epoch, like the file task (so a step's batch is a pure function of its index)."""

  def __init__(self, examples, name: str):
    self.rows, self.name = examples, name

  def examples(self, split: str, n: int, seed: int = 0, start: int = 0):
    import numpy as np

    from mixpo.data.tasks import derive_seed
    del split
    out = []
    for i in range(start, start + n):
      epoch, j = divmod(i, len(self.rows))
      perm = np.random.default_rng(derive_seed(self.name, seed, epoch)).permutation(len(self.rows))
      out.append(self.rows[perm[j]])
    return out


def sft_data(tokenizer):
  """(SFT data source, eval task or None) from the task flags."""
  from mixpo.data import read_examples, task_options
  task, options, knobs = cli.task_flag_values()
  if task != task_options.FILE:
    t = task_options.make_task(task, options, knobs, tokenizer=tokenizer)
    return t, t
  field = _RESPONSE_FIELD.value or options["answer_field"]
  rows, summary = read_examples(options["train_path"], options["prompt_field"], field,
                                tokenizer=tokenizer, chat_template=options["chat_template"],
                                max_prompt_tokens=options["max_prompt_tokens"] or None,
                                check_answers=False, skip_bad_rows=options["skip_bad_rows"])
  if summary.kept < summary.rows:
    logging.warning("--train_path: %s", summary)
  if not rows:
    raise cli.UserError(f"--train_path={options['train_path']}: no usable rows ({summary}).")
  eval_task = None
  if options["eval_path"]:
    first = options["eval_path"].split(",")[0].strip()
    eval_task = task_options.make_task(task, {**options, "train_path": first, "eval_path": first},
                                       knobs, tokenizer=tokenizer)
  return ResponseData(rows, options["train_path"]), eval_task


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  if not _OUT.value:
    raise cli.UserError("--out is required: the directory the fine-tuned model is written to.")
  cli.check_task_flags()
  task_name = cli.task_flag_values()[0]
  if _INIT.value == "builtin" and task_name == "file":
    raise cli.UserError("--init=builtin is a char-level model for the addition task; with "
                        "--task=file pass --init=<a Hugging Face checkpoint directory>.")
  if _INIT.value != "builtin":
    cli.check_model_dir("--init", _INIT.value)
  from experiments.configs import default
  from mixpo import builtin, models, rl
  from mixpo.data import char_tokenizer
  from mixpo.rewards import RewardRunner
  if _INIT.value == "builtin":
    b = default.get_config().builtin
    tokenizer = char_tokenizer()
    hf = builtin.tiny_hf_config(tokenizer, b.hidden, b.layers, b.heads, b.kv_heads,
                                b.intermediate, b.max_positions)
    model = models.init_from_config(hf, rng=_SEED.value)
  else:
    tokenizer = models.load_tokenizer(_INIT.value)
    model = models.from_pretrained(_INIT.value)
  data, eval_task = sft_data(tokenizer)
  model = builtin.sft(model, tokenizer, data, steps=_STEPS.value, batch_size=_BATCH.value,
                      learning_rate=_LR.value, seed=_SEED.value,
                      max_answer_tokens=_MAX_RESPONSE.value,
                      log_every=max(_STEPS.value // 10, 1))
  models.save_pretrained(model, _OUT.value)
  tokenizer.save_pretrained(_OUT.value)
  result = {"steps": _STEPS.value}
  if eval_task is not None:
    with RewardRunner([(eval_task.reward_fn, 1.0)]) as runner:
      result.update(rl.evaluate(model, tokenizer, eval_task.eval_examples(_EVAL.value), runner,
                                max_new_tokens=_EVAL_TOKENS.value or _MAX_RESPONSE.value))
  with open(os.path.join(_OUT.value, "sft_eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  logging.info("eval: %s", result)
  print("eval:", result)


if __name__ == "__main__":
  cli.run(main, config_flag=None)
