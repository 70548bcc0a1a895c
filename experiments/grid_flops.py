"""Model FLOPs a grid cell spent, from its metrics.jsonl and its config (mixpo/flops.py's count).

`with_flops(metrics, config, sft)` adds to every logged step the cumulative FLOPs of policy
generation, the online guide's generation, scoring (θ_old, πϕ, π_ref), the updates and SFT
steps, and their sum "flops" (mixpo.flops.PARTS). An RL step's parts come from the counts it
logs (`mixpo.flops.rl_step_flops`); an SFT step's from its trained tokens and the config's
groups × m rows a step (experiments/sft_baseline.py). The mean prompt length is measured on the
task's first train prompts under the policy's tokenizer (chat template included). Offline trace
generation is charged by experiments/grid.py (`_charge_offline_guide`), the guide's own SFT is
a one-off cost every guided cell shares (reported in the summary, not charged to a cell).
Evaluation is not training compute and is not counted.
"""

from __future__ import annotations

import functools
import json
import os

from mixpo import flops as mixpo_flops

PROMPT_SAMPLE = 256  # train prompts the mean prompt length is measured on.


def model_dir(config, which: str) -> str:
  """The policy's ("policy") or guide's ("guide") checkpoint directory of a run config."""
  path = config.policy if which == "policy" else config.guide.path
  if path == "builtin":  # the table grids: built-in models in builtin_dir.
    return os.path.join(config.builtin_dir, "policy_init" if which == "policy" else "guide")
  return path


@functools.lru_cache(maxsize=16)
def hf_config(path: str) -> dict:
  """config.json of a checkpoint directory."""
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def make_task(config, tokenizer):
  from mixpo.data import task_options  # noqa: PLC0415
  return task_options.make_task(config.task, config.task_kwargs, config.task_knobs,
                                tokenizer=tokenizer)


def mean_prompt_tokens(tokenizer, examples) -> float:
  """Mean prompt length in tokens as the rollout encodes prompts (special tokens included)."""
  lengths = [len(tokenizer(e.prompt, add_special_tokens=True)["input_ids"]) for e in examples]
  return sum(lengths) / max(len(lengths), 1)


@functools.lru_cache(maxsize=16)
def _prompt_tokens(policy_dir: str, task: str, task_kwargs: str, knobs: str) -> float:
  import ml_collections  # noqa: PLC0415

  from mixpo import models  # noqa: PLC0415
  tokenizer = models.load_tokenizer(policy_dir)
  c = ml_collections.ConfigDict({"task": task, "task_kwargs": json.loads(task_kwargs),
                                 "task_knobs": knobs})
  return mean_prompt_tokens(tokenizer, make_task(c, tokenizer).examples("train", PROMPT_SAMPLE))


def step_cost(config) -> mixpo_flops.StepCost:
  """What each step of the run `config` costs (mixpo.flops.StepCost)."""
  from mixpo import algorithms  # noqa: PLC0415
  policy_dir = model_dir(config, "policy")
  # SFT cells carry a runner's name, not a table entry: they sample no guide.
  entry = algorithms.TABLE.get(config.algo)
  guided = entry is not None and entry.guided
  guide = None
  if guided and config.guide.path:
    guide_dir = model_dir(config, "guide")
    guide = hf_config(guide_dir) if os.path.exists(os.path.join(guide_dir, "config.json")) else None
  return mixpo_flops.StepCost(
      policy=hf_config(policy_dir),
      prompt_tokens=_prompt_tokens(policy_dir, config.task,
                                   json.dumps(dict(config.task_kwargs), sort_keys=True),
                                   config.task_knobs),
      guide=guide, guide_online=guided and config.guide.source == "model",
      guide_scores=guided and config.guide.logp == "model", reference=config.objective.kl_coef > 0,
      epochs=int(config.step.epochs), lora_rank=int(config.lora.rank))


def with_flops(metrics: list[dict], config, sft: bool = False) -> list[dict]:
  """`metrics` (rows of one run, step order) with cumulative FLOPs per part and in total."""
  cost = step_cost(config)
  total = {part: 0.0 for part in mixpo_flops.PARTS}
  by_step = {int(r["step"]): r for r in metrics}  # a step logged twice (resumed) keeps its last.
  out, last_tokens = [], 0
  for step, r in sorted(by_step.items()):
    if step > 0 and sft:
      tokens = r.get("policy_tokens", last_tokens)
      total["flops_sft"] += mixpo_flops.sft_step_flops(
          cost.policy, int(config.rollout.groups) * int(config.rollout.m), cost.prompt_tokens,
          tokens - last_tokens, cost.lora_rank)
      last_tokens = tokens
    elif step > 0 and "step_policy_tokens" in r:
      for part, value in mixpo_flops.rl_step_flops(r, cost, int(config.rollout.groups),
                                                   int(config.rollout.n)).items():
        total[part] += value
    out.append({**r, **total, "flops": sum(total.values())})
  return out
