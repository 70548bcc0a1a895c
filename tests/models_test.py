"""mixpo.models: parity with transformers (PyTorch CPU), checkpoint I/O, KV cache, options, errors.

Tiny random checkpoints are built with transformers into a session tmp dir (no downloads).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file as np_save_file
from safetensors import safe_open

from mixpo import models
from mixpo.models import backend

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(**TINY, rope_scaling=dict(LLAMA3_ROPE)),
    "qwen2_tied": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen2_untied": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True),
}


def _randomize(model):
  """transformers inits biases and norms to 0 / 1; perturb them so they are really tested."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
  """{family: (dir, torch model)} of tiny random HF checkpoints."""
  out = {}
  for i, (name, make_config) in enumerate(FAMILIES.items()):
    torch.manual_seed(i)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(make_config())).eval()
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (path, model)
  return out


def _batch(seed=0, b=3, t=10, vocab=128):
  """Row 0 unpadded, rows 1.. left-padded; positions = cumsum(mask) - 1 clamped at 0."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(0, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  for r in range(1, b):
    mask[r, :min(2 * r + 1, t - 1)] = 0
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return tokens, positions, mask


def _torch_logits(model, tokens, positions, mask):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


def _max_err(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask == 1].max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(checkpoints, family):
  path, ref_model = checkpoints[family]
  model = models.from_pretrained(path)
  tokens, positions, mask = _batch()
  ref = _torch_logits(ref_model, tokens, positions, mask)
  logits = model(tokens, positions, mask)
  assert logits.dtype == jnp.float32 and logits.shape == (3, 10, 128)
  assert _max_err(logits, ref, mask) < 1e-4
  # Defaults (no padding): positions 0..T-1, all keys real.
  logits = model(tokens[:1])
  assert _max_err(logits, ref[:1], mask[:1]) < 1e-4


def test_config_from_checkpoint(checkpoints):
  c = models.from_pretrained(checkpoints["qwen3"][0]).config
  assert (c.model_type, c.head_dim, c.qk_norm, c.qkv_bias, c.tie_word_embeddings) == (
      "qwen3", 32, True, False, True)
  c = models.from_pretrained(checkpoints["llama3"][0]).config
  assert (c.rope_type, c.rope_factor, c.num_kv_heads, c.head_dim) == ("llama3", 8.0, 2, 16)
  c = models.from_pretrained(checkpoints["qwen2_untied"][0]).config
  assert (c.qkv_bias, c.o_bias, c.tie_word_embeddings) == (True, False, False)


def test_param_paths_are_regular(checkpoints):
  model = models.from_pretrained(checkpoints["qwen2_untied"][0])
  paths = {models.hf_io.param_path(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert {"embed/embedding", "layers/1/attn/q_proj/kernel", "layers/0/attn/q_proj/bias",
          "layers/0/mlp/down_proj/kernel", "final_norm/scale", "lm_head/kernel"} <= paths
  assert "layers/0/attn/o_proj/bias" not in paths


@pytest.mark.parametrize("family", ["llama3", "qwen2_tied"])
def test_save_pretrained_round_trip(checkpoints, family, tmp_path):
  path, ref_model = checkpoints[family]
  model = models.from_pretrained(path)
  models.save_pretrained(model, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens, positions, mask = _batch(seed=1)
  ref = _torch_logits(ref_model, tokens, positions, mask)
  assert _max_err(_torch_logits(reloaded, tokens, positions, mask), ref, mask) < 1e-5


def test_sharded_checkpoints_in_and_out(checkpoints, tmp_path):
  _, ref_model = checkpoints["qwen2_untied"]
  hf_dir, ours_dir = str(tmp_path / "hf"), str(tmp_path / "ours")
  ref_model.save_pretrained(hf_dir, max_shard_size="60KB")
  assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
  model = models.from_pretrained(hf_dir)
  tokens, positions, mask = _batch(seed=2)
  ref = _torch_logits(ref_model, tokens, positions, mask)
  assert _max_err(model(tokens, positions, mask), ref, mask) < 1e-4
  models.save_pretrained(model, ours_dir, max_shard_bytes=60_000)
  assert len([f for f in os.listdir(ours_dir) if f.endswith(".safetensors")]) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours_dir).eval()
  assert _max_err(_torch_logits(reloaded, tokens, positions, mask), ref, mask) < 1e-5


@pytest.mark.parametrize("family,impl", [("llama3", "xla"), ("qwen3", "xla"),
                                         ("llama3", "dot_product_attention"),
                                         ("llama3", "flash"), ("qwen3", "pallas")])
def test_kv_cache_decode_matches_full_forward(checkpoints, monkeypatch, family, impl):
  """impl "flash": the blockwise kernel (blocks of 4) for the full forward and the prefill."""
  if impl == "flash":
    monkeypatch.setattr(models.attention, "_DENSE_MAX_ROW_SCORE_BYTES", 0)
    monkeypatch.setattr(models.attention, "_FLASH_BLOCK", 4)
    impl = "xla"
  model = models.from_pretrained(checkpoints[family][0], attention_impl=impl)
  tokens, positions, mask = _batch(seed=3, t=12)
  prompt_len, max_len = 6, 16
  h_full = model.hidden_states(tokens, positions, mask)
  graphdef, state = nnx.split(model)

  @jax.jit
  def decode(state, tok, pos, msk, cache):
    return nnx.merge(graphdef, state).decode(tok, pos, msk, cache)

  cache = model.init_cache(3, max_len)
  sl = slice(0, prompt_len)
  h, cache = decode(state, tokens[:, sl], positions[:, sl], mask[:, sl], cache)
  hs = [h]
  for t in range(prompt_len, tokens.shape[1]):
    sl = slice(t, t + 1)
    h, cache = decode(state, tokens[:, sl], positions[:, sl], mask[:, sl], cache)
    hs.append(h)
  assert int(cache.index) == tokens.shape[1]
  np.testing.assert_array_equal(np.asarray(cache.valid_BxS[:, :12]), mask)
  h_dec = jnp.concatenate(hs, axis=1)
  assert _max_err(h_dec, h_full, mask) < 1e-4
  logits = model.logits_from_hidden(h_dec[:, -1])
  assert logits.shape == (3, 128) and logits.dtype == jnp.float32


def test_decode_inside_while_loop(checkpoints):
  """Greedy generation in lax.while_loop equals step-by-step eager decode."""
  model = models.from_pretrained(checkpoints["qwen2_tied"][0])
  tokens, positions, mask = _batch(seed=4, t=6)
  graphdef, state = nnx.split(model)
  steps = 4

  @jax.jit
  def generate(state, tokens, positions, mask):
    model = nnx.merge(graphdef, state)
    h, cache = model.decode(tokens, positions, mask, model.init_cache(3, 6 + steps))
    nxt = jnp.argmax(model.logits_from_hidden(h[:, -1]), -1).astype(jnp.int32)
    out = jnp.zeros((3, steps), jnp.int32).at[:, 0].set(nxt)

    def body(carry):
      i, out, cache, pos = carry
      last_Bx1 = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
      h, cache = model.decode(last_Bx1, pos[:, None], jnp.ones((3, 1), jnp.int32), cache)
      nxt = jnp.argmax(model.logits_from_hidden(h[:, -1]), -1).astype(jnp.int32)
      return i + 1, out.at[:, i].set(nxt), cache, pos + 1

    carry = (jnp.int32(1), out, cache, positions[:, -1] + 1)
    return jax.lax.while_loop(lambda c: c[0] < steps, body, carry)[1]

  generated = np.asarray(generate(state, tokens, positions, mask))
  seq, pos, msk = tokens, positions, mask
  for i in range(steps):
    nxt = np.argmax(np.asarray(model(seq, pos, msk))[:, -1], -1).astype(np.int32)
    np.testing.assert_array_equal(nxt, generated[:, i])
    seq = np.concatenate([seq, nxt[:, None]], 1)
    pos = np.concatenate([pos, pos[:, -1:] + 1], 1)
    msk = np.concatenate([msk, np.ones((3, 1), np.int32)], 1)


def _loss_grads(model, tokens, positions, mask, real_context_only=False):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  weights = mask[:, 1:] * (mask[:, :-1] if real_context_only else 1)  # of predicting token t+1

  @jax.jit
  def loss_and_grad(params):
    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(tokens, positions, mask)
      logp = jax.nn.log_softmax(logits[:, :-1])
      nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
      return jnp.sum(nll * weights) / jnp.sum(weights)
    return jax.value_and_grad(loss)(params)

  return loss_and_grad(params)


def test_remat_gives_equal_gradients(checkpoints):
  path = checkpoints["qwen3"][0]
  tokens, positions, mask = _batch(seed=5)
  loss0, g0 = _loss_grads(models.from_pretrained(path), tokens, positions, mask)
  loss1, g1 = _loss_grads(models.from_pretrained(path, remat=True), tokens, positions, mask)
  assert abs(float(loss0) - float(loss1)) < 1e-6
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family,t,flash_block", [
    ("llama3", 10, None), ("qwen3", 10, None), ("qwen2_untied", 80, None),
    ("qwen2_untied", 1024, 256), ("llama3", 300, 128)])
def test_gradients_match_transformers(checkpoints, monkeypatch, family, t, flash_block):
  """The hand-written attention backward (and the matmul VJP) against torch autograd; T = 80
  takes the causal query-chunked path; with flash_block, the blockwise (flash) kernel with
  query / key blocks of that length in the forward and half that in the backward (T = 300: a
  partial last block)."""
  if flash_block:
    monkeypatch.setattr(models.attention, "_DENSE_MAX_ROW_SCORE_BYTES", 0)
    monkeypatch.setattr(models.attention, "_FLASH_BLOCK", flash_block)
    monkeypatch.setattr(models.attention, "_FLASH_BACKWARD_BLOCK", flash_block // 2)
  path, torch_model = checkpoints[family]
  tokens, positions, mask = _batch(seed=8, t=t)
  model = models.from_pretrained(path)
  loss, grads = _loss_grads(model, tokens, positions, mask, real_context_only=True)
  torch_model.zero_grad()
  logits = torch_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions, dtype=torch.long)).logits.float()
  logp = torch.log_softmax(logits[:, :-1], -1)
  nll = -torch.gather(logp, -1, torch.tensor(tokens[:, 1:, None], dtype=torch.long))[..., 0]
  m = torch.tensor(mask[:, :-1] * mask[:, 1:], dtype=torch.float32)  # padding predicts nothing
  torch_loss = (nll * m).sum() / m.sum()
  torch_loss.backward()
  assert abs(float(loss) - float(torch_loss.detach())) < 1e-5
  flat = {models.hf_io.param_path(k): v for k, v in nnx.to_flat_state(grads)}
  torch_params = dict(torch_model.named_parameters())
  checked = 0
  for hf_name, (path, transposed) in models.hf_io.hf_names(model).items():
    expected = torch_params[hf_name].grad.numpy()
    got = np.asarray(flat[path][...])
    got = got.T if transposed else got
    scale = float(np.abs(expected).max())
    assert scale > 0, hf_name
    rel_err = float(np.abs(got - expected).max()) / scale
    assert rel_err < 2e-4, (hf_name, rel_err)
    checked += 1
  assert checked == len(flat)


def _reference_attention(q, k, v, allowed):
  """The textbook formula, left to autodiff."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  scores = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kv, n // kv, h), k) * h ** -0.5
  scores = jnp.where(allowed[:, None, None], scores, models.attention.MASK_VALUE)
  out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, -1), v)
  return out.reshape(b, t, n * h)


@pytest.mark.parametrize("block_bytes", [1, 1 << 30])  # one row per block / one block
@pytest.mark.parametrize("t", [12, 64])  # 64: causal query chunks
def test_attention_backward_equals_autodiff(monkeypatch, block_bytes, t):
  monkeypatch.setattr(backend, "_BLOCK_SCORE_BYTES", block_bytes)
  rs = np.random.RandomState(0)
  b, n, kv, h = 4, 6, 2, 8
  q, k, v = (jnp.asarray(rs.randn(b, t, heads, h), jnp.float32) for heads in (n, kv, kv))
  mask = np.ones((b, t), bool)
  mask[1, :3] = False
  mask[2, :t - 1] = False  # only the last key is real: queries 0..t-2 see nothing at all
  allowed = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & mask[:, None, :])
  # A query with no allowed key has an unspecified output: weight it 0 (as every loss does).
  sees_something = np.asarray(allowed).any(-1)[:, :, None]
  assert not sees_something.all()
  w = jnp.asarray(rs.randn(b, t, n * h) * sees_something, jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  mixpo_attend = lambda q, k, v: models.attention.attend(q, k, v, mask, "xla")
  reference = lambda q, k, v: _reference_attention(q, k, v, allowed)
  out, ref = mixpo_attend(q, k, v), reference(q, k, v)
  np.testing.assert_allclose(np.asarray(out) * sees_something, np.asarray(ref) * sees_something,
                             atol=1e-5)
  grads = jax.grad(lambda *a: loss(mixpo_attend, *a), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads):
    assert float(jnp.abs(r).max()) > 0
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_dot_product_attention_impl_matches_xla(checkpoints):
  path = checkpoints["llama3"][0]
  tokens, positions, mask = _batch(seed=6)
  ref = models.from_pretrained(path)(tokens, positions, mask)
  out = models.from_pretrained(path, attention_impl="dot_product_attention")(
      tokens, positions, mask)
  assert _max_err(out, ref, mask) < 1e-5


def test_bf16_runs_and_stays_close(checkpoints):
  path, _ = checkpoints["qwen2_untied"]
  tokens, positions, mask = _batch(seed=7)
  ref = np.asarray(models.from_pretrained(path)(tokens, positions, mask))
  model = models.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert model.embed.embedding[...].dtype == jnp.bfloat16
  logits = model(tokens, positions, mask)
  assert logits.dtype == jnp.float32
  assert _max_err(logits, ref, mask) < 0.05 * np.abs(ref).max() + 1e-2
  h, cache = model.decode(tokens, positions, mask, model.init_cache(3, 12))
  assert cache.k.dtype == jnp.bfloat16 and h.dtype == jnp.bfloat16


def test_init_from_config_accepts_dict_and_pretrained_config(checkpoints):
  with open(os.path.join(checkpoints["qwen3"][0], "config.json")) as f:
    config_dict = json.load(f)
  a = models.init_from_config(config_dict, 0)
  b = models.init_from_config(FAMILIES["qwen3"](), 0, remat=True)
  assert a.config == models.ModelConfig(**{**b.config.__dict__, "remat": False})
  tokens, positions, mask = _batch(seed=8)
  np.testing.assert_allclose(a(tokens, positions, mask), b(tokens, positions, mask), atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_tokens_out_of_vocab_raise(checkpoints):
  model = models.from_pretrained(checkpoints["qwen2_tied"][0])
  tokens, positions, mask = _batch(seed=9)
  for bad in (128, -1):
    with pytest.raises(ValueError, match=f"token id {bad} outside .*vocab_size=128"):
      model(np.where(np.arange(10) == 3, bad, tokens).astype(np.int32), positions, mask)
  with pytest.raises(ValueError, match="token id 128"):
    model.decode(np.full((3, 1), 128, np.int32), positions[:, :1], mask[:, :1],
                 model.init_cache(3, 4))


def test_missing_config_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"no config.json in '{tmp_path}'"):
    models.from_pretrained(str(tmp_path))


def _copy_with_tensors(src, dst, edit_config=None, edit_tensors=None):
  os.makedirs(dst)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  if edit_config:
    edit_config(config)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  with safe_open(os.path.join(src, "model.safetensors"), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if edit_tensors:
    edit_tensors(tensors)
  np_save_file(tensors, os.path.join(dst, "model.safetensors"))
  return dst


def test_missing_tensor_is_named(checkpoints, tmp_path):
  name = "model.layers.1.self_attn.k_proj.weight"
  path = _copy_with_tensors(checkpoints["llama3"][0], str(tmp_path / "c"),
                            edit_tensors=lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f"lacks tensors.*{name}.*model.safetensors"):
    models.from_pretrained(path)


def test_shape_mismatch_is_named(checkpoints, tmp_path):
  path = _copy_with_tensors(checkpoints["llama3"][0], str(tmp_path / "c"),
                            edit_config=lambda c: c.update(intermediate_size=96))
  with pytest.raises(ValueError, match=r"mlp\.\w+_proj.weight' in .*model.safetensors' has "
                                       r"shape \((128, 64|64, 128)\), config.json implies"):
    models.from_pretrained(path)


def test_dtype_mismatch_is_named(checkpoints, tmp_path):
  name = "model.norm.weight"
  path = _copy_with_tensors(checkpoints["llama3"][0], str(tmp_path / "c"),
                            edit_tensors=lambda t: t.update({name: t[name].astype(np.int32)}))
  with pytest.raises(ValueError, match=f"{name}' in .*model.safetensors' has dtype I32"):
    models.from_pretrained(path)


def test_unexpected_tensor_is_named(checkpoints, tmp_path):
  path = _copy_with_tensors(checkpoints["llama3"][0], str(tmp_path / "c"),
                            edit_tensors=lambda t: t.update(extra=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match="unexpected tensor 'extra'"):
    models.from_pretrained(path)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(model_type="mistral"), "model_type='mistral'"),
    (lambda c: c["rope_parameters"].update(rope_type="yarn"), "rope_parameters.rope_type='yarn'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_config_fields_are_named(checkpoints, tmp_path, edit, match):
  path = _copy_with_tensors(checkpoints["llama3"][0], str(tmp_path / "c"), edit_config=edit)
  with pytest.raises(ValueError, match=match):
    models.from_pretrained(path)


def test_old_style_rope_scaling_config():
  config = {**TINY, "model_type": "llama", "rope_theta": 500000.0,
            "rope_scaling": {**LLAMA3_ROPE, "rope_type": "llama3"}}
  c = models.from_hf_config(config)
  assert (c.rope_type, c.rope_theta, c.rope_original_max_position_embeddings) == (
      "llama3", 500000.0, 16)
  with pytest.raises(ValueError, match="rope_scaling.rope_type='dynamic'"):
    models.from_hf_config({**config, "rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_decode_under_nnx_jit_and_load_tokenizer(tmp_path):
  import tokenizers
  model = models.init_from_config(dict(
      model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16), 0)
  step = nnx.jit(lambda model, *args: model.decode(*args))
  ones = jnp.ones((2, 3), jnp.int32)
  h, cache = step(model, ones, jnp.cumsum(ones, 1) - 1, ones, model.init_cache(2, 8))
  assert h.shape == (2, 3, 32) and int(cache.index) == 3
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2},
                                                         unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(
      str(tmp_path))
  assert models.load_tokenizer(str(tmp_path))("a b c").input_ids == [1, 2, 0]
  with pytest.raises(FileNotFoundError, match="tokenizer directory"):
    models.load_tokenizer(str(tmp_path / "nope"))
