"""rl.py / rollout.py / loop.py: every algo and scheme end to end on tiny models."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import smoke
from mixpo import algorithms, loop, models, objectives, rl, sharding, train
from mixpo import logging as mlog
from mixpo.logging import PhaseTimer
from mixpo.rollout import Collected, Groups, dynamic_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(builtin_dir, **overrides):
  """The smoke config on the session's built-in models (conftest `builtin_dir`), no export."""
  c = smoke.get_config()
  c.builtin_dir = builtin_dir
  c.export_hf = False
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _leaves(tree):
  return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]  # copies: state is donated.


def run_two_steps(config, workdir):
  """setup + two rl_steps under the run's mesh; returns (exp, last metrics, last samples)."""
  exp, state, ckpt, _ = loop.setup(config, workdir)
  ckpt.close()
  guide_before = _leaves(exp.guide[1]) if exp.guide else []
  params0 = _leaves(state.params)
  pos, timer = 0, PhaseTimer()
  with jax.set_mesh(exp.mesh):
    for _ in range(2):
      state, pos, metrics, samples = rl.rl_step(exp, state, pos, timer)
  exp.reward_runner.close()
  assert int(state.step) == 2 and pos >= 2 * config.groups
  assert any(np.abs(a - b).max() > 0 for a, b in zip(params0, _leaves(state.params)))
  assert metrics["loss/skipped_updates"] == 0
  for a, b in zip(guide_before, _leaves(exp.guide[1]) if exp.guide else []):
    np.testing.assert_array_equal(a, b)  # the guide is frozen.
  return exp, metrics, samples


@pytest.mark.parametrize("scheme", ["paper", "dapo"])
@pytest.mark.parametrize("algo", algorithms.names())
def test_every_algo_and_scheme_runs_two_steps_and_changes_params(builtin_dir, tmp_path, algo,
                                                                 scheme):
  # The smoke models solve nothing yet: the dense partial-credit reward gives groups variance
  # (and R > 0 for the paper scheme's ON set) so every algorithm has a non-zero gradient.
  config = smoke_config(builtin_dir, algo=algo, scheme=scheme)
  config.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}
  exp, metrics, samples = run_two_steps(config, str(tmp_path))
  entry = algorithms.get(algo)
  sets = {s["set"] for s in samples}
  assert ("OFF" in sets) == entry.guided
  real_rows = metrics["train/rows_on"] + metrics["train/rows_zero"] + metrics["train/rows_off"]
  # Only a ZERO set's slots may stay unfilled (padding rows are not counted).
  assert exp.spec.sizes.rows == real_rows or entry.zero_set


def _fake_groups(has_var_per_group, k=2):
  r = np.array([[0.0, 1.0] if v else [0.0, 0.0] for v in has_var_per_group], np.float32)
  g = len(has_var_per_group)
  z = lambda *s: np.zeros(s, np.int32)
  return Groups(prompts=[f"p{i}" for i in range(g)], answers=["1"] * g, prompt_BxP=z(g * k, 4),
                prompt_mask_BxP=np.ones((g * k, 4), np.int32), tokens_BxN=z(g * k, 3),
                mask_BxN=np.ones((g * k, 3), np.float32), lengths_B=np.full(g * k, 3, np.int32),
                truncated_B=np.zeros(g * k, bool), completions=[""] * (g * k),
                rewards_B=r.reshape(-1), correct_B=r.reshape(-1))


def test_dynamic_sampling_fills_the_batch_then_stops():
  draws = [_fake_groups([True, False, False, True]), _fake_groups([True, True, True, False]),
           _fake_groups([True] * 4)]
  got = dynamic_sample(lambda i: (draws[i], {"i": i}), groups=4, zero_groups=2,
                       max_num_gen_batches=5)
  kept, zero, stats = got.kept, got.zero, got.stats
  assert got.draws == 2 and got.reward_metrics == {"i": 1}
  assert got.tokens == 2 * 4 * 2 * 3  # two batches of 4 groups × 2 rows × 3 tokens.
  assert stats["dynamic/gen_batches"] == 2  # 2 + 3 variance groups ≥ 4 after two batches.
  assert stats["dynamic/variance_groups"] == 4 and stats["dynamic/filled_with_zero_groups"] == 0
  assert kept.has_variance().all() and len(kept.prompts) == 4
  assert len(zero.prompts) == 2 and not zero.has_variance().any()


def test_dynamic_sampling_stops_at_the_cap_and_fills_with_zero_groups():
  calls = []

  def draw(i):
    calls.append(i)
    return _fake_groups([True, False, False, False]), {}

  got = dynamic_sample(draw, groups=4, zero_groups=1, max_num_gen_batches=2)
  kept, zero, stats = got.kept, got.zero, got.stats
  assert calls == [0, 1]
  assert len(calls) == 2 and stats["dynamic/gen_batches"] == 2
  assert stats["dynamic/variance_groups"] == 2
  assert stats["dynamic/filled_with_zero_groups"] == 2
  assert list(kept.has_variance()) == [True, True, False, False]
  assert len(zero.prompts) == 1


def test_dynamic_sampling_disabled_uses_one_batch():
  got = dynamic_sample(lambda i: (_fake_groups([False, True]), {}), groups=2, zero_groups=0,
                       max_num_gen_batches=3, enabled=False)
  assert got.stats["dynamic/gen_batches"] == 1 and len(got.kept.prompts) == 2


@pytest.mark.parametrize("field,value,match", [
    ("algo", "ppo", "algo"), ("n", 1, "config.n"), ("scheme", "x", "scheme"),
    ("guide", "", "config.guide"), ("num_minibatches", 7, "num_minibatches"),
    ("guide_logp", "maybe", "guide_logp"), ("max_num_gen_batches", 0, "max_num_gen_batches"),
    ("loss_agg", "sum", "loss_agg"), ("kl_estimator", "k9", "kl_estimator"),
    ("ratio_level", "row", "ratio_level"), ("eps_low", 1.5, "config.eps_low"),
    ("mesh_shape", (3, 1, 1), "mesh_shape"),
])
def test_inconsistent_configs_fail_before_compute(tmp_path, field, value, match):
  config = smoke.get_config()
  setattr(config, field, value)
  with pytest.raises(ValueError, match=match):
    loop.setup(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "models"))  # no model was built.


def test_guide_with_a_different_vocabulary_is_refused():
  config = smoke.get_config()
  with pytest.raises(ValueError, match="vocabulary"):
    rl.check_vocabularies(policy_vocab=22, guide_vocab=151936)


def _rows(workdir):
  drop = lambda r: {k: v for k, v in r.items()
                    if not k.startswith(("time/", "compile/")) and k != "wall_s"}
  return [drop(r) for r in mlog.read_metrics(workdir)]


def test_resume_equals_uninterrupted_run(builtin_dir, tmp_path):
  full = smoke_config(builtin_dir, num_steps=4, checkpoint_every=2)
  loop.run(full, str(tmp_path / "full"))
  part = copy.deepcopy(full)
  part.num_steps = 2
  loop.run(part, str(tmp_path / "split"))
  summary = loop.run(full, str(tmp_path / "split"))  # resumes at step 2.
  assert summary["start_step"] == 2 and summary["final_step"] == 4
  assert _rows(tmp_path / "full") == _rows(tmp_path / "split")


def test_workdir_with_a_different_runs_checkpoint_is_refused(builtin_dir, tmp_path):
  loop.run(smoke_config(builtin_dir, num_steps=2), str(tmp_path))
  assert sharding.current_mesh() is None  # the run's mesh is scoped to the run.
  other = smoke_config(builtin_dir, num_steps=2, seed=7)
  with pytest.raises(ValueError, match="seed"):
    loop.run(other, str(tmp_path))
  other.overwrite = True
  assert loop.run(other, str(tmp_path))["final_step"] == 2


def test_run_exports_a_hugging_face_policy_and_plots(builtin_dir, tmp_path):
  config = smoke_config(builtin_dir, num_steps=2)
  config.export_hf = True
  summary = loop.run(config, str(tmp_path))
  model = models.from_pretrained(str(tmp_path / "export"))
  assert model.config.vocab_size == len(models.load_tokenizer(str(tmp_path / "export")))
  assert summary["plots"] and all(os.path.exists(p) for p in summary["plots"])
  rows = mlog.read_metrics(str(tmp_path))
  assert all(k in rows[-1] for k in ("time/generate_policy", "time/generate_guide", "time/reward",
                                     "time/score", "time/update", "policy_tokens"))


# The binary: flags, main, summary.json. Every algorithm already runs two steps in-process above;
# through the binary only its name differs, so one unguided and one guided-with-zero-set run
# (each is a fresh interpreter and compile: ~10 s).
@pytest.mark.parametrize("algo", ["grpo", "mix2"])
def test_smoke_config_runs_from_the_command_line(builtin_dir, tmp_path, algo):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "experiments/train.py", "--config=smoke", f"--workdir={tmp_path}",
         f"--algo={algo}", f"--config.builtin_dir={builtin_dir}", "--config.num_steps=2"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["final_step"] == 2


def test_no_recompilation_after_the_first_step(builtin_dir, tmp_path):
  config = smoke_config(builtin_dir, num_steps=5, eval_every=2, checkpoint_every=2)
  config.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}
  loop.run(config, str(tmp_path))
  counts = {r["step"]: r["compile/count"] for r in mlog.read_metrics(str(tmp_path))
            if "compile/count" in r}
  # Step 1 compiles generate / score / train_step; step 2 adds the first checkpoint's programs.
  assert counts[2] == counts[5], counts


def test_padding_rows_enter_no_pool_and_no_loss():
  """Mix-2 with Z = 2 zero slots but no zero group drawn: 2 slots are padding (policy and guide
  rows). Their rewards are poisoned here; still no advantage, no loss token, no gradient."""
  config = smoke.get_config()
  config.groups, config.zero_groups, config.n, config.m = 2, 2, 2, 2
  spec = rl.resolve(config)
  kept = _fake_groups([True, True])
  policy_rows, n_groups = rl.policy_block(
      Collected(kept=kept, zero=None, stats={}, draws=1, tokens=0, reward_metrics={}), spec.sizes)
  assert n_groups == 2 and len(policy_rows.rewards_B) == spec.sizes.slots * spec.sizes.n
  guide = _fake_groups([True, False])
  policy_rows.rewards_B[n_groups * 2:] = [7.0, 3.0, 7.0, 3.0]  # a pool would normalise these.
  asm = rl.assemble(spec, policy_rows, n_groups, guide)
  real = np.asarray(asm.batch.real_B)
  np.testing.assert_array_equal(real, [1, 1, 1, 1, 0, 0, 0, 0] + [1, 1, 1, 1, 0, 0, 0, 0])
  assert np.all(np.asarray(asm.batch.adv_B)[~real] == 0.0)
  assert np.all(np.asarray(asm.batch.loss_mask_BxT)[~real] == 0.0)
  clean = rl.kinds_and_advantages(
      asm.rows.rewards_B[real], np.asarray(asm.batch.group_B)[real], asm.is_guide_B[real],
      np.ones(real.sum(), bool), algo=spec.algorithm, scheme=spec.scheme, std_normalize=True)[1]
  np.testing.assert_array_equal(np.asarray(asm.batch.adv_B)[real], clean)
  b = asm.batch
  shape = b.loss_mask_BxT.shape
  rng = np.random.default_rng(0)
  old = rng.normal(size=shape).astype(np.float32)
  kl_cfg = dataclasses.replace(spec.objective, kl_coef=0.1, entropy_coef=0.1)
  for cfg in (spec.objective, kl_cfg):
    grads = jax.grad(lambda lp, ent: objectives.objective(
        lp, old, old - 1.0, b.adv_B, b.kind_B, b.loss_mask_BxT, cfg, ref_logp=old + 0.5,
        entropy=ent)[0], argnums=(0, 1))(old + 0.3, np.ones(shape, np.float32))
    for g in grads if cfg is kl_cfg else grads[:1]:
      assert np.all(np.asarray(g)[~real] == 0.0) and np.any(np.asarray(g)[real] != 0.0)


@pytest.mark.parametrize("overrides", [
    dict(algo="mix2", loss_agg="seq-mean-token-sum-norm", std_normalize=False, kl_coef=0.05,
         kl_estimator="k2", entropy_coef=0.01, ratio_level="sequence"),
    dict(algo="luffy", loss_agg="seq-mean-token-mean", cispo=True, kl_coef=0.05),
], ids=["mix2-drgrpo-kl-entropy-gspo", "luffy-seqmean-cispo-kl"])
def test_switches_train_end_to_end(builtin_dir, tmp_path, overrides):
  config = smoke_config(builtin_dir, **overrides)
  config.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}
  exp, metrics, _ = run_two_steps(config, str(tmp_path))
  assert exp.reference is not None  # kl_coef > 0 keeps the frozen starting policy.
  assert np.isfinite(metrics["loss/kl"]) and metrics["loss/kl"] >= 0.0
  assert ("loss/entropy_bonus" in metrics) == ("entropy_coef" in overrides)


def test_no_reference_policy_without_kl(builtin_dir, tmp_path):
  exp, _, ckpt, _ = loop.setup(smoke_config(builtin_dir, algo="dapo"), str(tmp_path))
  ckpt.close()
  exp.reward_runner.close()
  assert exp.reference is None and not exp.spec.keeps_reference


# |bf16 − f32| θ_old log-prob per response token of the smoke policy, nats: mean and max over a
# step's real tokens (measured 3.8e-4 / 1.7e-3; bf16 rounds activations to 2⁻⁸ relative).
_BF16_LOGP_MEAN_TOL, _BF16_LOGP_MAX_TOL = 2e-3, 1e-2


def test_bf16_rollout_trains_with_float32_master_weights(builtin_dir, tmp_path):
  """rollout_dtype=bfloat16: the guide and KL reference are held in bf16, θ_old is scored in bf16
  within a stated tolerance of float32 (as float32 numbers), and the update differentiates
  float32 log-probs of the float32 master weights: against float32 scoring of the same θ_old its
  first ratio is 1 to float32 rounding (< 1e-5; against the bf16 scoring it is off by 5.5e-5)."""
  config = smoke_config(builtin_dir, algo="mix2", rollout_dtype="bfloat16", kl_coef=0.05)
  config.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}
  exp, state, ckpt, _ = loop.setup(config, str(tmp_path))
  ckpt.close()
  floats = lambda t: [x for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  assert {x.dtype for x in floats(exp.guide[1]) + floats(exp.reference[1])} == {bf16}
  assert {x.dtype for x in floats(state.params) + floats(state.opt_state)} == {f32}
  timer, key = PhaseTimer(), jax.random.key(0)
  with jax.set_mesh(exp.mesh):
    theta32 = exp.policy.pair(state.params)
    theta16 = rl.rollout_view(exp.spec, theta32)
    assert {x.dtype for x in floats(theta16[1])} == {bf16}
    collected = rl.collect_policy(exp, theta16, key, 0, timer)
    rows, n_groups = rl.policy_block(collected, exp.spec.sizes)
    guide_rows = rl.collect_guide(exp, rows.prompts, rows.answers, key, timer)
    batch = rl.assemble(exp.spec, rows, n_groups, guide_rows).batch
    b16 = rl.score(exp, theta16, batch, timer)
    exp32 = dataclasses.replace(exp, spec=dataclasses.replace(exp.spec, rollout_dtype="model"))
    b32 = rl.score(exp32, theta32, batch, timer)
    assert b16.old_logp_BxT.dtype == b16.ref_logp_BxT.dtype == jnp.float32
    real = np.asarray(batch.loss_mask_BxT) > 0
    err = np.abs(np.asarray(b16.old_logp_BxT) - np.asarray(b32.old_logp_BxT))[real]
    assert 0 < err.max() < _BF16_LOGP_MAX_TOL and err.mean() < _BF16_LOGP_MEAN_TOL, err
    state, metrics = rl.update(exp, state, b32, timer)
    assert abs(metrics["loss/ratio_on"] - 1) < 1e-5, metrics  # Mix-2's ZERO ratio is πθ/πϕ.
    params1 = _leaves(state.params)
    pos = 0
    for _ in range(2):
      state, pos, metrics, samples = rl.rl_step(exp, state, pos, timer)
  exp.reward_runner.close()
  assert metrics["loss/skipped_updates"] == 0 and np.isfinite(metrics["loss/loss"])
  assert np.isfinite(metrics["loss/kl"]) and "OFF" in {s["set"] for s in samples}
  assert any(np.abs(a - b).max() > 0 for a, b in zip(params1, _leaves(state.params)))
  assert {x.dtype for x in floats(state.params) + floats(state.opt_state)} == {f32}


def test_rollout_dtype_is_validated():
  with pytest.raises(ValueError, match="config.rollout_dtype='float16'"):
    rl.resolve(smoke_config("", rollout_dtype="float16"))
  config = smoke_config("", rollout_dtype="bfloat16")
  assert rl.resolve(config).rollout_dtype == "bfloat16"
  config.lora.rank = 4
  with pytest.raises(ValueError, match="config.rollout_dtype='bfloat16' with config.lora.rank=4"):
    rl.resolve(config)
  assert rl.resolve(smoke_config("")).rollout_dtype == "model"  # default: the models as loaded.
