"""Host-side rollout collection: prompts → samples → rewards → dynamic sampling → `Batch`.

This module turns text into the arrays `train_step` consumes. It owns no model code (sampling
does) and no mathematics (advantages / objectives do); it decides which samples form a batch.

Dynamic sampling (DAPO): generation batches of `groups` prompts are drawn until `groups` prompt
groups with non-zero reward variance among the policy's samples are collected, at most
`max_num_gen_batches` times. Groups without variance ("zero groups") are never thrown away
before the batch is built: Mix-2 trains on `zero_groups` of them as its ZERO set; for every
algorithm, unfilled variance slots at the cap are filled with zero groups, whose policy samples
carry no on-policy gradient (zero advantage) but whose guide samples still do.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
from flax import nnx

from mixpo import sampling, sharding
from mixpo.rewards import overlong


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
        correct_B=self.correct_B[rows], guide_logp_BxN=take(self.guide_logp_BxN))


def empty_rows(like: Groups, rows: int) -> Groups:
  """`rows` padding rows shaped like `like`: no tokens, no loss, reward 0 (fills static slots)."""
  z = lambda x: np.zeros((rows,) + x.shape[1:], x.dtype)
  return Groups(prompts=[], answers=[], prompt_BxP=z(like.prompt_BxP),
                prompt_mask_BxP=z(like.prompt_mask_BxP), tokens_BxN=z(like.tokens_BxN),
                mask_BxN=z(like.mask_BxN), lengths_B=z(like.lengths_B),
                truncated_B=z(like.truncated_B), completions=[""] * rows,
                rewards_B=z(like.rewards_B), correct_B=z(like.correct_B))


def concat_groups(parts: list[Groups], keep_empty: bool = False) -> Groups:
  """Row-wise concatenation; blocks without prompts are dropped unless `keep_empty` (padding)."""
  parts = [p for p in parts if p.prompts or (keep_empty and len(p.rewards_B))]
  width = max(p.prompt_BxP.shape[1] for p in parts)

  def left_pad(x):
    return np.pad(x, ((0, 0), (width - x.shape[1], 0)))

  cat = lambda f: np.concatenate([f(p) for p in parts])
  guide = None
  if all(p.guide_logp_BxN is not None for p in parts):
    guide = cat(lambda p: p.guide_logp_BxN)
  return Groups(
      prompts=sum((p.prompts for p in parts), []), answers=sum((p.answers for p in parts), []),
      prompt_BxP=cat(lambda p: left_pad(p.prompt_BxP)),
      prompt_mask_BxP=cat(lambda p: left_pad(p.prompt_mask_BxP)),
      tokens_BxN=cat(lambda p: p.tokens_BxN), mask_BxN=cat(lambda p: p.mask_BxN),
      lengths_B=cat(lambda p: p.lengths_B), truncated_B=cat(lambda p: p.truncated_B),
      completions=sum((p.completions for p in parts), []), rewards_B=cat(lambda p: p.rewards_B),
      correct_B=cat(lambda p: p.correct_B), guide_logp_BxN=guide)


def encode_prompts(tokenizer, prompts: list[str], repeat: int, min_width: int = 8):
  """Left-padded int32 [len(prompts)·repeat, P] tokens and mask, P = sampling.bucket_length
  (a power of two ≥ `min_width`, so varied prompt lengths compile a handful of programs)."""
  ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
  for i, x in enumerate(ids):
    if not x:
      raise ValueError(f"prompt {i} ({prompts[i][:40]!r}) encodes to no tokens")
  width = sampling.bucket_length(max(len(x) for x in ids), min_length=min_width)
  pad = tokenizer.pad_token_id or 0
  tok = np.full((len(ids), width), pad, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, x in enumerate(ids):
    tok[i, width - len(x):] = x
    mask[i, width - len(x):] = 1
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


def _no_timer(name):
  del name
  return contextlib.nullcontext()


def generate(model, *args, **kwargs) -> sampling.Rollout:
  """`sampling.generate` for a model or (graphdef, state); a rollout engine's own `generate`
  (`mixpo.engines`, same arguments and `Rollout`) when `model` is one."""
  if isinstance(model, (tuple, nnx.Module)):
    return sampling.generate(model, *args, **kwargs)
  return model.generate(*args, **kwargs)


def sample_groups(model, tokenizer, prompts, answers, k, rng, spec: SampleSpec, reward_runner,
                  extra_columns=None, timer=_no_timer, phase="generate") -> tuple[Groups, dict]:
  """k samples of each prompt from `model` (an nnx model, (graphdef, state) or a rollout engine),
  rewarded.

  `timer(name)` is a context manager per phase (`logging.PhaseTimer`): generation is billed to
  `phase`, decoding and rewards to "reward".
  """
  prompt_BxP, prompt_mask_BxP = encode_prompts(tokenizer, prompts, k)
  with timer(phase):
    out = generate(model, prompt_BxP, prompt_mask_BxP, rng, spec.max_new_tokens,
                   temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                   eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0)
    out = sharding.to_host(out)  # all-gathered when the rows span processes
  with timer("reward"):
    tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN, np.float32)
    lengths, truncated = np.asarray(out.lengths_B), np.asarray(out.truncated_B)
    completions = decode(tokenizer, tokens, mask)
    return reward_groups(prompts, answers, k, prompt_BxP, prompt_mask_BxP, tokens, mask, lengths,
                         truncated, completions, spec, reward_runner, extra_columns)


def reward_groups(prompts, answers, k, prompt_BxP, prompt_mask_BxP, tokens, mask, lengths,
                  truncated, completions, spec, reward_runner, extra_columns=None,
                  guide_logp=None) -> tuple[Groups, dict]:
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
                  correct_B=correct, guide_logp_BxN=guide_logp)
  return groups, result.metrics()


@dataclasses.dataclass(frozen=True)
class Collected:
  """What dynamic sampling drew in one step."""

  kept: Groups  # exactly `groups` groups: variance groups first, zero groups filling the rest.
  zero: Groups | None  # up to `zero_groups` further zero-variance groups (Mix-2's ZERO set).
  stats: dict  # dynamic/* counters.
  draws: int  # generation batches drawn.
  tokens: int  # response tokens generated over all of them.
  reward_metrics: dict  # the reward runner's metrics of the last generation batch.


def dynamic_sample(draw, groups: int, zero_groups: int, max_num_gen_batches: int,
                   enabled: bool = True) -> Collected:
  """DAPO dynamic sampling over `draw(i) -> (Groups, reward metrics)`, generation batch i of
  `groups` prompts, i = 0, 1, ...

  Draws until `groups` groups with reward variance are collected or `max_num_gen_batches`
  batches were drawn; the kept groups are the variance groups first and, if the cap is reached,
  zero groups after them; up to `zero_groups` further zero groups are returned as `zero`. With
  `enabled=False` one batch is drawn and used as it is.
  """
  var_parts, zero_parts, n_var, n_zero, n_batches, tokens = [], [], 0, 0, 0, 0
  while True:
    g, reward_metrics = draw(n_batches)
    n_batches += 1
    tokens += int(g.lengths_B.sum())
    has_var = g.has_variance()
    var_idx, zero_idx = np.flatnonzero(has_var), np.flatnonzero(~has_var)
    if not enabled:
      var_idx, zero_idx = np.arange(len(g.prompts)), zero_idx[:0]
    var_parts.append(g.select(var_idx[:groups - n_var]))
    n_var += len(var_parts[-1].prompts)
    zero_parts.append(g.select(zero_idx))
    n_zero += len(zero_idx)
    if n_var >= groups or n_batches >= max_num_gen_batches or not enabled:
      break
  zeros = concat_groups(zero_parts) if n_zero else None
  fill = groups - n_var
  parts = var_parts
  if fill > 0:
    parts = var_parts + [zeros.select(np.arange(fill))]
  kept = concat_groups(parts)
  rest = zeros.select(np.arange(fill, min(n_zero, fill + zero_groups))) if zeros else None
  stats = {"dynamic/gen_batches": n_batches, "dynamic/variance_groups": n_var,
           "dynamic/filled_with_zero_groups": max(fill, 0),
           "dynamic/zero_groups_seen": n_zero}
  return Collected(kept=kept, zero=rest, stats=stats, draws=n_batches, tokens=tokens,
                   reward_metrics=reward_metrics)
