"""models/lora.py, models/peft_io.py and LoRA through train / checkpoint / sharding / loop.

Tiny random checkpoints are built with transformers into tmp dirs (no downloads).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixpo import algorithms, models, objectives, sampling, train
from mixpo.batch import make_batch
from mixpo.models import lora
from mixpo.objectives import OFF, ON, ZERO
from rl_test import set_fields, smoke_config  # the smoke config on the built-in models

TINY = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 32,
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
OPT = optax.adam(1e-2)
CFG = train.StepConfig(objective=algorithms.get("mix2").objective_config())


def _tokens(seed=0, b=3, t=9, vocab=TINY["vocab_size"]):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, t), np.int32)
  mask[1, :3] = 0  # a left-padded row
  return rng.integers(0, vocab, (b, t)).astype(np.int32), mask


def _logp(model_or_pair, seed=0, vocab=TINY["vocab_size"]):
  tokens, mask = _tokens(seed, vocab=vocab)
  return np.asarray(sampling.score(model_or_pair, tokens, mask))


def _randomize_b(model, seed=1, scale=0.2):
  """Non-zero B (a trained adapter), so that adapters really change the function."""
  for k, (path, a) in enumerate(sorted(lora.adapters(model).items())):
    a.b[...] = scale * jax.random.normal(jax.random.key(seed * 1000 + k), a.b.shape)
  return model


def _rl_batch(seed=0, b=8, p=4, n=5):
  rng = np.random.default_rng(seed)
  pmask = np.ones((b, p), np.int32)
  pmask[0, :2] = 0
  rmask = (np.arange(n)[None] < rng.integers(2, n + 1, b)[:, None]).astype(np.float32)
  logp = -rng.uniform(1.0, 4.0, (b, n)).astype(np.float32)
  return make_batch(rng.integers(4, 32, (b, p)), pmask, rng.integers(4, 32, (b, n)), rmask,
                    old_logp_BxN=logp, guide_logp_BxN=logp - 0.5,
                    adv_B=rng.standard_normal(b).astype(np.float32),
                    kind_B=np.array([ON, ON, ZERO, ZERO, OFF, OFF, ON, ZERO], np.int32),
                    group_B=np.arange(b) // 2)


def _lora_model(seed=0, rank=4, config=TINY, **kw):
  model = models.init_from_config(config, rng=seed, **kw)
  return lora.apply(model, lora.LoraConfig(rank=rank, alpha=2.0 * rank), rng=seed + 100)


def _flat(state) -> dict:
  return {"/".join(map(str, p)): np.array(v.get_value(), copy=True)
          for p, v in nnx.to_flat_state(state)}


# -- the adapted model -------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_fresh_adapters_give_logits_identical_to_the_base(param_dtype):
  model = models.init_from_config(TINY, rng=0, param_dtype=param_dtype)
  base_logp = _logp(model)
  lora.apply(model, lora.LoraConfig(rank=4))
  assert len(lora.adapters(model)) == 2 * 7  # q k v o gate up down in both layers
  a = model.layers[0].attn.q_proj.lora
  assert a.a.get_value().dtype == jnp.float32 and np.abs(np.asarray(a.a.get_value())).max() > 0
  assert not np.asarray(a.b.get_value()).any()  # B = 0: the update starts at exactly zero.
  np.testing.assert_array_equal(_logp(model), base_logp)
  _randomize_b(model)
  assert np.abs(_logp(model) - base_logp).max() > 1e-3  # the hook is really on the forward.


def test_fused_projections_apply_each_adapter_to_its_own_slice():
  """q/k/v (and gate/up) run as one concatenated matmul; each adapter must land on its slice.
  Reference: the same projections called one by one through Linear.__call__."""
  model = _randomize_b(_lora_model())
  attn, mlp = model.layers[0].attn, model.layers[0].mlp
  x = jax.random.normal(jax.random.key(3), (2, 5, TINY["hidden_size"]))
  from mixpo.models.layers import fused_linear
  for projs in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
    for fused, p in zip(fused_linear(projs, x), projs):
      np.testing.assert_allclose(np.asarray(fused), np.asarray(p(x)), atol=1e-6, rtol=0)
      assert np.abs(np.asarray(p(x)) - np.asarray(x @ p.kernel[...])).max() > 1e-3


def test_targets_select_modules_and_bad_configs_are_named():
  model = models.init_from_config(TINY, rng=0)
  lora.apply(model, lora.LoraConfig(rank=2, targets=r"layers/1/attn/[qv]_proj/kernel$"))
  assert sorted(lora.adapters(model)) == ["layers/1/attn/q_proj", "layers/1/attn/v_proj"]
  with pytest.raises(ValueError, match="already has a LoRA adapter"):
    lora.apply(model, lora.LoraConfig(rank=2, targets=r"layers/1/attn/q_proj"))
  with pytest.raises(ValueError, match="matches no Linear"):
    lora.apply(models.init_from_config(TINY, rng=0), lora.LoraConfig(targets=r"qkv_proj"))
  with pytest.raises(ValueError, match="lm_head"):
    lora.apply(models.init_from_config(TINY, rng=0), lora.LoraConfig(targets=r"kernel$"))
  with pytest.raises(ValueError, match="config.lora.dropout"):
    lora.LoraConfig(dropout=0.1)
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=0)


# -- training: only adapters ---------------------------------------------------------------------


def test_gradients_optimizer_and_state_hold_only_adapters_and_the_base_stays_frozen():
  policy = train.Policy(_lora_model(param_dtype=jnp.bfloat16))
  base_before = _flat(policy.base)
  assert base_before and all(not "/lora/" in p for p in base_before)
  assert all(v.dtype == jnp.bfloat16 for v in base_before.values())  # storable in bf16
  state = train.init_state(policy, OPT, 0)
  names = set(_flat(state.params))
  assert names and all(p.endswith(("/lora/a", "/lora/b")) for p in names)
  n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert n_opt == 2 * n_adapter + 1  # Adam's mu and nu over the adapters, plus its count.
  # The gradient of the objective is a tree over the adapters only, non-zero on B (A's is 0
  # while B = 0: d(x·A·B)/dA = xᵀ·dy·Bᵀ).
  batch = _rl_batch()
  def loss(params):
    logp = sampling.token_logp(policy.merge(params), batch.tokens_BxT, batch.mask_BxT,
                               batch.positions_BxT)
    return objectives.objective(logp, batch.old_logp_BxT, batch.guide_logp_BxT, batch.adv_B,
                                batch.kind_B, batch.loss_mask_BxT, CFG.objective)[0]
  grads = _flat(jax.grad(loss)(policy.params))
  assert set(grads) == names
  assert all(np.abs(g).max() > 0 for p, g in grads.items() if p.endswith("/b"))
  step = train.make_train_step(policy, OPT, CFG)
  a0 = _flat(state.params)
  for _ in range(2):  # step 1 moves B off zero; step 2 then moves A too.
    state, metrics = step(state, batch)
  assert float(metrics["loss/skipped_updates"]) == 0
  a2 = _flat(state.params)
  assert all(np.abs(a2[p] - a0[p]).max() > 0 for p in names)
  for p, v in _flat(policy.base).items():
    np.testing.assert_array_equal(v, base_before[p])


def test_lora_train_step_with_remat_equals_without():
  """nnx.remat writes variables back; the frozen base must not come from an outer trace."""
  out = []
  for remat in (True, False):
    policy = train.Policy(_lora_model(remat=remat))
    step = train.make_train_step(policy, OPT, CFG, donate=False)
    state, metrics = step(train.init_state(policy, OPT, 0), _rl_batch())
    out.append((float(metrics["loss/loss"]), _flat(state.params)))
  assert abs(out[0][0] - out[1][0]) < 1e-6
  for p, v in out[0][1].items():
    np.testing.assert_allclose(v, out[1][1][p], atol=1e-6, rtol=0)


def test_per_layer_remat_holds_one_layers_activations_at_a_time():
  """Remat's point: the backward keeps a layer's recomputed activations only while that layer's
  gradient is taken. XLA:CPU used to hoist every layer's recompute (and defer the adapter
  gradients), so each extra layer cost ~8 MLP activations [B·T, intermediate] of compiled
  temporaries, as without remat; now under one. Measured from the compiled program (no run)."""
  cfg = {**TINY, "hidden_size": 64, "intermediate_size": 512, "vocab_size": 64,
         "max_position_embeddings": 128}
  tokens = jnp.zeros((4, 128), jnp.int32)

  def temp_bytes(layers):
    policy = train.Policy(_lora_model(remat=True, config={**cfg, "num_hidden_layers": layers}))
    def loss(params, base):
      return sampling.token_logp(policy.merge(params, base), tokens, jnp.ones_like(tokens)).sum()
    compiled = jax.jit(jax.grad(loss)).lower(policy.params, policy.base).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  mlp_activation = tokens.size * cfg["intermediate_size"] * 4
  per_layer = (temp_bytes(2) - temp_bytes(1)) / mlp_activation
  assert per_layer < 3, per_layer


def test_theta_old_is_base_plus_adapters_and_the_reference_is_the_base_alone():
  model = models.init_from_config(TINY, rng=0)
  base_logp = _logp(model)
  lora.apply(model, lora.LoraConfig(rank=4))
  _randomize_b(model)
  policy = train.Policy(model)
  np.testing.assert_array_equal(_logp(policy.pair(policy.params)), _logp(model))
  np.testing.assert_array_equal(_logp(policy.reference_pair()), base_logp)
  np.testing.assert_array_equal(_logp(lora.without_adapters(model)), base_logp)
  assert lora.has_adapters(model)  # without_adapters leaves the model itself alone.
  # The reference shares the base's arrays: no copy of the weights.
  ref_graphdef, ref_state = policy.reference_pair()
  assert all(a is b for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(policy.base)))
  assert train.Policy(models.init_from_config(TINY, rng=0)).reference_pair() is None


def test_merged_kernels_equal_the_adapter_forward():
  model = _randomize_b(_lora_model())
  merged = lora.merged(model)
  assert not lora.has_adapters(merged) and lora.has_adapters(model)
  np.testing.assert_allclose(_logp(merged), _logp(model), atol=1e-5, rtol=0)
  q = model.layers[0].attn.q_proj
  assert np.abs(np.asarray(merged.layers[0].attn.q_proj.kernel[...])
                - np.asarray(q.kernel[...])).max() > 1e-3  # the model's own kernel is untouched.


# -- export: merged HF weights and PEFT adapters -------------------------------------------------


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  """(dir, torch model) of a tiny random Qwen2 (q/k/v biases, untied head) made by transformers."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=32,
                                 max_position_embeddings=32, tie_word_embeddings=False)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("hf_base"))
  model.save_pretrained(path)
  return path, model


def _hf_model(path):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def _torch_logits(torch_model, tokens):
  import torch
  with torch.no_grad():
    return torch_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def test_merged_export_loads_in_transformers_with_the_adapter_logits(hf_base, tmp_path):
  path, _ = hf_base
  model = _randomize_b(lora.apply(models.from_pretrained(path), lora.LoraConfig(rank=4)))
  tokens, _ = _tokens(t=8)
  want = np.asarray(model(tokens))
  merged = lora.merged(model)
  np.testing.assert_allclose(np.asarray(merged(tokens)), want, atol=1e-5, rtol=0)
  models.save_pretrained(merged, str(tmp_path))
  np.testing.assert_allclose(_torch_logits(_hf_model(str(tmp_path)), tokens), want, atol=1e-4,
                             rtol=0)


def test_peft_adapter_written_by_mixpo_loads_in_peft(hf_base, tmp_path):
  import peft
  from mixpo.models import peft_io
  path, _ = hf_base
  cfg = lora.LoraConfig(rank=4, alpha=6.0, targets=r"(attn/[qv]_proj|mlp/down_proj)/kernel$")
  model = _randomize_b(lora.apply(models.from_pretrained(path), cfg))
  models.save_adapter(model, str(tmp_path), base_model_name_or_path=path)
  with open(tmp_path / "adapter_config.json") as f:
    written = json.load(f)
  assert written["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert written["r"] == 4 and written["lora_alpha"] == 6.0
  from safetensors import safe_open
  with safe_open(str(tmp_path / "adapter_model.safetensors"), "numpy") as f:
    a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert a.shape == (4, 32)  # torch orientation [r, in]
  peft_model = peft.PeftModel.from_pretrained(_hf_model(path), str(tmp_path)).eval()
  tokens, _ = _tokens(t=8)
  base_logits = _torch_logits(_hf_model(path), tokens)
  got = _torch_logits(peft_model, tokens)
  want = np.asarray(model(tokens))
  assert np.abs(want - base_logits).max() > 1e-2  # the adapter really changes the logits.
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # Back into mixpo: the same adapters, bit for bit.
  back = models.from_pretrained(path)
  got_cfg = models.load_adapter(back, str(tmp_path))
  assert got_cfg.rank == 4 and got_cfg.scaling == cfg.scaling
  assert sorted(lora.adapters(back)) == sorted(lora.adapters(model))
  for p, ad in lora.adapters(model).items():
    np.testing.assert_array_equal(np.asarray(lora.adapters(back)[p].b[...]), np.asarray(ad.b[...]))
  # Layers adapted unevenly are listed by full module name.
  partial = lora.apply(models.from_pretrained(path),
                       lora.LoraConfig(rank=2, targets=r"layers/1/attn/q_proj/kernel$"))
  models.save_adapter(partial, str(tmp_path / "partial"))
  assert peft_io.read_config(str(tmp_path / "partial"))["target_modules"] == [
      "model.layers.1.self_attn.q_proj"]


def test_peft_adapter_made_by_peft_imports_into_mixpo(hf_base, tmp_path):
  import peft
  import torch
  path, _ = hf_base
  torch.manual_seed(1)
  peft_cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"],
                             init_lora_weights=False)  # random B: a "trained" adapter
  peft_model = peft.get_peft_model(_hf_model(path), peft_cfg).eval()
  peft_model.save_pretrained(str(tmp_path))
  model = models.from_pretrained(path)
  cfg = models.load_adapter(model, str(tmp_path))
  assert cfg.rank == 4 and cfg.scaling == 3.0 and len(lora.adapters(model)) == 6
  tokens, _ = _tokens(t=8)
  np.testing.assert_allclose(np.asarray(model(tokens)), _torch_logits(peft_model, tokens),
                             atol=1e-4, rtol=0)
  # rslora scaling (alpha / sqrt(r)) is honoured too.
  peft_cfg = peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"], use_rslora=True,
                             init_lora_weights=False)
  peft_model = peft.get_peft_model(_hf_model(path), peft_cfg).eval()
  peft_model.save_pretrained(str(tmp_path / "rs"))
  model = models.from_pretrained(path)
  models.load_adapter(model, str(tmp_path / "rs"))
  np.testing.assert_allclose(np.asarray(model(tokens)), _torch_logits(peft_model, tokens),
                             atol=1e-4, rtol=0)


def test_unsupported_peft_adapters_are_refused_by_field(hf_base, tmp_path):
  import peft
  path, _ = hf_base
  peft.get_peft_model(_hf_model(path), peft.LoraConfig(
      r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(str(tmp_path / "dora"))
  with pytest.raises(ValueError, match="use_dora"):
    models.load_adapter(models.from_pretrained(path), str(tmp_path / "dora"))
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    models.load_adapter(models.from_pretrained(path), str(tmp_path))


def _peft_adapter(path, out, seed=1, **kw):
  """A "trained" PEFT adapter (random B) on the base at `path`, saved to `out`; its peft model."""
  import peft
  import torch
  torch.manual_seed(seed)
  model = peft.get_peft_model(_hf_model(path), peft.LoraConfig(r=2, lora_alpha=4,
                                                               init_lora_weights=False, **kw))
  model.save_pretrained(str(out))
  return model.eval()


def _edit_config(directory, **changes):
  with open(directory / "adapter_config.json") as f:
    config = json.load(f)
  config.update(changes)
  with open(directory / "adapter_config.json", "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=r".*\.1\.mlp\.(up|down)_proj"),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"]),
    dict(target_modules=["k_proj", "model.layers.1.self_attn.q_proj"], layers_to_transform=0,
         layers_pattern="layers"),
], ids=["layers_to_transform", "regex", "all_linear_exclude", "exact_name_and_pattern"])
def test_peft_selection_rules_load_the_model_peft_loads(hf_base, tmp_path, kw):
  peft_model = _peft_adapter(hf_base[0], tmp_path, **kw)
  model = models.from_pretrained(hf_base[0])
  models.load_adapter(model, str(tmp_path))
  want = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
          for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default")}
  names = models.peft_io.module_names(2)
  assert {names[p] for p in lora.adapters(model)} == want
  tokens, _ = _tokens(t=8)
  np.testing.assert_allclose(np.asarray(model(tokens)), _torch_logits(peft_model, tokens),
                             atol=1e-4, rtol=0)


def test_peft_config_that_disagrees_with_its_tensors_loads_as_in_peft_or_is_refused(hf_base,
                                                                                  tmp_path):
  """main: the tensors were applied whatever the config selected; with layers_to_transform=[0]
  over tensors of both layers, mixpo's logits differed from peft's by 0.49, no error."""
  import peft
  path = hf_base[0]
  _peft_adapter(path, tmp_path / "a", target_modules=["q_proj", "v_proj"])
  tokens, _ = _tokens(t=8)
  for changes, field in ((dict(layers_to_transform=[0]), "layers_to_transform"),
                         (dict(target_modules=["q_proj"]), "target_modules"),
                         (dict(exclude_modules=["model.layers.1.self_attn.v_proj"]),
                          "exclude_modules"),
                         (dict(target_modules=["q_proj", "v_proj", "k_proj"]), "k_proj")):
    _edit_config(tmp_path / "a", **changes)
    model = models.from_pretrained(path)
    try:
      models.load_adapter(model, str(tmp_path / "a"))
    except ValueError as e:
      assert "adapter_config.json" in str(e) and field in str(e), str(e)
    else:
      assert field != "k_proj", "peft gives k_proj a fresh random adapter: must be refused"
      want = _torch_logits(peft.PeftModel.from_pretrained(_hf_model(path), str(tmp_path / "a")),
                           tokens)
      np.testing.assert_allclose(np.asarray(model(tokens)), want, atol=1e-4, rtol=0)
    _edit_config(tmp_path / "a", target_modules=["q_proj", "v_proj"], layers_to_transform=None,
                 exclude_modules=None)


# -- checkpoints: adapters + optimizer, tied to their base ----------------------------------------


def test_base_fingerprint_changes_with_any_bit_and_ignores_placement():
  policy = train.Policy(_lora_model())
  fp = lora.fingerprint(policy.base)
  assert fp == lora.fingerprint(jax.tree.map(jnp.copy, policy.base))
  assert fp["num_params"] == sum(x.size for x in jax.tree.leaves(policy.base))
  flat = nnx.to_flat_state(policy.base)
  def edited(fn):
    out = []
    for p, v in flat:
      x = v.get_value()
      out.append((p, v.replace(fn(x)) if "/".join(map(str, p)) == "layers/1/mlp/up_proj/kernel"
                  else v))
    return nnx.from_flat_state(out)
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint32)
  one_bit = lambda x: jax.lax.bitcast_convert_type(bits(x).at[3, 5].set(bits(x)[3, 5] ^ 1),
                                                    jnp.float32)
  swapped = lambda x: x[::-1]  # same values, other positions
  for fn in (one_bit, swapped, lambda x: x.astype(jnp.bfloat16)):
    assert lora.fingerprint(edited(fn))["checksum"] != fp["checksum"]


def test_lora_resume_is_bit_identical_and_another_base_is_refused(tmp_path):
  from mixpo import checkpoint
  policy = train.Policy(_lora_model())
  base_id = {"path": "/models/base", **lora.fingerprint(policy.base)}
  step = train.make_train_step(policy, OPT, CFG, donate=False)
  state = train.init_state(policy, OPT, 0)
  with checkpoint.Checkpointer(tmp_path, save_every=1, keep=2, async_save=False) as ckpt:
    ckpt.check_base(base_id)
    state, _ = step(state, _rl_batch(0))
    ckpt.save(1, state)
    state, _ = step(state, _rl_batch(1))
  with checkpoint.Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
    ckpt.check_base(base_id)
    # The target is adapters + optimizer only; orbax refuses a tree of another structure.
    _, restored, _ = ckpt.restore_latest(train.init_state(policy, OPT, 7))
  restored, _ = step(restored, _rl_batch(1))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = {"path": "/models/base", **lora.fingerprint(train.Policy(_lora_model(seed=1)).base)}
  with checkpoint.Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
    with pytest.raises(checkpoint.BaseMismatchError, match="different base model.*checksum"):
      ckpt.check_base(other)
    with pytest.raises(checkpoint.BaseMismatchError, match="path"):
      ckpt.check_base({**base_id, "path": "/models/other"})
    ckpt.check_base(other, overwrite=True)  # deletes the other base's adapters
    assert ckpt.restore_latest(train.init_state(policy, OPT, 0)) is None


# -- config.lora through loop ---------------------------------------------------------------------


def _smoke(builtin_dir, **overrides):
  c = smoke_config(builtin_dir)
  c.lora.rank = 4
  c.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}  # gives groups reward variance
  c.optim.warmup_steps = 0  # the first update already moves the adapters.
  return set_fields(c, overrides)


def test_default_config_targets_are_the_library_default():
  from experiments.configs import default
  c = default.get_config()
  assert c.lora.targets == lora.DEFAULT_TARGETS and c.lora.rank == 0


def test_lora_run_trains_adapters_end_to_end_and_exports_merged_and_peft(builtin_dir, tmp_path):
  import shutil
  from mixpo import checkpoint, loop
  policy_dir = str(tmp_path / "policy")
  shutil.copytree(f"{builtin_dir}/policy_init", policy_dir)
  config = _smoke(builtin_dir, algo="mix2", num_steps=2, export_hf=True, policy=policy_dir)
  workdir = str(tmp_path / "run")
  summary = loop.run(config, workdir)
  assert summary["final_step"] == 2
  with open(f"{workdir}/checkpoints/{checkpoint.BASE_FILE}") as f:
    base = json.load(f)
  assert base["path"] == policy_dir and len(base["checksum"]) == 32
  merged = models.from_pretrained(f"{workdir}/export")
  adapted = models.from_pretrained(policy_dir)
  got = models.load_adapter(adapted, f"{workdir}/export_adapter")
  assert got.rank == 4 and len(lora.adapters(adapted)) == 7  # the smoke policy has 1 layer.
  assert any(np.abs(np.asarray(a.b[...])).max() > 0 for a in lora.adapters(adapted).values())
  vocab = merged.config.vocab_size  # the built-in char model's (ids past it are refused)
  np.testing.assert_allclose(_logp(merged, vocab=vocab), _logp(adapted, vocab=vocab), atol=1e-5,
                             rtol=0)
  # Other weights at the same path (same config): the adapters are refused, before any compute.
  shutil.copy(f"{builtin_dir}/guide/model.safetensors", f"{policy_dir}/model.safetensors")
  config.num_steps = 3
  with pytest.raises(checkpoint.BaseMismatchError, match="different base model"):
    loop.run(config, workdir)


@pytest.mark.parametrize("algo", algorithms.names())
def test_lora_rank_16_trains_every_algorithm(builtin_dir, tmp_path, algo):
  """`--config.lora.rank=16` at smoke size: setup + one RL step (generate, score, reward,
  update) of every algorithm in the table; the adapters move, the base does not."""
  from mixpo import loop, rl
  from mixpo.logging import PhaseTimer
  config = _smoke(builtin_dir, algo=algo)
  config.lora.rank = 16
  exp, state, ckpt, _ = loop.setup(config, str(tmp_path))
  ckpt.close()
  base = _flat(exp.policy.base)
  params = _flat(state.params)
  assert params and all(p.endswith(("/lora/a", "/lora/b")) for p in params)
  assert exp.policy.params["layers"][0]["attn"]["q_proj"]["lora"]["a"].shape[-1] == 16
  # Unguided algorithms learn only from groups with reward variance: step until one held some
  # (which prompts the weak smoke policy gets right depends on the sampler's stream).
  pos, signal = 0, False
  try:
    for _ in range(4):
      state, pos, metrics, _ = rl.rl_step(exp, state, pos, PhaseTimer())
      assert metrics["loss/skipped_updates"] == 0
      signal = metrics["dynamic/variance_groups"] > 0 or metrics.get("loss/tokens_off", 0) > 0
      if signal:
        break
  finally:
    exp.reward_runner.close()
  assert signal, "no step with a learning signal in 4"
  after = _flat(state.params)
  assert any(np.abs(after[p] - v).max() > 0 for p, v in params.items() if p.endswith("/b"))
  for p, v in _flat(exp.policy.base).items():
    np.testing.assert_array_equal(v, base[p])


# -- sharding: adapters follow their kernel's rules -----------------------------------------------

_MESH_WORKER = r'''
import copy, json, sys
import jax, numpy as np
jax.config.update("jax_numpy_rank_promotion", "raise")
sys.path.insert(0, sys.argv[1])
import lora_test as t
from mixpo import sampling, sharding, train
from mixpo.models import lora

def run(policy, mesh):
  state = jax.tree.map(lambda x: x.copy(), train.init_state(policy, t.OPT, 0))  # step donates it
  batch = t._rl_batch()
  if mesh is None:
    step = train.make_train_step(policy, t.OPT, t.CFG)
  else:
    policy = copy.copy(policy)  # the base placed by the rules, as from_pretrained(shardings=) does
    policy.base = jax.device_put(policy.base, sharding.tree_shardings(policy.base, mesh))
    state_sh = sharding.train_state_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    step = train.make_train_step(policy, t.OPT, t.CFG,
                                 shardings=(state_sh, sharding.batch_sharding(mesh)))
    batch = sharding.shard_rows(jax.device_get(batch), mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss/loss"]))
  logp = np.asarray(sampling.score(policy.pair(state.params), *t._tokens()))
  return losses, jax.tree.leaves(jax.device_get(state)), logp, lora.fingerprint(policy.base), state

policy = train.Policy(t._lora_model())
ref = run(policy, None)
out = {"devices": jax.device_count()}
for shape in [(1, 2, 1), (1, 1, 2)]:
  mesh = sharding.make_mesh(shape)
  with jax.set_mesh(mesh):
    got = run(policy, mesh)
  out[str(shape)] = {
      "loss": max(abs(a - b) for a, b in zip(got[0], ref[0])),
      "state": max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
                   for a, b in zip(got[1], ref[1])),
      "logp": float(np.abs(got[2] - ref[2]).max()),
      "fingerprint_equal": got[3] == ref[3],
      "specs": sharding.describe(got[4].params),
      "opt_specs": sharding.describe(got[4].opt_state)}
print("RESULT " + json.dumps(out))
'''


def test_lora_on_a_two_device_mesh_equals_one_device():
  import os
  import subprocess
  import sys
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.path.dirname(here), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  p = subprocess.run([sys.executable, "-c", _MESH_WORKER, here], env=env, capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  assert out["devices"] == 2
  for shape in ("(1, 2, 1)", "(1, 1, 2)"):  # fsdp and tensor: where adapters get split
    r = out[shape]
    assert r["loss"] < 1e-5 and r["state"] < 3e-5 and r["logp"] < 1e-5, (shape, r)
    assert r["fingerprint_equal"], shape  # the base checksum is independent of the layout.
  fsdp, tensor = out["(1, 2, 1)"]["specs"], out["(1, 1, 2)"]["specs"]
  assert fsdp["layers/0/attn/q_proj/lora/a"] == "P('fsdp', None)"  # like the kernel's input dim
  assert fsdp["layers/0/mlp/down_proj/lora/b"] == "P(None, 'fsdp')"  # like the kernel's output
  assert tensor["layers/0/attn/q_proj/lora/b"] == "P(None, 'tensor')"
  assert tensor["layers/0/attn/o_proj/lora/a"] == "P('tensor', None)"
  assert any(k.endswith("mu/layers/0/attn/o_proj/lora/a") and v == "P('tensor', None)"
             for k, v in out["(1, 1, 2)"]["opt_specs"].items())


def test_memory_plan_reports_lora_next_to_full():
  import sys
  import os
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import memory_plan
  out = memory_plan.plan(TINY, (1, 1, 1), param_dtype="float32", dtype="float32",
                         guide_dtype="bfloat16", train_rows=2, seq_len=16, rollout_rows=2,
                         rollout_len=16, remat=True, lora_rank=4, lora_base_dtype="bfloat16")
  full, lo = out["per_device"], out["lora"]["per_device"]
  n, n_lora = out["num_params"], out["lora"]["num_trained_params"]
  d, f, kv, layers = 32, 48, 16, 2
  assert n_lora == layers * 4 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + f))  # q o, k v, mlp
  assert out["lora"]["num_params"] == n + n_lora
  assert full["params"] == 4 * n and full["base"] == 0
  assert 0 <= full["optimizer"] - 8 * n < 64  # Adam's mu and nu (+ its step count)
  assert lo["params"] == 4 * n_lora and 0 <= lo["optimizer"] - 8 * n_lora < 64
  assert lo["base"] == 2 * n  # bf16, frozen: no gradient, no moments
  assert lo["guide"] == full["guide"] and lo["kv_cache"] == full["kv_cache"]
  assert 0 < lo["step_temp"] and out["lora"]["total"] < out["total"]
