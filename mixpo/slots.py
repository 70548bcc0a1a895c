"""Continuous batching: decode slots refilled from a work list, no decode work for ended rows.

A fixed number of decode slots (the rows of one KV cache) take decode steps together. A row that
ends (EOS, or its own token budget) frees its slot; the next waiting prompt takes it (its prefill
runs apart and is written into the slot's cache rows) until the work list has nothing left. Then
the rows still decoding are gathered into smaller buckets (down a ladder of rungs 3/4 apart,
never below `min_bucket`), so the tail of long rows costs in proportion to the rows left. Every
program has static shapes: one compile per (model, bucket, cache width, switches), all of them
at a configuration's first run; the number of steps a call runs and when it returns are
arguments, not shapes.

The work list (`WorkList`) decides what runs: `take(n)` offers up to n rows to start now,
`finished(rows)` receives the rows that ended and may stop the run (the rows still decoding
are dropped), `exhausted` says that nothing more will be offered. `sampling.generate` is a work
list of B rows; `mixpo.rollout`'s dynamic-sampling stream offers prompt groups and stops once
enough are scored.

Cache layout. The model's cache has one write index for all rows (`KVCache.index`), attention is
causal by slot and masked by `valid_BxS`, and keys carry their RoPE positions: a row's content
may start at any slot. A prompt inserted when the index is i occupies slots [i − P, i) (P: the
prompt width), and its decode steps write i, i + 1, ... with the other rows'. When the index
reaches the end of the window (W slots), the window is shifted left (one copy of the cache) by
the slots no live row reads any more; with no refills (`sampling.generate`) W = P + N − 1, the
static program's cache, and no shift happens.

Sampling noise is drawn per decode step for all slots at once (Philox, as `sampling.generate`
always did), keyed by the run's key and the step's number: a run is deterministic for a given
key, work list and slot count; greedy decoding does not depend on the slots at all.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixpo import sharding
from mixpo.batch import positions_from_mask
from mixpo.models import KVCache, attention


@dataclasses.dataclass(frozen=True)
class Request:
  """One row to generate."""

  row: int  # the work list's id of the row (returned with its result).
  prompt: np.ndarray  # int32 [L] the prompt's real tokens (no padding), 1 <= L <= prompt width.
  budget: int  # the row's own maximum of new tokens, 1 <= budget <= max_new_tokens.


@dataclasses.dataclass(frozen=True)
class Finished:
  """One row that ended."""

  row: int
  tokens: np.ndarray  # int32 [n] generated tokens, EOS included (n = the row's length).
  logp: np.ndarray  # float32 [n] log-probs under the sampling distribution.
  truncated: bool  # True: ended by its budget, no EOS.


class WorkList(Protocol):
  """What a `SlotSampler` run generates (see the module docstring)."""

  exhausted: bool  # nothing more will be offered: live rows may be compacted.

  def take(self, n: int) -> list[Request]:
    """Up to n rows to start now, in the order they should start ([] = none for now)."""

  def finished(self, rows: list[Finished]) -> bool:
    """Rows that ended since the last call; True stops the run (live rows are dropped)."""


class RowList:
  """The simplest work list: fixed rows, offered in order; results kept by row id."""

  def __init__(self, requests: list[Request]):
    self.todo = list(requests)
    self.results: dict[int, Finished] = {}
    self.exhausted = not self.todo

  def take(self, n: int) -> list[Request]:
    out, self.todo = self.todo[:n], self.todo[n:]
    self.exhausted = not self.todo
    return out

  def finished(self, rows: list[Finished]) -> bool:
    self.results.update((r.row, r) for r in rows)
    return False


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """Validated sampling switches (see `sampling.generate` for their meaning)."""

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  eos_E: tuple[int, ...] = (-1,)  # -1: no EOS (a never-sampled id keeps one program shape).
  pad_id: int = 0

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def static_args(self) -> dict:
    return dict(greedy=self.greedy, top_k=0 if self.greedy else self.top_k,
                use_top_p=(not self.greedy) and self.top_p < 1)

  def dynamic_args(self) -> tuple:
    return (np.float32(1.0 if self.greedy else self.temperature), np.float32(self.top_p),
            np.asarray(self.eos_E, np.int32), np.int32(self.pad_id))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
  """Device state of B decode slots (a slot's row: its cache rows and output buffers)."""

  cache: KVCache  # [B, K, W, H] per layer; one write index for every slot.
  tok_B: jax.Array  # int32 the last sampled token: the next step's input.
  pos_B: jax.Array  # int32 its position id.
  count_B: jax.Array  # int32 tokens generated so far.
  budget_B: jax.Array  # int32 the row's maximum of new tokens.
  live_B: jax.Array  # bool still decoding.
  eos_B: jax.Array  # bool ended with an EOS token.
  tokens_BxN: jax.Array  # int32 generated tokens, pad_id after the row's end.
  logp_BxN: jax.Array  # float32 their log-probs, 0 after the end.
  step: jax.Array  # int32 decode steps run (keys the sampling noise).


def _step_seed(rng, i):
  """uint32 [4] Philox key of noise draw i of a run (decode steps even, prefills odd)."""
  return jax.random.bits(jax.random.fold_in(rng, i), (4,), jnp.uint32)


def _is_eos(tok, eos_E):
  return jnp.any(tok[..., None] == eos_E.reshape((1,) * tok.ndim + (-1,)), axis=-1)


def _sampler(temperature, top_p, *, greedy, top_k, use_top_p):
  from mixpo import sampling  # noqa: PLC0415  (sampling imports this module in generate)
  return functools.partial(sampling._sample_token, temperature=temperature, top_p=top_p,  # pylint: disable=protected-access
                           greedy=greedy, top_k=top_k, use_top_p=use_top_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "width", "max_new_tokens"))
def _init_program(graphdef, state, pad_id, start, *, batch, width, max_new_tokens):
  """B empty slots (every row ended) with the write index at `start` (the prompt width)."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(batch, width)
  cache = dataclasses.replace(cache, index=jnp.asarray(start, jnp.int32))
  zeros_B = jnp.zeros((batch,), jnp.int32)
  return SlotState(cache=cache, tok_B=zeros_B + pad_id, pos_B=zeros_B, count_B=zeros_B,
                   budget_B=zeros_B, live_B=zeros_B > 0, eos_B=zeros_B > 0,
                   tokens_BxN=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                   logp_BxN=jnp.zeros((batch, max_new_tokens), jnp.float32),
                   step=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _head_program(graphdef, state):
  return nnx.merge(graphdef, state).decode_head()


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "top_k", "use_top_p"),
                   donate_argnames=("slots",))
def _insert_program(graphdef, state, slots: SlotState, prompt_UxP, mask_UxP, src_R, slot_R,
                    budget_R, rng, draw, temperature, top_p, eos_E, pad_id, *, greedy, top_k,
                    use_top_p):
  """Prefills U distinct prompts and writes R rows into slots `slot_R` (an index B drops the
  row); row i is prompt `src_R[i]`.

  Each row's keys / values go to slots [index − P, index) of its cache row (the rest of the row
  is marked invalid), its first token is sampled from its prompt's last logits with its own
  noise (rows of one prompt share the prefill, not the sample).
  """
  model = nnx.merge(graphdef, state)
  u, p = prompt_UxP.shape
  r = src_R.shape[0]
  n = slots.tokens_BxN.shape[1]
  sample = _sampler(temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
  fresh = model.init_cache(u, p)
  h_UxPxD, fresh = model.decode(prompt_UxP, positions_from_mask(mask_UxP), mask_UxP, fresh)
  logits_RxV = model.logits_from_hidden(h_UxPxD[:, -1:])[:, 0][src_R]
  mask_RxP = mask_UxP[src_R]
  tok_R, logp_R = sample(logits_RxV, _step_seed(rng, 2 * draw + 1))
  cache = slots.cache
  index = cache.index
  cols_P = index - p + jnp.arange(p, dtype=jnp.int32)
  rows_Rx1, cols_1xP = slot_R[:, None], cols_P[None, :]

  def put(big_BxKxWxH, new_UxKxPxH):
    # Advanced indices on axes 0 and 2: the update is laid out [R, P, K, H].
    return big_BxKxWxH.at[rows_Rx1, :, cols_1xP, :].set(
        new_UxKxPxH[src_R].swapaxes(1, 2).astype(big_BxKxWxH.dtype), mode="drop")

  valid_RxW = jax.lax.dynamic_update_slice(
      jnp.zeros((r, cache.valid_BxS.shape[1]), cache.valid_BxS.dtype),
      (mask_RxP != 0).astype(cache.valid_BxS.dtype), (jnp.zeros((), jnp.int32), index - p))
  cache = KVCache(tuple(put(k, f) for k, f in zip(cache.k_layers, fresh.k_layers)),
                  tuple(put(v, f) for v, f in zip(cache.v_layers, fresh.v_layers)),
                  cache.valid_BxS.at[slot_R].set(valid_RxW, mode="drop"), index)
  eos_R = _is_eos(tok_R, eos_E)
  set_rows = lambda x, new: x.at[slot_R].set(new, mode="drop")
  return SlotState(
      cache=cache, tok_B=set_rows(slots.tok_B, tok_R),
      pos_B=set_rows(slots.pos_B, jnp.sum(mask_RxP != 0, axis=1, dtype=jnp.int32)),
      count_B=set_rows(slots.count_B, jnp.ones_like(tok_R)),
      budget_B=set_rows(slots.budget_B, budget_R),
      live_B=set_rows(slots.live_B, ~eos_R & (budget_R > 1)),
      eos_B=set_rows(slots.eos_B, eos_R),
      tokens_BxN=set_rows(slots.tokens_BxN,
                          jnp.full((r, n), pad_id, jnp.int32).at[:, 0].set(tok_R)),
      logp_BxN=set_rows(slots.logp_BxN, jnp.zeros((r, n), jnp.float32).at[:, 0].set(logp_R)),
      step=slots.step)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "top_k", "use_top_p"),
                   donate_argnames=("slots",))
def _decode_program(graphdef, state, head_DxV, slots: SlotState, rng, max_steps, stop_live,
                    min_steps, temperature, top_p, eos_E, pad_id, *, greedy, top_k, use_top_p):
  """Decode steps of every slot until `max_steps` ran, no row is live, or, after `min_steps`,
  at most `stop_live` rows are live.

  A `lax.while_loop` whose carry (the cache included) XLA updates in place; ended rows are
  computed (static shapes) but write nothing: their cache slots are marked invalid.
  """
  del pad_id  # ended rows keep the pad their buffers were filled with at insertion
  model = nnx.merge(graphdef, state)
  b, n = slots.tokens_BxN.shape
  rows_B = jnp.arange(b, dtype=jnp.int32)
  sample = _sampler(temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

  def cond(carry):
    i, s = carry
    live = jnp.sum(s.live_B, dtype=jnp.int32)
    return (i < max_steps) & (live > 0) & ((live > stop_live) | (i < min_steps))

  def body(carry):
    i, s = carry
    live_B = s.live_B
    h_Bx1xD, cache = model.decode(s.tok_B[:, None], s.pos_B[:, None],
                                  live_B[:, None].astype(jnp.int32), s.cache)
    logits_BxV = model.logits_from_hidden(h_Bx1xD, head_DxV)[:, 0]
    tok_B, logp_B = sample(logits_BxV, _step_seed(rng, 2 * s.step))
    col_B = jnp.where(live_B, s.count_B, n)  # column n is out of range: ended rows write nothing
    count_B = s.count_B + live_B.astype(jnp.int32)
    eos_B = live_B & _is_eos(tok_B, eos_E)
    return i + 1, SlotState(
        cache=cache, tok_B=jnp.where(live_B, tok_B, s.tok_B),
        pos_B=s.pos_B + live_B.astype(jnp.int32), count_B=count_B, budget_B=s.budget_B,
        live_B=live_B & ~eos_B & (count_B < s.budget_B), eos_B=s.eos_B | eos_B,
        tokens_BxN=s.tokens_BxN.at[rows_B, col_B].set(tok_B, mode="drop"),
        logp_BxN=s.logp_BxN.at[rows_B, col_B].set(logp_B, mode="drop"),
        step=s.step + 1)

  _, slots = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), slots))
  return slots


@functools.partial(jax.jit, donate_argnames=("slots",))
def _shift_program(slots: SlotState, shift):
  """The window moved `shift` slots left: slots before it are dropped, the freed end invalid."""
  cache = slots.cache
  w = cache.valid_BxS.shape[1]
  roll = lambda x: jnp.roll(x, -shift, axis=2)
  keep_W = jnp.arange(w, dtype=jnp.int32) < w - shift
  valid = jnp.where(keep_W[None, :], jnp.roll(cache.valid_BxS, -shift, axis=1), 0)
  cache = KVCache(tuple(map(roll, cache.k_layers)), tuple(map(roll, cache.v_layers)), valid,
                  cache.index - shift)
  return dataclasses.replace(slots, cache=cache)


@functools.partial(jax.jit, static_argnames=("batch",))
def _gather_program(slots: SlotState, idx_b, real, *, batch):
  """The slots `idx_b` as a state of `batch` rows; rows at or past `real` are ended padding."""
  del batch  # the shape of idx_b; named so that each bucket is its own program
  take = lambda x: jnp.take(x, idx_b, axis=0)
  cache = slots.cache
  cache = KVCache(tuple(map(take, cache.k_layers)), tuple(map(take, cache.v_layers)),
                  take(cache.valid_BxS), cache.index)
  out = jax.tree.map(take, dataclasses.replace(slots, cache=None, step=None))
  live = out.live_B & (jnp.arange(idx_b.shape[0]) < real)
  return dataclasses.replace(out, cache=cache, live_B=live, step=slots.step)


def no_timer(name):
  """A `timer(phase)` that times nothing (the callers' default for `logging.PhaseTimer`)."""
  del name
  return contextlib.nullcontext()


def smaller_bucket(bucket: int, min_bucket: int) -> int:
  """The next bucket of the ladder below `bucket`: the largest power of two or 1.5 × a power of
  two below it (64, 48, 32, 24, 16, 12, ...), or 0 when that is below `min_bucket` (the ladder
  ends). Rungs 3/4 apart waste a sixth of the row-steps that halving wastes on the RL-shaped
  benchmark's tail (BUILD_NOTES), for twice the programs."""
  if bucket <= 1:
    return 0
  power = 1 << ((bucket - 1).bit_length() - 1)  # the largest power of two < bucket
  below = power * 3 // 2 if power >= 2 and power * 3 // 2 < bucket else power
  return below if below >= min_bucket else 0


# Sampler configurations whose programs were all compiled (`SlotSampler._warm_up`).
_WARM: set = set()


@dataclasses.dataclass(frozen=True)
class SlotConfig:
  """How a `SlotSampler` schedules its slots (the measured choices: BUILD_NOTES, "Rollouts at
  RL shape")."""

  slots: int  # decode slots (rows of the cache).
  prompt_width: int  # P: the widest prompt a run may insert (left-padded to it).
  max_new_tokens: int  # N: the largest row budget.
  # Return to the host (refill, report) once this many slots have ended; with nothing left to
  # take the run only returns to compact or at the end. 0 = slots // 8 (at least 1).
  refill_at: int = 0
  # ... but not before this many decode steps (or every row ended): a return costs a host round
  # trip and, in the dynamic-sampling stream, a reward call, more than a few steps of short rows.
  # Not applied when no row may take that many steps (max_new_tokens <= min_steps): the slots
  # would run in waves, each as long as its longest row (the default experiment, N = 6: 0.58
  # idle row-steps per kept token, 0.22 without the wait; BUILD_NOTES).
  min_steps: int = 8
  compact: bool = True  # gather the live rows into smaller buckets once the work is exhausted.
  min_bucket: int = 4  # the smallest bucket compaction makes.
  # Compact only while a live row may still take this many steps: a gather copies the cache
  # and each bucket is a program of its own, which short rows (e.g. N = 6) never pay back.
  compact_min_steps: int = 16
  refills: bool = True  # False: all rows start at once (no window beyond P + N − 1).
  # Rows the work list offers in runs of this many with one prompt (a group's samples): a prefill
  # of R such rows computes at most ceil(R / g) + 1 prompts and copies each prompt's keys /
  # values to its rows. 1: every row is prefilled apart. Prefill is most of the compute of short
  # responses (P = 8 prompt tokens per row against ~2.5 decode steps in the default experiment).
  group_rows: int = 1

  def __post_init__(self):
    for name in ("slots", "prompt_width", "max_new_tokens", "min_bucket", "group_rows"):
      if getattr(self, name) < 1:
        raise ValueError(f"SlotConfig.{name}={getattr(self, name)}: must be >= 1.")

  @property
  def width(self) -> int:
    """W: cache slots. A row holds at most P + N − 1 of them; refills add P + N of room, so the
    window is shifted at most every P + N steps. Past one key block of the cache attention, W is
    a whole number of blocks: a ragged last block is padded, which copies every layer's cache
    at every decode step."""
    w = self.prompt_width + self.max_new_tokens - 1
    w += self.prompt_width + self.max_new_tokens if self.refills else 0
    block = attention._CACHE_KEY_BLOCK  # pylint: disable=protected-access
    return w if w <= block else -(-w // block) * block

  @property
  def refill_rows(self) -> int:
    return self.refill_at or max(1, self.slots // 8)

  def prefill_prompts(self, rows: int) -> int:
    """U: the prompts a prefill of `rows` rows computes (the distinct prompts of `rows`
    consecutive rows in runs of `group_rows`, at most)."""
    return min(rows, -(-rows // self.group_rows) + 1) if self.group_rows > 1 else rows


@dataclasses.dataclass
class RunStats:
  """What a run did, for benchmarks and the step's metrics."""

  slot_steps: int = 0  # Σ over decode steps of the bucket size (row-steps computed).
  steps: int = 0  # decode steps.
  prefills: int = 0  # insert calls.
  prefill_rows: int = 0  # prompts prefilled (padding of a prefill bucket included).
  tokens: int = 0  # tokens of the rows that ended (what was kept of the decode work).
  dropped_tokens: int = 0  # tokens of live rows dropped when the work list stopped the run.
  shifts: int = 0
  compactions: int = 0
  returns: int = 0  # decode calls (host round trips).


class SlotSampler:
  """Runs work lists over a fixed set of decode slots (see the module docstring).

  model: a `CausalLM` or its `(graphdef, state)`; rng: a jax PRNG key; options: `SampleOptions`.
  One sampler may run several work lists (its compiled programs are jax's, cached per shape).
  """

  def __init__(self, model, cfg: SlotConfig, options: SampleOptions, rng):
    from mixpo import sampling  # noqa: PLC0415
    self.graphdef, self.state = sampling.split_model(model)
    self.vocab_size = nnx.merge(self.graphdef, self.state).config.vocab_size
    self.cfg, self.options, self.rng = cfg, options, rng
    self.stats = RunStats()
    self._draws = 0  # prefill noise draws of this sampler (each insert call takes a new one)

  def _empty(self, bucket):
    cfg = self.cfg
    return _init_program(self.graphdef, self.state, np.int32(self.options.pad_id),
                         np.int32(cfg.prompt_width), batch=bucket, width=cfg.width,
                         max_new_tokens=cfg.max_new_tokens)

  def _warm_up(self):
    """Compiles, once per configuration, every program a run of it can reach, by calling each
    on empty slots (no row is written): which prefill size, bucket or window shift a run needs
    depends on the rows, and compiling them as they first occur would leave compiles in later
    RL steps (the trainer's compile/count must stay flat after the first step)."""
    cfg, o = self.cfg, self.options
    key = (self.graphdef, cfg, tuple(sorted(o.static_args().items())), len(o.eos_E))
    if key in _WARM:
      return
    stats, draws = self.stats, self._draws  # the warm-up neither counts nor draws noise
    head = _head_program(self.graphdef, self.state)
    bucket = cfg.slots
    slots = self._empty(bucket)
    small = min(bucket, 1 << (cfg.refill_rows - 1).bit_length())
    for r in sorted({small, bucket} if cfg.refills else {bucket}):
      slots = self._insert(slots, [], [], bucket, rows=r)
    while True:
      slots = _decode_program(self.graphdef, self.state, head, slots, self.rng, np.int32(0),
                              np.int32(0), np.int32(0), *o.dynamic_args(), **o.static_args())
      if cfg.refills:
        slots = _shift_program(slots, np.int32(0))
      smaller = smaller_bucket(bucket, cfg.min_bucket)
      if not (cfg.compact and cfg.max_new_tokens > cfg.compact_min_steps and smaller):
        break
      slots = _gather_program(slots, np.zeros((smaller,), np.int32), np.int32(0), batch=smaller)
      bucket = smaller
    jax.block_until_ready(slots)
    self.stats, self._draws = stats, draws
    _WARM.add(key)

  def _insert(self, slots, requests, slot_ids, bucket, rows=None):
    """Prefills `requests` into `slot_ids`. The prefill batch is padded to one of two sizes, the
    refill size (refill_rows up to a power of two) or the whole bucket: two programs per bucket
    (a prefill program compiles as slowly as a decode program), little padding in either. Rows
    with equal prompts share one prefill (`SlotConfig.group_rows`); rows of more distinct
    prompts than `prefill_prompts` allows (a work list not in runs) are prefilled apart."""
    p = self.cfg.prompt_width
    small = min(bucket, 1 << (self.cfg.refill_rows - 1).bit_length())
    r = rows or (small if len(requests) <= small else bucket)
    distinct: dict[bytes, int] = {}
    src_R = np.zeros((r,), np.int32)  # padding rows read prompt 0 (they are dropped)
    for i, req in enumerate(requests):
      src_R[i] = distinct.setdefault(np.asarray(req.prompt, np.int32).tobytes(), len(distinct))
    u = self.cfg.prefill_prompts(r)
    prompts = [np.frombuffer(b, np.int32) for b in distinct]
    if len(distinct) > u:
      u, src_R[:len(requests)] = r, np.arange(len(requests))
      prompts = [np.asarray(req.prompt, np.int32) for req in requests]
    prompt_UxP = np.full((u, p), self.options.pad_id, np.int32)
    mask_UxP = np.zeros((u, p), np.int32)
    mask_UxP[:, -1] = 1  # padding prompts: one token, so no row is empty
    for i, prompt in enumerate(prompts):
      prompt_UxP[i, p - len(prompt):] = prompt
      mask_UxP[i] = 0
      mask_UxP[i, p - len(prompt):] = 1
    budget_R = np.ones((r,), np.int32)
    slot_R = np.full((r,), bucket, np.int32)  # index B: dropped
    for i, (req, s) in enumerate(zip(requests, slot_ids)):
      budget_R[i], slot_R[i] = req.budget, s
    self.stats.prefills += 1
    self.stats.prefill_rows += u
    self._draws += 1
    prompt_UxP, mask_UxP = sharding.shard_rows((prompt_UxP, mask_UxP))
    return _insert_program(self.graphdef, self.state, slots, prompt_UxP, mask_UxP, src_R, slot_R,
                           budget_R, self.rng, np.int32(self._draws),
                           *self.options.dynamic_args(), **self.options.static_args())

  def _check(self, requests):
    cfg = self.cfg
    for req in requests:
      prompt = np.asarray(req.prompt)
      if prompt.ndim != 1 or not 1 <= len(prompt) <= cfg.prompt_width:
        raise ValueError(f"row {req.row}: prompt of shape {prompt.shape}; expected 1 to "
                         f"{cfg.prompt_width} tokens (SlotConfig.prompt_width)")
      if not 1 <= req.budget <= cfg.max_new_tokens:
        raise ValueError(f"row {req.row}: token budget {req.budget} outside [1, "
                         f"{cfg.max_new_tokens}] (max_new_tokens)")
      bad = (prompt < 0) | (prompt >= self.vocab_size)
      if bad.any():
        raise ValueError(f"row {req.row}: token id {int(prompt[bad][0])} outside the vocabulary "
                         f"[0, {self.vocab_size}); the tokenizer and the model disagree")

  def run(self, work: WorkList, timer: Callable = no_timer, phase: str = "generate") -> RunStats:
    """Generates `work` until it stops the run or has nothing left; returns this run's stats.

    `timer(phase)` (a `logging.PhaseTimer`) times the device work; `work.finished` runs outside
    it (a work list times its own rewards).
    """
    cfg, stats = self.cfg, RunStats()
    self.stats = stats
    bucket = cfg.slots
    p, w = cfg.prompt_width, cfg.width
    with timer(phase):
      self._warm_up()
      head = _head_program(self.graphdef, self.state)
      slots = self._empty(bucket)
    slot_row = [-1] * bucket  # the request row a slot holds, -1 = free
    start = [0] * bucket  # first cache slot of each slot's row (host mirror)
    left = [0] * bucket  # budget minus tokens at the last return: the steps a row may still take
    index = p  # host mirror of the cache's write index
    min_steps = cfg.min_steps if cfg.max_new_tokens > cfg.min_steps else 1
    while True:
      free = [s for s in range(bucket) if slot_row[s] < 0]
      requests = work.take(len(free)) if free else []
      if len(requests) > len(free):
        raise ValueError(f"WorkList.take({len(free)}) returned {len(requests)} rows")
      self._check(requests)
      occupied = bucket - len(free) + len(requests)
      if not occupied:
        break
      with timer(phase):
        if requests:
          slots = self._insert(slots, requests, free[:len(requests)], bucket)
          for req, s in zip(requests, free):
            slot_row[s], start[s], left[s] = req.row, index - p, req.budget - 1
        live = [s for s in range(bucket) if slot_row[s] >= 0]
        exhausted = work.exhausted
        compact = cfg.compact and max(left[s] for s in live) >= cfg.compact_min_steps
        # Down the ladder one bucket at a time (one gather program per rung, not per pair).
        while exhausted and compact and len(live) <= smaller_bucket(bucket, cfg.min_bucket):
          smaller = smaller_bucket(bucket, cfg.min_bucket)
          idx = np.asarray(live + [live[0]] * (smaller - len(live)), np.int32)
          slots = _gather_program(slots, idx, np.int32(len(live)), batch=smaller)
          pad = smaller - len(live)
          slot_row = [slot_row[s] for s in live] + [-1] * pad
          start = [start[s] for s in live] + [0] * pad
          left = [left[s] for s in live] + [0] * pad
          bucket, live = smaller, list(range(len(live)))
          stats.compactions += 1
        # Shift the window when it is full, or when that skips a whole key block of attention.
        shift = min([start[s] for s in live] + [index - p])
        if index >= w or (w > 256 and shift >= 256):
          slots = _shift_program(slots, np.int32(shift))
          index -= shift
          start = [x - shift for x in start]
          stats.shifts += 1
        stop_live = max(0, len(live) - cfg.refill_rows)
        if exhausted and compact:  # return once the live rows fit the next bucket down
          stop_live = max(stop_live, smaller_bucket(bucket, cfg.min_bucket))
        slots = _decode_program(self.graphdef, self.state, head, slots, self.rng,
                                np.int32(w - index), np.int32(stop_live), np.int32(min_steps),
                                *self.options.dynamic_args(), **self.options.static_args())
        live_B, count_B, budget_B, eos_B, new_index = sharding.to_host(
            (slots.live_B, slots.count_B, slots.budget_B, slots.eos_B, slots.cache.index))
        steps = int(new_index) - index
        index = int(new_index)
        stats.steps += steps
        stats.slot_steps += steps * bucket
        stats.returns += 1
        for s in live:
          left[s] = int(budget_B[s]) - int(count_B[s])
        ended = [s for s in live if not live_B[s]]
        finished = []
        if ended:
          tokens_BxN, logp_BxN = sharding.to_host((slots.tokens_BxN, slots.logp_BxN))
          for s in ended:
            n = int(count_B[s])
            finished.append(Finished(row=slot_row[s], tokens=tokens_BxN[s, :n].copy(),
                                     logp=logp_BxN[s, :n].copy(), truncated=not eos_B[s]))
            stats.tokens += n
            slot_row[s] = -1
      if work.finished(finished):
        stats.dropped_tokens += int(sum(count_B[s] for s in range(bucket) if slot_row[s] >= 0))
        break
    return stats
