"""train.py: train_step semantics (accumulation, NaN guard, compile once) on a tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixpo import algorithms, models, objectives, sampling, train
from mixpo.batch import make_batch
from mixpo.objectives import OFF, ON, ZERO

TINY = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 24,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
}


def tiny_policy(seed=0):
  return train.Policy(models.init_from_config(TINY, rng=seed))


def random_rl_batch(seed, b=8, p=4, n=5):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(4, 24, (b, p))
  pmask = np.ones((b, p), np.int32)
  pmask[0, :2] = 0  # a left-padded row
  resp = rng.integers(4, 24, (b, n))
  rmask = (np.arange(n)[None] < rng.integers(1, n + 1, b)[:, None]).astype(np.float32)
  logp = -rng.uniform(1.0, 4.0, (b, n)).astype(np.float32)
  kind = np.array([ON, ON, ZERO, ZERO, OFF, OFF, ON, ZERO][:b], np.int32)
  return make_batch(prompt, pmask, resp, rmask, old_logp_BxN=logp,
                    guide_logp_BxN=logp - 0.5, adv_B=rng.standard_normal(b).astype(np.float32),
                    kind_B=kind, group_B=np.arange(b) // 2)


def _params_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("algo,switch", [(a, {}) for a in algorithms.names()] + [
    ("mix2", dict(loss_agg="seq-mean-token-mean")),
    ("mix2", dict(loss_agg="seq-mean-token-sum-norm", loss_agg_tokens=5)),
    ("mix2", dict(ratio_level="sequence", entropy_coef=0.1, kl_coef=0.1, kl_estimator="k3"))],
    ids=str)
def test_train_step_micro_batch_accumulation_equals_one_big_batch(algo, switch):
  policy = tiny_policy()
  # Plain SGD: the update is the gradient itself (Adam's g/|g| would hide or amplify noise).
  opt = optax.sgd(1.0)
  batch = random_rl_batch(1)
  if switch.get("kl_coef"):
    batch = dataclasses.replace(batch, ref_logp_BxT=batch.old_logp_BxT - 0.3)
  results = []
  for micro in (1, 4):
    cfg = train.StepConfig(objective=algorithms.get(algo).objective_config(**switch),
                           num_micro_batches=micro)
    step = train.make_train_step(policy, opt, cfg, donate=False)
    state, metrics = step(train.init_state(policy, opt, 0), batch)
    results.append((state, metrics))
  np.testing.assert_allclose(results[0][1]["loss/loss"], results[1][1]["loss/loss"], rtol=1e-5,
                             atol=1e-6)
  _params_close(results[0][0].params, results[1][0].params, atol=2e-6)
  # ...and the update actually moved the parameters.
  moved = any(np.abs(np.asarray(x) - np.asarray(y)).max() > 1e-4 for x, y in
              zip(jax.tree.leaves(results[0][0].params), jax.tree.leaves(policy.params)))
  assert moved


def test_train_step_skips_nan_updates_and_counts_them():
  policy = tiny_policy()
  opt = train.make_optimizer(train.OptimConfig(learning_rate=1e-2, grad_clip=0.0))
  cfg = train.StepConfig(objective=objectives.ObjectiveConfig(), num_minibatches=2)
  step = train.make_train_step(policy, opt, cfg, donate=False)
  state0 = train.init_state(policy, opt, 0)
  bad = dataclasses.replace(random_rl_batch(2), kind_B=jnp.full((8,), ON, jnp.int32))
  bad = dataclasses.replace(bad, old_logp_BxT=jnp.full_like(bad.old_logp_BxT, -jnp.inf))
  state1, metrics = step(state0, bad)
  assert float(metrics["loss/skipped_updates"]) == 2.0
  assert int(state1.skipped) == 2
  for x, y in zip(jax.tree.leaves((state0.params, state0.opt_state)),
                  jax.tree.leaves((state1.params, state1.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(state1.step) == 1  # the step is counted, its update is not applied.


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_guard_skips_non_finite_gradients_and_otherwise_is_the_plain_update(grad_clip):
  """A NaN / inf gradient under a finite loss is skipped bit for bit; a finite one gives the
  unguarded optimizer's update (the clip reads the norm it is handed; to float rounding: compiled
  against op-by-op)."""
  policy = tiny_policy()
  opt = train.make_optimizer(train.OptimConfig(learning_rate=1e-2, grad_clip=grad_clip))
  params, opt_state = policy.params, opt.init(policy.params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  for poison in (jnp.nan, jnp.inf):
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(poison), grads)
    p, o, ok = train._guarded_update(opt, params, opt_state, bad, jnp.zeros(()),
                                     optax.tree.norm(bad))
    assert not bool(ok)
    for x, y in zip(jax.tree.leaves((p, o)), jax.tree.leaves((params, opt_state))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  p, o, ok = jax.jit(lambda p, o, g: train._guarded_update(opt, p, o, g, jnp.zeros(()),
                                                           optax.tree.norm(g)))(
      params, opt_state, grads)
  updates, o_plain = opt.update(grads, opt_state, params)
  assert bool(ok)
  for x, y in zip(jax.tree.leaves((p, o)),
                  jax.tree.leaves((optax.apply_updates(params, updates), o_plain))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)
  with pytest.raises(ValueError, match="learning_rate"):
    train.make_optimizer(train.OptimConfig(learning_rate=float("inf")))


def test_the_guard_moves_no_more_memory_than_no_guard(monkeypatch):
  """XLA's cost analysis of the compiled step: the guarded step reads and writes as many bytes as
  one that applies every update unconditionally (a select of old and new state per leaf, the
  guard before, moved each parameter and moment twice more)."""
  # Wide enough that the state, not the step's fixed scalars, is what moves.
  policy = train.Policy(models.init_from_config(
      {**TINY, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256}, rng=0))
  opt = train.make_optimizer(train.OptimConfig(learning_rate=1e-3))
  cfg = train.StepConfig(objective=algorithms.get("mix2").objective_config())

  def bytes_accessed():
    step = train.make_train_step(policy, opt, cfg, donate=True)
    cost = step.lower(train.init_state(policy, opt, 0), random_rl_batch(0)).compile()
    cost = cost.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]

  guarded = bytes_accessed()

  def unguarded(optimizer, params, opt_state, grads, loss, grad_norm):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.isfinite(loss)

  monkeypatch.setattr(train, "_guarded_update", unguarded)
  plain = bytes_accessed()
  assert guarded <= 1.001 * plain, (guarded, plain)


def test_response_columns_only_equal_every_column():
  """StepConfig.response_tokens = N (the head and the loss over the last N columns only, as
  rl.resolve sets it) gives the update and the metrics of scoring every column."""
  policy = tiny_policy()
  opt = optax.sgd(1.0)
  batch = random_rl_batch(5)  # prompt width 4, response width 5: the loss mask is 0 on the prompt
  batch = dataclasses.replace(batch, ref_logp_BxT=batch.old_logp_BxT - 0.3)
  ocfg = algorithms.get("mix2").objective_config(kl_coef=0.1, entropy_coef=0.1)
  runs = []
  for n in (0, 5):
    step = train.make_train_step(policy, opt, train.StepConfig(objective=ocfg, response_tokens=n),
                                 donate=False)
    runs.append(step(train.init_state(policy, opt, 0), batch))
  _params_close(runs[0][0].params, runs[1][0].params, atol=1e-6)
  for key, value in runs[0][1].items():
    np.testing.assert_allclose(runs[1][1][key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_train_step_metrics_do_not_depend_on_micro_batching():
  """Set-level metrics are (total, count) sums divided once: 1, 2 and 4 micro-batches agree to
  1e-6, and each is its definition over the whole batch (J's terms at θ, token means)."""
  policy = tiny_policy()
  opt = optax.sgd(1e-3)
  batch = random_rl_batch(1)
  batch = dataclasses.replace(batch, ref_logp_BxT=batch.old_logp_BxT - 0.3)
  ocfg = algorithms.get("mix2").objective_config(kl_coef=0.1, entropy_coef=0.1)
  runs = []
  for micro in (1, 2, 4):
    step = train.make_train_step(policy, opt, train.StepConfig(objective=ocfg,
                                                               num_micro_batches=micro),
                                 donate=False)
    runs.append(step(train.init_state(policy, opt, 0), batch)[1])
  assert {"loss/j_on", "loss/j_mix", "loss/kl", "loss/entropy_bonus", "loss/tokens_on",
          "loss/clipfrac_on", "loss/ratio_guide_off", "train/entropy", "loss/loss",
          "loss/grad_norm", "loss/skipped_updates"} <= set(runs[0])
  for other in runs[1:]:
    assert set(other) == set(runs[0])
    for key in runs[0]:
      np.testing.assert_allclose(other[key], runs[0][key], rtol=1e-6, atol=1e-6, err_msg=key)
  logp, ent = sampling.token_logp(policy.merge(policy.params), batch.tokens_BxT, batch.mask_BxT,
                                  batch.positions_BxT, return_entropy=True)
  _, want = objectives.objective(logp, batch.old_logp_BxT, batch.guide_logp_BxT, batch.adv_B,
                                 batch.kind_B, batch.loss_mask_BxT, ocfg,
                                 ref_logp=batch.ref_logp_BxT, entropy=ent)
  for key in ("j_on", "j_mix", "kl", "entropy_bonus", "tokens_on", "tokens_off", "ratio_on"):
    np.testing.assert_allclose(runs[2][f"loss/{key}"], want[key], rtol=1e-5, err_msg=key)
  m = np.asarray(batch.loss_mask_BxT)
  np.testing.assert_allclose(runs[2]["train/entropy"], (np.asarray(ent) * m).sum() / m.sum(),
                             rtol=1e-5)


def test_train_step_compiles_once_and_donates_state():
  policy = tiny_policy()
  opt = train.make_optimizer(train.OptimConfig(learning_rate=1e-3))
  step = train.make_train_step(policy, opt, train.StepConfig(), donate=True)
  state = train.init_state(policy, opt, 0)
  for seed in range(3):
    old = state
    state, _ = step(state, random_rl_batch(seed))
  assert step._cache_size() == 1
  assert jax.tree.leaves(old.params)[0].is_deleted()


def test_step_config_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="num_minibatches"):
    train.StepConfig(num_minibatches=3).check(8)
  train.StepConfig(num_minibatches=2).check(8, batch_shards=4)
  with pytest.raises(ValueError, match="mesh_shape"):
    train.StepConfig(num_minibatches=2).check(8, batch_shards=8)


def test_sft_step_reduces_loss():
  policy = tiny_policy()
  opt = train.make_optimizer(train.OptimConfig(learning_rate=1e-2))
  step = train.make_sft_step(policy, opt)
  state = train.init_state(policy, opt, 0)
  batch = random_rl_batch(3)
  losses = []
  for _ in range(20):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("algo", algorithms.names())
def test_zero_samples_reach_the_loss_only_where_a_term_trains_them(algo):
  b = random_rl_batch(4)
  entry = algorithms.get(algo)
  cfg = entry.objective_config()
  grad = jax.grad(lambda lp: objectives.objective(
      lp, b.old_logp_BxT, b.guide_logp_BxT, b.adv_B, b.kind_B, b.loss_mask_BxT, cfg)[0])(
          b.old_logp_BxT + 0.1)
  zero_rows = np.asarray(b.kind_B) == ZERO
  zero_grad = np.abs(np.asarray(grad)[zero_rows]).sum()
  assert (zero_grad > 0) == any(objectives.ZERO in t.sets for t in entry.terms)
  assert (zero_grad > 0) == (algo == "mix2")  # of the published algorithms, only Mix-2.


def test_compiled_train_step_grows_linearly_with_depth():
  """The step's optimised program is O(layers): 3× the layers, under 3× the instructions.

  Scalars combined by chains of cheap ops (the NaN guard's all-finite flag over every leaf, the
  remat ordering ties over a layer's cotangents) used to be copied by XLA:CPU's fusion into the
  consumer of every leaf: quadratic in the leaves (LoRA, 2 → 8 layers: 10× the instructions),
  and an 11-minute compile holding 7 GiB of program for a 24-layer model.
  """
  from mixpo.models import lora  # noqa: PLC0415

  def lines(layers):
    model = models.init_from_config({**TINY, "num_hidden_layers": layers}, rng=0, remat=True)
    lora.apply(model, lora.LoraConfig(rank=2, alpha=4.0))  # adapters: more leaves per layer
    policy, opt = train.Policy(model), optax.adamw(1e-3)
    step = train.make_train_step(policy, opt, train.StepConfig(
        objective=algorithms.get("mix2").objective_config()), donate=False)
    text = step.lower(train.init_state(policy, opt, 0), random_rl_batch(0)).compile().as_text()
    return text.count("\n")

  small, large = lines(2), lines(6)
  assert large < 3 * small, (small, large)
