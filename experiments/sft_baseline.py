"""SFT on the guide's traces: the off-policy baseline LUFFY (arXiv 2504.14945) compares against.

A cell of the reasoning grids (experiments/grid.py) whose algorithm is "sft": the starting policy
is fine-tuned by supervised steps (token-mean NLL of response + EOS, `train.make_sft_step`) on the
responses of config.guide.traces_path, `groups × m` responses a step, drawn without replacement in a
seeded order (a new permutation each pass over the file). No policy sample is generated, so its
budget counts the tokens it trains on: `policy_tokens` = trained response tokens (EOS included),
the same count an RL cell spends on generated tokens; they are guide tokens as well
(`guide_tokens`, the same number). Evaluation is the RL loop's: greedy accuracy of the same
config.eval_size eval problems at step 0, every config.eval_every steps and at the last step.
Writes metrics.jsonl and summary.json in the workdir like `mixpo.loop.run` (no checkpoints: an
interrupted cell reruns from the start), and with config.export_hf the final model in Hugging Face
format to workdir/export.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np


def run(config, workdir: str) -> dict:
  """Runs the SFT cell of `config` in `workdir`; returns its summary (as loop.run's)."""
  from mixpo import builtin, models, rl, train  # noqa: PLC0415
  from mixpo import logging as mlog  # noqa: PLC0415
  from mixpo.data import task_options  # noqa: PLC0415
  from mixpo.data.tasks import Example  # noqa: PLC0415
  from mixpo.data.traces import read_trace_prompts  # noqa: PLC0415
  from mixpo.rewards import RewardRunner  # noqa: PLC0415

  if not config.guide.traces_path or not os.path.exists(config.guide.traces_path):
    raise ValueError(f"sft baseline: config.guide.traces_path={config.guide.traces_path!r} is "
                     "not a file; the reasoning grids write it (experiments/grid.py, "
                     "prepare_reasoning).")
  os.makedirs(workdir, exist_ok=True)
  tokenizer = models.load_tokenizer(config.policy)
  from mixpo.loop import model_options  # noqa: PLC0415
  model = models.from_pretrained(config.policy, **model_options(config))  # remat as RL cells do.
  prompts, _ = read_trace_prompts(config.guide.traces_path, tokenizer=tokenizer)
  pairs = [(p.prompt, p.answer, r.text) for p in prompts for r in p.responses
           if r.correct or not config.guide.traces.only_correct]
  if not pairs:
    raise ValueError(f"sft baseline: {config.guide.traces_path} has no usable response "
                     f"(traces.only_correct={config.guide.traces.only_correct}).")
  rows_per_step = int(config.rollout.groups) * int(config.rollout.m)
  rng = np.random.default_rng(config.seed)
  order: list[int] = []

  def next_batch():
    while len(order) < rows_per_step:
      order.extend(rng.permutation(len(pairs)).tolist())
    take = [order.pop(0) for _ in range(rows_per_step)]
    return [Example(prompt=pairs[i][0], answer=pairs[i][1], metadata={"solution": pairs[i][2]})
            for i in take]

  policy = train.Policy(model)
  optimizer = train.make_optimizer(train.OptimConfig(**config.optim))
  state = train.init_state(policy, optimizer, config.seed)
  step_fn = train.make_sft_step(policy, optimizer)
  # The policy's tokenizer renders a chat model's prompts (word problems, file datasets).
  task = task_options.make_task(config.task, config.task_kwargs, config.task_knobs,
                                tokenizer=tokenizer)
  eval_examples = task.eval_examples(config.eval_size)
  budget = int(config.max_policy_tokens)
  tokens, summary = 0, {"start_step": 0, "preempted": False, "guide_source": "traces",
                        "guide_logp": "none", "sft_rows": len(pairs)}
  t_start = time.time()
  with RewardRunner([(task.reward_fn, 1.0)], timeout_s=config.reward.timeout_s) as runner, \
      mlog.MetricLogger(workdir, resume_step=-1, tensorboard=False) as logger:

    def evaluate(params):
      out = rl.evaluate(policy.merge(params), tokenizer, eval_examples, runner,
                        config.rollout.max_new_tokens, batch_size=config.eval_batch_size)
      return out["accuracy"]

    summary["initial_eval_accuracy"] = evaluate(state.params)
    logger.write(0, {"eval/accuracy": summary["initial_eval_accuracy"], "policy_tokens": 0,
                     "guide_tokens": 0})
    step = 0
    for step in range(1, config.num_steps + 1):
      batch = builtin.sft_batch(tokenizer, next_batch(), config.rollout.max_new_tokens)
      state, metrics = step_fn(state, batch)
      tokens += int(np.asarray(batch.loss_mask_BxT).sum())
      row = {"train/loss": float(metrics["loss"]), "policy_tokens": tokens,
             "guide_tokens": tokens, "wall_s": time.time() - t_start}
      last = step == config.num_steps or bool(budget and tokens >= budget)
      if step % config.eval_every == 0 or last:
        row["eval/accuracy"] = evaluate(state.params)
      logger.write(step, row)
      if last:
        break
  if config.export_hf:  # the SFT stage of an SFT → RL cell: its RL stage starts here.
    models.save_pretrained(policy.merge(state.params), os.path.join(workdir, "export"))
    tokenizer.save_pretrained(os.path.join(workdir, "export"))
  rows = [r for r in mlog.read_metrics(workdir) if "eval/accuracy" in r]
  summary.update(final_step=step, policy_tokens=tokens, guide_tokens=tokens,
                 budget_reached=bool(budget and tokens >= budget),
                 final_eval_accuracy=rows[-1]["eval/accuracy"])
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary
