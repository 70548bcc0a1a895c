"""Tests for mixpo.checkpoint: exact resume, keep-N, async saves, corrupt fallback, fingerprints."""

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixpo import checkpoint as ckpt_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array
  rng: jax.Array


class _Block(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.Linear(4, 8, rngs=rngs)
    self.mlp = nnx.Linear(8, 4, use_bias=False, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)


def _state(seed: int = 0, step: int = 3) -> _State:
  """A small TrainState-like pytree with nested nnx params and a non-trivial adamw state."""
  params = nnx.state(_Block(nnx.Rngs(seed)), nnx.Param)
  opt = optax.adamw(1e-2)
  opt_state = opt.init(params)
  for _ in range(2):  # Moments and count become non-zero.
    grads = jax.tree.map(lambda p: jnp.sin(p * 3.0 + seed), params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  rng = jax.random.key_data(jax.random.key(seed + 100))
  return _State(params, opt_state, jnp.int32(step), rng)


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert x.sharding == y.sharding


def _largest_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns]
  return max(files, key=os.path.getsize)


def _save_steps(directory, steps, **kw):
  kw = {"save_every": 1, "keep": 5, "async_save": False, **kw}
  with ckpt_lib.Checkpointer(directory, **kw) as ck:
    for s in steps:
      assert ck.save(s, _state(seed=s, step=s), {"data_pos": 10 * s})


def test_resume_round_trip_bit_identical(tmp_path):
  state = _state(seed=1, step=7)
  extra = {"data_pos": 1234, "config": {"lr": 1e-6, "layers": [1, 2]}, "counters": {"tokens": 99}}
  with ckpt_lib.Checkpointer(tmp_path, save_every=7, keep=2, async_save=False) as ck:
    assert ck.restore_latest(state) is None  # Empty directory: fresh start.
    assert ck.save(7, state, extra)
  with ckpt_lib.Checkpointer(tmp_path, save_every=7, keep=2, async_save=False) as ck:
    step, restored, got_extra = ck.restore_latest(_state(seed=5, step=0))
  assert step == 7 and got_extra == extra
  assert isinstance(restored, _State) and isinstance(restored.params, nnx.State)
  assert restored.rng.dtype == jnp.uint32 and restored.step.dtype == jnp.int32
  _assert_bit_identical(restored, state)


def test_resume_into_abstract_target(tmp_path):
  state = _state(seed=2)
  _save_steps(tmp_path, [4])
  abstract = jax.eval_shape(lambda: state)
  abstract = jax.tree.map(lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x.sharding),
                          abstract, state)
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    step, restored, _ = ck.restore_latest(abstract)
  assert step == 4
  _assert_bit_identical(restored, _state(seed=4, step=4))


def test_should_save_and_keep_newest_n(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path, save_every=2, keep=2, async_save=False) as ck:
    assert [s for s in range(7) if ck.should_save(s)] == [2, 4, 6]
    for s in range(1, 9):
      ck.save(s, _state(step=s), {"s": s})
    assert ck.all_steps() == [6, 8]
    assert not ck.should_save(8)  # Already on disk (e.g. the step just resumed from).
    assert not ck.save(8, _state(), {}, force=True)
    assert ck.save(9, _state(step=9), {}, force=True)
    assert ck.all_steps() == [8, 9]
  for s in (8, 9):
    assert os.path.exists(os.path.join(tmp_path, str(s), ckpt_lib.MANIFEST_FILE))


def test_async_save_then_resume(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=3, async_save=True) as ck:
    for s in (1, 2, 3):
      assert ck.save(s, _state(seed=s, step=s), {"data_pos": s})
    step, restored, extra = ck.restore_latest(_state())  # Waits for the in-flight save.
  assert step == 3 and extra == {"data_pos": 3}
  _assert_bit_identical(restored, _state(seed=3, step=3))
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=3, async_save=True) as ck:
    assert ck.all_steps() == [1, 2, 3]
    assert ck.restore_latest(_state())[0] == 3


def test_corrupt_truncated_latest_falls_back_with_warning(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2])
  path = _largest_file(os.path.join(tmp_path, "2"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level(logging.WARNING), ckpt_lib.Checkpointer(tmp_path, save_every=1,
                                                               keep=5) as ck:
    step, restored, extra = ck.restore_latest(_state())
  assert step == 1 and extra == {"data_pos": 10}
  _assert_bit_identical(restored, _state(seed=1, step=1))
  msg = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert "skipping step 2" in msg and "truncated" in msg


def test_corrupt_bit_flip_latest_falls_back(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2, 3])
  path = _largest_file(os.path.join(tmp_path, "3"))
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x04
  open(path, "wb").write(bytes(data))
  with caplog.at_level(logging.WARNING), ckpt_lib.Checkpointer(tmp_path, save_every=1,
                                                               keep=5) as ck:
    step, restored, _ = ck.restore_latest(_state())
  assert step == 2
  _assert_bit_identical(restored, _state(seed=2, step=2))
  assert any("skipping step 3" in r.getMessage() and "sha256" in r.getMessage()
             for r in caplog.records)


def test_corrupt_missing_manifest_or_file_falls_back(tmp_path):
  _save_steps(tmp_path, [1, 2, 3])
  os.remove(os.path.join(tmp_path, "3", ckpt_lib.MANIFEST_FILE))  # Crash before manifest write.
  os.remove(_largest_file(os.path.join(tmp_path, "2")))
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    assert ck.restore_latest(_state())[0] == 1


def test_corrupt_all_steps_raises_listing_them(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for s in ("1", "2"):
    with open(_largest_file(os.path.join(tmp_path, s)), "r+b") as f:
      f.truncate(1)
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    with pytest.raises(ckpt_lib.NoValidCheckpointError, match=r"(?s)step 2: .*step 1: "):
      ck.restore_latest(_state())


def test_resume_fingerprint_mismatch_refuses_then_overwrite(tmp_path):
  cfg = {"optim": {"lr": 1e-6}, "model": "tiny", "seed": (1, 2)}
  _save_steps(tmp_path, [1, 2], fingerprint=cfg)
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint=cfg) as ck:
    assert ck.restore_latest(_state())[0] == 2  # Same run (tuple == list after JSON): resume.
  new = {"optim": {"lr": 2e-6}, "model": "tiny", "seed": [1, 2], "extra_flag": True}
  with pytest.raises(ckpt_lib.FingerprintMismatchError) as e:
    ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint=new)
  assert str(tmp_path) in str(e.value) and "optim.lr" in str(e.value)
  assert "extra_flag" in str(e.value) and "model" not in str(e.value).split("keys:")[1]
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint=new,
                             overwrite=True) as ck:
    assert ck.all_steps() == [] and ck.restore_latest(_state()) is None
    ck.save(1, _state(), {})
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint=new) as ck:
    assert ck.all_steps() == [1]  # Same fingerprint with no overwrite: kept and resumable.


def test_resume_fingerprint_without_checkpoints_is_replaced(tmp_path):
  ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint={"a": 1}).close()
  # The first run stopped before its first save: nothing to protect, the new config wins.
  ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint={"a": 2}).close()
  with pytest.raises(ckpt_lib.FingerprintMismatchError, match="a: 2 -> 3"):
    with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint={"a": 2}) as ck:
      ck.save(1, _state(), {})
    ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint={"a": 3})


def test_resume_refuses_checkpoints_without_fingerprint(tmp_path):
  _save_steps(tmp_path, [1])
  with pytest.raises(ckpt_lib.FingerprintMismatchError, match="unknown run"):
    ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, fingerprint={"a": 1})


def test_unwritable_directory_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")  # A path under a regular file is unwritable even for root.
  with pytest.raises(ckpt_lib.CheckpointDirectoryError, match="not writable") as e:
    ckpt_lib.Checkpointer(blocker / "ckpt", save_every=1, keep=1)
  assert str(blocker / "ckpt") in str(e.value)


def test_low_disk_space_clear_error(tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(ckpt_lib.shutil, "disk_usage",
                      lambda p: usage._replace(free=10 * 2**20))
  with pytest.raises(ckpt_lib.CheckpointDirectoryError, match="MiB free"):
    ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1, min_free_bytes=100 * 2**20)


def test_resume_into_mismatched_target_raises(tmp_path):
  _save_steps(tmp_path, [1])
  bad = {"w": jnp.zeros((3,))}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    with pytest.raises(RuntimeError, match="step 1"):
      ck.restore_latest(bad)


def test_resume_bit_identical_other_dtypes(tmp_path):
  x = jax.random.normal(jax.random.key(0), (5, 3))
  state = {"bf16": x.astype(jnp.bfloat16), "f16": x.astype(jnp.float16),
           "i8": jnp.arange(6, dtype=jnp.int8),
           "nan_payload": jnp.array([np.nan, -0.0, np.inf], jnp.float32),
           "typed_key": jax.random.key(3), "nested": {"a": {"b": jnp.ones((2,), jnp.uint32)}}}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ck:
    ck.save(1, state, {})
    _, restored, _ = ck.restore_latest(jax.tree.map(jnp.zeros_like, state))
  restored["typed_key"] = jax.random.key_data(restored["typed_key"])
  state["typed_key"] = jax.random.key_data(state["typed_key"])
  _assert_bit_identical(restored, state)


class _Killed(BaseException):
  """Stands for SIGKILL at that line: nothing after it in the save runs."""


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_one_kill_during_manifest_pass_resumes_the_previous_step(tmp_path, monkeypatch,
                                                                      async_save):
  """main: orbax deleted step 1 before step 2 had its manifest, so the rerun started from 0."""
  _save_steps(tmp_path, [1], keep=1, async_save=async_save)
  write = ckpt_lib.write_manifest

  def killed_at_step_2(step_dir, step):
    if step == 2:
      raise _Killed
    write(step_dir, step)

  monkeypatch.setattr(ckpt_lib, "write_manifest", killed_at_step_2)
  with pytest.raises(_Killed):
    with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1, async_save=async_save) as ck:
      ck.save(2, _state(seed=2, step=2), {"data_pos": 20})
  monkeypatch.setattr(ckpt_lib, "write_manifest", write)
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ck:
    got = ck.restore_latest(_state())
    assert got is not None, "the rerun would start from step 0"
    step, restored, extra = got
    assert step == 1 and extra == {"data_pos": 10}
    _assert_bit_identical(restored, _state(seed=1, step=1))
    ck.save(2, _state(seed=2, step=2), {"data_pos": 20})  # Step 2 redone; step 1 rotated out.
    assert ck.all_steps() == [2]


def test_partial_manifest_does_not_vouch_for_unlisted_files(tmp_path, caplog):
  """main: a manifest that omitted the flipped array file verified, and step 2 was restored
  from it (a restore error here, wrong values where the flip misses the chunk checksums)."""
  _save_steps(tmp_path, [1, 2])
  step_dir = os.path.join(tmp_path, "2")
  path = max((os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state", "d"))
              for n in ns), key=os.path.getsize)  # An array data file.
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x04
  open(path, "wb").write(bytes(data))
  manifest_file = os.path.join(step_dir, ckpt_lib.MANIFEST_FILE)
  manifest = json.load(open(manifest_file))
  del manifest["files"][os.path.relpath(path, step_dir)]
  json.dump(manifest, open(manifest_file, "w"))
  with caplog.at_level(logging.WARNING), ckpt_lib.Checkpointer(tmp_path, save_every=1,
                                                               keep=5) as ck:
    step, restored, _ = ck.restore_latest(_state())
  assert step == 1
  _assert_bit_identical(restored, _state(seed=1, step=1))
  assert any("skipping step 2" in r.getMessage() and os.path.relpath(path, step_dir)
             in r.getMessage() and "not in the manifest" in r.getMessage()
             for r in caplog.records)


def test_resume_in_a_new_process_logs_no_orbax_warnings_and_checks_dtypes(tmp_path, caplog):
  """main: a fresh Checkpointer (every resume) logged 4 orbax 'could not be restored' warnings
  and 'cannot read array metadata', then restored bfloat16 into float32 without the refusal."""
  state = {"params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7},
           "step": jnp.int32(3)}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ck:
    ck.save(1, state, {"data_pos": 1})
  with caplog.at_level(logging.WARNING), ckpt_lib.Checkpointer(tmp_path, save_every=1,
                                                               keep=1) as ck:
    step, restored, _ = ck.restore_latest(jax.tree.map(jnp.zeros_like, state))
  assert step == 1
  _assert_bit_identical(restored, state)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not warnings, warnings
  target = {"params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)},
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1) as ck:
    with pytest.raises(ckpt_lib.DtypeMismatchError, match="params/w: stored float32, target "
                       "bfloat16"):
      ck.restore_latest(target)
