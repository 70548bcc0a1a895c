"""`run(config, workdir)`: the whole RL experiment the binaries and notebooks share.

Set-up checks everything that can be wrong before any model is built (config, workdir writable,
a foreign checkpoint in the workdir, and in `mixpo.preflight` the policy's and guide's tokenizers
by content, the dataset and trace files: `preflight.SetupError` naming `config.<field>`, file,
row and field), builds only the built-in models the run uses, writes the resolved `config.json`,
then: restore the latest valid checkpoint, step, evaluate, log, checkpoint; SIGTERM or Ctrl-C →
the step finishes, a forced checkpoint, `summary.json` and plots, a clean return (a second Ctrl-C
stops at once); too many consecutive non-finite updates → an error naming the step (summary.json
records it).
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
from absl import logging

from mixpo import builtin, checkpoint, cli, models, rl, sharding, train
from mixpo import logging as mlog
from mixpo import preflight
from mixpo.data import task_options
from mixpo.models import lora
from mixpo.rewards import RewardConfig, RewardRunner, custom

# Config fields that may change between a run and its resumption (they do not change results
# of the steps already taken).
# mesh_shape: resuming on another slice restores into the new sharding (same numbers up to
# float32 reduction order).
# max_policy_tokens: a larger budget continues a finished run (experiments/compare.py).
# no_signal_steps / max_skip_ratio: thresholds of warnings and of giving up, not of the updates.
# loggers / wandb_project: where metrics are sent besides metrics.jsonl.
RESUMABLE_FIELDS = ("num_steps", "overwrite", "progress", "log_samples_every", "builtin_dir",
                    "mesh_shape", "max_policy_tokens", "no_signal_steps", "max_skip_ratio",
                    "loggers", "wandb_project")


# Task options added after runs were fingerprinted: left out while at their defaults, so those
# runs (and the comparison grids' finished cells) still resume.
LATER_TASK_OPTIONS = ("eval_prompt_field", "eval_answer_field", "schema")


def fingerprint(config) -> dict:
  d = config.to_dict()
  for k in RESUMABLE_FIELDS:
    d.pop(k, None)
  kwargs = d.get("task_kwargs")
  for k in LATER_TASK_OPTIONS:
    if isinstance(kwargs, dict) and kwargs.get(k) == task_options.BY_NAME[k].default:
      kwargs.pop(k)
  return d


def resolve_models(config, workdir: str, spec: rl.RunSpec | None = None) -> tuple[str, str | None]:
  """Paths of the starting policy and of the guide (None when no guide is loaded); 'builtin'
  builds (or reuses) only the built-in models the run uses, under config.builtin_dir or
  workdir/models."""
  spec = spec or rl.resolve(config)
  used = preflight.builtin_models_used(config, spec)
  policy, guide = config.policy, (config.guide.path or None) if spec.guide.needs_model else None
  if used:
    directory = config.builtin_dir or os.path.join(workdir, "models")
    if jax.process_count() > 1:  # process 0 builds them (shared filesystem), the others wait.
      if jax.process_index() == 0:
        builtin.ensure_builtin_models(directory, config.builtin, only=used)
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices("mixpo: built-in models ready")
    b_guide, b_policy = builtin.ensure_builtin_models(directory, config.builtin, only=used)
    policy = b_policy if policy == "builtin" else policy
    guide = b_guide if guide == "builtin" else guide
  return policy, guide


def model_options(config, guide: bool = False) -> dict:
  """dtype / param_dtype / remat / attention_impl for from_pretrained (the guide never remats)."""
  return {"dtype": jnp.dtype(config.model.dtype), "param_dtype": jnp.dtype(config.model.param_dtype),
          "remat": bool(config.model.remat) and not guide,
          "attention_impl": config.model.attention_impl}


def lora_config(config) -> lora.LoraConfig | None:
  """`config.lora` as a LoraConfig (checked before any compute), None when rank is 0."""
  c = config.lora
  if not c.rank:
    return None
  return lora.LoraConfig(rank=int(c.rank), alpha=float(c.alpha), targets=c.targets,
                         dropout=float(c.dropout))


def _apply_lora(config, cfg: lora.LoraConfig | None, model) -> None:
  """Fresh adapters (A random, B = 0) on the policy, or config.lora.init_from's PEFT adapter."""
  if cfg is None:
    return
  if not config.lora.init_from:
    lora.apply(model, cfg, rng=config.seed)
    return
  got = models.load_adapter(model, config.lora.init_from)
  if got.rank != cfg.rank:
    raise ValueError(f"config.lora.init_from={config.lora.init_from!r} holds rank-{got.rank} "
                     f"adapters but config.lora.rank={cfg.rank}; set config.lora.rank={got.rank}.")


def setup(config, workdir: str):
  """Returns (experiment, initial TrainState, Checkpointer, eval examples).

  The config is resolved once into `exp.spec` (`rl.resolve`, which validates it before anything
  is built); then the files (tokenizers, dataset, traces) are read and refused before any model
  is built; then the models, the reward runner, the trainer and the rollout engines. The (data,
  fsdp, tensor) mesh is `exp.mesh`: every tensor is read straight onto its shards and the train
  step is jitted with explicit shardings; `run` enters it with `jax.set_mesh` for the run's
  duration (nothing here sets it process-wide).
  """
  # A notebook's `config.eps_low = ...` would add a field nothing reads: refused by its new name.
  cli.check_renamed(config, "the config")
  checkpoint.check_directory(workdir)  # creates it; a clear error if unwritable or full.
  spec = rl.resolve(config)
  preflight.warn_unused(config, spec)
  _warn_gpu_precision(config)
  # Files before models: tokenizers, the dataset and the traces are read (and refused) first.
  tokenizer = preflight.tokenizer_of(config, "policy")
  preflight.check_guide(config, spec, tokenizer)
  task, eval_examples = preflight.make_task(config, tokenizer)
  traces = preflight.read_traces(config, spec, tokenizer)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                                 fingerprint=fingerprint(config), overwrite=config.overwrite)
  policy_path, guide_path = resolve_models(config, workdir, spec)
  if config.policy == "builtin":  # as saved with the built model
    tokenizer = models.load_tokenizer(policy_path)
  preflight.write_run_config(config, workdir, spec, policy_path, guide_path)
  # One code path for 1 device and a pod; a 1-device mesh leaves the numbers unchanged.
  mesh = sharding.make_mesh(spec.mesh_shape)
  sharding.log_layout(mesh)
  model, guide, reference = build_models(config, spec, mesh, policy_path, guide_path)
  runner = build_reward_runner(config, task)
  policy, state, train_step = build_trainer(config, spec, model, mesh, ckpt, policy_path)
  policy_engine, guide_engine = rl.make_engines(spec, policy_path, guide_path,
                                                config.model.dtype)
  exp = rl.Experiment(config=config, spec=spec, policy=policy, guide=guide, tokenizer=tokenizer,
                      task=task, reward_runner=runner, train_step=train_step,
                      reference=reference, mesh=mesh, traces=traces,
                      policy_engine=policy_engine, guide_engine=guide_engine)
  return exp, state, ckpt, eval_examples


def _warn_gpu_precision(config) -> None:
  if (jax.default_backend() == "gpu" and config.model.dtype == "float32"
      and jax.config.jax_default_matmul_precision in (None, "default")):
    # Measured on an H200 (jax 0.11.2): logits 3.8e-4 from transformers' instead of < 1e-4, and
    # θ_old log-probs that differ between score shapes, i.e. ratios r ≠ 1 at θ = θ_old.
    logging.warning("float32 on GPU with the default matmul precision: XLA:GPU multiplies in "
                    "TF32. Set JAX_DEFAULT_MATMUL_PRECISION=highest for float32 numbers (or "
                    "config.model.dtype=bfloat16 for speed).")


def build_models(config, spec: rl.RunSpec, mesh, policy_path: str, guide_path: str | None):
  """(policy model, guide, KL reference): the policy as loaded (LoRA adapters added later, by
  `build_trainer`); the guide and the reference frozen as (graphdef, state) in the rollout dtype,
  None where the run does not use them. Every tensor is read straight onto its shards."""
  on_shards = sharding.path_shardings(mesh)
  model = models.from_pretrained(policy_path, shardings=on_shards, **model_options(config))
  guide = reference = None
  if spec.guide.needs_model:
    guide_model = models.from_pretrained(guide_path, shardings=on_shards,
                                         **model_options(config, guide=True))
    guide = rl.rollout_view(spec, _frozen(guide_model))  # held in the rollout dtype only.
    del guide_model
  if spec.keeps_reference:  # the KL reference: the starting policy, frozen (no remat, no grads).
    reference = rl.rollout_view(spec, _frozen(models.from_pretrained(
        policy_path, shardings=on_shards, **model_options(config, guide=True))))
  return model, guide, reference


def build_reward_runner(config, task) -> RewardRunner:
  """The task's reward, or config.reward.functions, in the sandboxed runner. Every process holds
  the same rollouts (see rl.py); each scores 1/P of them."""
  r = RewardConfig(**config.reward)
  runner = RewardRunner(custom.reward_fns(r.functions, r.weights, task.reward_fn),
                        timeout_s=r.timeout_s, on_error=r.on_error, split_across_processes=True,
                        batch_timeout_s=r.batch_timeout_s or None)
  logging.info("reward workers: %s", runner.sandbox)
  return runner


def build_trainer(config, spec: rl.RunSpec, model, mesh, ckpt: checkpoint.Checkpointer,
                  policy_path: str):
  """(train.Policy, initial TrainState on the mesh, jitted train_step): LoRA adapters applied
  (fresh or config.lora.init_from's; the checkpoints then hold adapters only, tied to this base),
  AdamW, the state laid out by the partition rules."""
  _apply_lora(config, lora_config(config), model)
  policy = train.Policy(model)
  if policy.base is not None:  # the checkpoints hold adapters only: tie them to this base.
    ckpt.check_base({"path": os.path.abspath(policy_path), **lora.fingerprint(policy.base)},
                    overwrite=config.overwrite)
  optimizer = train.make_optimizer(train.OptimConfig(**config.optim))
  state = train.init_state(policy, optimizer, config.seed)
  state_sh = sharding.train_state_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  train_step = train.make_train_step(policy, optimizer, spec.step,
                                     shardings=(state_sh, sharding.batch_sharding(mesh)))
  return policy, state, train_step


def _frozen(model) -> tuple:
  """(graphdef, state) of the guide. Frozen by construction: only the policy's parameters are in
  `TrainState`, so the guide's arrays never reach `train_step` or the optimizer."""
  from flax import nnx
  return nnx.split(model)


class _StopNow(KeyboardInterrupt):
  """A second Ctrl-C: stop without finishing the step."""


class _Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag checked between steps.

  Schedulers send SIGTERM, often to the whole process group, before evicting a job; the reward
  workers are in a session of their own (mixpo.rewards.sandbox), so the step in flight finishes,
  rewards included, and a forced checkpoint follows. A second Ctrl-C raises KeyboardInterrupt at
  once (the last checkpoint stays valid: orbax writes atomically). If that lands inside a gc
  callback or a `__del__` (jax registers `_xla_gc_callback`), Python would print "Exception
  ignored" and carry on; `sys.unraisablehook` catches ours there and the interrupt is delivered
  again until it lands in plain code.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None  # the name of the signal that asked to stop
    self._previous = {}
    self._unraisable_hook = None
    self._in_hook = False
    self._redelivery = None

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler.
        pass
    if self._previous:
      self._unraisable_hook = sys.unraisablehook
      sys.unraisablehook = self._unraisable
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      if self._in_hook:  # raised here it would be swallowed again
        self._redeliver()
        return
      raise _StopNow(f"second {name}: stopping without finishing the step")
    if not self.requested:
      self.requested = name
      how = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
      logging.warning("%s received: finishing the step, then a final checkpoint and exit%s.",
                      name, how)

  def _unraisable(self, info):
    if not isinstance(info.exc_value, _StopNow):
      self._unraisable_hook(info)
      return
    self._in_hook = True
    try:
      self._redeliver()
    finally:
      self._in_hook = False

  def _redeliver(self):
    # From another thread, a little later: the handler then runs in the main thread's plain
    # code, not in this collection (a swallowed one comes back here and is sent again).
    self._redelivery = threading.Timer(0.01, _thread.interrupt_main, args=(signal.SIGINT,))
    self._redelivery.daemon = True
    self._redelivery.start()

  def __exit__(self, *exc):
    if self._redelivery is not None:  # the block ended first: nothing left to interrupt
      self._redelivery.cancel()
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    if self._unraisable_hook is not None:
      sys.unraisablehook = self._unraisable_hook


def _evaluate(exp, params, examples) -> dict:
  out = rl.evaluate(exp.policy.pair(params), exp.tokenizer, examples, exp.reward_runner,
                    exp.spec.sample.max_new_tokens, batch_size=exp.config.eval_batch_size)
  # The set's size is logged with the accuracy: plots and readers see "of how many problems".
  return {"eval/accuracy": out["accuracy"], "eval/num_examples": out["num_examples"]}


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the final summary dict.

  The run's mesh is entered here and left on return, so two runs in one process (notebooks,
  tests) cannot leak layouts into each other.
  """
  mlog.CompileCounter.install()
  preflight.loggers(config)  # a typo in config.loggers is found before any work.
  exp, state, ckpt, eval_examples = setup(config, workdir)
  try:
    # Signals are handled up to the summary: a Ctrl-C in the export and plots after the last
    # step (gc-heavy) is caught like one during a step.
    with jax.set_mesh(exp.mesh), _Preemption() as preempt:
      return _run(exp, state, ckpt, eval_examples, config, workdir, preempt)
  finally:
    exp.reward_runner.close()


class _Live:
  """The run's state as the step loop leaves it, also when it stops with an error."""

  def __init__(self, state, extra):
    self.state, self.extra = state, extra


def _run(exp, state, ckpt, eval_examples, config, workdir: str, preempt: _Preemption) -> dict:
  extra = {"data_pos": 0, "policy_tokens": 0, "guide_tokens": 0, "consecutive_skips": 0}
  restored = ckpt.restore_latest(state)
  if restored is not None:
    step0, state, extra = restored
    logging.info("resumed from step %d of %s", step0, ckpt.directory)
  start = int(state.step)
  is_main = jax.process_index() == 0
  # A fresh start drops every row (-1): rows there came from an attempt that crashed before its
  # first checkpoint and will be logged again.
  config_dict = json.loads(json.dumps(config.to_dict(), default=str))
  logger = mlog.MetricLogger(workdir, is_main=is_main, resume_step=start if restored else -1,
                             loggers=preflight.loggers(config), config=config_dict,
                             project=config.wandb_project)
  if restored:
    logger.event(start, "resumed")
  summary = {"start_step": start, "preempted": False, "guide_source": exp.spec.guide.source,
             "guide_logp": exp.spec.guide.logp, "eval_size": len(eval_examples)}
  if exp.traces is not None:  # what was read and dropped, by reason (also in the log above).
    summary.update(exp.traces.report())
  health = mlog.RunHealth(config.max_skip_ratio, config.no_signal_steps,
                          reward_failure_ratio=config.reward.failure_warn_ratio)
  # Logged at WARNING when the task read its files; listed again where a person looks last.
  health.warnings += task_options.dropped_rows_warnings(exp.task)
  live = _Live(state, extra)
  try:
    with ckpt, logger, mlog.Progress(
        config.num_steps, initial=start, disable=not (config.progress and is_main)) as bar:
      _steps(exp, live, ckpt, logger, bar, eval_examples, config, preempt, health, summary)
  except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C: stop at once, no summary work.
    raise
  except Exception as e:  # the run's files still say how far it got and why it stopped.
    summary["error"] = f"{type(e).__name__}: {e}"
    _finish(exp, live, ckpt, config, workdir, summary, health)
    raise
  return _finish(exp, live, ckpt, config, workdir, summary, health)


def _steps(exp, live, ckpt, logger, bar, eval_examples, config, preempt, health, summary):
  """The step loop: step, evaluate, checkpoint, log, until num_steps, the token budget or a
  stop signal."""
  extra, start = live.extra, int(live.state.step)
  if start == 0:
    first = _evaluate(exp, live.state.params, eval_examples)
    logger.write(0, {**first, "policy_tokens": 0, "guide_tokens": 0})
    summary["initial_eval_accuracy"] = first["eval/accuracy"]
  timer = mlog.PhaseTimer()
  t_start = time.time()
  # Equal-budget comparisons stop on generated policy tokens (0 = off); guide tokens not counted.
  budget = int(config.max_policy_tokens)
  for step in range(start + 1, config.num_steps + 1):
    if budget and extra["policy_tokens"] >= budget:  # resumed after the final step.
      break
    timer.reset()
    live.state, extra["data_pos"], metrics, samples = rl.rl_step(exp, live.state,
                                                                 extra["data_pos"], timer)
    extra["policy_tokens"] += metrics["step_policy_tokens"]
    extra["guide_tokens"] += metrics["step_guide_tokens"]
    skipped = metrics["loss/skipped_updates"] > 0
    extra["consecutive_skips"] = extra["consecutive_skips"] + 1 if skipped else 0
    health.observe(step, metrics)
    if extra["consecutive_skips"] >= config.max_consecutive_skips:
      logger.write(step, metrics)  # the failing step's counts belong in metrics.jsonl too.
      raise train.NonFiniteUpdateError(
          f"step {step}: {extra['consecutive_skips']} consecutive steps had non-finite loss or "
          "gradients (updates skipped, parameters unchanged). Likely causes: a learning rate "
          "too high, -inf log-probs from θ_old or the guide (tokens outside the model's "
          "support), or config.objective.max_log_ratio too large. Last loss: "
          f"{metrics.get('loss/loss')}.")
    metrics.update(policy_tokens=extra["policy_tokens"], guide_tokens=extra["guide_tokens"],
                   data_pos=extra["data_pos"], wall_s=time.time() - t_start)
    last = step == config.num_steps or bool(budget and extra["policy_tokens"] >= budget)
    if step % config.eval_every == 0 or last:
      with timer("eval"):
        metrics.update(_evaluate(exp, live.state.params, eval_examples))
    with timer("checkpoint"):
      ckpt.save(step, live.state, extra, force=bool(preempt.requested) or last)
    metrics.update(timer.metrics())
    metrics["compile/count"] = mlog.CompileCounter.count()
    logger.write(step, metrics)
    every = config.log_samples_every
    # The first step's samples too: a short run (or the first minutes of a long one) shows what
    # the policy writes.
    if every and (step == start + 1 or step % every == 0 or last):
      logger.write_samples(step, samples)
    bar.update(step, metrics)
    if preempt.requested:
      summary.update(preempted=True, preempted_by=preempt.requested)
      break
    if last:
      break
  summary["budget_reached"] = bool(budget and extra["policy_tokens"] >= budget)


def _finish(exp, live, ckpt, config, workdir: str, summary: dict, health) -> dict:
  """The summary, the export (a run that ended normally) and, on every end (finished,
  preempted, stopped by an error), plots/ and summary.json."""
  is_main = jax.process_index() == 0
  extra = live.extra
  summary.update(final_step=int(live.state.step), policy_tokens=extra["policy_tokens"],
                 guide_tokens=extra["guide_tokens"], **health.summary())
  summary.setdefault("budget_reached", False)
  has_rows = os.path.exists(os.path.join(workdir, mlog.METRICS_FILE))
  rows = [r for r in mlog.read_metrics(workdir) if "eval/accuracy" in r] if has_rows else []
  if rows:
    summary["final_eval_accuracy"] = rows[-1]["eval/accuracy"]
    summary.setdefault("initial_eval_accuracy", rows[0]["eval/accuracy"])
  finished = not summary["preempted"] and "error" not in summary
  state = live.state
  export_params, export_base = state.params, exp.policy.base
  if jax.process_count() > 1 and config.export_hf and finished:
    # A collective: every process joins; process 0 then holds the full (host) weights and writes.
    export_params, export_base = sharding.to_host((state.params, exp.policy.base))
  if not is_main:
    return summary
  if config.export_hf and finished:
    export = exp.policy.merge(export_params, export_base)
    if export_base is not None:  # LoRA: the adapters alone (PEFT), then the merged weights.
      with open(os.path.join(ckpt.directory, checkpoint.BASE_FILE)) as f:
        base_path = json.load(f)["path"]
      models.save_adapter(export, os.path.join(workdir, "export_adapter"), base_path)
      export = lora.merged(export)
    models.save_pretrained(export, os.path.join(workdir, "export"), tokenizer=exp.tokenizer)
  try:
    summary["plots"] = mlog.plot_run(workdir)
  except Exception as e:  # noqa: BLE001  (plots never hide the run's own outcome)
    logging.warning("plots not written: %s: %s", type(e).__name__, e)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary
