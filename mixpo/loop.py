"""`run(config, workdir)`: the whole RL experiment the binaries and notebooks share.

Set-up checks everything that can be wrong before any compute (config, workdir writable,
vocabularies, a foreign checkpoint in the workdir), then: restore the latest valid checkpoint,
step, evaluate, log, checkpoint; SIGTERM or Ctrl-C → the step finishes, a forced checkpoint, a
clean return (a second Ctrl-C stops at once); too many consecutive non-finite updates → an error
naming the step.
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

from mixpo import builtin, checkpoint, models, rl, sharding, train
from mixpo import logging as mlog
from mixpo.data import task_options
from mixpo.guide_source import TraceSource
from mixpo.models import lora
from mixpo.rewards import RewardRunner, custom

# Config fields that may change between a run and its resumption (they do not change results
# of the steps already taken).
# mesh_shape: resuming on another slice restores into the new sharding (same numbers up to
# float32 reduction order).
# max_policy_tokens: a larger budget continues a finished run (experiments/compare.py).
# no_signal_steps / max_skip_ratio: thresholds of warnings and of giving up, not of the updates.
RESUMABLE_FIELDS = ("num_steps", "overwrite", "progress", "log_samples_every", "builtin_dir",
                    "mesh_shape", "max_policy_tokens", "no_signal_steps", "max_skip_ratio")


def fingerprint(config) -> dict:
  d = config.to_dict()
  for k in RESUMABLE_FIELDS:
    d.pop(k, None)
  return d


def resolve_models(config, workdir: str) -> tuple[str, str | None]:
  """Paths of the starting policy and the guide; 'builtin' builds them under workdir/models."""
  policy, guide = config.policy, config.guide
  if "builtin" in (policy, guide):
    directory = config.builtin_dir or os.path.join(workdir, "models")
    if jax.process_count() > 1:  # process 0 builds them (shared filesystem), the others wait.
      if jax.process_index() == 0:
        builtin.ensure_builtin_models(directory, config.builtin)
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices("mixpo: built-in models ready")
    b_guide, b_policy = builtin.ensure_builtin_models(directory, config.builtin)
    policy = b_policy if policy == "builtin" else policy
    guide = b_guide if guide == "builtin" else guide
  return policy, guide or None


def model_options(config, guide: bool = False) -> dict:
  """dtype / param_dtype / remat / attention_impl for from_pretrained (the guide never remats)."""
  return {"dtype": jnp.dtype(config.model.dtype), "param_dtype": jnp.dtype(config.model.param_dtype),
          "remat": bool(config.model.remat) and not guide,
          "attention_impl": config.model.attention_impl}


def lora_config(config) -> lora.LoraConfig | None:
  """`config.lora` as a LoraConfig (checked before any compute), None when rank is 0."""
  c = config.get("lora")
  if c is None or not c.rank:
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
  is built). The (data, fsdp, tensor) mesh is `exp.mesh`: every tensor is read straight onto its
  shards and the train step is jitted with explicit shardings; `run` enters it with
  `jax.set_mesh` for the run's duration (nothing here sets it process-wide).
  """
  checkpoint.check_directory(workdir)  # creates it; a clear error if unwritable or full.
  spec = rl.resolve(config)
  lora_cfg = lora_config(config)
  if (jax.default_backend() == "gpu" and config.model.dtype == "float32"
      and jax.config.jax_default_matmul_precision in (None, "default")):
    # Measured on an H200 (jax 0.11.2): logits 3.8e-4 from transformers' instead of < 1e-4, and
    # θ_old log-probs that differ between score shapes, i.e. ratios r ≠ 1 at θ = θ_old.
    logging.warning("float32 on GPU with the default matmul precision: XLA:GPU multiplies in "
                    "TF32. Set JAX_DEFAULT_MATMUL_PRECISION=highest for float32 numbers (or "
                    "config.model.dtype=bfloat16 for speed).")
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                                 fingerprint=fingerprint(config), overwrite=config.overwrite)
  policy_path, guide_path = resolve_models(config, workdir)
  # One code path for 1 device and a pod; a 1-device mesh leaves the numbers unchanged.
  mesh = sharding.make_mesh(spec.mesh_shape)
  sharding.log_layout(mesh)
  on_shards = sharding.path_shardings(mesh)
  tokenizer = models.load_tokenizer(policy_path)
  model = models.from_pretrained(policy_path, shardings=on_shards, **model_options(config))
  guide = reference = None
  if spec.guide.needs_model:
    guide_model = models.from_pretrained(guide_path, shardings=on_shards,
                                         **model_options(config, guide=True))
    rl.check_vocabularies(model.config.vocab_size, guide_model.config.vocab_size)
    guide = rl.rollout_view(spec, _frozen(guide_model))  # held in the rollout dtype only.
    del guide_model
  if spec.keeps_reference:  # the KL reference: the starting policy, frozen (no remat, no grads).
    reference = rl.rollout_view(spec, _frozen(models.from_pretrained(
        policy_path, shardings=on_shards, **model_options(config, guide=True))))
  # Real datasets: the policy's tokenizer renders / filters the file task's prompts.
  task = task_options.make_task(config.task, config.task_kwargs, config.get("task_knobs", ""),
                                tokenizer=tokenizer)
  traces = None
  if spec.guide.source == "traces":  # the trace file is the train set; the task evaluates.
    traces = TraceSource.from_options(spec.guide.traces, tokenizer,
                                      max_new_tokens=config.max_new_tokens,
                                      temperature=config.temperature)
    logging.info("guide traces: %s; %s", traces.summary, traces.report())
  # Every process holds the same rollouts (see rl.py); each scores 1/P of them.
  runner = RewardRunner(custom.reward_fns(config.get("rewards", ""),
                                          config.get("reward_weights", ""), task.reward_fn),
                        timeout_s=config.reward_timeout_s,
                        on_error=config.reward_on_error, split_across_processes=True,
                        batch_timeout_s=config.get("reward_batch_timeout_s", 0) or None)
  logging.info("reward workers: %s", runner.sandbox)
  _apply_lora(config, lora_cfg, model)
  policy = train.Policy(model)
  if policy.base is not None:  # the checkpoints hold adapters only: tie them to this base.
    ckpt.check_base({"path": os.path.abspath(policy_path), **lora.fingerprint(policy.base)},
                    overwrite=config.overwrite)
  optimizer = train.make_optimizer(train.OptimConfig(
      learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
      weight_decay=config.weight_decay, grad_clip=config.grad_clip))
  state = train.init_state(policy, optimizer, config.seed)
  state_sh = sharding.train_state_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  train_step = train.make_train_step(policy, optimizer, spec.step,
                                     shardings=(state_sh, sharding.batch_sharding(mesh)))
  exp = rl.Experiment(config=config, spec=spec, policy=policy, guide=guide, tokenizer=tokenizer,
                      task=task, reward_runner=runner, train_step=train_step,
                      reference=reference, mesh=mesh, traces=traces)
  if spec.rollout_engine == "vllm":
    exp.policy_engine, exp.guide_engine = rollout_engines(config, spec, policy_path, guide_path)
  return exp, state, ckpt, task.eval_examples(config.eval_size)


def rollout_engines(config, spec: rl.RunSpec, policy_path: str, guide_path: str | None):
  """(policy engine, online guide engine or None) of rollout_engine="vllm", built from the
  checkpoint directories the models were loaded from. The policy engine's weights are replaced by
  θ_old at every step (rl.rl_step), so a resumed or LoRA run starts from its own weights too."""
  if jax.process_count() > 1:
    raise ValueError("config.rollout_engine='vllm' runs its engines inside one process; use "
                     "config.rollout_engine='jax' for a multi-process run.")
  from mixpo.engines.vllm import VllmEngine  # noqa: PLC0415
  dtype = config.model.dtype if spec.rollout_dtype == "model" else spec.rollout_dtype
  policy = VllmEngine(policy_path, dtype=dtype, seed=config.seed)
  guide = None
  if spec.sizes.m and spec.guide.source == "model":
    guide = VllmEngine(guide_path, dtype=dtype, seed=config.seed)
  return policy, guide


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
                    exp.config.max_new_tokens, batch_size=exp.config.eval_batch_size)
  return {"eval/accuracy": out["accuracy"]}


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the final summary dict.

  The run's mesh is entered here and left on return, so two runs in one process (notebooks,
  tests) cannot leak layouts into each other.
  """
  mlog.CompileCounter.install()
  exp, state, ckpt, eval_examples = setup(config, workdir)
  try:
    # Signals are handled up to the summary: a Ctrl-C in the export and plots after the last
    # step (gc-heavy) is caught like one during a step.
    with jax.set_mesh(exp.mesh), _Preemption() as preempt:
      return _run(exp, state, ckpt, eval_examples, config, workdir, preempt)
  finally:
    exp.reward_runner.close()


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
  logger = mlog.MetricLogger(workdir, is_main=is_main, resume_step=start if restored else -1)
  summary = {"start_step": start, "preempted": False, "guide_source": exp.spec.guide.source,
             "guide_logp": exp.spec.guide.logp}
  if exp.traces is not None:  # what was read and dropped, by reason (also in the log above).
    summary.update(exp.traces.report())
  health = mlog.RunHealth(config.get("max_skip_ratio", 1.0), config.get("no_signal_steps", 0))
  # Logged at WARNING when the task read its files; listed again where a person looks last.
  health.warnings += task_options.dropped_rows_warnings(exp.task)
  t_start = time.time()
  with ckpt, logger, mlog.Progress(
      config.num_steps, initial=start, disable=not (config.progress and is_main)) as bar:
    if start == 0:
      first = _evaluate(exp, state.params, eval_examples)
      logger.write(0, {**first, "policy_tokens": 0, "guide_tokens": 0})
      summary["initial_eval_accuracy"] = first["eval/accuracy"]
    timer = mlog.PhaseTimer()
    # Equal-budget comparisons stop on generated policy tokens (0 = off); guide tokens not counted.
    budget = int(config.get("max_policy_tokens", 0) or 0)
    for step in range(start + 1, config.num_steps + 1):
      if budget and extra["policy_tokens"] >= budget:  # resumed after the final step.
        break
      timer.reset()
      state, extra["data_pos"], metrics, samples = rl.rl_step(exp, state, extra["data_pos"], timer)
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
            "support), or config.max_log_ratio too large. Last loss: "
            f"{metrics.get('loss/loss')}.")
      metrics.update(policy_tokens=extra["policy_tokens"], guide_tokens=extra["guide_tokens"],
                     data_pos=extra["data_pos"], wall_s=time.time() - t_start)
      last = step == config.num_steps or bool(budget and extra["policy_tokens"] >= budget)
      if step % config.eval_every == 0 or last:
        with timer("eval"):
          metrics.update(_evaluate(exp, state.params, eval_examples))
      with timer("checkpoint"):
        ckpt.save(step, state, extra, force=bool(preempt.requested) or last)
      metrics.update(timer.metrics())
      metrics["compile/count"] = mlog.CompileCounter.count()
      logger.write(step, metrics)
      if config.log_samples_every and step % config.log_samples_every == 0:
        logger.write_samples(step, samples)
      bar.update(step, metrics)
      if preempt.requested:
        summary.update(preempted=True, preempted_by=preempt.requested)
        break
      if last:
        break
  final_step = int(state.step)
  summary.update(final_step=final_step, policy_tokens=extra["policy_tokens"],
                 guide_tokens=extra["guide_tokens"],
                 budget_reached=bool(budget and extra["policy_tokens"] >= budget),
                 **health.summary())
  rows = [r for r in mlog.read_metrics(workdir) if "eval/accuracy" in r]
  if rows:
    summary["final_eval_accuracy"] = rows[-1]["eval/accuracy"]
    summary.setdefault("initial_eval_accuracy", rows[0]["eval/accuracy"])
  export_params, export_base = state.params, exp.policy.base
  if jax.process_count() > 1 and config.export_hf and not summary["preempted"]:
    # A collective: every process joins; process 0 then holds the full (host) weights and writes.
    export_params, export_base = sharding.to_host((state.params, exp.policy.base))
  if is_main and not summary["preempted"]:
    if config.export_hf:
      export = exp.policy.merge(export_params, export_base)
      if export_base is not None:  # LoRA: the adapters alone (PEFT), then the merged weights.
        with open(os.path.join(ckpt.directory, checkpoint.BASE_FILE)) as f:
          base_path = json.load(f)["path"]
        models.save_adapter(export, os.path.join(workdir, "export_adapter"), base_path)
        export = lora.merged(export)
      models.save_pretrained(export, os.path.join(workdir, "export"))
      exp.tokenizer.save_pretrained(os.path.join(workdir, "export"))
    summary["plots"] = mlog.plot_run(workdir)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary
