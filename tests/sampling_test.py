"""Tests of mixpo.sampling against transformers on tiny float32 checkpoints."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mixpo import algorithms, models
from mixpo import sampling
from mixpo import slots
from mixpo.models import backend

VOCAB = 96
# Wide init (0.2, not 0.02) spreads the logits so greedy argmaxes are not near-ties that float
# rounding could flip between two correct implementations.
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.2, tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=None, pad_token_id=0)


def _checkpoint(tmp_path_factory, arch):
  torch.manual_seed(0)
  if arch == "llama":
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
  else:
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))
  hf = hf.eval()
  path = str(tmp_path_factory.mktemp(arch))
  hf.save_pretrained(path)
  return hf, models.from_pretrained(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return _checkpoint(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  return _checkpoint(tmp_path_factory, "qwen2")


def _prompts(lengths, width=None, seed=0):
  """Left-padded random prompts (ids >= 1) of the given lengths."""
  rng = np.random.default_rng(seed)
  width = width or max(lengths)
  tokens = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, width - n:] = rng.integers(1, VOCAB, n)
    mask[i, width - n:] = 1
  return tokens, mask


def _full_rows(prompt, mask, rollout):
  tokens = np.concatenate([prompt, np.asarray(rollout.tokens_BxN)], axis=1)
  full_mask = np.concatenate([mask, np.asarray(rollout.mask_BxN)], axis=1)
  return tokens, full_mask


def _reference_logp(model, tokens, mask, temperature=1.0):
  """Unchunked per-token log-probs and entropies from the full [B, T, V] logits."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  z = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))
  z = z[:, :-1] / temperature
  logp_all = np.asarray(jax.nn.log_softmax(jnp.asarray(z), axis=-1))
  logp = np.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  ent = -(np.exp(logp_all) * logp_all).sum(-1)
  valid = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
  pad = np.zeros((tokens.shape[0], 1), np.float32)
  return (np.concatenate([pad, np.where(valid, logp, 0)], 1),
          np.concatenate([pad, np.where(valid, ent, 0)], 1))


@pytest.mark.parametrize("arch,cache_block", [("llama", None), ("qwen2", None), ("qwen2", 8)])
def test_greedy_matches_transformers(arch, cache_block, request, monkeypatch):
  """cache_block: the KV cache read in key blocks of 8 slots up to the last written one."""
  hf, model = request.getfixturevalue(arch)
  prompt, mask = _prompts([5, 12, 1, 9])
  n = 20
  if cache_block:
    monkeypatch.setattr(models.attention, "_CACHE_KEY_BLOCK", cache_block)
    n = 21  # another program shape: the patched constant is read when tracing
  rollout = sampling.generate(model, prompt, mask, jax.random.key(0), n, temperature=0.0)
  with torch.no_grad():
    out = hf.generate(torch.from_numpy(prompt).long(), attention_mask=torch.from_numpy(mask).long(),
                      do_sample=False, max_new_tokens=n, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(rollout.tokens_BxN), out[:, prompt.shape[1]:].numpy())
  np.testing.assert_array_equal(np.asarray(rollout.mask_BxN), 1)
  np.testing.assert_array_equal(np.asarray(rollout.lengths_B), n)
  assert np.asarray(rollout.truncated_B).all()
  # Greedy log-probs are under the unscaled distribution, i.e. score at temperature 0.
  tokens, full_mask = _full_rows(prompt, mask, rollout)
  logp = np.asarray(sampling.score(model, tokens, full_mask, temperature=0.0))
  np.testing.assert_allclose(np.asarray(rollout.logp_BxN), logp[:, prompt.shape[1]:], atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_logp_matches_score(llama, temperature):
  _, model = llama
  prompt, mask = _prompts([3, 16, 8, 11, 1, 7], seed=1)
  rollout = sampling.generate(model, prompt, mask, jax.random.key(1), 24,
                              temperature=temperature)
  tokens, full_mask = _full_rows(prompt, mask, rollout)
  logp = np.asarray(sampling.score(model, tokens, full_mask, temperature=temperature))
  np.testing.assert_allclose(np.asarray(rollout.logp_BxN), logp[:, prompt.shape[1]:], atol=1e-4)
  assert (np.asarray(rollout.logp_BxN) < 0).all()


def test_eos_stops_row_and_masks_rest(llama):
  _, model = llama
  prompt, mask = _prompts([4, 10, 6, 2], seed=2)
  n, pad_id = 16, 0
  free = np.asarray(sampling.generate(model, prompt, mask, jax.random.key(0), n,
                                      temperature=0.0).tokens_BxN)
  eos = int(free[0, 3])  # a token row 0 produces at step 3 (or earlier)
  rollout = sampling.generate(model, prompt, mask, jax.random.key(0), n, temperature=0.0,
                              eos_id=eos, pad_id=pad_id)
  tokens, out_mask = np.asarray(rollout.tokens_BxN), np.asarray(rollout.mask_BxN)
  for row in range(len(prompt)):
    hits = np.flatnonzero(free[row] == eos)
    length = hits[0] + 1 if hits.size else n
    assert rollout.lengths_B[row] == length
    assert bool(rollout.truncated_B[row]) == (hits.size == 0)
    np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
    np.testing.assert_array_equal(tokens[row, length:], pad_id)
    np.testing.assert_array_equal(out_mask[row], np.arange(n) < length)
    np.testing.assert_array_equal(np.asarray(rollout.logp_BxN)[row, length:], 0.0)
  assert rollout.lengths_B[0] <= 4
  # Several EOS ids: a row ends at the first of any of them.
  other = int(free[1, 2])
  both = sampling.generate(model, prompt, mask, jax.random.key(0), n, temperature=0.0,
                           eos_id=[eos, other], pad_id=pad_id)
  for row in range(len(prompt)):
    hits = np.flatnonzero((free[row] == eos) | (free[row] == other))
    assert both.lengths_B[row] == (hits[0] + 1 if hits.size else n)


def test_rollout_is_a_pytree_with_documented_shapes(llama):
  _, model = llama
  prompt, mask = _prompts([3, 5], seed=3)
  rollout = sampling.generate(model, prompt, mask, jax.random.key(0), 7)
  assert isinstance(rollout, sampling.Rollout)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype.name), rollout)
  assert shapes == sampling.Rollout(((2, 7), "int32"), ((2, 7), "int32"), ((2,), "int32"),
                                    ((2, 7), "float32"), ((2,), "bool"))


def _first_token_logits(model, prompt, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return np.asarray(model(jnp.asarray(prompt), jnp.asarray(positions), jnp.asarray(mask)))[:, -1]


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.7)])
def test_top_k_top_p_restrict_support_and_match_distribution(llama, top_k, top_p):
  _, model = llama
  prompt, mask = _prompts([6], seed=4)
  rows = 2000
  z = _first_token_logits(model, prompt, mask)[0].astype(np.float64)
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(VOCAB, bool)
  keep[order[:top_k or VOCAB]] = True
  p = np.exp(z - z.max()) * keep
  p /= p.sum()
  sorted_p = p[order]
  mass_before = np.cumsum(sorted_p) - sorted_p
  keep[order[mass_before >= top_p]] = False
  p = np.where(keep, p, 0)
  p /= p.sum()
  rollout = sampling.generate(model, np.repeat(prompt, rows, 0), np.repeat(mask, rows, 0),
                              jax.random.key(7), 1, top_k=top_k, top_p=top_p)
  first = np.asarray(rollout.tokens_BxN)[:, 0]
  assert keep[first].all(), "sampled a token outside the top-k / top-p support"
  freq = np.bincount(first, minlength=VOCAB) / rows
  assert np.abs(freq - p).max() < 0.04  # > 3.5 sigma for any p at 2000 draws
  np.testing.assert_allclose(np.asarray(rollout.logp_BxN)[:, 0], np.log(p[first]), atol=1e-4)
  assert 1 < keep.sum() < VOCAB  # the restriction was active and non-trivial


def test_same_rng_same_samples(llama):
  _, model = llama
  prompt, mask = _prompts([5, 9, 2], seed=5)
  graphdef, state = nnx.split(model)
  a = sampling.generate(model, prompt, mask, jax.random.key(3), 12)
  b = sampling.generate((graphdef, state), prompt, mask, jax.random.key(3), 12)
  c = sampling.generate(model, prompt, mask, jax.random.key(4), 12)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)


def test_no_recompiles_within_a_bucket(llama):
  _, model = llama
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(6)
  sampling.generate((graphdef, state), *_prompts([17, 3, 9, 30]), jax.random.key(0), 8)
  programs = (slots._init_program, slots._head_program, slots._insert_program,
              slots._decode_program, slots._gather_program, slots._shift_program)
  cache_sizes = lambda: [p._cache_size() for p in programs]
  before = cache_sizes()
  for call in range(10):
    # Longest prompt varies in 17..32 (bucket 32); the array width varies too.
    lengths = rng.integers(1, 33, 4)
    lengths[0] = 17 + call
    width = int(lengths.max()) + call % 3
    rollout = sampling.generate((graphdef, state), *_prompts(lengths, width, seed=call),
                                jax.random.key(call), 8)
    jax.block_until_ready(rollout)
  assert cache_sizes() == before
  assert sampling.bucket_length(17) == sampling.bucket_length(32) == 32
  assert [sampling.bucket_length(p) for p in (1, 16, 33, 128, 129, 300)] == [16, 16, 64, 128,
                                                                             256, 384]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_chunked_score_equals_unchunked(llama, temperature):
  _, model = llama
  prompt, mask = _prompts([9, 30, 1, 22, 14], width=32, seed=8)
  rollout = sampling.generate(model, prompt, mask, jax.random.key(2), 8, eos_id=5)
  tokens, full_mask = _full_rows(prompt, mask, rollout)  # T = 40: 39 scored positions
  want_logp, want_ent = _reference_logp(model, tokens, full_mask, temperature)
  for chunk_size in (5, 39, None):
    logp, ent = sampling.score(model, tokens, full_mask, temperature=temperature,
                               chunk_size=chunk_size, return_entropy=True)
    np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-5, err_msg=f"{chunk_size}")
    np.testing.assert_allclose(np.asarray(ent), want_ent, atol=1e-5, err_msg=f"{chunk_size}")
  assert np.asarray(logp)[:, 0].tolist() == [0.0] * 5
  assert (np.asarray(logp)[full_mask == 0] == 0).all()


def test_chunked_token_logp_gradient_equals_unchunked(llama):
  _, model = llama
  tokens, mask = _prompts([20, 13, 7], seed=9)
  graphdef, state = nnx.split(model)

  def loss(state, chunk_size):
    logp, ent = sampling.token_logp(nnx.merge(graphdef, state), tokens, mask,
                                    chunk_size=chunk_size, return_entropy=True)
    return jnp.sum(logp) + 0.1 * jnp.sum(ent)

  g_chunked = jax.jit(jax.grad(loss), static_argnums=1)(state, 6)
  g_whole = jax.jit(jax.grad(loss), static_argnums=1)(state, 64)
  # Equal up to float32 summation order (gradients of size ~6 summed over every position).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               g_chunked, g_whole)


def test_score_of_large_vocab_stays_chunked():
  """A 152k vocabulary at B x T = 64 x 2048 compiles to a program whose temporaries are far
  below the 80 GB of float32 [B, T, V] logits (compiled only, not run)."""
  config = models.ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=32,
                              intermediate_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                              head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True)
  model = models.init_from_config(config, 0)
  graphdef, state = nnx.split(model)
  chunk = sampling.auto_chunk_size(64, 2047, config.vocab_size)
  tokens = jax.ShapeDtypeStruct((64, 2048), jnp.int32)
  compiled = sampling._score_program.lower(
      graphdef, state, tokens, tokens, None, np.float32(1.0), chunk_size=chunk,
      return_entropy=True).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  attention = 64 * 2048 * 2048 * 4  # the model's own [B, 1, T, T] float32 scores
  logits_chunk = 64 * chunk * config.vocab_size * 4
  assert logits_chunk <= 4 * sampling._LOGITS_CHUNK_ELEMENTS
  assert temp < 2 * attention + 4 * logits_chunk, temp
  assert temp < 80e9 / 8


def test_bad_inputs_raise(llama):
  _, model = llama
  prompt, mask = _prompts([4, 6])
  key = jax.random.key(0)
  gen = lambda **kw: sampling.generate(
      model, kw.pop("prompt", prompt), kw.pop("mask", mask), key, kw.pop("n", 4), **kw)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    gen(n=125)
  with pytest.raises(ValueError, match="prompt_mask: row"):
    gen(mask=np.concatenate([np.zeros((1, 6), np.int32), mask[1:]]))
  with pytest.raises(ValueError, match="left-padded"):
    gen(mask=mask[:, ::-1])
  with pytest.raises(ValueError, match="prompt_tokens"):
    gen(prompt=prompt[:0], mask=mask[:0])
  with pytest.raises(ValueError, match="eos_id"):
    gen(eos_id=VOCAB)
  with pytest.raises(ValueError, match="eos_id"):
    gen(eos_id=-1)
  with pytest.raises(ValueError, match="temperature"):
    gen(temperature=-0.1)
  for top_p in (0.0, 1.5, -0.2):
    with pytest.raises(ValueError, match="top_p"):
      gen(top_p=top_p)
  with pytest.raises(ValueError, match="top_k"):
    gen(top_k=-1)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen(n=0)
  with pytest.raises(ValueError, match="prompt_mask: shape"):
    gen(mask=mask[:, 1:])
  with pytest.raises(TypeError, match="model"):
    sampling.generate(object(), prompt, mask, key, 4)
  with pytest.raises(ValueError, match="tokens"):
    sampling.score(model, np.zeros((0, 4), np.int32), np.zeros((0, 4), np.int32))
  with pytest.raises(ValueError, match="temperature"):
    sampling.score(model, prompt, mask, temperature=-1.0)
  with pytest.raises(ValueError, match="chunk_size"):
    sampling.score(model, prompt, mask, chunk_size=0)


def test_argmax_equals_jnp_argmax_with_ties_and_nans():
  rs = np.random.RandomState(0)
  x = rs.randint(0, 4, (64, 33)).astype(np.float32)  # many ties: the first index must win
  x[3, 7] = np.nan
  x[5, :] = -np.inf
  x[6, [2, 30]] = np.nan
  got = np.asarray(backend.argmax(jnp.asarray(x)))  # mixpo/models/backend.py
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
  assert got[3] == 7 and got[6] == 2 and got[5] == 0


# ----------------------------------------------------------------------------------------------
# bfloat16: rollout / scoring in bf16 from float32 master weights; log-probs in float32.

# |bf16 − f32| per-token log-prob, nats, on the wide-init tiny model (logits spread over ~±10, so
# bf16's 2⁻⁸ relative rounding of activations is ~0.04 nats per logit): mean and max
# (measured 0.023 and 0.15).
_BF16_LOGP_MEAN_TOL, _BF16_LOGP_MAX_TOL = 0.05, 0.3


def test_bf16_view_logp_within_tolerance_of_f32(qwen2):
  _, model = qwen2
  tokens, mask = _prompts([40, 33, 40, 20], seed=3)
  view = sampling.with_dtype(model, jnp.bfloat16, exact=True)
  graphdef, state = view
  params = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert params and all(x.dtype == jnp.bfloat16 for x in params)
  assert nnx.merge(graphdef, state).config.dtype == jnp.bfloat16
  assert sampling.with_dtype(view, jnp.bfloat16, exact=True)[1] is state  # already bf16: no copy
  lp32 = np.asarray(sampling.score(model, tokens, mask))
  lp16 = sampling.score(view, tokens, mask)
  assert lp16.dtype == jnp.float32
  real = np.concatenate([np.zeros((4, 1), bool), (mask[:, 1:] * mask[:, :-1]) == 1], 1)
  err = np.abs(np.asarray(lp16) - lp32)[real]
  assert err.mean() < _BF16_LOGP_MEAN_TOL and err.max() < _BF16_LOGP_MAX_TOL, err
  assert err.max() > 0 and np.abs(lp32).max() > 1.0  # really bf16, really scored
  out = sampling.generate(view, tokens[:, -8:], mask[:, -8:], jax.random.key(0), 6, eos_id=None)
  assert out.logp_BxN.dtype == jnp.float32 and np.all(np.asarray(out.logp_BxN) < 0)


def _floats(state):
  return [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_bf16_rollout_on_cpu_computes_in_f32_on_bf16_rounded_weights(qwen2, monkeypatch):
  """On CPU a bfloat16 rollout copy holds the float32 weights rounded to bf16 (as float32) and
  computes in float32: its log-probs differ from the float32 model's by the weight rounding
  alone, less than bf16 compute's. On another platform the copy stays bf16."""
  _, model = qwen2
  tokens, mask = _prompts([40, 33, 40, 20], seed=3)
  graphdef, state = sampling.with_dtype(model, jnp.bfloat16)
  assert nnx.merge(graphdef, state).config.dtype == jnp.float32
  f32 = _floats(nnx.split(model)[1])
  got = _floats(state)
  assert got and all(x.dtype == jnp.float32 for x in got)
  for x, w in zip(got, f32):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(w.astype(jnp.bfloat16), np.float32))
  assert any(np.any(np.asarray(x) != np.asarray(w)) for x, w in zip(got, f32))  # really rounded
  again = sampling.with_dtype((graphdef, state), jnp.bfloat16)[1]  # idempotent
  assert all(np.array_equal(a, b) for a, b in zip(_floats(again), got))
  real = np.concatenate([np.zeros((4, 1), bool), (mask[:, 1:] * mask[:, :-1]) == 1], 1)
  lp32 = np.asarray(sampling.score(model, tokens, mask))
  err = lambda view: np.abs(np.asarray(sampling.score(view, tokens, mask)) - lp32)[real]
  rounded, bf16 = err((graphdef, state)), err(sampling.with_dtype(model, jnp.bfloat16, True))
  assert 0 < rounded.max() < _BF16_LOGP_MAX_TOL and rounded.mean() < bf16.mean(), (rounded, bf16)
  monkeypatch.setattr(backend, "platform", lambda: "gpu")
  graphdef, state = sampling.with_dtype(model, jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in _floats(state))
  assert nnx.merge(graphdef, state).config.dtype == jnp.bfloat16


def test_bf16_training_ratios_come_from_f32_logp(tmp_path):
  """Training (bf16 compute, f32 master weights) against the bf16 rollout view of the same
  weights: the on-policy ratio is 1 to within f32 rounding and J_on (A = 1) is 1, because both
  log-probs are float32; bf16 log-probs (spacing 2⁻⁵ at |logp| ≈ 4) could not give that."""
  from mixpo import objectives
  config = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                initializer_range=0.2)
  policy = models.init_from_config(config, 0, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens, mask = _prompts([30, 24, 30], seed=4)
  old_logp = sampling.score(sampling.with_dtype(policy, jnp.bfloat16, exact=True), tokens, mask)
  kind_B, adv_B = jnp.zeros((3,), jnp.int32), jnp.ones((3,), jnp.float32)
  resp_mask = jnp.asarray(np.concatenate([np.zeros((3, 1), np.int32), mask[:, 1:] * mask[:, :-1]],
                                         1))

  def loss(params):
    logp = sampling.token_logp(nnx.merge(graphdef, params, rest), jnp.asarray(tokens),
                               jnp.asarray(mask))
    loss, metrics = objectives.objective(logp, old_logp, old_logp, adv_B, kind_B, resp_mask,
                                         algorithms.get("grpo").objective_config())
    return loss, (logp, metrics)

  (neg_j, (logp, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert logp.dtype == jnp.float32 and old_logp.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # f32 master gradients
  real = np.asarray(resp_mask) == 1
  ratio = np.exp(np.asarray(logp) - np.asarray(old_logp))[real]
  assert np.abs(ratio - 1).max() < 1e-4, np.abs(ratio - 1).max()
  assert abs(float(neg_j) + 1.0) < 1e-4 and abs(float(metrics["ratio_on"]) - 1.0) < 1e-4
  # The same log-probs rounded to bf16 are coarser than the tolerance above.
  spacing = np.abs(np.asarray(old_logp, np.float32)
                   - np.asarray(old_logp.astype(jnp.bfloat16), np.float32))[real]
  assert spacing.max() > 1e-3


def test_decode_loop_reads_each_layer_cache_in_place(llama):
  """No op of the compiled generate program slices or copies a whole layer's K/V ([B, K, S, H])
  out of a bigger array: each layer's cache is its own loop-carried buffer, updated in place."""
  _, model = llama
  graphdef, state = sampling.split_model(model)
  b, p, n = 4, 16, 24
  c = model.config
  lowered = sampling._generate_program.lower(
      graphdef, state, jnp.ones((b, p), jnp.int32), jnp.ones((b, p), jnp.int32),
      jax.random.key(0), np.float32(1), np.float32(1), np.full((1,), -1, np.int32), np.int32(0),
      max_new_tokens=n, greedy=False, top_k=0, use_top_p=False)
  hlo = lowered.compile().as_text()
  layer = rf"f32\[(1,)?{b},{c.num_kv_heads},{p + n - 1},{c.head_dim}\]"
  copies = [line for line in hlo.splitlines()
            if re.search(rf"= {layer}\S* (slice|dynamic-slice|copy)\(", line)]
  assert not copies, copies[:3]
  stacked = rf"f32\[{c.num_layers},{b},{c.num_kv_heads},{p + n - 1},{c.head_dim}\]"
  assert not re.search(stacked, hlo)


def test_slot_decode_reads_each_layer_cache_in_place_past_one_key_block(llama):
  """The slots' decode program, at a cache width past one key block of the cache attention
  (P + N − 1 = 339 slots, W rounded up to 512): no op slices, pads or copies a layer's K/V."""
  _, model = llama
  graphdef, state = sampling.split_model(model)
  c = model.config
  b, cfg = 4, slots.SlotConfig(slots=4, prompt_width=16, max_new_tokens=324, refills=False)
  assert cfg.width == 512 and models.attention._CACHE_KEY_BLOCK == 256
  opts = slots.SampleOptions()
  state_slots = slots._init_program(graphdef, state, np.int32(0), np.int32(16), batch=b,
                                    width=cfg.width, max_new_tokens=324)
  hlo = slots._decode_program.lower(
      graphdef, state, None, state_slots, jax.random.key(0), np.int32(8), np.int32(0),
      np.int32(0), *opts.dynamic_args(), **opts.static_args()).compile().as_text()
  layer = rf"f32\[(1,)?{b},{c.num_kv_heads},{cfg.width},{c.head_dim}\]"
  copies = [line for line in hlo.splitlines()
            if re.search(rf"= {layer}\S* (slice|dynamic-slice|copy)\(", line)
            or re.search(rf"= f32\[{b},{c.num_kv_heads},\d+,{c.head_dim}\]\S* pad\(", line)]
  assert not copies, copies[:3]
  # The same program at a ragged width (339 slots) pads and copies the cache at every step.
  ragged = slots._init_program(graphdef, state, np.int32(0), np.int32(16), batch=b, width=339,
                               max_new_tokens=324)
  hlo = slots._decode_program.lower(
      graphdef, state, None, ragged, jax.random.key(0), np.int32(8), np.int32(0),
      np.int32(0), *opts.dynamic_args(), **opts.static_args()).compile().as_text()
  assert re.search(rf"= f32\[{b},{c.num_kv_heads},339,{c.head_dim}\]\S* copy\(", hlo)


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_row(llama):
  """Ids >= vocab_size (or < 0) never reach a compiled generate / score (inside them a gather
  would read another row or NaN): a ValueError names the row, also for padding positions."""
  _, model = llama
  prompt, mask = _prompts([4, 6, 3])
  bad = prompt.copy()
  bad[1, -1] = VOCAB  # a real token of row 1
  with pytest.raises(ValueError, match=r"prompt_tokens: row 1 holds token id 96 outside"):
    sampling.generate(model, bad, mask, jax.random.key(0), 4)
  pad = prompt.copy()
  pad[2, 0] = -3  # row 2's left padding
  with pytest.raises(ValueError, match=r"prompt_tokens: row 2 holds token id -3"):
    sampling.generate(model, pad, mask, jax.random.key(0), 4)
  with pytest.raises(ValueError, match=r"tokens: row 1 holds token id 96"):
    sampling.score(model, bad, mask)
  with pytest.raises(ValueError, match=r"prompt_tokens: row 1 holds token id 96"):
    sampling.static_generate(model, bad, mask, jax.random.key(0), 4)


def test_decode_steps_read_a_tied_head_laid_out_d_by_v(llama):
  """On XLA:CPU the decode loop reads the tied LM head from one [D, V] copy made before the
  loop (a few-row GEMM against the [V, D] embedding re-packs it at every step), and the logits
  through that copy equal the stored head's."""
  _, model = llama
  c = model.config
  assert model.lm_head is None  # the fixture is tied
  h_BxD = jax.random.normal(jax.random.key(1), (3, c.hidden_size))
  np.testing.assert_allclose(model.logits_from_hidden(h_BxD, model.decode_head()),
                             model.logits_from_hidden(h_BxD), rtol=1e-5, atol=1e-5)
  graphdef, state = sampling.split_model(model)
  b, p, n = 4, 16, 24
  hlo = sampling._generate_program.lower(
      graphdef, state, jnp.ones((b, p), jnp.int32), jnp.ones((b, p), jnp.int32),
      jax.random.key(0), np.float32(1), np.float32(1), np.full((1,), -1, np.int32), np.int32(0),
      max_new_tokens=n, greedy=False, top_k=0, use_top_p=False).compile().as_text()
  head_dots = re.findall(
      rf"= f32\[{b},{c.vocab_size}\]\S* dot\([^\n]*rhs_contracting_dims=\{{(\d)\}}", hlo)
  assert head_dots and "0" in head_dots, head_dots  # the loop's head dot contracts [D, V]'s dim 0
  # Ops writing a [D, V] array (a fusion's ROOT is part of its fusion op, not another copy).
  copies = [line for line in hlo.splitlines() if "ROOT" not in line and re.search(
      rf"= f32\[{c.hidden_size},{c.vocab_size}\]\{{1,0\}} (copy|fusion)\(", line)]
  assert len(copies) == 1, copies  # one transposed copy per call, none per step
