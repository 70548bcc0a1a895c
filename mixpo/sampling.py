"""Jitted generation (prefill + KV-cache decode loop) and teacher-forced scoring.

One code path serves the policy, θ_old and the guide: every entry point takes `model` as either
an NNX `CausalLM` or its `(graphdef, state)` pair from `nnx.split` (the form to keep when several
parameter sets share one architecture: the compiled programs are keyed on the graphdef and the
static arguments only, so swapping `state` never recompiles).

Conventions (shared with `mixpo.batch`):
  * prompts are left-padded, `prompt_mask_BxP` is 1 on real tokens; position ids come from the
    mask (cumsum − 1, clamped at 0) and continue through the generated tokens;
  * per-token log-probs are aligned with the tokens they score: entry t is
    log p(token_t | tokens_<t); entries without a scored token are 0.

Sampling distribution: logits / temperature, then top-k (k largest), then top-p (smallest prefix
of the sorted distribution whose mass reaches top_p), renormalised — the order `transformers` uses.
The log-prob `generate` reports is under that restricted distribution. Temperature 0 means greedy
(argmax); its log-probs are then under the unscaled, unrestricted distribution (log_softmax of the
logits), which is what `score(..., temperature=0.0)` also returns.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixpo import sharding
from mixpo.batch import positions_from_mask
from mixpo.models import backend

# Float32 elements of one logits chunk in `score` when chunk_size is left to us (512 MiB).
_LOGITS_CHUNK_ELEMENTS = 1 << 27


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
  """What `generate` returns; every field is a device array."""
  tokens_BxN: jax.Array  # int32 sampled tokens; pad_id after a row's EOS.
  mask_BxN: jax.Array  # int32 1 up to and including EOS, 0 after.
  lengths_B: jax.Array  # int32 number of generated tokens (EOS included) = mask_BxN.sum(1).
  logp_BxN: jax.Array  # float32 log-prob of each token under the sampling distribution; 0 off-mask.
  truncated_B: jax.Array  # bool True where no EOS was produced within N tokens.


def split_model(model):
  """Returns `(graphdef, state)` for an NNX model or passes such a pair through."""
  if isinstance(model, nnx.Module):
    return nnx.split(model)
  if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
    return model
  raise TypeError(f"model: expected an nnx.Module or a (graphdef, state) pair from nnx.split, "
                  f"got {type(model).__name__}")


@functools.lru_cache(maxsize=16)
def _graphdef_for(config) -> nnx.GraphDef:
  """The graphdef of a `CausalLM` built from `config` (abstract: no parameter is allocated)."""
  from mixpo.models import CausalLM  # pylint: disable=g-import-not-at-top
  return nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))[0]


def with_dtype(model, dtype=jnp.bfloat16, exact: bool = False):
  """`(graphdef, state)` of `model` with its parameters held in `dtype`: the form to roll out and
  score with (e.g. bfloat16) while training keeps float32 master weights.

  It computes in `backend.rollout_compute_dtype(dtype)`: `dtype` itself, except bfloat16 on a
  CPU platform, where the copy holds the bf16-rounded weights as float32 and computes in float32
  (XLA:CPU's bf16 decode is slower than its float32; the values are a bf16 copy's). `exact`:
  store and compute in `dtype` on every platform (to measure bf16 compute on CPU).

  One jitted cast per call (reads 4 and writes 2 bytes per parameter for float32 → bfloat16);
  the KV cache of `generate` follows the compute dtype. Log-probs stay float32 (logits are
  computed with float32 accumulation and reduced in float32). A model already in the dtype is
  returned as is (a bf16 copy computing in float32 is rounded again: the values do not change).
  model: a `CausalLM` or its `(graphdef, state)`.
  """
  from mixpo.models import backend  # noqa: PLC0415
  graphdef, state = split_model(model)
  config = _model_config(graphdef, state)
  dtype = jnp.dtype(dtype)
  compute = dtype if exact else backend.rollout_compute_dtype(dtype)
  same = jnp.dtype(config.dtype) == compute and jnp.dtype(config.param_dtype) == compute
  if same and compute == dtype:
    return graphdef, state
  config = dataclasses.replace(config, dtype=compute, param_dtype=compute)
  return _graphdef_for(config), _round_floats(state, dtype, compute)


@functools.partial(jax.jit, static_argnames=("dtype", "compute"))
def _round_floats(state, dtype, compute):
  """Floating leaves rounded to `dtype`, held as `compute` (one program)."""
  return jax.tree.map(lambda x: x.astype(dtype).astype(compute)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def bucket_length(p: int, min_length: int = 16) -> int:
  """Prompt width a batch is left-padded to: the next power of two (at least `min_length`) up to
  128, then the next multiple of 128. Prompts of varied lengths compile a handful of programs."""
  p = max(int(p), min_length)
  if p <= 128:
    return 1 << (p - 1).bit_length()
  return -(-p // 128) * 128


# ----------------------------------------------------------------------------------------------
# Sampling one token.


def _sample_token(logits_BxV, seed_4, temperature, top_p, *, greedy, top_k, use_top_p):
  """Samples one token per row and its log-prob under the (restricted) sampling distribution.

  Gumbel-max on the scaled logits: argmax(z + g) with g ~ Gumbel(0, 1) is a draw from softmax(z),
  with no normalisation or cumulative sum over the vocabulary on the sampling path.
  seed_4: uint32 [4] Philox key of this step. Returns (tokens_B int32, logp_B float32).
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  if greedy:
    tok_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    return tok_B, jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
  z_BxV = logits_BxV / temperature
  if top_k == 0 and not use_top_p:
    tok_B = backend.argmax(z_BxV + backend.gumbel(seed_4, z_BxV.shape))
    z_tok_B = jnp.take_along_axis(z_BxV, tok_B[:, None], axis=-1)[:, 0]
    return tok_B, z_tok_B - jax.nn.logsumexp(z_BxV, axis=-1)
  # Work in the sorted top-k space: lax.top_k returns the k largest logits in descending order,
  # which is also the order top-p needs (k = V when only top-p is asked for).
  k = top_k if top_k > 0 else z_BxV.shape[-1]
  z_BxK, idx_BxK = jax.lax.top_k(z_BxV, k)
  if use_top_p:
    p_BxK = jax.nn.softmax(z_BxK, axis=-1)
    mass_before_BxK = jnp.cumsum(p_BxK, axis=-1) - p_BxK
    # Keep the smallest prefix reaching top_p; the first token always survives.
    z_BxK = jnp.where(mass_before_BxK < top_p, z_BxK, -jnp.inf)
  j_B = jnp.argmax(z_BxK + backend.gumbel(seed_4, z_BxK.shape), axis=-1)
  tok_B = jnp.take_along_axis(idx_BxK, j_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
  z_tok_B = jnp.take_along_axis(z_BxK, j_B[:, None], axis=-1)[:, 0]
  return tok_B, z_tok_B - jax.nn.logsumexp(z_BxK, axis=-1)


# ----------------------------------------------------------------------------------------------
# generate


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p"))
def _generate_program(graphdef, state, prompt_BxP, prompt_mask_BxP, rng, temperature, top_p,
                      eos_E, pad_id, *, max_new_tokens, greedy, top_k, use_top_p):
  """Prefill + `lax.while_loop` decode; one XLA program per (graphdef, B, P, N, switches).

  The KV cache is allocated inside the program and lives only in the loop carry, which XLA
  updates in place — there is no host-side buffer to donate and no per-token host round-trip.
  """
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  n = max_new_tokens
  sample = functools.partial(_sample_token, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p)

  positions_BxP = positions_from_mask(prompt_mask_BxP)
  next_pos_B = jnp.sum(prompt_mask_BxP, axis=1, dtype=jnp.int32)  # position of new token 0
  # The last sampled token is never fed back, so P + N − 1 slots suffice.
  cache = model.init_cache(b, p + n - 1)
  h_BxPxD, cache = model.decode(prompt_BxP, positions_BxP, prompt_mask_BxP, cache)
  logits_Bx1xV = model.logits_from_hidden(h_BxPxD[:, -1:])
  head_DxV = model.decode_head()  # loop-invariant: built once per call, read by every step
  is_eos = lambda tok: jnp.any(tok[..., None] == eos_E.reshape((1,) * tok.ndim + (-1,)), axis=-1)
  seeds_Nx4 = jax.random.bits(rng, (n, 4), jnp.uint32)  # one Philox key per step
  tok_B, logp_B = sample(logits_Bx1xV[:, 0], seeds_Nx4[0])
  done_B = is_eos(tok_B)
  tokens_BxN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok_B)
  logp_BxN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp_B)
  ones_Bx1 = jnp.ones((b, 1), jnp.int32)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < n) & ~jnp.all(done_B)

  def body(carry):
    i, cache, prev_B, done_B, tokens_BxN, logp_BxN = carry
    pos_Bx1 = (next_pos_B + i - 1)[:, None]
    h_Bx1xD, cache = model.decode(prev_B[:, None], pos_Bx1, ones_Bx1, cache)
    logits_Bx1xV = model.logits_from_hidden(h_Bx1xD, head_DxV)
    tok_B, logp_B = sample(logits_Bx1xV[:, 0], seeds_Nx4[i])
    tok_B = jnp.where(done_B, pad_id, tok_B)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, tok_B[:, None], (0, i))
    logp_BxN = jax.lax.dynamic_update_slice(logp_BxN, logp_B[:, None], (0, i))
    return i + 1, cache, tok_B, done_B | is_eos(tok_B), tokens_BxN, logp_BxN

  carry = (jnp.int32(1), cache, tok_B, done_B, tokens_BxN, logp_BxN)
  _, _, _, _, tokens_BxN, logp_BxN = jax.lax.while_loop(cond, body, carry)

  # A token is in the response iff no EOS came strictly before it.
  is_eos_BxN = is_eos(tokens_BxN)
  eos_before_BxN = jnp.cumsum(is_eos_BxN, axis=1) - is_eos_BxN
  mask_BxN = (eos_before_BxN == 0).astype(jnp.int32)
  return Rollout(
      tokens_BxN=jnp.where(mask_BxN == 1, tokens_BxN, pad_id),
      mask_BxN=mask_BxN,
      lengths_B=jnp.sum(mask_BxN, axis=1, dtype=jnp.int32),
      logp_BxN=jnp.where(mask_BxN == 1, logp_BxN, 0.0),
      truncated_B=~jnp.any(is_eos_BxN, axis=1),
  )


def _model_config(graphdef, state):
  return nnx.merge(graphdef, state).config


def check_token_ids(tokens, vocab_size: int, what: str) -> None:
  """Raises ValueError naming the first row of `tokens` ([B, T] host array) with an id outside
  [0, vocab_size). Called on the host before every compiled generate / score: inside the
  compiled programs an out-of-range id is not an error (a gather clamps or fills), it silently
  becomes another token's embedding."""
  tokens = np.asarray(tokens)
  bad_BxT = (tokens < 0) | (tokens >= vocab_size)
  if bad_BxT.any():
    row = int(np.flatnonzero(bad_BxT.any(axis=1))[0])
    tok = int(tokens[row][bad_BxT[row]][0])
    raise ValueError(f"{what}: row {row} holds token id {tok} outside the vocabulary [0, "
                     f"{vocab_size}); the tokenizer and the model disagree (or the ids are "
                     "corrupt): ids are never clamped")


@dataclasses.dataclass(frozen=True)
class _Prepared:
  graphdef: nnx.GraphDef
  state: nnx.State
  prompt_BxP: np.ndarray  # int32 left-padded to the bucket width.
  mask_BxP: np.ndarray  # int32.
  lengths_B: np.ndarray  # real prompt tokens per row.
  budgets_B: np.ndarray  # int32 each row's maximum of new tokens.
  options: "slots.SampleOptions"


def _prepare(model, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_p, top_k,
             eos_id, pad_id, prompt_length, row_budgets) -> _Prepared:
  """`generate`'s argument checks (host side, before any compiled call) and re-padding."""
  from mixpo import slots  # noqa: PLC0415  (slots imports this module)
  graphdef, state = split_model(model)
  config = _model_config(graphdef, state)
  prompt_BxP = np.asarray(prompt_tokens)
  mask_BxP = np.asarray(prompt_mask)
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[0] == 0 or prompt_BxP.shape[1] == 0:
    raise ValueError(f"prompt_tokens: expected a non-empty [B, P] array, got shape "
                     f"{prompt_BxP.shape}; pass at least one prompt of at least one token")
  if mask_BxP.shape != prompt_BxP.shape:
    raise ValueError(f"prompt_mask: shape {mask_BxP.shape} differs from prompt_tokens "
                     f"{prompt_BxP.shape}")
  mask_BxP = (mask_BxP != 0).astype(np.int32)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
  lengths_B = mask_BxP.sum(axis=1)
  empty = np.flatnonzero(lengths_B == 0)
  if empty.size:
    raise ValueError(f"prompt_mask: row(s) {empty[:8].tolist()} have no real token; drop them or "
                     f"give each prompt at least one token (e.g. BOS)")
  not_left = np.flatnonzero(np.any(np.diff(mask_BxP, axis=1) < 0, axis=1))
  if not_left.size:
    raise ValueError(f"prompt_mask: row(s) {not_left[:8].tolist()} are not left-padded (a 1 is "
                     f"followed by a 0); put the padding before the prompt")
  check_token_ids(prompt_BxP, config.vocab_size, "prompt_tokens")
  max_pos = config.max_position_embeddings
  if lengths_B.max() + max_new_tokens > max_pos:
    row = int(np.argmax(lengths_B))
    raise ValueError(f"prompt_tokens: row {row} has {lengths_B[row]} tokens, more than the model's "
                     f"max_position_embeddings ({max_pos}) minus max_new_tokens "
                     f"({max_new_tokens}); truncate the prompt or lower max_new_tokens")
  budgets_B = np.full(len(prompt_BxP), max_new_tokens, np.int32)
  if row_budgets is not None:
    budgets_B = np.asarray(row_budgets)
    if (budgets_B.shape != lengths_B.shape or not np.issubdtype(budgets_B.dtype, np.integer)
        or (budgets_B < 1).any() or (budgets_B > max_new_tokens).any()):
      raise ValueError(f"row_budgets: expected {len(lengths_B)} ints in [1, max_new_tokens="
                       f"{max_new_tokens}], got {np.asarray(row_budgets)[:8]!r}")
    budgets_B = budgets_B.astype(np.int32)
  eos_E = np.asarray([] if eos_id is None else eos_id, np.int64).reshape(-1)
  if np.any((eos_E < 0) | (eos_E >= config.vocab_size)):
    raise ValueError(f"eos_id: {eos_id} is outside the vocabulary [0, {config.vocab_size}); "
                     f"pass the tokenizer's eos_token_id (an int or a list of ints) or None")
  if not 0 <= pad_id < config.vocab_size:
    raise ValueError(f"pad_id: {pad_id} is outside the vocabulary [0, {config.vocab_size})")
  if not temperature >= 0:
    raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p: expected a value in (0, 1] (1 disables it), got {top_p}")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k: expected an int >= 0 (0 disables it), got {top_k!r}")
  options = slots.SampleOptions(
      temperature=float(temperature), top_p=float(top_p), top_k=min(int(top_k), config.vocab_size),
      eos_E=tuple(int(e) for e in eos_E) or (-1,), pad_id=int(pad_id))

  # Re-pad to the bucket width: drop all-padding columns, then pad on the left.
  longest = int(lengths_B.max())
  width = bucket_length(longest) if prompt_length is None else int(prompt_length)
  if width < longest:
    raise ValueError(f"prompt_length: {width} is shorter than the longest prompt ({longest})")
  prompt_BxP = prompt_BxP[:, prompt_BxP.shape[1] - longest:]
  mask_BxP = mask_BxP[:, mask_BxP.shape[1] - longest:]
  pad = ((0, 0), (width - longest, 0))
  prompt_BxP = np.pad(prompt_BxP.astype(np.int32), pad, constant_values=pad_id)
  mask_BxP = np.pad(mask_BxP, pad)
  return _Prepared(graphdef, state, prompt_BxP, mask_BxP, lengths_B, budgets_B, options)


def rollout_from_rows(results, rows: int, max_new_tokens: int, pad_id: int) -> Rollout:
  """A `Rollout` ([rows, N] arrays) of `slots.Finished` results keyed by row 0 .. rows − 1."""
  tokens_BxN = np.full((rows, max_new_tokens), pad_id, np.int32)
  logp_BxN = np.zeros((rows, max_new_tokens), np.float32)
  lengths_B = np.zeros((rows,), np.int32)
  truncated_B = np.zeros((rows,), bool)
  for i in range(rows):
    r = results[i]
    n = len(r.tokens)
    tokens_BxN[i, :n], logp_BxN[i, :n], lengths_B[i], truncated_B[i] = r.tokens, r.logp, n, \
        r.truncated
  mask_BxN = (np.arange(max_new_tokens)[None, :] < lengths_B[:, None]).astype(np.int32)
  return Rollout(tokens_BxN=jnp.asarray(tokens_BxN), mask_BxN=jnp.asarray(mask_BxN),
                 lengths_B=jnp.asarray(lengths_B), logp_BxN=jnp.asarray(logp_BxN),
                 truncated_B=jnp.asarray(truncated_B))


def _prompt_runs(prompt_BxP, mask_BxP) -> int:
  """g > 1 when the rows are runs of g equal prompts (k samples of each prompt, as
  `rollout.encode_prompts` lays them out): their prefill is then shared (`SlotConfig.group_rows`).
  1 otherwise."""
  b = len(prompt_BxP)
  rows = np.concatenate([np.asarray(prompt_BxP), np.asarray(mask_BxP)], axis=1)
  new = np.flatnonzero(np.any(rows[1:] != rows[:-1], axis=1)) + 1  # rows where a run starts
  g = int(np.gcd.reduce(np.concatenate([new, [b]])))
  return g if g > 1 else 1


def generate(model, prompt_tokens, prompt_mask, rng, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_id: int | Sequence[int] | None = None,
             pad_id: int = 0, prompt_length: int | None = None, row_budgets=None,
             min_bucket: int = 4) -> Rollout:
  """Samples up to `max_new_tokens` (N) continuations of a batch of left-padded prompts.

  Rows that end (EOS or their own budget) stop costing decode work: the rows still decoding
  are gathered into smaller batches as the others end (`mixpo.slots`, every row starts at once;
  `static_generate` is the one-program form that decodes every row to the end).

  Args:
    model: a `CausalLM` or its `(graphdef, state)` from `nnx.split`.
    prompt_tokens: int [B, P] left-padded prompts (numpy or jax); every id in the vocabulary.
    prompt_mask: int/bool [B, P], 1 on real tokens; every row needs at least one.
    rng: a jax PRNG key; the same key gives the same samples.
    max_new_tokens: N, the static length of the response arrays.
    temperature: softmax temperature; 0 = greedy (see module docstring for its log-probs).
    top_p: nucleus mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    eos_id: token (or tokens, e.g. Llama 3's [128001, 128009]) that ends a row (kept, mask 1);
      None = rows always run to their budget.
    pad_id: token written after a row's end.
    prompt_length: width to left-pad prompts to before compiling; default `bucket_length` of the
      longest prompt, so that varied prompt lengths share a handful of programs.
    row_budgets: int [B], each row's own maximum of new tokens (1 .. N); None = N for every row.
      A row that reaches its budget without EOS is `truncated`.
    min_bucket: the smallest batch the live rows are gathered into.

  Returns:
    `Rollout` with [B, N] tokens, mask and log-probs, [B] lengths and truncated flags.
  """
  from mixpo import slots  # noqa: PLC0415
  prep = _prepare(model, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_p, top_k,
                  eos_id, pad_id, prompt_length, row_budgets)
  b, width = prep.prompt_BxP.shape
  work = slots.RowList([
      slots.Request(i, prep.prompt_BxP[i, width - prep.lengths_B[i]:], int(prep.budgets_B[i]))
      for i in range(b)])
  cfg = slots.SlotConfig(slots=b, prompt_width=width, max_new_tokens=int(max_new_tokens),
                         refill_at=b, min_bucket=min_bucket, refills=False,
                         group_rows=_prompt_runs(prep.prompt_BxP, prep.mask_BxP))
  slots.SlotSampler((prep.graphdef, prep.state), cfg, prep.options, rng).run(work)
  return rollout_from_rows(work.results, b, int(max_new_tokens), prep.options.pad_id)


def static_generate(model, prompt_tokens, prompt_mask, rng, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
                    prompt_length: int | None = None, row_budgets=None) -> Rollout:
  """`generate` as one XLA program over a static batch: every row is decoded until all have
  ended or N tokens were generated (ended rows included). The reference `generate` is tested
  against and benchmarked against; `row_budgets` are applied by cutting rows afterwards."""
  prep = _prepare(model, prompt_tokens, prompt_mask, max_new_tokens, temperature, top_p, top_k,
                  eos_id, pad_id, prompt_length, row_budgets)
  o = prep.options
  # Under jax.set_mesh: rows over data × fsdp (the program follows); otherwise a no-op.
  prompt_BxP, mask_BxP = sharding.shard_rows((prep.prompt_BxP, prep.mask_BxP))
  out = _generate_program(
      prep.graphdef, prep.state, prompt_BxP, mask_BxP, rng, *o.dynamic_args()[:2],
      np.asarray(o.eos_E, np.int32), np.int32(o.pad_id), max_new_tokens=int(max_new_tokens),
      **o.static_args())
  if row_budgets is None:
    return out
  keep_BxN = np.arange(max_new_tokens)[None, :] < prep.budgets_B[:, None]
  mask_BxN = np.asarray(out.mask_BxN) * keep_BxN
  lengths_B = mask_BxN.sum(1).astype(np.int32)
  ended_B = np.asarray(out.lengths_B) <= prep.budgets_B
  return Rollout(
      tokens_BxN=jnp.asarray(np.where(mask_BxN == 1, np.asarray(out.tokens_BxN), o.pad_id)),
      mask_BxN=jnp.asarray(mask_BxN.astype(np.int32)), lengths_B=jnp.asarray(lengths_B),
      logp_BxN=jnp.asarray(np.where(mask_BxN == 1, np.asarray(out.logp_BxN), 0.0)),
      truncated_B=jnp.asarray(np.asarray(out.truncated_B) | ~ended_B))


# ----------------------------------------------------------------------------------------------
# score


def auto_chunk_size(batch_size: int, length: int, vocab_size: int) -> int:
  """Largest power-of-two chunk (over T) whose float32 [B, chunk, V] logits fit the budget."""
  c = max(1, _LOGITS_CHUNK_ELEMENTS // max(1, batch_size * vocab_size))
  c = 1 << (c.bit_length() - 1)
  return min(c, max(1, length))


def token_logp(model, tokens_BxT, mask_BxT, positions_BxT=None, *, temperature=1.0,
               chunk_size: int | None = None, return_entropy: bool = False, first: int = 1):
  """Per-token log-probs (and entropies) of a teacher-forced batch; pure and differentiable.

  The body of `score`, for use inside a jitted loss (takes an NNX model, not a pair). The
  [B, T, V] logits are never materialised: hidden states are cut into chunks of `chunk_size`
  positions and each chunk's logits are reduced (logsumexp, gather, entropy) under a `lax.map`
  whose body is rematerialised in the backward pass, so peak memory is one [B, chunk, V] block.

  Entry t of the outputs scores token t given tokens < t, under softmax(logits / temperature)
  (temperature 0 = unscaled); it is 0 where token t or token t−1 is padding and at t = 0.
  Returns logp_BxT float32, or (logp_BxT, entropy_BxT) with `return_entropy`. `first` (static,
  >= 1): positions before it are not scored (0), so the head runs on T − first positions only
  (a trainer whose loss covers the last N tokens passes T − N).
  """
  b, t = tokens_BxT.shape
  mask_BxT = mask_BxT.astype(jnp.int32)
  if positions_BxT is None:
    positions_BxT = positions_from_mask(mask_BxT)
  h_BxTxD = model.hidden_states(tokens_BxT, positions_BxT, mask_BxT)
  # Position t−1 predicts token t: pair h[:, :-1] with tokens[:, 1:].
  if not 1 <= first < t:
    raise ValueError(f"token_logp(first={first}): must lie in [1, {t}) for rows of {t} tokens.")
  h_BxSxD, target_BxS = h_BxTxD[:, first - 1:-1], tokens_BxT[:, first:]
  s = t - first
  inv_temp = jnp.where(temperature > 0, 1.0 / jnp.where(temperature > 0, temperature, 1.0), 1.0)

  def reduce_chunk(h_BxCxD, target_BxC):
    z_BxCxV = model.logits_from_hidden(h_BxCxD).astype(jnp.float32) * inv_temp
    lse_BxC = jax.nn.logsumexp(z_BxCxV, axis=-1)
    logp_BxC = jnp.take_along_axis(z_BxCxV, target_BxC[..., None], axis=-1)[..., 0] - lse_BxC
    if not return_entropy:
      return logp_BxC, jnp.zeros_like(logp_BxC)
    p_BxCxV = jnp.exp(z_BxCxV - lse_BxC[..., None])
    return logp_BxC, lse_BxC - jnp.sum(p_BxCxV * z_BxCxV, axis=-1)

  if chunk_size is None:
    chunk_size = auto_chunk_size(b, s, model.config.vocab_size)
  if s <= chunk_size:
    logp_BxS, ent_BxS = reduce_chunk(h_BxSxD, target_BxS)
  else:
    n_chunks = -(-s // chunk_size)
    pad = n_chunks * chunk_size - s
    h_CxBxKxD = jnp.pad(h_BxSxD, ((0, 0), (0, pad), (0, 0)))
    h_CxBxKxD = h_CxBxKxD.reshape(b, n_chunks, chunk_size, -1).swapaxes(0, 1)
    target_CxBxK = jnp.pad(target_BxS, ((0, 0), (0, pad)))
    target_CxBxK = target_CxBxK.reshape(b, n_chunks, chunk_size).swapaxes(0, 1)
    logp_CxBxK, ent_CxBxK = jax.lax.map(
        lambda xs: jax.checkpoint(reduce_chunk)(*xs), (h_CxBxKxD, target_CxBxK))
    logp_BxS = logp_CxBxK.swapaxes(0, 1).reshape(b, -1)[:, :s]
    ent_BxS = ent_CxBxK.swapaxes(0, 1).reshape(b, -1)[:, :s]

  valid_BxS = (mask_BxT[:, first:] == 1) & (mask_BxT[:, first - 1:-1] == 1)
  zeros_BxF = jnp.zeros((b, first), jnp.float32)
  logp_BxT = jnp.concatenate([zeros_BxF, jnp.where(valid_BxS, logp_BxS, 0.0)], axis=1)
  if not return_entropy:
    return logp_BxT
  return logp_BxT, jnp.concatenate([zeros_BxF, jnp.where(valid_BxS, ent_BxS, 0.0)], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "return_entropy"))
def _score_program(graphdef, state, tokens_BxT, mask_BxT, positions_BxT, temperature, *,
                   chunk_size, return_entropy):
  return token_logp(nnx.merge(graphdef, state), tokens_BxT, mask_BxT, positions_BxT,
                    temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy)


def score(model, tokens, mask, positions=None, *, temperature: float = 1.0,
          chunk_size: int | None = None, return_entropy: bool = False):
  """Teacher-forced per-token log-probs of a padded batch, jitted (see `token_logp`).

  Args:
    model: a `CausalLM` or its `(graphdef, state)` from `nnx.split`.
    tokens: int [B, T] (e.g. `Batch.tokens_BxT`: left-padded prompt + response).
    mask: int/bool [B, T], 1 on real tokens.
    positions: int [B, T] position ids; default from the mask (cumsum − 1, clamped at 0).
    temperature: score under softmax(logits / temperature) so that log-probs match the
      sampling distribution of `generate` (top-k/top-p are not applied); 0 = unscaled.
    chunk_size: positions per logits chunk; default keeps one chunk's float32 logits ≤ 512 MiB.
    return_entropy: also return the per-token entropy of the scaled distribution.

  Returns:
    logp_BxT float32 (entry 0 and padding entries 0), or (logp_BxT, entropy_BxT).
  """
  graphdef, state = split_model(model)
  tokens_BxT = jnp.asarray(tokens, jnp.int32)
  if tokens_BxT.ndim != 2 or tokens_BxT.shape[0] == 0 or tokens_BxT.shape[1] == 0:
    raise ValueError(f"tokens: expected a non-empty [B, T] array, got shape {tokens_BxT.shape}")
  check_token_ids(sharding.to_host(tokens), _model_config(graphdef, state).vocab_size, "tokens")
  mask_BxT = jnp.asarray(mask).astype(jnp.int32)
  if mask_BxT.shape != tokens_BxT.shape:
    raise ValueError(f"mask: shape {mask_BxT.shape} differs from tokens {tokens_BxT.shape}")
  if positions is not None:
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape != tokens_BxT.shape:
      raise ValueError(f"positions: shape {positions.shape} differs from tokens "
                       f"{tokens_BxT.shape}; pass None to derive them from the mask")
  if not temperature >= 0:
    raise ValueError(f"temperature: expected >= 0 (0 = unscaled), got {temperature}")
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
  if chunk_size is None:
    config = _model_config(graphdef, state)
    chunk_size = auto_chunk_size(tokens_BxT.shape[0], tokens_BxT.shape[1] - 1, config.vocab_size)
  tokens_BxT, mask_BxT, positions = sharding.shard_rows((tokens_BxT, mask_BxT, positions))
  return _score_program(graphdef, state, tokens_BxT, mask_BxT, positions, np.float32(temperature),
                        chunk_size=int(chunk_size), return_entropy=bool(return_entropy))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time lowering (experiments/aot_compile.py): the programs `generate` and `score` run,
# for inputs given as shapes. Nothing is validated or placed on a device (there are no values),
# so they lower under the compile-only mesh of a TPU / GPU topology a CPU host cannot run.


def _replicated_scalar(dtype, like):
  """A scalar ShapeDtypeStruct, replicated over the mesh of `like` (a sharded ShapeDtypeStruct)."""
  sh = getattr(like, "sharding", None)
  if isinstance(sh, jax.sharding.NamedSharding):
    return jax.ShapeDtypeStruct((), dtype, sharding=jax.sharding.NamedSharding(
        sh.mesh, jax.sharding.PartitionSpec()))
  return jax.ShapeDtypeStruct((), dtype)


def lower_generate(model, prompt_BxP, prompt_mask_BxP, max_new_tokens: int, *,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   num_eos: int = 1):
  """jax's `Lowered` of the program `generate` runs (`.compile()` for its memory and HLO).

  model: a `CausalLM` or `(graphdef, state)`; state leaves may be `jax.ShapeDtypeStruct`s with
  shardings. prompt_BxP, prompt_mask_BxP: int32 ShapeDtypeStructs [B, P] (rows sharded as
  `generate` places them: `sharding.fit_spec(sharding.ROWS_B, ...)`). The sampling switches
  select the program as in `generate`; num_eos: how many EOS ids the run passes.
  Call it inside `jax.set_mesh(mesh)`, as `generate` runs.
  """
  graphdef, state = split_model(model)
  vocab = _model_config(graphdef, state).vocab_size
  greedy = temperature == 0
  f32 = _replicated_scalar(jnp.float32, prompt_BxP)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=f32.sharding)
  eos_E = jax.ShapeDtypeStruct((num_eos,), jnp.int32, sharding=f32.sharding)
  return _generate_program.lower(
      graphdef, state, prompt_BxP, prompt_mask_BxP, rng, f32, f32, eos_E,
      _replicated_scalar(jnp.int32, prompt_BxP), max_new_tokens=int(max_new_tokens),
      greedy=greedy, top_k=0 if greedy else min(int(top_k), vocab),
      use_top_p=(not greedy) and top_p < 1)


def lower_score(model, tokens_BxT, mask_BxT, positions_BxT=None, *, chunk_size=None,
                return_entropy: bool = False):
  """jax's `Lowered` of the program `score` runs; arguments as `lower_generate`'s (int32
  ShapeDtypeStructs [B, T]) and `score`'s."""
  graphdef, state = split_model(model)
  b, t = tokens_BxT.shape
  if chunk_size is None:
    chunk_size = auto_chunk_size(b, t - 1, _model_config(graphdef, state).vocab_size)
  return _score_program.lower(graphdef, state, tokens_BxT, mask_BxT, positions_BxT,
                              _replicated_scalar(jnp.float32, tokens_BxT),
                              chunk_size=int(chunk_size), return_entropy=bool(return_entropy))
