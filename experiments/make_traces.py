r"""Writes a mixpo guide-trace jsonl by sampling a guide checkpoint over a dataset or a task.

  python experiments/make_traces.py --guide=workdir/default/guide --task=addition \
      --digits=2 --terms=2 --n_prompts=512 --out=/tmp/traces.jsonl --n_per_prompt=1
  python experiments/make_traces.py --guide=ckpt/qwen --task=file --train_path=data/train.parquet \
      --chat_template --out=/tmp/traces.jsonl --max_new_tokens=1024 --temperature=0.6

Each row: {"prompt", "answer", "response", "response_tokens", "guide_logp"} with one natural-log
probability per response token (EOS included) under the sampling distribution (see
mixpo.sampling.generate), so the trainer can use them as πϕ without re-scoring the guide.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from mixpo import cli  # noqa: E402

_GUIDE = flags.DEFINE_string("guide", None, "Guide checkpoint dir (config.json, safetensors, tokenizer).")
# --task, --task_knobs, --train_path, --prompt_field, --answer_field, --chat_template,
# --max_prompt_tokens, --skip_bad_rows, ...: train.py's --config.task_kwargs.* fields.
cli.define_task_flags()
_DATASET = flags.DEFINE_string("dataset", None, "Shorthand for --task=file --train_path=<file>.")
_N_PROMPTS = flags.DEFINE_integer("n_prompts", 256, "Prompts drawn from a procedural task's train "
                                  "split (all rows of a dataset are used).")
_SEED = flags.DEFINE_integer("seed", 0, "Task stream seed and sampling PRNG seed.")
_OUT = flags.DEFINE_string("out", None, "Output .jsonl path.")
_N_PER_PROMPT = flags.DEFINE_integer("n_per_prompt", 1, "Guide samples per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Response token budget.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Prompts per generate call.")


def load_examples(tokenizer):
  from mixpo.data import read_examples, task_options
  task, options, knobs = cli.task_flag_values()
  if task != task_options.FILE:
    t = task_options.make_task(task, options, knobs, tokenizer=tokenizer)
    return t.examples("train", _N_PROMPTS.value, seed=_SEED.value)
  examples, summary = read_examples(
      options["train_path"], options["prompt_field"], options["answer_field"],
      tokenizer=tokenizer, chat_template=options["chat_template"],
      max_prompt_tokens=options["max_prompt_tokens"] or None,
      skip_bad_rows=options["skip_bad_rows"])
  if summary.kept < summary.rows:
    logging.warning("%s", summary)
  return examples


def make_traces(guide_dir, examples, n_per_prompt, max_new_tokens, temperature, batch_size, seed):
  """Samples the guide over examples; returns mixpo Traces (n_per_prompt per example, in order)."""
  import jax
  import numpy as np

  from mixpo import models, sampling
  from mixpo.data import Trace
  from mixpo.rollout import encode_prompts

  model = models.from_pretrained(guide_dir)
  tokenizer = models.load_tokenizer(guide_dir)
  rng = jax.random.key(seed)
  traces = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    tok_BxP, mask_BxP = encode_prompts(tokenizer, [e.prompt for e in chunk], n_per_prompt)
    rng, key = jax.random.split(rng)
    out = sampling.generate(model, tok_BxP, mask_BxP, key, max_new_tokens, temperature=temperature,
                            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0)
    tokens, lengths, logp = (np.asarray(out.tokens_BxN), np.asarray(out.lengths_B),
                             np.asarray(out.logp_BxN))
    for row in range(tokens.shape[0]):
      ex = chunk[row // n_per_prompt]
      n = int(lengths[row])
      ids = tokens[row, :n].tolist()
      traces.append(Trace(prompt=ex.prompt, answer=ex.answer,
                          response=tokenizer.decode(ids, skip_special_tokens=True),
                          response_tokens=ids, guide_logp=logp[row, :n].tolist()))
  return traces


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  if not _GUIDE.value or not _OUT.value:
    raise cli.UserError("--guide and --out are required (a guide checkpoint directory and the "
                        "output .jsonl).")
  if _DATASET.value:
    flags.FLAGS.task, flags.FLAGS.train_path = "file", _DATASET.value
  cli.check_model_dir("--guide", _GUIDE.value)
  cli.check_task_flags()
  from mixpo import models
  from mixpo.data import write_traces
  examples = load_examples(models.load_tokenizer(_GUIDE.value))
  traces = make_traces(_GUIDE.value, examples, _N_PER_PROMPT.value, _MAX_NEW.value,
                       _TEMPERATURE.value, _BATCH.value, _SEED.value)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  write_traces(_OUT.value, traces)
  logging.info("wrote %d traces for %d prompts to %s", len(traces), len(examples), _OUT.value)


if __name__ == "__main__":
  cli.run(main, config_flag=None)
