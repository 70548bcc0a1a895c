"""objectives.py against a plain numpy reference, per algorithm (the table's entries) and piece."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixpo import algorithms
from mixpo import objectives as obj
from mixpo.objectives import OFF, ON, ZERO, ObjectiveConfig, Term


def cfg_for(algo, **fields):
  """The table entry's ObjectiveConfig; the exact shaping gradient unless asked otherwise."""
  fields.setdefault("shaping_grad", "exact")
  return algorithms.get(algo).objective_config(**fields)


# ---------------------------------------------------------------- numpy reference
def ref_clip(lr, a, el, eh, dual=None):
  r = np.exp(lr)
  o = np.minimum(r * a[:, None], np.clip(r, 1 - el, 1 + eh) * a[:, None])
  if dual is not None:
    o = np.where(a[:, None] < 0, np.maximum(o, dual * a[:, None]), o)
  return o


def ref_f(lr, gamma):
  r = np.exp(lr)
  return r / (r + gamma)


def ref_mean(x, m):
  return (x * m).sum() / m.sum() if m.sum() > 0 else 0.0


def ref_objective(logp, old, guide, adv, kind, mask, algo, cfg):
  """−J of `algo` written out by hand, one branch per algorithm of the table (adding an entry
  means adding its branch: test_every_table_entry_has_a_reference fails otherwise)."""
  m_on = mask * (kind == ON)[:, None]
  m_zero = mask * (kind == ZERO)[:, None]
  m_off = mask * (kind == OFF)[:, None]
  clip_on = ref_clip(logp - old, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
  shaped = ref_f(logp - guide, cfg.gamma) * adv[:, None]
  zero_ref = old if cfg.zero_ratio == "old" else guide
  clip_zero = ref_clip(logp - zero_ref, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
  j_on = ref_mean(clip_on, m_on)
  j_off = ref_mean(shaped, m_off)
  denom = m_off.sum() + m_zero.sum()
  j_mix = ((shaped * m_off).sum() + (clip_zero * m_zero).sum()) / denom if denom else 0.0
  w = cfg.on_weight
  if algo == "dapo":
    return -j_on
  if algo == "grpo":
    sym = ref_clip(logp - old, adv, cfg.eps_low, cfg.eps_low, cfg.dual_clip)
    per_seq = [ref_mean(sym[i], m_on[i]) for i in range(len(adv)) if m_on[i].sum() > 0]
    return -(np.mean(per_seq) if per_seq else 0.0)
  if algo == "mix1":
    return -(w * j_on + (1 - w) * j_off)
  if algo == "mix2":
    return -(w * j_on + (1 - w) * j_mix)
  if algo == "luffy":
    n = m_on.sum() + m_off.sum()
    return -(((clip_on * m_on).sum() + (shaped * m_off).sum()) / n if n else 0.0)
  if algo == "chord":  # CHORD with a constant μ: (1 − μ)·J_on + μ·token mean of log π on OFF.
    mu = cfg.sft_coef
    return -((1 - mu) * j_on + mu * ref_mean(logp, m_off))
  raise KeyError(algo)


def random_batch(seed, b=6, t=7, scale=0.5):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.1, 3.0, (b, t)).astype(np.float32)
  old = (logp + scale * rng.standard_normal((b, t))).astype(np.float32)
  guide = (logp + 2 * scale * rng.standard_normal((b, t))).astype(np.float32)
  adv = rng.standard_normal(b).astype(np.float32)
  kind = np.array([ON, ZERO, OFF, ON, OFF, ZERO][:b], np.int32)
  mask = (rng.uniform(size=(b, t)) < 0.8).astype(np.float32)
  return logp, old, guide, adv, kind, mask


ALGOS = algorithms.names()
ALL_CFGS = [(a, {}) for a in ALGOS] + [(a, {"dual_clip": None}) for a in ALGOS] + [
    ("mix2", dict(on_weight=0.3, gamma=0.5, dual_clip=3.0)),
    ("dapo", dict(eps_low=0.1, eps_high=0.4, dual_clip=2.0)),
    ("mix2", dict(zero_ratio="old")),
    ("chord", dict(sft_coef=0.7)),
]


def test_every_table_entry_has_a_reference():
  args = random_batch(0)
  for algo in ALGOS:
    ref_objective(*args, algo, cfg_for(algo))  # KeyError: write the new entry's reference.


@pytest.mark.parametrize("algo,fields", ALL_CFGS, ids=lambda x: str(x))
@pytest.mark.parametrize("seed", [0, 1])
def test_objective_matches_numpy_reference(algo, fields, seed):
  args = random_batch(seed)
  cfg = cfg_for(algo, **fields)
  loss, metrics = obj.objective(*map(jnp.asarray, args), cfg)
  np.testing.assert_allclose(loss, ref_objective(*args, algo, cfg), rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(metrics["loss"]))


def test_pieces_match_reference():
  logp, old, guide, adv, kind, mask = random_batch(3)
  cfg = cfg_for("mix2", dual_clip=3.0)
  o, clipped = obj.clip_objective(jnp.asarray(logp - old), jnp.asarray(adv), 0.2, 0.28, 3.0)
  np.testing.assert_allclose(o, ref_clip(logp - old, adv, 0.2, 0.28, 3.0), rtol=1e-6)
  assert set(np.unique(np.asarray(clipped))) <= {0.0, 1.0}
  s, f = obj.shaped_offpolicy(jnp.asarray(logp - guide), jnp.asarray(adv), 0.1)
  np.testing.assert_allclose(f, ref_f(logp - guide, 0.1), rtol=1e-5)
  np.testing.assert_allclose(s, ref_f(logp - guide, 0.1) * adv[:, None], rtol=1e-5, atol=1e-7)
  a = list(map(jnp.asarray, (logp, old, guide, adv, kind, mask)))
  _, met = obj.objective(*a, cfg)
  jon, jmix = met["j_on"], met["j_mix"]
  m_on = mask * (kind == ON)[:, None]
  np.testing.assert_allclose(jon, ref_mean(ref_clip(logp - old, adv, .2, .28, 3.0), m_on), 1e-5)
  joff = obj.objective(*a, cfg_for("mix1"))[1]["j_off"]
  m_off = mask * (kind == OFF)[:, None]
  np.testing.assert_allclose(joff, ref_mean(ref_f(logp - guide, .1) * adv[:, None], m_off), 1e-5)
  m_zero = mask * (kind == ZERO)[:, None]
  expect = ((ref_f(logp - guide, .1) * adv[:, None] * m_off).sum()
            + (ref_clip(logp - guide, adv, .2, .28, 3.0) * m_zero).sum()) / (m_off.sum() + m_zero.sum())
  np.testing.assert_allclose(jmix, expect, rtol=1e-5)
  assert float(met["tokens_zero"]) == m_zero.sum() and float(met["tokens_off"]) == m_off.sum()


def test_clip_fraction_counts_only_active_clips():
  lr = jnp.log(jnp.array([[0.5, 1.0, 1.5]]))
  _, clipped_pos = obj.clip_objective(lr, jnp.array([1.0]), 0.2, 0.28)
  _, clipped_neg = obj.clip_objective(lr, jnp.array([-1.0]), 0.2, 0.28)
  # A>0: only r > 1+eps_high is clipped; A<0: only r < 1-eps_low.
  np.testing.assert_array_equal(clipped_pos, [[0.0, 0.0, 1.0]])
  np.testing.assert_array_equal(clipped_neg, [[1.0, 0.0, 0.0]])


@pytest.mark.parametrize("algo", ALGOS)
def test_empty_sets_give_zero_not_nan(algo):
  b, t = 4, 5
  z = jnp.zeros((b, t))
  cfg = cfg_for(algo)
  # All rows masked out.
  loss, metrics = obj.objective(z, z, z, jnp.ones(b), jnp.zeros(b, jnp.int32), z, cfg)
  assert float(loss) == 0.0
  assert all(np.isfinite(float(v)) for v in metrics.values())
  # Every row is OFF: the on-policy part is empty.
  loss, _ = obj.objective(z, z, z, jnp.ones(b), jnp.full(b, OFF, jnp.int32), jnp.ones((b, t)), cfg)
  assert np.isfinite(float(loss))
  g = jax.grad(lambda lp: obj.objective(lp, z, z, jnp.ones(b), jnp.full(b, ZERO, jnp.int32),
                                        jnp.ones((b, t)), cfg)[0])(z)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("big", [1e4, -1e4])
def test_extreme_log_ratios_keep_loss_and_grads_finite(algo, big):
  logp, old, guide, adv, kind, mask = map(jnp.asarray, random_batch(5))
  cfg = cfg_for(algo)
  old = old.at[:, 2].add(big)
  guide = guide.at[:, 3].add(-big)
  loss_fn = lambda lp: obj.objective(lp, old, guide, adv, kind, mask, cfg)[0]
  loss, g = jax.value_and_grad(loss_fn)(logp)
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(g)))


def test_masked_garbage_does_not_leak():
  logp, old, guide, adv, kind, mask = map(jnp.asarray, random_batch(7))
  cfg = cfg_for("mix2")
  poisoned = jnp.where(mask > 0, old, jnp.inf)
  loss_clean, _ = obj.objective(logp, old, guide, adv, kind, mask, cfg)
  loss_fn = lambda lp: obj.objective(lp, poisoned, jnp.where(mask > 0, guide, -jnp.inf),
                                     adv, kind, mask, cfg)[0]
  loss, g = jax.value_and_grad(loss_fn)(logp)
  np.testing.assert_allclose(loss, loss_clean, rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(g)))


def test_j_off_gradient_carries_the_ratio_factor():
  """d J_off / d logp = γ r̂/(r̂+γ)² · A / n_tokens: the r̂ factor the paper's argument drops."""
  logp, _, guide, adv, _, mask = random_batch(11)
  kind = np.full(len(adv), OFF, np.int32)
  cfg = ObjectiveConfig(terms=(Term(sets=(OFF,)),), gamma=0.1, shaping_grad="exact")
  fn = lambda lp: -obj.objective(lp, lp, jnp.asarray(guide), jnp.asarray(adv), jnp.asarray(kind),
                                 jnp.asarray(mask), cfg)[0]
  g = np.asarray(jax.grad(fn)(jnp.asarray(logp)))
  r = np.exp(logp - guide)
  expect = cfg.gamma * r / (r + cfg.gamma) ** 2 * adv[:, None] * mask / mask.sum()
  np.testing.assert_allclose(g, expect, rtol=1e-4, atol=1e-8)


def test_f_is_computed_in_log_space():
  # exp(±200) overflows float32; sigmoid in log space must still give 1 and 0.
  _, f = obj.shaped_offpolicy(jnp.array([[200.0, -200.0, 0.0]]), jnp.ones(1), 0.1)
  np.testing.assert_allclose(f, [[1.0, 0.0, 1 / 1.1]], rtol=1e-6)


def test_config_is_hashable_and_validates():
  assert hash(ObjectiveConfig()) == hash(ObjectiveConfig())
  assert hash(cfg_for("mix2")) == hash(cfg_for("mix2"))
  for bad in [dict(terms=()), dict(gamma=0.0), dict(on_weight=1.5), dict(dual_clip=0.5),
              dict(eps_low=1.0), dict(max_log_ratio=0.0), dict(zero_ratio="new"),
              dict(loss_agg="sum"), dict(ratio_form="row"), dict(kl_estimator="k4"),
              dict(kl_coef=-1.0), dict(cispo_eps_high=-0.1), dict(sft_coef=1.5),
              dict(entropy_agg="sum")]:
    with pytest.raises(ValueError, match=next(iter(bad))):
      ObjectiveConfig(**bad)
  with pytest.raises(ValueError, match="loss_agg_tokens"):
    ObjectiveConfig(loss_agg="seq-mean-token-sum-norm")
  with pytest.raises(ValueError, match="ratio_level"):
    algorithms.get("dapo").objective_config(ratio_level="row")
  with pytest.raises(ValueError, match="Term.form"):
    Term(sets=(ON,), form="nope")


def test_library_defaults_agree_with_the_experiment_config():
  """The experiment config and ObjectiveConfig name the same defaults (one source of truth)."""
  from experiments.configs import default
  c = default.get_config()
  d = ObjectiveConfig()
  fields = {f.name for f in dataclasses.fields(ObjectiveConfig)}
  # The config's spellings that Algorithm.objective_config maps: the algorithm's own loss_agg,
  # the ratio form named by two switches.
  assert set(c.objective) - fields == {"ratio_level", "cispo"}
  for field in sorted(set(c.objective) & fields - {"loss_agg"}):
    assert getattr(d, field) == c.objective[field], field
  assert c.objective.loss_agg == "default"
  assert d.ratio_form == obj.ratio_form(c.objective.ratio_level, c.objective.cispo)


@pytest.mark.parametrize("algo", ALGOS)
def test_jit_compiles_once_per_shape(algo):
  cfg = cfg_for(algo)
  traces = []

  @jax.jit
  def f(*a):
    traces.append(1)
    return obj.objective(*a, cfg)[0]

  for seed in range(3):
    f(*map(jnp.asarray, random_batch(seed)))
  assert len(traces) == 1


@pytest.mark.parametrize("algo", ALGOS)
def test_micro_batch_sum_with_shared_denominators_equals_full_batch(algo):
  args = list(map(jnp.asarray, random_batch(13)))
  cfg = cfg_for(algo)
  kind, mask = args[4], args[5]
  d = obj.denominators(kind, mask)
  full_fn = lambda lp: obj.objective(lp, *args[1:], cfg)[0]

  def split_fn(lp):
    total = 0.0
    for idx in (slice(0, 2), slice(2, 4), slice(4, 6)):
      a = [x[idx] for x in [lp] + args[1:]]
      total = total + obj.objective(*a, cfg, denoms=d)[0]
    return total

  np.testing.assert_allclose(split_fn(args[0]), full_fn(args[0]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.grad(split_fn)(args[0]), jax.grad(full_fn)(args[0]),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algo", ["dapo", "mix2"])
def test_nan_from_non_finite_logp_on_real_tokens_is_not_clipped_away(algo):
  logp, old, guide, adv, kind, mask = map(jnp.asarray, random_batch(8))
  kind = jnp.full_like(kind, ON)
  mask = jnp.ones_like(mask)
  loss, _ = obj.objective(logp, old.at[0, 0].set(-jnp.inf), guide, adv, kind, mask,
                          cfg_for(algo))
  assert np.isnan(float(loss))


def test_paper_step_gradient_is_f_prime_without_the_ratio_factor():
  """shaping_grad="paper_step": same loss, gradient γ/(r̂+γ)²·A (up to 1/γ for r̂ → 0)."""
  logp, _, guide, adv, _, mask = random_batch(12)
  kind = np.full(len(adv), OFF, np.int32)
  off = (Term(sets=(OFF,)),)
  exact = ObjectiveConfig(terms=off, gamma=0.1, shaping_grad="exact")
  step = ObjectiveConfig(terms=off, gamma=0.1, shaping_grad="paper_step")
  fn = lambda cfg: lambda lp: -obj.objective(lp, lp, jnp.asarray(guide), jnp.asarray(adv),
                                             jnp.asarray(kind), jnp.asarray(mask), cfg)[0]
  np.testing.assert_allclose(fn(step)(jnp.asarray(logp)), fn(exact)(jnp.asarray(logp)), rtol=1e-6)
  g = np.asarray(jax.grad(fn(step))(jnp.asarray(logp)))
  r = np.exp(logp - guide)
  expect = 0.1 / (r + 0.1) ** 2 * adv[:, None] * mask / mask.sum()
  np.testing.assert_allclose(g, expect, rtol=1e-4, atol=1e-8)
  # Far from the guide the step approaches A/γ per token, as the paper's argument says.
  _, f = obj.shaped_offpolicy(jnp.array([[-30.0]]), jnp.ones(1), 0.1)
  gw = jax.grad(lambda x: obj.shaped_offpolicy(x, jnp.ones(1), 0.1, "paper_step")[0].sum())(
      jnp.array([[-30.0]]))
  np.testing.assert_allclose(gw, [[10.0]], rtol=1e-4)


# ---------------------------------------------------------------- switches
TRAINED = {"grpo": (ON,), "dapo": (ON,), "luffy": (ON, OFF), "mix1": (ON, OFF),
           "mix2": (ON, ZERO, OFF), "chord": (ON, OFF)}


def ref_switched(logp, old, guide, adv, kind, mask, algo, cfg, ref=None, ent=None, sg_logp=None):
  """−J of `algo` under cfg's switches, in float64 numpy (independent of objectives.py).

  CISPO's weight is a constant: computed from `sg_logp` (default `logp`), its term is
  w·A·exp(log r − log r_sg), whose value at logp = sg_logp is w·A and whose derivative there is
  w·A, so a finite difference in `logp` at fixed `sg_logp` is CISPO's gradient."""
  logp, old, guide = (np.asarray(x, np.float64) for x in (logp, old, guide))
  sg_logp = logp if sg_logp is None else np.asarray(sg_logp, np.float64)
  masks = {k: mask * (kind == k)[:, None] for k in (ON, ZERO, OFF)}

  def clipped(lr, sg_lr, m):
    el, eh = cfg.eps_low, cfg.eps_high
    if cfg.ratio_form.startswith("sequence-"):
      seq = lambda x: np.broadcast_to(((x * m).sum(1) / np.maximum(m.sum(1), 1))[:, None], x.shape)
      lr, sg_lr = seq(lr), seq(sg_lr)
      el, eh = cfg.seq_eps_low, cfg.seq_eps_high
    if cfg.ratio_form.endswith("cispo"):
      w = np.clip(np.exp(sg_lr), 1 - cfg.cispo_eps_low, 1 + cfg.cispo_eps_high)
      return w * adv[:, None] * np.exp(lr - sg_lr)
    return ref_clip(lr, adv, el, eh, cfg.dual_clip)

  zero_ref = old if cfg.zero_ratio == "old" else guide
  per_token = {ON: clipped(logp - old, sg_logp - old, masks[ON]),
               ZERO: clipped(logp - zero_ref, sg_logp - zero_ref, masks[ZERO]),
               OFF: ref_f(logp - guide, cfg.gamma) * adv[:, None], "sft": logp}

  def num(x, m):
    if cfg.loss_agg == "token-mean":
      return (x * m).sum()
    if cfg.loss_agg == "seq-mean-token-mean":
      return ((x * m).sum(1) / np.maximum(m.sum(1), 1)).sum()
    return (x * m).sum() / cfg.loss_agg_tokens

  def den(k):
    m = masks[k]
    return m.sum() if cfg.loss_agg == "token-mean" else (m.sum(1) > 0).sum()

  def j(sets, norm=None, form=None):
    d = sum(den(k) for k in (norm or sets))
    return sum(num(per_token[form or k], masks[k]) for k in sets) / max(d, 1)

  w = cfg.on_weight
  jj = {"grpo": lambda: j((ON,)), "dapo": lambda: j((ON,)),
        "luffy": lambda: j((ON,), (ON, OFF)) + j((OFF,), (ON, OFF)),
        "mix1": lambda: w * j((ON,)) + (1 - w) * j((OFF,)),
        "mix2": lambda: w * j((ON,)) + (1 - w) * j((OFF, ZERO)),
        "chord": lambda: (1 - cfg.sft_coef) * j((ON,)) + cfg.sft_coef * j((OFF,), form="sft"),
        }[algo]()
  loss = -jj
  m_all = sum(masks[k] for k in TRAINED[algo])
  d_all = max(sum(den(k) for k in TRAINED[algo]), 1)
  if cfg.kl_coef:
    x = np.asarray(ref, np.float64) - logp
    kl = {"k1": -x, "k2": x ** 2 / 2, "k3": np.exp(x) - 1 - x}[cfg.kl_estimator]
    loss += cfg.kl_coef * num(kl, m_all) / d_all
  if cfg.entropy_coef and cfg.entropy_agg == "token-mean":
    loss -= cfg.entropy_coef * (np.asarray(ent, np.float64) * m_all).sum() / max(m_all.sum(), 1)
  elif cfg.entropy_coef:
    loss -= cfg.entropy_coef * num(np.asarray(ent, np.float64), m_all) / d_all
  return loss


def numeric_grad(fn, x, h=1e-4):
  g = np.zeros_like(x, np.float64)
  for idx in np.ndindex(x.shape):
    xp, xm = x.astype(np.float64), x.astype(np.float64)
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (fn(xp) - fn(xm)) / (2 * h)
  return g


SWITCHES = [
    dict(loss_agg="token-mean"), dict(loss_agg="seq-mean-token-mean"),
    dict(loss_agg="seq-mean-token-sum-norm", loss_agg_tokens=9),
    dict(ratio_level="sequence", seq_eps_low=0.05, seq_eps_high=0.08),
    dict(kl_coef=0.3, kl_estimator="k1"), dict(kl_coef=0.3, kl_estimator="k2"),
    dict(kl_coef=0.3, kl_estimator="k3"), dict(entropy_coef=0.2),
    dict(entropy_coef=0.2, entropy_agg="token-mean", loss_agg="seq-mean-token-sum-norm",
         loss_agg_tokens=9),
    dict(loss_agg="seq-mean-token-mean", ratio_level="sequence", kl_coef=0.1, entropy_coef=0.1),
    dict(cispo=True, cispo_eps_low=0.03, cispo_eps_high=0.02),
    dict(cispo=True, cispo_eps_low=0.03, cispo_eps_high=0.02, loss_agg="seq-mean-token-mean",
         kl_coef=0.1),
]


@pytest.mark.parametrize("switch", SWITCHES,
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("algo", ALGOS)
def test_switches_match_numpy_reference_loss_and_gradient(algo, switch):
  logp, old, guide, adv, kind, mask = random_batch(21, scale=0.05)
  rng = np.random.default_rng(4)
  ref = (logp + 0.3 * rng.standard_normal(logp.shape)).astype(np.float32)
  ent = rng.uniform(0.5, 2.0, logp.shape).astype(np.float32)
  cfg = cfg_for(algo, dual_clip=None, **switch)
  fn = lambda lp, e: obj.objective(lp, jnp.asarray(old), jnp.asarray(guide), jnp.asarray(adv),
                                   jnp.asarray(kind), jnp.asarray(mask), cfg,
                                   ref_logp=jnp.asarray(ref), entropy=e)[0]
  loss, (g_logp, g_ent) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(logp),
                                                                 jnp.asarray(ent))
  ref_fn = lambda lp, e=ent: ref_switched(lp, old, guide, adv, kind, mask, algo, cfg, ref, e,
                                          sg_logp=logp)
  np.testing.assert_allclose(loss, ref_fn(logp), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_logp, numeric_grad(ref_fn, logp), rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(g_ent, numeric_grad(lambda e: ref_fn(logp, e), ent), rtol=2e-3,
                             atol=2e-5)


@pytest.mark.parametrize("algo", ALGOS)
def test_cispo_weight_is_clipped_and_stop_gradient(algo):
  """CISPO: value sg(ŵ)·A, gradient sg(ŵ)·A·∇log π / N on every ON (and ZERO) token."""
  logp, old, guide, adv, kind, mask = random_batch(22, scale=0.5)
  cfg = cfg_for(algo, cispo=True, cispo_eps_low=0.5, cispo_eps_high=0.2)
  args = [jnp.asarray(x) for x in (old, guide, adv, kind, mask)]
  loss, g = jax.value_and_grad(lambda lp: obj.objective(lp, *args, cfg)[0])(jnp.asarray(logp))
  np.testing.assert_allclose(loss, ref_switched(logp, old, guide, adv, kind, mask, algo, cfg),
                             rtol=1e-5, atol=1e-6)
  if algo == "dapo":  # J = token mean over ON: the gradient in closed form.
    m_on = mask * (kind == ON)[:, None]
    w = np.clip(np.exp(logp - old), 0.5, 1.2)
    np.testing.assert_allclose(g, -w * adv[:, None] * m_on / m_on.sum(), rtol=1e-5, atol=1e-7)
    clipped = ((np.exp(logp - old) < 0.5) | (np.exp(logp - old) > 1.2)) & (m_on > 0)
    assert clipped.any() and np.all(np.asarray(g)[clipped] != 0.0)  # clipped tokens still learn.


def test_kl_estimators_on_hand_made_log_probs():
  """x = log π_ref − log πθ = (−1, 0, 1): k1 = −x, k2 = x²/2, k3 = eˣ − 1 − x; d/dlogp likewise."""
  logp = jnp.array([[-1.0, -2.0, -3.0]])
  ref = jnp.array([[-2.0, -2.0, -2.0]])
  x = np.array([-1.0, 0.0, 1.0])
  want = {"k1": (-x, np.ones(3)), "k2": (x ** 2 / 2, -x), "k3": (np.exp(x) - 1 - x, 1 - np.exp(x))}
  for est, (value, grad) in want.items():
    np.testing.assert_allclose(obj.kl_penalty(logp, ref, est)[0], value, rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda lp: obj.kl_penalty(lp, ref, est).sum())(logp)
    np.testing.assert_allclose(g[0], grad, rtol=1e-6, atol=1e-7)
  # k3 >= 0 everywhere and 0 only at x = 0; k1 can be negative.
  assert np.all(np.asarray(obj.kl_penalty(logp, ref, "k3")) >= 0)
  assert float(obj.kl_penalty(logp, ref, "k1")[0, 2]) < 0


def test_gspo_sequence_ratio_and_clipping():
  """s_i = exp(mean_t log r_t) over the row's tokens, clipped to [1 − 3e-4, 1 + 4e-4]."""
  lr = jnp.array([[0.1, 0.3, 9.0], [-0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
  s = obj.sequence_log_ratio(lr, mask)
  np.testing.assert_allclose(s, [[0.2] * 3, [-0.2 / 3] * 3, [0.0] * 3], rtol=1e-6, atol=1e-7)
  cfg = ObjectiveConfig(ratio_form="sequence-clip", dual_clip=None)
  adv = jnp.array([1.0, -1.0, 1.0])
  kind = jnp.zeros(3, jnp.int32)
  old = jnp.zeros((3, 3))
  loss, m = obj.objective(lr, old, old, adv, kind, mask, cfg)
  # Row 0: s = e^0.2 > 1 + 4e-4 with A > 0 → clipped at 1.0004; row 1: s = e^-0.067 < 1 − 3e-4
  # with A < 0 → clipped at 0.9997; every token of a row carries its row's value.
  want = -(2 * 1.0004 * 1.0 + 3 * 0.9997 * -1.0) / 5
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(m["clipfrac_on"]) == 1.0
  g = jax.grad(lambda x: obj.objective(x, old, old, adv, kind, mask, cfg)[0])(lr)
  np.testing.assert_array_equal(g, np.zeros((3, 3)))  # both rows clipped: no gradient.
  # Inside the range the gradient of a row's objective is spread as A·s/|y_i| per token.
  small = lr * 1e-4
  g = jax.grad(lambda x: obj.objective(x, old, old, adv, kind, mask, cfg)[0])(small)
  s0 = float(np.exp(np.asarray(obj.sequence_log_ratio(small, mask))[0, 0]))
  np.testing.assert_allclose(g[0, :2], [-s0 / 2 * 2 / 5] * 2, rtol=1e-5)


@pytest.mark.parametrize("switch", [
    dict(loss_agg="token-mean"), dict(loss_agg="seq-mean-token-mean"),
    dict(loss_agg="seq-mean-token-sum-norm", loss_agg_tokens=7),
    dict(loss_agg="seq-mean-token-mean", ratio_level="sequence", kl_coef=0.2, entropy_coef=0.1)],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_accumulation_over_micro_batches_equals_the_minibatch(algo, switch, micro):
  logp, old, guide, adv, kind, mask = random_batch(13, b=8)
  kind = np.array([ON, ZERO, OFF, ON, OFF, ZERO, ON, OFF], np.int32)
  rng = np.random.default_rng(5)
  ref = jnp.asarray(logp + 0.2 * rng.standard_normal(logp.shape), jnp.float32)
  ent = jnp.asarray(rng.uniform(0.5, 2.0, logp.shape), jnp.float32)
  args = list(map(jnp.asarray, (logp, old, guide, adv, kind, mask)))
  cfg = cfg_for(algo, **switch)
  d = obj.denominators(args[4], args[5])
  full_fn = lambda lp: obj.objective(lp, *args[1:], cfg, ref_logp=ref, entropy=ent)[0]

  def split_fn(lp):
    total, rows = 0.0, 8 // micro
    for i in range(micro):
      idx = slice(i * rows, (i + 1) * rows)
      a = [x[idx] for x in [lp] + args[1:]]
      total = total + obj.objective(*a, cfg, denoms=d, ref_logp=ref[idx], entropy=ent[idx])[0]
    return total

  np.testing.assert_allclose(split_fn(args[0]), full_fn(args[0]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.grad(split_fn)(args[0]), jax.grad(full_fn)(args[0]),
                             rtol=1e-5, atol=1e-7)


def test_denominators_are_named():
  kind = jnp.array([ON, ZERO, OFF, ON], jnp.int32)
  mask = jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
  d = obj.denominators(kind, mask)
  assert (float(d.tokens_on), float(d.tokens_zero), float(d.tokens_off)) == (2.0, 1.0, 2.0)
  assert (float(d.seqs_on), float(d.seqs_zero), float(d.seqs_off)) == (1.0, 1.0, 1.0)
  assert float(d.of(OFF)) == 2.0 and float(d.of(OFF, "seq-mean-token-mean")) == 1.0


# ---------------------------------------------------------------- the bound only where exp needs it
def test_cispo_keeps_the_gradient_of_far_off_policy_tokens():
  """|log r| > 20: the token still gets −sg(ŵ)·A / N (verl's and TRL's CISPO keep it too)."""
  cfg = ObjectiveConfig(ratio_form="cispo", cispo_eps_low=1.0, cispo_eps_high=0.28)
  old = jnp.array([[-1.0, -1.0, -1.0]])
  logp = jnp.array([[-31.0, 29.0, -1.2]])  # log r = −30, +30, −0.2
  adv, kind, mask = jnp.array([2.0]), jnp.zeros(1, jnp.int32), jnp.ones((1, 3))
  g = jax.grad(lambda lp: obj.objective(lp, old, old, adv, kind, mask, cfg)[0])(logp)
  w = np.clip(np.exp([-20.0, 20.0, -0.2]), 0.0, 1.28)  # the weight's exp is bounded, not its carrier
  np.testing.assert_allclose(g, -w[None] * 2.0 / 3, rtol=1e-6)
  assert float(g[0, 1]) != 0.0


def test_kl_k1_k2_are_not_clipped_and_k3_only_in_its_exp():
  logp = jnp.array([[-31.0, 29.0]])
  ref = jnp.array([[-1.0, -1.0]])  # x = ref − logp = 30, −30
  np.testing.assert_allclose(obj.kl_penalty(logp, ref, "k1"), [[-30.0, 30.0]])
  np.testing.assert_allclose(obj.kl_penalty(logp, ref, "k2"), [[450.0, 450.0]])
  np.testing.assert_allclose(obj.kl_penalty(logp, ref, "k3"),
                             [[np.exp(20.0) - 31.0, np.exp(-20.0) - 1.0 + 30.0]], rtol=1e-6)
  for est, want in (("k1", [[1.0, 1.0]]), ("k2", [[-30.0, 30.0]]), ("k3", [[1.0, 1.0 - np.exp(-20.0)]])):
    g = jax.grad(lambda lp: obj.kl_penalty(lp, ref, est).sum())(logp)
    np.testing.assert_allclose(g, want, rtol=1e-6)


def test_paper_step_keeps_the_largest_off_policy_steps():
  """OFF tokens with log r̂ < −20, the ones the guide is surest of and the policy least, get the
  paper's step ≈ A/γ, as at log r̂ = −19."""
  cfg = ObjectiveConfig(terms=(Term(sets=(OFF,)),), gamma=0.1, shaping_grad="paper_step")
  guide = jnp.zeros((1, 3))
  logp = jnp.array([[-19.0, -25.0, -60.0]])
  adv, kind, mask = jnp.array([1.0]), jnp.full(1, OFF, jnp.int32), jnp.ones((1, 3))
  g = jax.grad(lambda lp: -obj.objective(lp, logp, guide, adv, kind, mask, cfg)[0])(logp)
  np.testing.assert_allclose(g, np.full((1, 3), 10.0 / 3), rtol=1e-5)


def test_gspo_bounds_the_sequence_ratio_after_the_mean():
  """One token past ±20 moves its row's log s by its own log-ratio / |y|, not by a clipped one."""
  cfg = ObjectiveConfig(ratio_form="sequence-clip", seq_eps_low=0.5, seq_eps_high=0.5,
                        dual_clip=None)
  old = jnp.zeros((1, 2))
  logp = jnp.array([[30.0, -29.9]])  # mean log r = 0.05
  adv, kind, mask = jnp.array([1.0]), jnp.zeros(1, jnp.int32), jnp.ones((1, 2))
  loss, g = jax.value_and_grad(lambda lp: obj.objective(lp, old, old, adv, kind, mask, cfg)[0])(
      logp)
  np.testing.assert_allclose(loss, -np.exp(0.05), rtol=1e-6)
  np.testing.assert_allclose(g, [[-np.exp(0.05) / 2] * 2], rtol=1e-5)
  # The row mean itself past the bound: s is held at e^20 (a constant, no overflow).
  far = jnp.array([[50.0, 40.0]])
  loss, g = jax.value_and_grad(lambda lp: obj.objective(lp, old, old, -adv, kind, mask, cfg)[0])(
      far)
  np.testing.assert_allclose(loss, np.exp(20.0), rtol=1e-6)
  np.testing.assert_array_equal(g, np.zeros((1, 2)))


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_seq_mean_counts_rows_with_a_loss_token(loss_agg):
  """SEQ_ROWS: a fully masked row (a truncated response under mask_truncated, a padding slot)
  changes neither the loss nor its gradient (TRL and verl's trainer would count it)."""
  logp, old, guide, adv, kind, mask = random_batch(31)
  kind = np.full_like(kind, ON)
  cfg = cfg_for("dapo", loss_agg=loss_agg, loss_agg_tokens=7)
  args = lambda m: [jnp.asarray(x) for x in (old, guide, adv, kind, m)]
  full = lambda lp, m: obj.objective(lp, *args(m), cfg)[0]
  masked = mask.copy()
  masked[0] = 0.0
  dropped = [x[1:] for x in (logp, old, guide, adv, kind, mask)]
  want = obj.objective(*map(jnp.asarray, dropped), cfg)[0]
  np.testing.assert_allclose(full(jnp.asarray(logp), masked), want, rtol=1e-6)
  g = jax.grad(full)(jnp.asarray(logp), masked)
  g_dropped = jax.grad(lambda lp: obj.objective(lp, *map(jnp.asarray, dropped[1:]), cfg)[0])(
      jnp.asarray(dropped[0]))
  np.testing.assert_allclose(g[1:], g_dropped, rtol=1e-6)
  assert obj.SEQ_ROWS == "rows with a loss token"


def test_luffy_paper_weighs_entropy_as_luffy_does():
  """luffy_paper's J is LUFFY's micro-batch loss (Σ pg / T − 0.001 · token mean of H, written
  from its paper and its loss code) divided by the rows it sums over: value and gradient w.r.t.
  the log-probs and the entropies, on a batch of the preset's rows."""
  from experiments.configs import luffy_paper  # noqa: PLC0415
  from mixpo import rl  # noqa: PLC0415
  c = luffy_paper.get_config()
  cfg = rl._objective_config(c, algorithms.get(c.algo))
  r = c.rollout
  rows, t = r.groups * (r.n + r.m) // c.step.num_minibatches, r.max_new_tokens
  rng = np.random.default_rng(0)
  logp = -rng.uniform(0.01, 4.0, (rows, t))
  old = logp + 0.3 * rng.standard_normal((rows, t))
  adv = rng.standard_normal(rows)
  is_off = np.arange(rows) % (c.rollout.n + c.rollout.m) == c.rollout.n  # one trace a group
  kind = np.where(is_off, OFF, ON).astype(np.int32)
  mask = (np.arange(t)[None] < rng.integers(1, t + 1, rows)[:, None]).astype(np.float64)
  ent = rng.uniform(0.1, 3.0, (rows, t))

  def luffy(lp, e):  # policy_loss = Σ m·pg / T − entropy_coeff · token mean of H (ρ ≡ 1: no clip)
    pg_on = -adv[:, None] * np.exp(lp - old)
    p = np.exp(lp)
    pg_off = -adv[:, None] * p / (p + 0.1)
    pg = np.where(is_off[:, None], pg_off, pg_on)
    return (pg * mask).sum() / t - 0.001 * (e * mask).sum() / mask.sum()

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  fn = lambda lp, e: obj.objective(lp, f32(old), jnp.zeros((rows, t)), f32(adv), jnp.asarray(kind),
                                   f32(mask), cfg, entropy=e)[0]
  loss, (g_lp, g_e) = jax.value_and_grad(fn, argnums=(0, 1))(f32(logp), f32(ent))
  np.testing.assert_allclose(loss, luffy(logp, ent) / rows, rtol=2e-5)
  h = 1e-6
  np.testing.assert_allclose(g_e, -0.001 * mask / mask.sum() / rows, rtol=1e-5, atol=1e-12)
  idx = (3, 2)
  bump = np.zeros_like(logp)
  bump[idx] = h
  fd = (luffy(logp + bump, ent) - luffy(logp - bump, ent)) / (2 * h) / rows
  np.testing.assert_allclose(g_lp[idx], fd, rtol=1e-3)
