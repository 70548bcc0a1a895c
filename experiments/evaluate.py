r"""mean@k, pass@k and maj@k (bootstrap 95 % intervals) of a checkpoint, per dataset file.

  python experiments/evaluate.py --model=workdir/default --k=1            # greedy, built-in task
  python experiments/evaluate.py --model=workdir/mine --task=file --chat_template --k=8 \
      --eval_path=data/math500.jsonl,data/aime.jsonl --eval_prompt_field=problem,question \
      --max_new_tokens=4096 --strict_boxed

--model is a Hugging Face directory (config.json + safetensors + tokenizer), or a run workdir whose
`export/` holds the exported policy. k = 1 evaluates greedily; k > 1 samples --n ≥ k answers per
problem at --temperature (pass@k is the unbiased estimator from n samples). The task / dataset
flags are the ones train.py has as --config.task_kwargs.* (mixpo/data/task_options.py); each eval
file may name its own fields (--eval_prompt_field / --eval_answer_field: one value, or one per
--eval_path file).

Writes the metrics json (--out; default: eval.json in the run's directory, or in the checkpoint's
when it is not a run's export) and every sample (--samples_out, default eval_samples.jsonl next
to it: prompt, answer, response, extracted answer, correct, truncated). eval.json records per
file the rows read, kept and dropped (by reason), the token budget, the share of responses that
hit it (truncation rate; a WARNING when most do) and the answer extraction used. A file with no
usable problem is an error naming the flag (exit 2) and nothing is written: earlier results are
never replaced by a report on zero problems.

--max_new_tokens=0 (default) takes the run's own budget (its config.json) for a run workdir,
otherwise 1024 tokens, within the model's context. --strict_boxed scores only answers in a final
\boxed{...}; without it, the answer extraction falls back to "The answer is ..." and the last
number in the response.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from mixpo import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "HF checkpoint directory or run workdir.")
cli.define_task_flags()
_N_EVAL = flags.DEFINE_integer("eval_size", 300, "Problems per dataset (the first ones).")
_K = flags.DEFINE_integer("k", 1, "k of mean@k / pass@k / maj@k (1 = greedy).")
_N = flags.DEFINE_integer("n", 0, "Samples per problem for pass@k (0 = k; must be >= k).")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature when k > 1.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "Response budget in tokens (0 = the run's "
                                "own budget for a run workdir, else 1024, within the model's "
                                "context).")
_STRICT = flags.DEFINE_bool("strict_boxed", False, "Score only answers in a final \\boxed{...} "
                            "(no fallback to 'The answer is' or the last number).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Problems per generate call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and the bootstrap's).")
_RESAMPLES = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of the intervals.")
_OUT = flags.DEFINE_string("out", "", "Where to write the json (default: eval.json in the run's "
                           "directory, not inside export/).")
_SAMPLES = flags.DEFINE_string("samples_out", "", "Where to write the samples jsonl (default: "
                               "eval_samples.jsonl next to --out).")

DEFAULT_BUDGET = 1024  # tokens: room for a worked solution of a real model.
TRUNCATION_WARN = 0.5  # share of responses at the budget above which the results are suspect.


def model_dir(path: str) -> str:
  if not path:
    raise cli.UserError("--model is required: a Hugging Face checkpoint directory or a finished "
                        "run's workdir.")
  if os.path.isfile(os.path.join(path, "config.json")) and not _is_run(path):
    return path
  if os.path.isfile(os.path.join(path, "export", "config.json")):
    return os.path.join(path, "export")
  if _is_run(path):
    raise cli.UserError(f"--model={path}: a run directory without an export/ (the run did not "
                        "finish, or ran with --config.export_hf=False); evaluate a finished run, "
                        "or pass a checkpoint directory.")
  raise cli.UserError(f"--model={path}: no config.json there nor in {path}/export; pass a "
                      "Hugging Face checkpoint directory or a finished run's workdir.")


def _is_run(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(
      os.path.join(path, "metrics.jsonl"))


def run_dir(model_path: str) -> str | None:
  """The run directory a model belongs to (the parent of a run's export/), or None."""
  parent = os.path.dirname(os.path.abspath(model_path))
  if os.path.basename(os.path.abspath(model_path)) == "export" and _is_run(parent):
    return parent
  return None


def default_out(model_path: str) -> str:
  """eval.json in the run's directory for a run's export (never inside export/, which a later
  export replaces), else beside the checkpoint's files."""
  return os.path.join(run_dir(model_path) or model_path, "eval.json")


def token_budget(model_path: str, flag_value: int) -> tuple[int, str]:
  """(max_new_tokens, where it came from): the flag, the run's config.json, or DEFAULT_BUDGET."""
  if flag_value:
    return flag_value, "--max_new_tokens"
  run = run_dir(model_path)
  if run and os.path.isfile(os.path.join(run, "config.json")):
    with open(os.path.join(run, "config.json")) as f:
      budget = (json.load(f).get("rollout") or {}).get("max_new_tokens")
    if isinstance(budget, int) and budget > 0:
      return budget, f"{run}/config.json"
  return DEFAULT_BUDGET, "default"


def _read_error(e, options) -> cli.UserError:
  from mixpo.data import task_options
  return cli.UserError(task_options.data_error_message(e, options, lambda o: f"--{o}"))


def eval_sets(tokenizer, n: int) -> tuple[list, object]:
  """([(name, examples, read summary or None)] to evaluate, the task's reward function); a file
  without a usable problem is a UserError naming the flag at fault."""
  from mixpo.data import DataError, read_examples, task_options
  from mixpo.rewards import math_answer_reward
  task, options, knobs = cli.task_flag_values()
  paths = task_options.eval_paths(options)
  if task == task_options.FILE and paths:
    _, _, chat = task_options.file_fields(options)
    sets = []
    for i, path in enumerate(paths):
      prompt_field, answer_field = task_options.eval_fields(options, i)
      try:
        examples, summary = read_examples(
            path, prompt_field, answer_field, tokenizer=tokenizer, chat_template=chat,
            max_prompt_tokens=options["max_prompt_tokens"] or None,
            skip_bad_rows=options["skip_bad_rows"])
      except DataError as e:
        raise _read_error(e, options) from None
      if not examples:
        raise _read_error(DataError(f"no usable problem in {path} ({summary})", "no_rows"),
                          options)
      if summary.kept < summary.rows:
        logging.warning("--eval_path: %s", summary)
      sets.append((path, examples[:n], summary))
    return sets, math_answer_reward
  try:
    t = task_options.make_task(task, options, knobs, tokenizer=tokenizer)
  except DataError as e:
    raise _read_error(e, options) from None
  examples = t.eval_examples(n)
  if not examples:
    raise cli.UserError(f"--eval_fraction={options['eval_fraction']}: the held-out split of "
                        f"{t.name} is empty; pass --eval_path, or raise --eval_fraction.")
  return [(t.name, examples, getattr(t, "summary", None))], t.reward_fn


def evaluate_set(model, tokenizer, examples, runner, n: int, temperature: float, seed: int,
                 max_new_tokens: int, strict: bool):
  """(correct [P, n] bool, truncated [P, n] bool, samples) for `examples`, n samples each."""
  import jax
  import numpy as np

  from mixpo import eval_metrics, rl
  from mixpo.rewards import extract_answer
  from mixpo.rollout import SampleSpec, sample_groups
  spec = SampleSpec(max_new_tokens=max_new_tokens, temperature=temperature)
  key, correct, truncated, samples = jax.random.key(seed), [], [], []
  for start in range(0, len(examples), _BATCH.value):
    chunk = examples[start:start + _BATCH.value]
    key, sub = jax.random.split(key)
    groups, _ = sample_groups(model, tokenizer, [e.prompt for e in chunk],
                              [e.answer for e in chunk], n, sub, spec, runner,
                              {"metadata": [e.metadata for e in chunk]})
    ok = rl.solved(groups.correct_B)
    correct.append(ok.reshape(len(chunk), n))
    truncated.append(np.asarray(groups.truncated_B, bool).reshape(len(chunk), n))
    for row, completion in enumerate(groups.completions):
      e = chunk[row // n]
      extracted = (eval_metrics.boxed_answer(completion) if strict else
                   extract_answer(completion) or completion.strip() or None)
      samples.append({"index": start + row // n, "sample": row % n, "prompt": e.prompt,
                      "answer": e.answer, "response": completion, "extracted": extracted,
                      "reward": float(groups.correct_B[row]), "correct": bool(ok[row]),
                      "truncated": bool(groups.truncated_B[row]),
                      "source": e.metadata.get("source")})
  stack = lambda parts: np.concatenate(parts) if parts else np.zeros((0, n), bool)
  return stack(correct), stack(truncated), samples


def _check_budget(model, sets, tokenizer, budget: int, source: str) -> int:
  """The budget within the model's context: the longest prompt plus the budget must fit."""
  from mixpo.rollout import encode_prompts
  longest = max(int(encode_prompts(tokenizer, [e.prompt for e in ex], 1)[1].sum(axis=1).max())
                for _, ex, _ in sets)
  room = model.config.max_position_embeddings - longest
  if budget <= room:
    return budget
  if source == "--max_new_tokens":
    raise cli.UserError(f"--max_new_tokens={budget}: the longest prompt has {longest} tokens and "
                        f"the model's context is {model.config.max_position_embeddings}; at most "
                        f"{room} tokens are left for the response.")
  return room


def _write_atomically(path: str, write) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    write(f)
  os.replace(tmp, path)


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  import numpy as np

  from mixpo import eval_metrics, models
  from mixpo.rewards import RewardRunner
  path = model_dir(_MODEL.value)
  cli.check_task_flags(need_train=False)
  task, options, _ = cli.task_flag_values()
  if task == "file" and not (options["eval_path"] or options["train_path"]):
    raise cli.UserError("--task=file needs --eval_path=<.jsonl / .parquet files, comma-separated>"
                        " (or --train_path, whose held-out --eval_fraction is then used).")
  k = _K.value
  temperature = 0.0 if k == 1 else _TEMP.value
  n = 1 if temperature == 0 else (_N.value or k)
  if n < k:
    raise cli.UserError(f"--n={_N.value}: pass@k needs at least k={k} samples per problem.")
  out = _OUT.value or default_out(path)
  samples_out = _SAMPLES.value or os.path.join(os.path.dirname(os.path.abspath(out)),
                                               "eval_samples.jsonl")
  tokenizer = models.load_tokenizer(path)
  sets, reward_fn = eval_sets(tokenizer, _N_EVAL.value)  # a file without problems stops here.
  model = models.from_pretrained(path)
  budget, budget_source = token_budget(path, _MAX_NEW.value)
  budget = _check_budget(model, sets, tokenizer, budget, budget_source)
  if _STRICT.value:
    reward_fn = eval_metrics.BoxedOnly(reward_fn)
  result = {"model": path, "task": task, "k": k, "n": n, "temperature": temperature,
            "max_new_tokens": budget, "max_new_tokens_from": budget_source,
            "answer_extraction": "boxed only" if _STRICT.value else
                                 "last \\boxed{}, else 'The answer is', else the last number",
            "datasets": {}, "warnings": []}
  all_samples = []
  with RewardRunner([(reward_fn, 1.0)]) as runner:
    for name, examples, read in sets:
      correct_PxN, truncated_PxN, samples = evaluate_set(
          model, tokenizer, examples, runner, n, temperature, _SEED.value, budget, _STRICT.value)
      answers = np.array([s["extracted"] for s in samples], object).reshape(correct_PxN.shape)
      r = eval_metrics.summarize(correct_PxN, answers, k, _RESAMPLES.value, _SEED.value)
      r["truncation_rate"] = float(truncated_PxN.mean())
      if read is not None:  # what the file held and what was dropped, by reason
        r["rows"] = read.as_dict()
      if r["truncation_rate"] > TRUNCATION_WARN:
        message = (f"{name}: {r['truncation_rate']:.0%} of the responses hit the "
                   f"{budget}-token budget (no end of sequence): raise --max_new_tokens, or the "
                   "scores are of cut-off answers.")
        logging.warning("%s", message)
        result["warnings"].append(message)
      result["datasets"][name] = r
      all_samples += [{"dataset": name, **s} for s in samples]
  first = next(iter(result["datasets"].values()))
  # The first dataset's values at the top level (what `--k=1` users read: accuracy).
  result.update({"accuracy": first[f"mean@{k}"]["value"], "num_examples": first["num_examples"],
                 "truncation_rate": first["truncation_rate"],
                 **{m: first[m]["value"] for m in (f"mean@{k}", f"pass@{k}", f"maj@{k}")}})
  result["samples"] = samples_out
  # Written only now, each file whole: an interrupted or refused evaluation leaves the last
  # results as they were.
  _write_atomically(samples_out, lambda f: f.writelines(
      json.dumps(s, ensure_ascii=False) + "\n" for s in all_samples))
  _write_atomically(out, lambda f: json.dump(result, f, indent=1))
  for name, r in result["datasets"].items():
    print(f"{name}: " + ", ".join(f"{m} {r[m]['value']:.3f} [{r[m]['ci95'][0]:.3f}, "
                                  f"{r[m]['ci95'][1]:.3f}]" for m in r if "@" in m)
          + f" ({r['num_examples']} problems, {r['truncation_rate']:.0%} truncated at "
          f"{budget} tokens)")
  print(f"wrote {out} and {samples_out}")


if __name__ == "__main__":
  cli.run(main, config_flag=None)
