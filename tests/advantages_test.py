"""advantages.py against a numpy reference; both partition schemes on hand-made batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixpo import advantages as adv_lib
from mixpo import algorithms
from mixpo.objectives import OFF, ON, ZERO


def ref_group_adv(r, g, pool, eps=1e-6, std_normalize=True):
  out = np.zeros(len(r), np.float32)
  for gid in np.unique(g):
    idx = np.where((g == gid) & pool)[0]
    if len(idx) < 2:
      continue
    vals = r[idx]
    out[idx] = vals - vals.mean()
    if std_normalize:
      out[idx] /= vals.std(ddof=1) + eps
  return out


def advantages_for(r, g, kind, algo, real=None, std_normalize=True):
  return adv_lib.pooled_advantages(r, g, kind, algorithms.get(algo).pools, real, std_normalize)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("binary", [True, False])
def test_group_advantages_match_reference(seed, binary):
  rng = np.random.default_rng(seed)
  b = 24
  r = rng.integers(0, 2, b).astype(np.float32) if binary else rng.standard_normal(b).astype(np.float32)
  g = rng.integers(0, 5, b).astype(np.int32)
  pool = rng.uniform(size=b) < 0.7
  got = adv_lib.group_advantages(jnp.asarray(r), jnp.asarray(g), jnp.asarray(pool))
  np.testing.assert_allclose(got, ref_group_adv(r, g, pool), rtol=1e-5, atol=1e-5)


def test_group_advantages_small_pools_and_singletons():
  r = jnp.array([1.0, 0.0, 5.0, 2.0, 3.0])
  g = jnp.array([0, 0, 1, 2, 2])
  # Group 1 is a singleton; group 2 has one pool member; group 0 has a pool of size 0.
  pool = jnp.array([False, False, True, True, False])
  np.testing.assert_array_equal(adv_lib.group_advantages(r, g, pool), np.zeros(5))
  # A group with identical rewards: (R - mean) = 0, no NaN from std = 0.
  same = adv_lib.group_advantages(jnp.ones(4), jnp.zeros(4, jnp.int32), jnp.ones(4, bool))
  np.testing.assert_array_equal(same, np.zeros(4))


def test_partition_paper_scheme():
  r = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
  g = jnp.array([0, 0, 0, 1, 1, 1])
  guide = jnp.array([False, False, True, False, False, True])
  kind = adv_lib.partition(r, g, guide, "paper")
  np.testing.assert_array_equal(kind, [ON, ZERO, OFF, ZERO, ON, OFF])


def test_partition_dapo_scheme_uses_group_variance_of_policy_samples():
  # Group 0: policy rewards (1, 1) identical -> discarded by DAPO -> ZERO, even though R > 0.
  # Group 1: policy rewards (0, 1) vary -> ON for both, including the R = 0 one.
  # Group 2: all zero -> ZERO; the guide's success does not make the group "kept".
  r = jnp.array([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
  g = jnp.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  guide = jnp.array([False, False, True] * 3)
  kind = adv_lib.partition(r, g, guide, "dapo")
  np.testing.assert_array_equal(kind, [ZERO, ZERO, OFF, ON, ON, OFF, ZERO, ZERO, OFF])


def test_partition_rejects_unknown_scheme():
  with pytest.raises(ValueError, match="scheme"):
    adv_lib.partition(jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.zeros(2, bool), "literal")


def _batch():
  # Two prompts, 4 policy samples + 2 guide samples each.
  r = np.array([1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0], np.float32)
  g = np.repeat([0, 1], 6).astype(np.int32)
  guide = np.array([0, 0, 0, 0, 1, 1] * 2, bool)
  return r, g, guide


def ref_pools(algo, kind):
  """Each algorithm's pools written out by hand (paper eqs. 1-2, 6-7; LUFFY's joint one)."""
  on, zero, off = kind == ON, kind == ZERO, kind == OFF
  return {
      "grpo": [on | zero], "dapo": [on | zero], "luffy": [on | zero | off],
      "mix1": [on, off], "mix2": [on, off | zero], "chord": [on | zero],
  }[algo]


@pytest.mark.parametrize("std_normalize", [True, False])
@pytest.mark.parametrize("scheme", ["paper", "dapo"])
@pytest.mark.parametrize("algo", algorithms.names())
def test_pooled_advantages_use_the_algorithms_pools(algo, scheme, std_normalize):
  r, g, guide = _batch()
  kind = np.asarray(adv_lib.partition(jnp.asarray(r), jnp.asarray(g), jnp.asarray(guide), scheme))
  got = np.asarray(advantages_for(jnp.asarray(r), jnp.asarray(g), jnp.asarray(kind), algo,
                                  std_normalize=std_normalize))
  expect = sum(ref_group_adv(r, g, p, std_normalize=std_normalize) for p in ref_pools(algo, kind))
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", algorithms.names())
def test_padding_rows_enter_no_pool(algo):
  """A padding row (real_B False) in a real group changes nobody's advantage and gets 0."""
  r, g, guide = _batch()
  kind = np.asarray(adv_lib.partition(jnp.asarray(r), jnp.asarray(g), jnp.asarray(guide), "dapo"))
  base = np.asarray(advantages_for(jnp.asarray(r), jnp.asarray(g), jnp.asarray(kind), algo))
  # The same batch plus padding rows in group 0 with rewards that would move its mean and std.
  pad = 3
  r2 = np.concatenate([r, np.full(pad, 5.0, np.float32)])
  g2 = np.concatenate([g, np.zeros(pad, np.int32)])
  kind2 = np.concatenate([kind, np.array([ON, ZERO, OFF], np.int32)])
  real = np.concatenate([np.ones(len(r), bool), np.zeros(pad, bool)])
  got = np.asarray(advantages_for(jnp.asarray(r2), jnp.asarray(g2), jnp.asarray(kind2), algo,
                                  jnp.asarray(real)))
  np.testing.assert_array_equal(got[:len(r)], base)
  np.testing.assert_array_equal(got[len(r):], 0.0)


def test_paper_scheme_on_pool_is_degenerate_under_binary_rewards():
  """The trap the `dapo` scheme exists for: literal ON = {R > 0} has zero variance."""
  r, g, guide = _batch()
  kind = adv_lib.partition(jnp.asarray(r), jnp.asarray(g), jnp.asarray(guide), "paper")
  a = np.asarray(advantages_for(jnp.asarray(r), jnp.asarray(g), kind, "mix2"))
  assert np.all(a[np.asarray(kind) == ON] == 0.0)
  kind_d = adv_lib.partition(jnp.asarray(r), jnp.asarray(g), jnp.asarray(guide), "dapo")
  a_d = np.asarray(advantages_for(jnp.asarray(r), jnp.asarray(g), kind_d, "mix2"))
  assert np.any(a_d[np.asarray(kind_d) == ON] != 0.0)


def test_advantage_functions_jit_once():
  traces = []

  @jax.jit
  def f(r, g, guide):
    traces.append(1)
    kind = adv_lib.partition(r, g, guide, "dapo")
    return advantages_for(r, g, kind, "mix2")

  for seed in range(3):
    rng = np.random.default_rng(seed)
    f(jnp.asarray(rng.integers(0, 2, 12).astype(np.float32)), jnp.asarray(np.repeat([0, 1], 6)),
      jnp.asarray(np.array([0, 0, 0, 0, 1, 1] * 2, bool)))
  assert len(traces) == 1
