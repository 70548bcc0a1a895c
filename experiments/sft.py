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
summary, sft_eval.json: greedy accuracy on --eval_path (its own fields: --eval_prompt_field /
--eval_answer_field) or, without one, on the --eval_fraction of --train_path's rows held out of
training (by a hash of the prompt), scored against --answer_field. Every target is checked
against --max_response_tokens before training: a longer one is an error naming its row.
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


def _data_error(e, options) -> cli.UserError:
  from mixpo.data import task_options
  fields = {"response_field": _RESPONSE_FIELD.value} if _RESPONSE_FIELD.value else None
  return cli.UserError(task_options.data_error_message(e, options, lambda o: f"--{o}", fields))


def _read(path, prompt_field, field, options, tokenizer, check_answers, chat):
  from mixpo.data import DataError, read_examples
  try:
    rows, summary = read_examples(path, prompt_field, field, tokenizer=tokenizer,
                                  chat_template=chat,
                                  max_prompt_tokens=options["max_prompt_tokens"] or None,
                                  check_answers=check_answers,
                                  skip_bad_rows=options["skip_bad_rows"])
  except DataError as e:
    raise _data_error(e, options) from None
  if not rows:
    raise _data_error(DataError(f"no usable row in {path} ({summary})", "no_rows"), options)
  if summary.kept < summary.rows:
    logging.warning("%s", summary)
  return rows


def check_target_lengths(tokenizer, rows, field: str, limit: int) -> None:
  """UserError naming the first row whose target (tokens + EOS) exceeds --max_response_tokens."""
  lengths = [len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) + 1 for e in rows]
  over = [i for i, n in enumerate(lengths) if n > limit]
  if over:
    e = rows[over[0]]
    raise cli.UserError(
        f"--max_response_tokens={limit}: {e.metadata.get('source')}: field {field!r} needs "
        f"{lengths[over[0]]} tokens with EOS; {len(over)} of {len(rows)} targets are longer than "
        f"the limit (the longest needs {max(lengths)}). Raise --max_response_tokens or drop "
        "those rows.")


def sft_data(tokenizer):
  """(SFT data source, eval examples or None, eval reward function) from the task flags.

  A file task trains on --train_path's --response_field; it evaluates on --eval_path (its own
  fields) or, without one, on the rows `split_of` holds out (never trained on)."""
  from mixpo.data import split_of, task_options
  from mixpo.rewards import math_answer_reward
  task, options, knobs = cli.task_flag_values()
  if task != task_options.FILE:
    t = task_options.make_task(task, options, knobs, tokenizer=tokenizer)
    return t, t.eval_examples(_EVAL.value), t.reward_fn
  prompt_field, answer_field, chat = task_options.file_fields(options)
  field = _RESPONSE_FIELD.value or answer_field
  train = options["train_path"]
  rows = _read(train, prompt_field, field, options, tokenizer, False, chat)
  paths = task_options.eval_paths(options)
  if paths:
    eval_prompt, eval_answer = task_options.eval_fields(options, 0)
    evals = _read(paths[0], eval_prompt, eval_answer, options, tokenizer, True, chat)
  else:
    held_out = lambda e: split_of(e.prompt, options["eval_fraction"]) == "eval"
    rows = [e for e in rows if not held_out(e)]
    evals = [e for e in _read(train, prompt_field, answer_field, options, tokenizer, True, chat)
             if held_out(e)]
    if not evals or not rows:
      raise cli.UserError(f"--eval_fraction={options['eval_fraction']}: holds out "
                          f"{len(evals)} of the rows of {train}, leaving {len(rows)} to train "
                          "on; pass --eval_path, or change --eval_fraction.")
  check_target_lengths(tokenizer, rows, field, _MAX_RESPONSE.value)
  return ResponseData(rows, train), evals[:_EVAL.value], math_answer_reward


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
  data, eval_examples, reward_fn = sft_data(tokenizer)
  model = builtin.sft(model, tokenizer, data, steps=_STEPS.value, batch_size=_BATCH.value,
                      learning_rate=_LR.value, seed=_SEED.value,
                      max_answer_tokens=_MAX_RESPONSE.value,
                      log_every=max(_STEPS.value // 10, 1))
  models.save_pretrained(model, _OUT.value, tokenizer=tokenizer)
  result = {"steps": _STEPS.value, "eval": "--eval_path" if cli.task_flag_values()[1][
      "eval_path"] else "held-out split"}
  with RewardRunner([(reward_fn, 1.0)]) as runner:
    result.update(rl.evaluate(model, tokenizer, eval_examples, runner,
                              max_new_tokens=_EVAL_TOKENS.value or _MAX_RESPONSE.value))
  with open(os.path.join(_OUT.value, "sft_eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  logging.info("eval: %s", result)
  print("eval:", result)


if __name__ == "__main__":
  cli.run(main, config_flag=None)
