"""Rollout engines: what the policy's and the guide's rollouts call to sample tokens.

An engine samples continuations of prompts and returns their tokens and per-token log-probs as a
`sampling.Rollout` (the log-probs under its own sampling distribution and numerics: the trainer
recomputes θ_old itself and may correct for the difference, `rl.score`). The contract:

  engine.generate(prompt_BxP, prompt_mask_BxP, rng, max_new_tokens, temperature=, top_p=,
                  top_k=, eos_id=, pad_id=) -> sampling.Rollout
      the signature of `sampling.generate` (left-padded prompts, numpy or jax arrays);
      max_new_tokens an int, or int [B] per-row budgets (N = their maximum);
  engine.update_weights(model)
      called at the start of every RL step with the policy as it is then (`(graphdef, state)`
      of the full model, LoRA adapters included, in the rollout dtype): an engine that holds
      its own copy of the weights updates it in place. The guide's engine is never updated.

An engine may also implement `stream(work, cfg, options, rng, timer, phase) -> slots.RunStats`,
running a `slots.WorkList` (the dynamic-sampling stream of `mixpo.rollout`) with continuous
batching; `run_stream` adapts an engine without it by running the work list in static batches
of `cfg.slots` rows through `generate`.

  jax   `JaxEngine`: mixpo's own sampler (`sampling.generate`, `mixpo.slots`), the default.
  vllm  `mixpo.engines.vllm.VllmEngine(hf_dir, ...)`, imported only when chosen (an optional
        install: README).
"""

from __future__ import annotations

import importlib

import jax
import numpy as np

from mixpo import sampling, slots

ENGINES = ("jax", "vllm")


class JaxEngine:
  """mixpo's sampler as an engine: continuous batching over decode slots (`mixpo.slots`)."""

  name = "jax"

  def __init__(self, model=None):
    self.model = None if model is None else sampling.split_model(model)

  def update_weights(self, model) -> None:
    self.model = sampling.split_model(model)  # arrays are shared, nothing is copied

  def _ready(self):
    if self.model is None:
      raise RuntimeError("JaxEngine: no weights yet; call update_weights(model) first")
    return self.model

  def generate(self, prompt_BxP, prompt_mask_BxP, rng, max_new_tokens, **kwargs):
    """`sampling.generate`; max_new_tokens may be int [B], each row's own budget."""
    budgets = np.asarray(max_new_tokens)
    if budgets.ndim:
      kwargs["row_budgets"], max_new_tokens = budgets, int(budgets.max())
    return sampling.generate(self._ready(), prompt_BxP, prompt_mask_BxP, rng, max_new_tokens,
                             **kwargs)

  def stream(self, work, cfg: slots.SlotConfig, options: slots.SampleOptions, rng,
             timer=None, phase="generate") -> slots.RunStats:
    sampler = slots.SlotSampler(self._ready(), cfg, options, rng)
    return sampler.run(work, timer or slots.no_timer, phase)


def run_stream(engine, work, cfg: slots.SlotConfig, options: slots.SampleOptions, rng,
               timer=None, phase: str = "generate") -> slots.RunStats:
  """Runs `work` on `engine`: its own `stream` when it has one, else static rounds of up to
  `cfg.slots` rows through `engine.generate` (each row cut to its budget; a round's rows all
  end before the next round starts, so ended rows cost that engine's decode work)."""
  if hasattr(engine, "stream"):
    return engine.stream(work, cfg, options, rng, timer, phase)
  timer = timer or slots.no_timer
  stats, round_ = slots.RunStats(), 0
  eos = None if options.eos_E == (-1,) else list(options.eos_E)
  while True:
    requests = work.take(cfg.slots)
    if not requests:
      break
    p = cfg.prompt_width
    prompt_BxP = np.full((len(requests), p), options.pad_id, np.int32)
    mask_BxP = np.zeros((len(requests), p), np.int32)
    for i, req in enumerate(requests):
      prompt_BxP[i, p - len(req.prompt):] = req.prompt
      mask_BxP[i, p - len(req.prompt):] = 1
    budget = max(r.budget for r in requests)
    budgets = np.asarray([r.budget for r in requests], np.int32)
    with timer(phase):
      out = engine.generate(prompt_BxP, mask_BxP, jax.random.fold_in(rng, round_),
                            budgets if (budgets < budget).any() else budget,
                            temperature=options.temperature, top_p=options.top_p,
                            top_k=options.top_k, eos_id=eos, pad_id=options.pad_id)
      tokens, logp = np.asarray(out.tokens_BxN), np.asarray(out.logp_BxN)
      lengths, truncated = np.asarray(out.lengths_B), np.asarray(out.truncated_B)
    round_ += 1
    finished = []
    for i, req in enumerate(requests):
      n = min(int(lengths[i]), req.budget)
      finished.append(slots.Finished(row=req.row, tokens=tokens[i, :n].astype(np.int32),
                                     logp=logp[i, :n].astype(np.float32),
                                     truncated=bool(truncated[i]) or n < int(lengths[i])))
      stats.tokens += n
    stats.steps += budget
    stats.slot_steps += budget * len(requests)
    stats.returns += 1
    if work.finished(finished):
      break
  return stats


def make(kind: str, model=None, hf_dir: str | None = None, **options):
  """The engine `kind` (one of ENGINES): JaxEngine(model), or vLLM's built from the exported
  Hugging Face directory `hf_dir` with `options` (dtype, seed, ...: its own)."""
  if kind == "jax":
    return JaxEngine(model)
  if kind == "vllm":
    try:
      module = importlib.import_module("mixpo.engines.vllm")
    except ImportError as e:
      raise ValueError(f"config.rollout.engine='vllm': the vLLM engine is not available ({e}); "
                       "install the vllm extra (README) or set --config.rollout.engine=jax.") \
          from None
    return module.VllmEngine(hf_dir, **options)
  raise ValueError(f"config.rollout.engine={kind!r}: expected one of {ENGINES}.")
