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

import metrics_doc  # tests/metrics_doc.py

from experiments.configs import smoke
from mixpo import algorithms, loop, models, objectives, rl, sharding, train
from mixpo import logging as mlog
from mixpo.logging import PhaseTimer
from mixpo.models import backend
from mixpo import slots as slots_mod
from mixpo.rollout import Collected, Groups, select_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_fields(config, overrides: dict):
  """config with each {dotted field: value} of `overrides` set ("rollout.n": 4)."""
  for field, value in overrides.items():
    *groups, name = field.split(".")
    node = config
    for g in groups:
      node = node[g]
    node[name] = value
  return config


def smoke_config(builtin_dir, **overrides):
  """The smoke config on the session's built-in models (conftest `builtin_dir`), no export;
  `overrides` as `set_fields`' (dotted ones passed as **{"rollout.n": 4})."""
  c = smoke.get_config()
  c.builtin_dir = builtin_dir
  c.export_hf = False
  return set_fields(c, overrides)


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
  assert int(state.step) == 2 and pos >= 2 * config.rollout.groups
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
  config = smoke_config(builtin_dir, algo=algo, **{"advantage.scheme": scheme})
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


def test_select_groups_takes_the_smallest_deciding_prefix_in_stream_order():
  has_var = [True, False, False, True, True, True, False, True, True]
  # 4 variance and 2 zero groups: decided at group 4 (var 0, 3, 4, 5; zero 1, 2).
  assert select_groups(has_var, groups=4, zero_groups=2) == (6, [0, 3, 4, 5], [1, 2])
  # Mix-2's zero groups count too: 3 zero groups first appear with group 6.
  assert select_groups(has_var, groups=4, zero_groups=3) == (7, [0, 3, 4, 5], [1, 2, 6])
  assert select_groups(has_var[:5], groups=4, zero_groups=0) == (None, [], [])
  # Disabled: the first `groups` groups whatever their variance.
  assert select_groups(has_var, groups=3, zero_groups=2, enabled=False) == (3, [0, 1, 2], [])


class _FakeStream:
  """Drives rollout.GroupStream as a SlotSampler would: `slots` rows at a time, rows end in the
  order `end_order` gives (not the stream order), each finished() call one return."""

  def __init__(self, has_var, k=2):
    self.has_var, self.k, self.scored = has_var, k, []

  def score(self, start, end, rows):
    assert all(g * self.k + j in rows for g in range(start, end) for j in range(self.k))
    self.scored.append((start, end))
    return np.asarray(self.has_var[start:end])

  def run(self, slots, groups, zero_groups, seed):
    from mixpo.rollout import GroupStream  # noqa: PLC0415
    ids = [np.array([1, 2], np.int32)] * len(self.has_var)
    work = GroupStream(ids, self.k, 3, self.score, groups, zero_groups, True)
    rng, live = np.random.default_rng(seed), []
    while True:
      live += work.take(slots - len(live))
      if not live:
        return work
      ended = [live.pop(i) for i in sorted(rng.choice(len(live), rng.integers(1, len(live) + 1),
                                                      replace=False), reverse=True)]
      rows = [slots_mod.Finished(row=r.row, tokens=np.ones(1, np.int32),
                                 logp=np.zeros(1, np.float32), truncated=False) for r in ended]
      if work.finished(rows):
        return work


def test_group_stream_decides_the_same_groups_whatever_order_rows_end_in():
  """The stream stops once the prefix decides, scores groups in stream order only, offers no
  prompt after the cap, and its decision does not depend on slots or on which row ended first."""
  has_var = [False, True, False, False, True, True, False, True, True, False, True, False]
  decisions = set()
  for slots, seed in [(2, 0), (4, 1), (6, 2), (24, 3), (3, 4)]:
    fake = _FakeStream(has_var)
    work = fake.run(slots, groups=4, zero_groups=2, seed=seed)
    decisions.add(repr(work.decision))
    starts = [s for s, _ in fake.scored]
    assert starts == sorted(starts) and fake.scored[0][0] == 0  # contiguous, in stream order
    # Stops once decided: at most the slots' worth of rows past the deciding prefix (8 groups).
    assert work.next_row <= 8 * 2 + slots
  assert decisions == {repr((8, [1, 4, 5, 7], [0, 2]))}
  # At the cap (too few variance groups): every prompt is used, zero groups fill the batch.
  work = _FakeStream([False, True, False, False]).run(3, groups=3, zero_groups=1, seed=0)
  assert work.decision == (4, [1, 0, 2], [3])


@pytest.mark.parametrize("field,value,match", [
    ("algo", "ppo", "algo"), ("rollout.n", 1, "rollout.n"), ("advantage.scheme", "x", "scheme"),
    ("guide.path", "", "guide.path"), ("step.num_minibatches", 7, "num_minibatches"),
    ("guide.logp", "maybe", "guide.logp"),
    ("rollout.max_num_gen_batches", 0, "rollout.max_num_gen_batches"),
    ("objective.loss_agg", "sum", "loss_agg"), ("objective.kl_estimator", "k9", "kl_estimator"),
    ("objective.ratio_level", "row", "ratio_level"),
    ("objective.eps_low", 1.5, "objective.eps_low"),
    ("mesh_shape", (3, 1, 1), "mesh_shape"),
])
def test_inconsistent_configs_fail_before_compute(tmp_path, field, value, match):
  config = smoke.get_config()
  *group, name = field.split(".")
  (config[group[0]] if group else config)[name] = value
  with pytest.raises(ValueError, match=match):
    loop.setup(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "models"))  # no model was built.


def test_guide_with_a_different_tokenizer_is_refused():
  from mixpo.data import char_tokenizer
  rl.check_vocabularies(char_tokenizer(), char_tokenizer())
  with pytest.raises(ValueError, match="tokenizer"):  # same size, other ids
    rl.check_vocabularies(char_tokenizer("0123456789+-*/=() "), char_tokenizer("1023456789+-*/=() "))


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
  config.rollout.groups, config.rollout.zero_groups, config.rollout.n, config.rollout.m = 2, 2, 2, 2
  spec = rl.resolve(config)
  kept = _fake_groups([True, True])
  policy_rows, n_groups = rl.policy_block(
      Collected(kept=kept, zero=None, stats={}, consumed=2, tokens=0, rewards=[]), spec.sizes)
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
    {"algo": "mix2", "objective.loss_agg": "seq-mean-token-sum-norm",
     "advantage.std_normalize": False, "objective.kl_coef": 0.05, "objective.kl_estimator": "k2",
     "objective.entropy_coef": 0.01, "objective.ratio_level": "sequence"},
    {"algo": "luffy", "objective.loss_agg": "seq-mean-token-mean", "objective.cispo": True,
     "objective.kl_coef": 0.05},
], ids=["mix2-drgrpo-kl-entropy-gspo", "luffy-seqmean-cispo-kl"])
def test_switches_train_end_to_end(builtin_dir, tmp_path, overrides):
  config = smoke_config(builtin_dir, **overrides)
  config.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}
  exp, metrics, _ = run_two_steps(config, str(tmp_path))
  assert exp.reference is not None  # kl_coef > 0 keeps the frozen starting policy.
  assert np.isfinite(metrics["loss/kl"]) and metrics["loss/kl"] >= 0.0
  assert ("loss/entropy_bonus" in metrics) == ("objective.entropy_coef" in overrides)
  metrics_doc.assert_documented(metrics)  # every key a step reports has its row in the doc.


def test_no_reference_policy_without_kl(builtin_dir, tmp_path):
  exp, _, ckpt, _ = loop.setup(smoke_config(builtin_dir, algo="dapo"), str(tmp_path))
  ckpt.close()
  exp.reward_runner.close()
  assert exp.reference is None and not exp.spec.keeps_reference


# |bf16 − f32| θ_old log-prob per response token of the smoke policy, nats: mean and max over a
# step's real tokens (measured 3.8e-4 / 1.7e-3; bf16 rounds activations to 2⁻⁸ relative).
_BF16_LOGP_MEAN_TOL, _BF16_LOGP_MAX_TOL = 2e-3, 1e-2


def test_bf16_rollout_trains_with_float32_master_weights(builtin_dir, tmp_path):
  """rollout.dtype=bfloat16: the guide and KL reference hold bf16 weights (on CPU as float32
  values rounded to bf16, computed in float32: `backend.rollout_compute_dtype`), θ_old is scored
  from bf16 weights within a stated tolerance of float32 (as float32 numbers), and the update
  differentiates float32 log-probs of the float32 master weights: against float32 scoring of the
  same θ_old its first ratio is 1 to float32 rounding (< 1e-5)."""
  config = smoke_config(builtin_dir, algo="mix2", **{"rollout.dtype": "bfloat16",
                                                       "objective.kl_coef": 0.05})
  config.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}
  exp, state, ckpt, _ = loop.setup(config, str(tmp_path))
  ckpt.close()
  floats = lambda t: [x for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  held = f32 if backend.on_cpu() else bf16
  in_bf16 = lambda t: all(np.array_equal(np.asarray(x.astype(bf16), np.float32),
                                         np.asarray(x, np.float32)) for x in floats(t))
  assert {x.dtype for x in floats(exp.guide[1]) + floats(exp.reference[1])} == {held}
  assert in_bf16(exp.guide[1]) and in_bf16(exp.reference[1])
  assert {x.dtype for x in floats(state.params) + floats(state.opt_state)} == {f32}
  timer, key = PhaseTimer(), jax.random.key(0)
  with jax.set_mesh(exp.mesh):
    theta32 = exp.policy.pair(state.params)
    theta16 = rl.rollout_view(exp.spec, theta32)
    assert {x.dtype for x in floats(theta16[1])} == {held} and in_bf16(theta16[1])
    for seed in range(8):  # a draw with a variance group: ON rows, whose ratio is checked below
      collected = rl.collect_policy(exp, theta16, jax.random.key(seed), 0, timer)
      if collected.stats["dynamic/variance_groups"]:
        break
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
  with pytest.raises(ValueError, match="rollout.dtype='float16': expected one of"):
    rl.resolve(smoke_config("", **{"rollout.dtype": "float16"}))
  config = smoke_config("", **{"rollout.dtype": "bfloat16"})
  assert rl.resolve(config).rollout_dtype == "bfloat16"
  config.lora.rank = 4
  with pytest.raises(ValueError, match="rollout.dtype='bfloat16': with config.lora.rank=4"):
    rl.resolve(config)
  assert rl.resolve(smoke_config("")).rollout_dtype == "model"  # default: the models as loaded.


@pytest.mark.parametrize("mode", ["none", "token", "sequence"])
def test_rollout_correction_matches_a_numpy_reference(mode):
  """TIS weights min(π_old/π_rollout, C) per token or per sequence (1 off the mask and with
  "none"), and the mismatch metrics (mean |Δ|, KL k3), against numpy in float64."""
  rng = np.random.default_rng(0)
  b, t, cap = 5, 7, 2.0
  old = rng.normal(-2.0, 1.0, (b, t)).astype(np.float32)
  # Per-row offsets: row 0's sequence ratio passes the cap, row 1's stays below 1.
  offset = np.array([-0.3, 0.2, -0.05, 0.0, 0.3])[:, None]
  rollout = (old + offset + rng.normal(0.0, 0.4, (b, t))).astype(np.float32)
  mask = (rng.random((b, t)) < 0.7).astype(np.float32)
  mask[3] = 0.0  # a row without loss tokens (a guide or padding row)
  w, metrics = rl.rollout_correction(jnp.asarray(old), jnp.asarray(rollout), jnp.asarray(mask),
                                     np.float32(cap), mode=mode)
  d = np.where(mask > 0, old.astype(np.float64) - rollout, 0.0)
  if mode == "token":
    want = np.minimum(np.exp(d), cap)
  elif mode == "sequence":
    want = np.broadcast_to(np.minimum(np.exp(d.sum(1, keepdims=True)), cap), d.shape)
  else:
    want = np.ones_like(d)
  want = np.where(mask > 0, want, 1.0)
  np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5)
  m = mask > 0
  np.testing.assert_allclose(metrics["mismatch/abs_logp_diff"], np.abs(d[m]).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["mismatch/kl"], (np.exp(d[m]) - 1 - d[m]).mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["mismatch/is_weight"], want[m].mean(), rtol=1e-5)
  if mode != "none":
    assert 0 < float(metrics["mismatch/is_capped"]) < 1 and (want[m] < 1).any()


def test_is_weights_multiply_the_per_token_objective():
  """objectives.objective with is_weight w: every set's per-token objective (value and gradient)
  is w times the unweighted one; w = 1 equals no weights."""
  rng = np.random.default_rng(1)
  b, t = 6, 5
  logp = jnp.asarray(rng.normal(-1.5, 0.3, (b, t)), jnp.float32)
  old = logp + jnp.asarray(rng.normal(0, 0.1, (b, t)), jnp.float32)
  guide = logp + jnp.asarray(rng.normal(0, 0.5, (b, t)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=b), jnp.float32)
  kind = jnp.asarray([0, 0, 1, 1, 2, 2], jnp.int32)
  mask = jnp.ones((b, t), jnp.float32)
  cfg = algorithms.get("mix2").objective_config()
  w = jnp.asarray(rng.uniform(0.2, 2.0, (b, t)), jnp.float32).at[4:].set(1.0)
  loss = lambda lp, wt: objectives.objective(lp, old, guide, adv, kind, mask, cfg, is_weight=wt)[0]
  assert float(loss(logp, jnp.ones((b, t)))) == pytest.approx(float(loss(logp, None)), abs=1e-7)
  g_w = np.asarray(jax.grad(loss)(logp, w))
  g_1 = np.asarray(jax.grad(loss)(logp, None))
  np.testing.assert_allclose(g_w, g_1 * np.asarray(w), rtol=1e-5, atol=1e-8)


def test_reward_counters_sum_over_every_draw_and_row_source(builtin_dir, tmp_path):
  """Issue 25 finding 7 / issue 29: a reward function that raises on every row (scored 0 with
  reward_on_error="zero") leaves every group without variance, so dynamic sampling uses all
  max_num_gen_batches × G prompts; metrics.jsonl and summary.json count the errors of every one
  of them and of the guide's rows, with per-source keys (main counted the last batch only)."""
  reward_file = tmp_path / "raises.py"
  reward_file.write_text("def always_raises(prompts, completions, **kwargs):\n"
                         "  raise RuntimeError('reward service down')\n")
  config = smoke_config(builtin_dir, algo="mix2", num_steps=1, eval_size=4, eval_batch_size=4,
                        **{"reward.functions": f"{reward_file}:always_raises",
                           "reward.on_error": "zero"})
  workdir = tmp_path / "run"
  summary = loop.run(config, str(workdir))
  row = [r for r in mlog.read_metrics(str(workdir)) if r["step"] == 1][0]
  r = config.rollout
  g, n, m, z, cap = r.groups, r.n, r.m, r.zero_groups, 3
  assert config.rollout.max_num_gen_batches == cap
  policy_rows, guide_rows = cap * g * n, (g + z) * m
  assert row["reward/errors"] == policy_rows + guide_rows
  assert summary["reward_errors"] == policy_rows + guide_rows
  assert row["reward/policy/errors"] == policy_rows and row["dynamic/prompts"] == cap * g
  assert row["reward/guide/errors"] == guide_rows
