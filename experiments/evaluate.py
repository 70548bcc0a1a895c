r"""mean@k and pass@k of a checkpoint on a task's eval split; writes a json.

  python experiments/evaluate.py --model=workdir/default/export --k=8 --out=/tmp/eval.json
  python experiments/evaluate.py --model=workdir/default --k=1      # a run dir: uses its export/

--model is a Hugging Face directory (config.json + safetensors + tokenizer), or a run workdir whose
`export/` holds the exported policy. k = 1 evaluates greedily; k > 1 samples at --temperature.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "HF checkpoint directory or run workdir.")
_TASK = flags.DEFINE_string("task", "addition", "Registered task name.")
_DIGITS = flags.DEFINE_integer("digits", 2, "Addition task: digits per operand.")
_TERMS = flags.DEFINE_integer("terms", 2, "Addition task: number of operands.")
_N = flags.DEFINE_integer("eval_size", 300, "Number of eval examples.")
_K = flags.DEFINE_integer("k", 1, "Samples per problem (1 = greedy).")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature when k > 1.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "Response budget in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", "", "Where to write the json (default: <model>/eval.json).")


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  from mixpo import models, rl
  from mixpo.data import get_task
  from mixpo.rewards import RewardRunner
  path = _MODEL.value
  if not path:
    raise app.UsageError("--model is required.")
  if not os.path.exists(os.path.join(path, "config.json")):
    if os.path.exists(os.path.join(path, "export", "config.json")):
      path = os.path.join(path, "export")
    else:
      raise FileNotFoundError(f"--model={path}: no config.json there nor in {path}/export; pass "
                              "a Hugging Face checkpoint directory or a finished run's workdir.")
  kwargs = {"digits": _DIGITS.value, "terms": _TERMS.value} if _TASK.value == "addition" else {}
  task = get_task(_TASK.value, **kwargs)
  tokenizer, model = models.load_tokenizer(path), models.from_pretrained(path)
  temperature = 0.0 if _K.value == 1 else _TEMP.value
  with RewardRunner([(task.reward_fn, 1.0)]) as runner:
    result = rl.evaluate(model, tokenizer, task.eval_examples(_N.value), runner, _MAX_NEW.value,
                         k=_K.value, temperature=temperature, seed=_SEED.value)
  result.update(model=path, task=task.name, temperature=temperature)
  out = _OUT.value or os.path.join(path, "eval.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
