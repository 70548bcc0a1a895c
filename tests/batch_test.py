"""batch.py: the Batch pytree's layout, positions and border checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixpo.batch import Batch, make_batch, positions_from_mask


def test_make_batch_layout_and_positions():
  prompt = np.array([[0, 0, 5, 6], [7, 8, 9, 10]])
  pmask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  resp = np.array([[11, 2, 0], [12, 13, 2]])
  rmask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  b = make_batch(prompt, pmask, resp, rmask, old_logp_BxN=-np.ones((2, 3)), adv_B=[1.0, -1.0],
                 kind_B=[0, 2], group_B=[3, 3])
  assert b.shape == (2, 7)
  np.testing.assert_array_equal(b.tokens_BxT[0], [0, 0, 5, 6, 11, 2, 0])
  np.testing.assert_array_equal(b.positions_BxT[0], [0, 0, 0, 1, 2, 3, 3])
  np.testing.assert_array_equal(b.positions_BxT[1], [0, 1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(b.loss_mask_BxT[0], [0, 0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(b.old_logp_BxT[0], [0, 0, 0, 0, -1, -1, -1])
  assert b.kind_B.dtype == jnp.int32 and b.adv_B.dtype == jnp.float32


def test_batch_is_a_pytree_and_take_selects_rows():
  b = make_batch(np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 3)), np.ones((4, 3)))
  leaves = jax.tree.leaves(b)
  assert len(leaves) == 10  # ref_logp_BxT is None (no KL reference): not a leaf.
  sub = b.take(np.array([1, 3]))
  assert sub.shape == (2, 5) and sub.adv_B.shape == (2,)
  doubled = jax.jit(lambda x: jax.tree.map(lambda a: a * 2, x))(b)
  assert isinstance(doubled, Batch)


def test_batch_check_rejects_bad_shapes_and_dtypes():
  b = make_batch(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 3)), np.ones((2, 3)))
  bad = Batch(**{**b.__dict__, "adv_B": jnp.zeros(3)})
  with pytest.raises(AssertionError):
    bad.check()
  bad = Batch(**{**b.__dict__, "tokens_BxT": b.tokens_BxT.astype(jnp.float32)})
  with pytest.raises(AssertionError):
    bad.check()


def test_padding_rows_have_no_loss_tokens():
  b = make_batch(np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 3)), np.ones((3, 3)),
                 real_B=[True, False, True])
  np.testing.assert_array_equal(b.real_B, [True, False, True])
  np.testing.assert_array_equal(b.loss_mask_BxT.sum(axis=1), [3, 0, 3])


def test_positions_from_mask_left_padding():
  np.testing.assert_array_equal(positions_from_mask(jnp.array([[0, 0, 1, 1, 1]])), [[0, 0, 0, 1, 2]])
