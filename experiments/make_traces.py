r"""Writes a mixpo guide-trace jsonl by sampling a guide checkpoint over a dataset or a task.

  python experiments/make_traces.py --guide=workdir/default/models/guide --task=addition \
      --digits=2 --terms=2 --n_prompts=512 --out=/tmp/traces.jsonl --n_per_prompt=1
  python experiments/make_traces.py --guide=ckpt/qwen --task=file --train_path=data/train.parquet \
      --chat_template --out=/tmp/traces.jsonl --max_new_tokens=1024 --temperature=0.6

One line per prompt, the mixpo trace format the RL loop reads (mixpo/data/traces.py):
  {"prompt", "answer", "responses": [str], "correct": [bool],
   "response_tokens": [[int]], "guide_logp": [[float]], "tokenizer": str, "logp_temperature": float}
Responses are the guide's finished samples (EOS within --max_new_tokens); "correct" is the task's
reward (1 = correct). With --logp (default), each response's tokens are the loop's tokenization
of its text (EOS appended) and "guide_logp" the guide's natural-log probability of each of them
at the sampling temperature, so `--config.guide.logp=file` trains without re-scoring the guide;
"tokenizer" fingerprints the tokenizer they hold for. `mixpo.guide_source.TraceSource` reads the
file back as a train stream plus each prompt's OFF rows.
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
_LOGP = flags.DEFINE_bool("logp", True,
                          "Store per-token guide log-probs (for --config.guide.logp=file).")


def load_examples(tokenizer):
  """(examples, reward function): a procedural task's train split, or every usable row of
  --train_path (a row or field problem is a UserError naming the flag, file, row and field)."""
  from mixpo.data import DataError, read_examples, task_options
  task, options, knobs = cli.task_flag_values()
  if task != task_options.FILE:
    t = task_options.make_task(task, options, knobs, tokenizer=tokenizer)
    return t.examples("train", _N_PROMPTS.value, seed=_SEED.value), t.reward_fn
  prompt_field, answer_field, chat = task_options.file_fields(options)
  flag = lambda o: f"--{o}"
  try:
    examples, summary = read_examples(
        options["train_path"], prompt_field, answer_field, tokenizer=tokenizer,
        chat_template=chat, max_prompt_tokens=options["max_prompt_tokens"] or None,
        skip_bad_rows=options["skip_bad_rows"])
    if not examples:
      raise DataError(f"no usable row in {options['train_path']} ({summary})", "no_rows")
  except DataError as e:
    raise cli.UserError(task_options.data_error_message(e, options, flag)) from None
  if summary.kept < summary.rows:
    logging.warning("%s", summary)
  from mixpo.rewards.math_answer import math_answer_reward
  return examples, math_answer_reward


def make_traces(guide_dir, examples, n_per_prompt, max_new_tokens, temperature, batch_size, seed,
                with_logp=True, reward_fn=None):
  """Samples the guide over examples; returns ([TracePrompt], counts).

  Only finished samples (EOS within max_new_tokens) become responses: the loop appends EOS to
  every trace, so an unfinished one would become an answer the guide never gave. A response is
  stored as text plus, with `with_logp`, its tokens under the loop's tokenization (text, no
  special tokens, EOS) and the guide's per-token log-probs of exactly those tokens, scored like
  the trainer scores (`mixpo.guide_source.model_guide_logp` at the sampling temperature), with the
  tokenizer's fingerprint. `reward_fn` (TRL-style) marks each response correct (reward 1) or not.
  """
  import jax
  import numpy as np

  from mixpo import guide_source, models, sampling
  from mixpo.data.traces import TracePrompt, TraceResponse, tokenizer_fingerprint
  from mixpo.rewards import RewardRunner
  from mixpo.rollout import encode_prompts

  model = models.from_pretrained(guide_dir)
  tokenizer = models.load_tokenizer(guide_dir)
  fingerprint = tokenizer_fingerprint(tokenizer)
  logp_temperature = 1.0 if temperature == 0 else float(temperature)  # greedy scores unscaled.
  runner = RewardRunner([(reward_fn, 1.0)]) if reward_fn is not None else None
  rng = jax.random.key(seed)
  out, counts = [], {"samples": 0, "unfinished": 0, "prompts_without_response": 0}
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    tok_BxP, mask_BxP = encode_prompts(tokenizer, [e.prompt for e in chunk], n_per_prompt)
    rng, key = jax.random.split(rng)
    gen = sampling.generate(model, tok_BxP, mask_BxP, key, max_new_tokens, temperature=temperature,
                            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0)
    tokens, lengths = np.asarray(gen.tokens_BxN), np.asarray(gen.lengths_B)
    truncated = np.asarray(gen.truncated_B)
    counts["samples"] += len(tokens)
    counts["unfinished"] += int(truncated.sum())
    texts = [tokenizer.decode(tokens[b, :lengths[b]].tolist(), skip_special_tokens=True)
             for b in range(len(tokens))]
    correct = [None] * len(texts)
    if runner is not None:
      rewards = runner([e.prompt for e in chunk for _ in range(n_per_prompt)], texts,
                       answer=[e.answer for e in chunk for _ in range(n_per_prompt)]).rewards
      correct = [bool(r >= 1.0 - 1e-6) for r in rewards]
    groups = []
    for i, ex in enumerate(chunk):
      rows = [b for b in range(i * n_per_prompt, (i + 1) * n_per_prompt)
              if not truncated[b] and texts[b].strip()]
      if not rows:
        counts["prompts_without_response"] += 1
        continue
      groups.append(TracePrompt(ex.prompt, ex.answer, [
          TraceResponse(texts[b], correct=correct[b]) for b in rows]))
    if with_logp and groups:
      for r in (r for g in groups for r in g.responses):
        r.tokens = guide_source.response_tokens(tokenizer, r.text)
        r.tokenizer, r.logp_temperature = fingerprint, logp_temperature
      width = max(len(r.tokens) for g in groups for r in g.responses)
      src = guide_source.TraceSource(groups, tokenizer, max_new_tokens=max(width, max_new_tokens),
                                     guide_logp="model")
      rows = src.guide_rows(range(len(groups)), n_per_prompt)
      logp = guide_source.model_guide_logp(model, rows, logp_temperature)
      for gi, g in enumerate(groups):
        for j, r in enumerate(g.responses):
          r.logp = logp[gi * n_per_prompt + j, :len(r.tokens)].tolist()
    out += groups
  if runner is not None:
    runner.close()
  return out, counts


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
  from mixpo.data.traces import write_trace_prompts
  examples, reward_fn = load_examples(models.load_tokenizer(_GUIDE.value))
  prompts, counts = make_traces(_GUIDE.value, examples, _N_PER_PROMPT.value, _MAX_NEW.value,
                                _TEMPERATURE.value, _BATCH.value, _SEED.value,
                                with_logp=_LOGP.value, reward_fn=reward_fn)
  n = sum(len(p.responses) for p in prompts)
  if not n:  # an empty trace file would only fail later, in the run that reads it
    raise cli.UserError(f"--max_new_tokens={_MAX_NEW.value}: none of the {counts['samples']} "
                        f"guide samples ended (EOS) within the budget ({counts['unfinished']} "
                        f"unfinished); nothing written to {_OUT.value}. Raise --max_new_tokens.")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  write_trace_prompts(_OUT.value, prompts)
  print(f"wrote {n} traces for {len(prompts)} of {len(examples)} prompts to {_OUT.value} "
        f"({counts['unfinished']} of {counts['samples']} samples unfinished within "
        "--max_new_tokens, not written)")


if __name__ == "__main__":
  cli.run(main, config_flag=None)
