r"""mean@k, pass@k and maj@k (bootstrap 95 % intervals) of a checkpoint, per dataset file.

  python experiments/evaluate.py --model=workdir/default --k=1            # greedy, built-in task
  python experiments/evaluate.py --model=workdir/mine/export --task=file \
      --eval_path=data/math500.jsonl,data/aime.jsonl --chat_template --k=8 --max_new_tokens=1024

--model is a Hugging Face directory (config.json + safetensors + tokenizer), or a run workdir whose
`export/` holds the exported policy. k = 1 evaluates greedily; k > 1 samples --n ≥ k answers per
problem at --temperature (pass@k is the unbiased estimator from n samples). The task / dataset
flags are the ones train.py has as --config.task_kwargs.* (mixpo/data/task_options.py). Writes
the metrics json (--out, default <model>/eval.json) and every sample (--samples_out, default
next to it as eval_samples.jsonl: prompt, answer, response, extracted answer, correct).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from mixpo import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "HF checkpoint directory or run workdir.")
cli.define_task_flags()
_N_EVAL = flags.DEFINE_integer("eval_size", 300, "Problems per dataset (the first ones).")
_K = flags.DEFINE_integer("k", 1, "k of mean@k / pass@k / maj@k (1 = greedy).")
_N = flags.DEFINE_integer("n", 0, "Samples per problem for pass@k (0 = k; must be >= k).")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature when k > 1.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "Response budget in tokens.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Problems per generate call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and the bootstrap's).")
_RESAMPLES = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of the intervals.")
_OUT = flags.DEFINE_string("out", "", "Where to write the json (default: <model>/eval.json).")
_SAMPLES = flags.DEFINE_string("samples_out", "", "Where to write the samples jsonl (default: "
                               "eval_samples.jsonl next to --out).")


def model_dir(path: str) -> str:
  if not path:
    raise cli.UserError("--model is required: a Hugging Face checkpoint directory or a finished "
                        "run's workdir.")
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  if os.path.isfile(os.path.join(path, "export", "config.json")):
    return os.path.join(path, "export")
  raise cli.UserError(f"--model={path}: no config.json there nor in {path}/export; pass a "
                      "Hugging Face checkpoint directory or a finished run's workdir.")


def eval_sets(tokenizer, n: int) -> tuple[list, object]:
  """[(name, examples)] to evaluate and the reward function of the task."""
  from mixpo.data import read_examples, task_options
  from mixpo.rewards import math_answer_reward
  task, options, knobs = cli.task_flag_values()
  paths = [p.strip() for p in options["eval_path"].split(",") if p.strip()]
  if task == task_options.FILE and paths:
    sets = []
    for path in paths:
      examples, summary = read_examples(
          path, options["prompt_field"], options["answer_field"], tokenizer=tokenizer,
          chat_template=options["chat_template"],
          max_prompt_tokens=options["max_prompt_tokens"] or None,
          skip_bad_rows=options["skip_bad_rows"])
      if summary.kept < summary.rows:
        logging.warning("--eval_path: %s", summary)
      sets.append((path, examples[:n]))
    return sets, math_answer_reward
  t = task_options.make_task(task, options, knobs, tokenizer=tokenizer)
  return [(t.name, t.eval_examples(n))], t.reward_fn


def evaluate_set(model, tokenizer, examples, runner, k: int, n: int, temperature: float,
                 seed: int):
  """(correct [P, n] bool, samples) for `examples`, n samples each (1 when greedy)."""
  import jax
  import numpy as np

  from mixpo import rl
  from mixpo.rewards import extract_answer
  from mixpo.rollout import SampleSpec, sample_groups
  spec = SampleSpec(max_new_tokens=_MAX_NEW.value, temperature=temperature)
  key, correct, samples = jax.random.key(seed), [], []
  for start in range(0, len(examples), _BATCH.value):
    chunk = examples[start:start + _BATCH.value]
    key, sub = jax.random.split(key)
    groups, _ = sample_groups(model, tokenizer, [e.prompt for e in chunk],
                              [e.answer for e in chunk], n, sub, spec, runner,
                              {"metadata": [e.metadata for e in chunk]})
    ok = rl.solved(groups.correct_B)
    correct.append(ok.reshape(len(chunk), n))
    for row, completion in enumerate(groups.completions):
      e = chunk[row // n]
      samples.append({"index": start + row // n, "sample": row % n, "prompt": e.prompt,
                      "answer": e.answer, "response": completion,
                      "extracted": extract_answer(completion) or completion.strip() or None,
                      "reward": float(groups.correct_B[row]), "correct": bool(ok[row]),
                      "source": e.metadata.get("source")})
  correct_PxN = np.concatenate(correct) if correct else np.zeros((0, n), bool)
  return correct_PxN, samples


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
  tokenizer = models.load_tokenizer(path)
  sets, reward_fn = eval_sets(tokenizer, _N_EVAL.value)
  model = models.from_pretrained(path)
  out = _OUT.value or os.path.join(path, "eval.json")
  samples_out = _SAMPLES.value or os.path.join(os.path.dirname(os.path.abspath(out)),
                                               "eval_samples.jsonl")
  result = {"model": path, "task": cli.task_flag_values()[0], "k": k, "n": n,
            "temperature": temperature, "datasets": {}}
  with RewardRunner([(reward_fn, 1.0)]) as runner, open(samples_out, "w") as f:
    for name, examples in sets:
      correct_PxN, samples = evaluate_set(model, tokenizer, examples, runner, k, n, temperature,
                                          _SEED.value)
      answers = np.array([s["extracted"] for s in samples], object).reshape(correct_PxN.shape)
      result["datasets"][name] = eval_metrics.summarize(correct_PxN, answers, k,
                                                        _RESAMPLES.value, _SEED.value)
      for s in samples:
        f.write(json.dumps({"dataset": name, **s}, ensure_ascii=False) + "\n")
  first = next(iter(result["datasets"].values()))
  # The first dataset's values at the top level (what `--k=1` users read: accuracy).
  result.update({"accuracy": first[f"mean@{k}"]["value"], "num_examples": first["num_examples"],
                 **{m: first[m]["value"] for m in (f"mean@{k}", f"pass@{k}", f"maj@{k}")}})
  result["samples"] = samples_out
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  for name, r in result["datasets"].items():
    print(f"{name}: " + ", ".join(f"{m} {r[m]['value']:.3f} [{r[m]['ci95'][0]:.3f}, "
                                  f"{r[m]['ci95'][1]:.3f}]" for m in r if "@" in m)
          + f" ({r['num_examples']} problems)")
  print(json.dumps({k_: v for k_, v in result.items() if k_ != "datasets"}))


if __name__ == "__main__":
  cli.run(main, config_flag=None)
