"""Host-side rollout collection: prompts → samples → rewards → dynamic sampling → `Batch`.

This module turns text into the arrays `train_step` consumes. It owns no model code (sampling
does) and no mathematics (advantages / objectives do); it decides which samples form a batch.

Dynamic sampling (DAPO) is a stream (`stream_groups`): prompt groups are generated with
continuous batching (`mixpo.slots`), rewarded as they complete, and the stream stops as soon as
the first `groups` groups with non-zero reward variance among the policy's samples (and, for
Mix-2, `zero_groups` zero-variance groups) are in hand, in stream order, or when
`max_num_gen_batches` × `groups` prompts were used. Groups without variance ("zero groups") are
never thrown away before the batch is built: Mix-2 trains on `zero_groups` of them as its ZERO
set; for every algorithm, unfilled variance slots at the cap are filled with zero groups, whose
policy samples carry no on-policy gradient (zero advantage) but whose guide samples still do.
The prompts a step uses up are those up to the last group it decided on: prompts started but
not reached are generated again by the next step (so nothing depends on which row ended first).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixpo import engines, sampling, sharding, slots
from mixpo.rewards import overlong
from mixpo.rewards.runner import RewardResult


@dataclasses.dataclass
class Groups:
  """Samples of a list of prompt groups, row-major: group g owns rows [g·k, (g+1)·k)."""

  prompts: list[str]  # one per group.
  answers: list[str]  # one per group.
  prompt_BxP: np.ndarray  # int32 left-padded prompt of every row.
  prompt_mask_BxP: np.ndarray
  tokens_BxN: np.ndarray  # int32 response tokens.
  mask_BxN: np.ndarray  # float32 response mask (loss mask: truncated rows may be zeroed).
  lengths_B: np.ndarray  # int32 response length in tokens (EOS included).
  truncated_B: np.ndarray  # bool: no EOS within max_new_tokens.
  completions: list[str]  # decoded responses.
  rewards_B: np.ndarray  # float32 shaped rewards.
  correct_B: np.ndarray  # float32 unshaped task reward (accuracy > 0).
  guide_logp_BxN: np.ndarray | None = None  # from traces, when they carry them.
  # Unweighted value of each reward function per row ({name: float32 [B]}), for samples.jsonl.
  per_fn_B: dict | None = None
  # float32 log-probs of the tokens under the engine that sampled them (its sampling distribution
  # and numerics; the trainer recomputes θ_old, `rl.score`); None for rows it did not sample.
  logp_BxN: np.ndarray | None = None

  @property
  def per_group(self) -> int:
    return len(self.rewards_B) // max(len(self.prompts), 1)

  def has_variance(self) -> np.ndarray:
    r = self.rewards_B.reshape(len(self.prompts), -1)
    return r.max(axis=1) > r.min(axis=1)

  def select(self, group_idx) -> "Groups":
    k = self.per_group
    rows = np.concatenate([np.arange(g * k, (g + 1) * k) for g in group_idx]).astype(int) \
        if len(group_idx) else np.zeros(0, int)
    take = lambda x: None if x is None else x[rows]
    return Groups(
        prompts=[self.prompts[g] for g in group_idx], answers=[self.answers[g] for g in group_idx],
        prompt_BxP=self.prompt_BxP[rows], prompt_mask_BxP=self.prompt_mask_BxP[rows],
        tokens_BxN=self.tokens_BxN[rows], mask_BxN=self.mask_BxN[rows],
        lengths_B=self.lengths_B[rows], truncated_B=self.truncated_B[rows],
        completions=[self.completions[i] for i in rows], rewards_B=self.rewards_B[rows],
        correct_B=self.correct_B[rows], guide_logp_BxN=take(self.guide_logp_BxN),
        per_fn_B=None if self.per_fn_B is None else {k: v[rows] for k, v in self.per_fn_B.items()},
        logp_BxN=take(self.logp_BxN))


def empty_rows(like: Groups, rows: int) -> Groups:
  """`rows` padding rows shaped like `like`: no tokens, no loss, reward 0 (fills static slots)."""
  z = lambda x: np.zeros((rows,) + x.shape[1:], x.dtype)
  return Groups(prompts=[], answers=[], prompt_BxP=z(like.prompt_BxP),
                prompt_mask_BxP=z(like.prompt_mask_BxP), tokens_BxN=z(like.tokens_BxN),
                mask_BxN=z(like.mask_BxN), lengths_B=z(like.lengths_B),
                truncated_B=z(like.truncated_B), completions=[""] * rows,
                rewards_B=z(like.rewards_B), correct_B=z(like.correct_B),
                per_fn_B=None if like.per_fn_B is None else {k: z(v) for k, v in
                                                             like.per_fn_B.items()},
                logp_BxN=None if like.logp_BxN is None else z(like.logp_BxN))


def concat_groups(parts: list[Groups], keep_empty: bool = False) -> Groups:
  """Row-wise concatenation; blocks without prompts are dropped unless `keep_empty` (padding)."""
  parts = [p for p in parts if p.prompts or (keep_empty and len(p.rewards_B))]
  width = max(p.prompt_BxP.shape[1] for p in parts)

  def left_pad(x):
    return np.pad(x, ((0, 0), (width - x.shape[1], 0)))

  cat = lambda f: np.concatenate([f(p) for p in parts])
  optional = lambda f: cat(f) if all(f(p) is not None for p in parts) else None
  per_fn = None
  if all(p.per_fn_B is not None for p in parts) and len({tuple(p.per_fn_B) for p in parts}) == 1:
    per_fn = {k: cat(lambda p, k=k: p.per_fn_B[k]) for k in parts[0].per_fn_B}
  return Groups(
      prompts=sum((p.prompts for p in parts), []), answers=sum((p.answers for p in parts), []),
      prompt_BxP=cat(lambda p: left_pad(p.prompt_BxP)),
      prompt_mask_BxP=cat(lambda p: left_pad(p.prompt_mask_BxP)),
      tokens_BxN=cat(lambda p: p.tokens_BxN), mask_BxN=cat(lambda p: p.mask_BxN),
      lengths_B=cat(lambda p: p.lengths_B), truncated_B=cat(lambda p: p.truncated_B),
      completions=sum((p.completions for p in parts), []), rewards_B=cat(lambda p: p.rewards_B),
      correct_B=cat(lambda p: p.correct_B), guide_logp_BxN=optional(lambda p: p.guide_logp_BxN),
      per_fn_B=per_fn, logp_BxN=optional(lambda p: p.logp_BxN))


def encode_ids(tokenizer, prompts: list[str]) -> list[np.ndarray]:
  """Each prompt's token ids (int32, special tokens added); an empty encoding is an error."""
  ids = [np.asarray(tokenizer(p, add_special_tokens=True)["input_ids"], np.int32)
         for p in prompts]
  for i, x in enumerate(ids):
    if not x.size:
      raise ValueError(f"prompt {i} ({prompts[i][:40]!r}) encodes to no tokens")
  return ids


def left_pad(ids: list[np.ndarray], pad_id: int, min_width: int = 8):
  """int32 [len(ids), P] tokens and mask, P = sampling.bucket_length (a power of two ≥
  `min_width`, so varied prompt lengths compile a handful of programs)."""
  width = sampling.bucket_length(max(len(x) for x in ids), min_length=min_width)
  tok = np.full((len(ids), width), pad_id, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, x in enumerate(ids):
    tok[i, width - len(x):] = x
    mask[i, width - len(x):] = 1
  return tok, mask


def encode_prompts(tokenizer, prompts: list[str], repeat: int, min_width: int = 8):
  """Left-padded int32 [len(prompts)·repeat, P] tokens and mask (see `left_pad`)."""
  tok, mask = left_pad(encode_ids(tokenizer, prompts), tokenizer.pad_token_id or 0, min_width)
  return np.repeat(tok, repeat, axis=0), np.repeat(mask, repeat, axis=0)


def decode(tokenizer, tokens_BxN, mask_BxN) -> list[str]:
  return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
          for row, mrow in zip(np.asarray(tokens_BxN), np.asarray(mask_BxN))]


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """How to sample and reward: the parts of the config `sample_groups` needs."""

  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  overlong: overlong.OverlongConfig | None = None
  # Decode slots of the dynamic-sampling stream (`stream_groups`); 0 = the rows of one
  # generation batch (groups × n). refill_at / min_steps: `slots.SlotConfig`'s.
  slots: int = 0
  refill_at: int = 0
  min_steps: int = 8

  def options(self, tokenizer) -> slots.SampleOptions:
    eos = tokenizer.eos_token_id
    eos = (-1,) if eos is None else tuple(np.atleast_1d(eos).astype(int).tolist())
    return slots.SampleOptions(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                               eos_E=eos, pad_id=tokenizer.pad_token_id or 0)


def sample_groups(model, tokenizer, prompts, answers, k, rng, spec: SampleSpec, reward_runner,
                  extra_columns=None, timer=slots.no_timer, phase="generate"
                  ) -> tuple[Groups, RewardResult]:
  """k samples of each prompt, rewarded: (Groups, the reward runner's result).

  model: an nnx model, its (graphdef, state), or a rollout engine (`mixpo.engines`).
  `timer(name)` is a context manager per phase (`logging.PhaseTimer`): generation is billed to
  `phase`, decoding and rewards to "reward".
  """
  prompt_BxP, prompt_mask_BxP = encode_prompts(tokenizer, prompts, k)
  engine = model if hasattr(model, "generate") else engines.JaxEngine(model)
  with timer(phase):
    out = engine.generate(prompt_BxP, prompt_mask_BxP, rng, spec.max_new_tokens,
                          temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                          eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0)
    out = sharding.to_host(out)  # all-gathered when the rows span processes
  with timer("reward"):
    tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN, np.float32)
    lengths, truncated = np.asarray(out.lengths_B), np.asarray(out.truncated_B)
    completions = decode(tokenizer, tokens, mask)
    groups, result = reward_groups(prompts, answers, k, prompt_BxP, prompt_mask_BxP, tokens, mask,
                                   lengths, truncated, completions, spec, reward_runner,
                                   extra_columns)
  return dataclasses.replace(groups, logp_BxN=np.asarray(out.logp_BxN, np.float32)), result


def reward_groups(prompts, answers, k, prompt_BxP, prompt_mask_BxP, tokens, mask, lengths,
                  truncated, completions, spec, reward_runner, extra_columns=None,
                  guide_logp=None) -> tuple[Groups, RewardResult]:
  """The rows of len(prompts) groups of k with their rewards (overlong shaping applied) and the
  reward runner's result (its counters: `RewardTally`)."""
  rows_prompts = [p for p in prompts for _ in range(k)]
  cols = {"answer": [a for a in answers for _ in range(k)]}
  for key, vals in (extra_columns or {}).items():
    cols[key] = [v for v in vals for _ in range(k)]
  result = reward_runner(rows_prompts, completions, **cols)
  correct = np.asarray(result.rewards, np.float32)
  rewards, keep = correct, np.ones_like(correct)
  if spec.overlong is not None:
    rewards, keep = overlong.shape_rewards(correct, lengths, ~truncated, spec.overlong)
  groups = Groups(prompts=list(prompts), answers=list(answers), prompt_BxP=prompt_BxP,
                  prompt_mask_BxP=prompt_mask_BxP, tokens_BxN=tokens,
                  mask_BxN=mask * keep[:, None], lengths_B=lengths, truncated_B=truncated,
                  completions=completions, rewards_B=np.asarray(rewards, np.float32),
                  correct_B=correct, guide_logp_BxN=guide_logp,
                  per_fn_B={k: np.asarray(v, np.float32) for k, v in result.per_fn.items()})
  return groups, result


# ---------------------------------------------------------------------------------------------
# Reward counters over every call of a step.


def merge_results(results: list[RewardResult]) -> RewardResult | None:
  """One `RewardResult` of several calls: per-row arrays concatenated, counters summed, so that
  `.metrics()` gives means over every row and counts over every call. None for no call."""
  if not results:
    return None
  merged = {}
  for f in dataclasses.fields(results[0]):
    values = [getattr(r, f.name) for r in results]
    first = values[0]
    if isinstance(first, np.ndarray):
      merged[f.name] = np.concatenate(values)
    elif isinstance(first, dict):  # name → per-row array (per_fn)
      merged[f.name] = {k: np.concatenate([v[k] for v in values]) for k in first}
    elif isinstance(first, (int, float, np.integer, np.floating)) and not isinstance(first, bool):
      merged[f.name] = sum(values)
    else:
      merged[f.name] = values[-1]
  return type(results[0])(**merged)


class RewardTally:
  """The reward runner's results of a step by row source ("policy", "guide", "traces"): every
  call counts (each dynamic-sampling batch, the guide's rows, the trace rows)."""

  def __init__(self):
    self.results: dict[str, list[RewardResult]] = {}

  def add(self, source: str, result: RewardResult | None) -> None:
    if result is not None:
      self.results.setdefault(source, []).append(result)

  def metrics(self) -> dict:
    """reward/<key> over every source (means over every row, counters summed) and
    reward/<source>/<key> per source."""
    out = {}
    everything = merge_results([r for rs in self.results.values() for r in rs])
    if everything is not None:
      out.update(everything.metrics())
    for source, rs in self.results.items():
      for key, value in merge_results(rs).metrics().items():
        out[key.replace("reward/", f"reward/{source}/", 1)] = value
    return out


# ---------------------------------------------------------------------------------------------
# The dynamic-sampling stream.


@dataclasses.dataclass(frozen=True)
class Collected:
  """What dynamic sampling drew in one step."""

  kept: Groups  # exactly `groups` groups: variance groups first, zero groups filling the rest.
  zero: Groups | None  # up to `zero_groups` further zero-variance groups (Mix-2's ZERO set).
  stats: dict  # dynamic/* counters.
  consumed: int  # prompts of the train stream this step used up (the data position advances).
  tokens: int  # response tokens generated, kept or not (rows dropped mid-way included).
  rewards: list[RewardResult]  # the reward runner's result of every call.
  run: slots.RunStats | None = None  # the decode work (None: not run on an engine).


def select_groups(has_var, groups: int, zero_groups: int, enabled: bool = True):
  """The decision of dynamic sampling over groups in stream order (has_var: bool per group).

  Returns (prefix, kept, zero): the groups decided so far are the first `prefix` (None: not yet
  decidable, more groups are needed); `kept` are the first `groups` variance groups, filled with
  the first zero groups when the prefix ran out of groups; `zero` the next `zero_groups` zero
  groups. Decided as soon as the prefix holds `groups` variance and `zero_groups` zero groups —
  the smallest such prefix, so the choice depends on the order of the groups, never on which
  finished first. With `enabled=False` the first `groups` groups are kept whatever their
  variance.
  """
  has_var = list(has_var)
  if not enabled:
    if len(has_var) < groups:
      return None, [], []
    return groups, list(range(groups)), []
  n_var = n_zero = 0
  for i, v in enumerate(has_var):
    n_var, n_zero = n_var + bool(v), n_zero + (not v)
    if n_var >= groups and n_zero >= zero_groups:
      break
  else:
    return None, [], []
  return i + 1, *_split(has_var[:i + 1], groups, zero_groups)


def _split(has_var, groups: int, zero_groups: int):
  var = [i for i, v in enumerate(has_var) if v][:groups]
  zeros = [i for i, v in enumerate(has_var) if not v]
  fill = groups - len(var)
  return var + zeros[:fill], zeros[fill:fill + zero_groups]


class GroupStream:
  """The work list of the dynamic-sampling stream (a `slots.WorkList`).

  Prompt groups are offered in stream order, k rows each; a group is rewarded once all its rows
  ended and every group before it was, in one reward call with the other groups of that prefix,
  as soon as they could complete the decision; the run stops as soon as `select_groups` can
  decide, or when every prompt was decided.
  """

  def __init__(self, prompt_ids, k, budget, score, groups, zero_groups, enabled):
    self.prompt_ids, self.k, self.budget, self.score = prompt_ids, k, budget, score
    self.groups, self.zero_groups, self.enabled = groups, zero_groups, enabled
    self.total = len(prompt_ids) * k
    self.next_row = 0
    self.rows: dict[int, slots.Finished] = {}
    self.ended = [0] * len(prompt_ids)  # rows ended per group
    self.has_var: list[bool] = []  # per rewarded group, in stream order
    self.decision = None  # (prefix, kept, zero) once decided

  @property
  def exhausted(self) -> bool:
    return self.next_row >= self.total

  def take(self, n: int) -> list[slots.Request]:
    out = []
    while len(out) < n and self.next_row < self.total:
      out.append(slots.Request(row=self.next_row, budget=self.budget,
                               prompt=self.prompt_ids[self.next_row // self.k]))
      self.next_row += 1
    return out

  def _could_decide(self, unscored: int) -> bool:
    """Whether `unscored` more groups could complete the decision (else scoring them can wait:
    one bigger reward call later instead of one per return)."""
    if not self.enabled:
      return len(self.has_var) + unscored >= self.groups
    n_var = sum(self.has_var)
    n_zero = len(self.has_var) - n_var
    return (max(self.groups - n_var, 0) + max(self.zero_groups - n_zero, 0)) <= unscored

  def finished(self, rows: list[slots.Finished]) -> bool:
    for r in rows:
      self.rows[r.row] = r
      self.ended[r.row // self.k] += 1
    start = end = len(self.has_var)
    while end < len(self.ended) and self.ended[end] == self.k:
      end += 1
    idle = self.exhausted and len(self.rows) == self.next_row  # nothing left to run
    if end > start and (self._could_decide(end - start) or idle):
      self.has_var += list(self.score(start, end, self.rows))
    prefix, kept, zero = select_groups(self.has_var, self.groups, self.zero_groups, self.enabled)
    if prefix is None and len(self.has_var) == len(self.prompt_ids):  # every prompt decided
      prefix = len(self.has_var)
      kept, zero = _split(self.has_var, self.groups, self.zero_groups)
    if prefix is not None:
      self.decision = (prefix, kept, zero)
    return self.decision is not None


def stream_groups(engine, tokenizer, examples, k: int, rng, spec: SampleSpec, reward_runner,
                  groups: int, zero_groups: int, enabled: bool = True, timer=slots.no_timer,
                  phase: str = "generate_policy") -> Collected:
  """DAPO dynamic sampling as a stream over `examples` (the step's candidate prompts in train
  order, at most max_num_gen_batches × groups of them; objects with .prompt, .answer,
  .metadata): k samples of each, generated on `engine` with continuous batching, rewarded as
  their groups complete, until `select_groups` decides (the rows still decoding are dropped).

  Kept: the first `groups` groups with reward variance in stream order (filled with zero groups
  when every example was used); zero: up to `zero_groups` further zero groups (Mix-2's ZERO
  set). With `enabled=False` the first `groups` examples are kept as they are.
  """
  prompt_ids = encode_ids(tokenizer, [e.prompt for e in examples])
  pad_id = tokenizer.pad_token_id or 0
  width = sampling.bucket_length(max(len(x) for x in prompt_ids), min_length=8)
  scored: list[Groups] = []  # rewarded groups, in stream order, one Groups per reward call
  results: list[RewardResult] = []

  def score(start: int, end: int, rows: dict) -> np.ndarray:
    with timer("reward"):
      ids = prompt_ids[start:end]
      prompt_BxP, mask_BxP = left_pad([x for x in ids for _ in range(k)], pad_id)
      n = spec.max_new_tokens
      tokens = np.full((len(prompt_BxP), n), pad_id, np.int32)
      logp = np.zeros((len(prompt_BxP), n), np.float32)
      lengths = np.zeros(len(prompt_BxP), np.int32)
      truncated = np.zeros(len(prompt_BxP), bool)
      for i in range(len(prompt_BxP)):
        r = rows[start * k + i]
        tokens[i, :len(r.tokens)], logp[i, :len(r.tokens)] = r.tokens, r.logp
        lengths[i], truncated[i] = len(r.tokens), r.truncated
      mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
      exs = examples[start:end]
      g, result = reward_groups(
          [e.prompt for e in exs], [e.answer for e in exs], k, prompt_BxP, mask_BxP, tokens,
          mask, lengths, truncated, decode(tokenizer, tokens, mask), spec, reward_runner,
          {"metadata": [e.metadata for e in exs]})
    scored.append(dataclasses.replace(g, logp_BxN=logp))
    results.append(result)
    return g.has_variance() if enabled else np.ones(end - start, bool)

  work = GroupStream(prompt_ids, k, spec.max_new_tokens, score, groups, zero_groups, enabled)
  cfg = slots.SlotConfig(slots=spec.slots or groups * k, prompt_width=width,
                         max_new_tokens=spec.max_new_tokens, refill_at=spec.refill_at,
                         min_steps=spec.min_steps, group_rows=k)
  run = engines.run_stream(engine, work, cfg, spec.options(tokenizer), rng, timer, phase)
  prefix, kept_idx, zero_idx = work.decision
  every = concat_groups(scored) if scored else None

  def pick(idx):
    return concat_groups([every.select(np.asarray(idx[i:i + 1])) for i in range(len(idx))])

  has_var = work.has_var[:prefix]
  n_var = int(sum(has_var))
  stats = {"dynamic/prompts": prefix, "dynamic/prompts_started": -(-work.next_row // k),
           "dynamic/variance_groups": min(n_var, groups),
           "dynamic/filled_with_zero_groups": max(groups - n_var, 0),
           "dynamic/zero_groups_seen": prefix - n_var,
           "dynamic/gen_batches": -(-prefix // groups)}
  zero = pick(zero_idx) if zero_idx else None
  return Collected(kept=pick(kept_idx), zero=zero, stats=stats, consumed=prefix,
                   tokens=run.tokens + run.dropped_tokens, rewards=results, run=run)
