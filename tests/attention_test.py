"""mixpo.models.attention: `auto` per platform compiled for, every explicit kernel against the
textbook formula (the custom-call kernels also per device block under a mesh), the blockwise
(flash) kernel's forward / gradient and its memory at long T."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixpo import models
from mixpo.models import attention, backend


def _reference(q, k, v, key_valid, q_start=0):
  """softmax(q·kᵀ/√H, causal + key mask)·v as written, left to autodiff. k, v [B, S, K, H]."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  allowed = attention.allowed_mask(q_start, t, jnp.asarray(key_valid) != 0)
  scores = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kv, n // kv, h), k) * h ** -0.5
  scores = jnp.where(allowed[:, None, None], scores, attention.MASK_VALUE)
  out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, -1), v)
  return out.reshape(b, t, n * h)


def _inputs(t, b=3, n=4, kv=2, h=16, seed=0):
  """q, k, v and a key mask: row 0 unpadded, row 1 left-padded, row 2 left- and right-padded
  (the layouts mixpo.batch builds: a row's real tokens are contiguous)."""
  rs = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rs.randn(b, t, heads, h), jnp.float32) for heads in (n, kv, kv))
  valid = np.ones((b, t), bool)
  valid[1, :t // 3] = False
  valid[2, :5] = False
  valid[2, t - t // 4:] = False
  # Outputs of queries that are padding are unspecified: weight them 0, as every loss does.
  w = jnp.asarray(rs.randn(b, t, n * h) * valid[:, :, None], jnp.float32)
  return q, k, v, jnp.asarray(valid), w


def _check_against_reference(fn, t, grads=True, atol=2e-5, **kw):
  q, k, v, valid, w = _inputs(t, **kw)
  real = np.asarray(valid)[:, :, None]
  out, ref = fn(q, k, v, valid), _reference(q, k, v, valid)
  np.testing.assert_allclose(np.asarray(out) * real, np.asarray(ref) * real, atol=atol)
  if grads:
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v, valid) * w))
    got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
      assert float(jnp.abs(r).max()) > 0
      np.testing.assert_allclose(g, r, atol=atol)


# ------------------------------------------------------------------------------ auto


@pytest.mark.parametrize("platform,dtype,head_dim,expected", [
    ("cpu", jnp.float32, 64, "xla"), ("cpu", jnp.bfloat16, 64, "xla"),
    ("gpu", jnp.bfloat16, 64, "cudnn"), ("gpu", jnp.float16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"), ("gpu", jnp.bfloat16, 256, "xla"),
    ("tpu", jnp.float32, 64, "pallas"), ("tpu", jnp.bfloat16, 128, "pallas"),
])
def test_auto_resolves_per_backend(monkeypatch, platform, dtype, head_dim, expected):
  monkeypatch.setattr(backend, "platform", lambda: platform)
  assert attention.resolve_impl("auto", dtype=dtype, head_dim=head_dim) == expected
  for explicit in ("xla", "dot_product_attention", "cudnn", "pallas"):
    assert attention.resolve_impl(explicit, dtype=dtype, head_dim=head_dim) == explicit


def test_auto_is_the_default_and_logged_once(monkeypatch, caplog):
  assert models.ModelConfig.__dataclass_fields__["attention_impl"].default == "auto"
  monkeypatch.setattr(attention, "_logged", set())
  with caplog.at_level(logging.INFO, logger=attention.__name__):
    for _ in range(3):
      attention.resolve_impl("auto", dtype=jnp.float32, head_dim=8)
  assert [r.getMessage() for r in caplog.records] == [
      "attention_impl=auto on cpu (dtype float32, head_dim 8): xla"]
  with pytest.raises(ValueError, match="attention_impl='flash'.*config.model.attention_impl"):
    attention.resolve_impl("flash", dtype=jnp.float32, head_dim=8)


def _tiny_model(dtype=jnp.float32):
  return models.init_from_config(dict(
      model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2), 0, dtype=dtype)


@pytest.mark.parametrize("platform,dtype,kernel", [("gpu", jnp.bfloat16, "_cudnn_attention"),
                                                   ("tpu", jnp.float32, "pallas_attention")])
def test_model_dispatches_by_platform_and_keeps_cpu_kernels_on_cpu(monkeypatch, platform, dtype,
                                                                   kernel):
  """Under a mocked backend the model calls that backend's kernel, and neither the CPU matmul
  VJP nor the CPU attention kernel runs; the KV-cache path stays on the neutral einsum."""
  calls = []
  monkeypatch.setattr(backend, "platform", lambda: platform)
  monkeypatch.setattr(attention, kernel,
                      lambda *a: calls.append(kernel) or attention._jax_nn_attention(*a))
  for name in ("_grouped_attention", "_cpu_matmul"):
    monkeypatch.setattr(backend, name, lambda *a, name=name: calls.append(name))
  model = _tiny_model(dtype)
  tokens = jnp.ones((2, 8), jnp.int32)
  model(tokens)
  assert calls == [kernel]
  model.decode(tokens, None, None, model.init_cache(2, 9))
  assert calls == [kernel]


def test_cpu_keeps_the_tuned_kernels(monkeypatch):
  calls = []
  cpu_matmul, grouped = backend._cpu_matmul, backend._grouped_attention
  monkeypatch.setattr(backend, "_cpu_matmul", lambda *a: calls.append("mm") or cpu_matmul(*a))
  monkeypatch.setattr(backend, "_grouped_attention",
                      lambda *a: calls.append("attn") or grouped(*a))
  _tiny_model()(jnp.ones((2, 8), jnp.int32))
  assert "mm" in calls and "attn" in calls


# ------------------------------------------------------------------------------ explicit kernels


@pytest.mark.parametrize("impl", ["xla", "dot_product_attention"])
def test_explicit_impls_equal_reference(impl):
  _check_against_reference(lambda q, k, v, valid: attention.attend(q, k, v, valid, impl), t=40)


def test_cudnn_rotation_equals_reference():
  """The cuDNN kernel's left-padding rotation, run through jax.nn's XLA kernel (no GPU here)."""
  fn = lambda q, k, v, valid: attention._cudnn_attention(
      q, k, v, valid, q.shape[-1] ** -0.5, implementation="xla").reshape(q.shape[:2] + (-1,))
  _check_against_reference(fn, t=40)


def test_pallas_splash_equals_reference_in_interpret_mode():
  """jax's Pallas splash attention (the TPU kernel) in interpret mode on CPU; T = 100 is padded
  to the kernel's 128."""
  _check_against_reference(lambda q, k, v, valid: attention.attend(q, k, v, valid, "pallas"),
                           t=100, atol=5e-5)


# ------------------------------------------------------------------------------ blockwise kernel


@pytest.mark.parametrize("t,block,backward_block", [(40, 16, 16), (200, 64, 24), (96, 512, 256)])
def test_flash_equals_reference(monkeypatch, t, block, backward_block):
  """Forward and gradient; T not a multiple of the blocks, forward and backward blocks of their
  own lengths, rows with left and right padding."""
  monkeypatch.setattr(attention, "_DENSE_MAX_ROW_SCORE_BYTES", 0)
  monkeypatch.setattr(attention, "_FLASH_BLOCK", block)
  monkeypatch.setattr(attention, "_FLASH_BACKWARD_BLOCK", backward_block)
  _check_against_reference(lambda q, k, v, valid: attention.attend(q, k, v, valid, "xla"), t=t)


def test_flash_over_a_cache_with_an_offset(monkeypatch):
  """The KV-cache form: T queries at slots q_start.. over S > T cached keys (a long prefill)."""
  monkeypatch.setattr(attention, "_DENSE_MAX_ROW_SCORE_BYTES", 0)
  monkeypatch.setattr(attention, "_FLASH_BLOCK", 16)
  b, t, s, start, n, kv, h = 2, 20, 64, 23, 4, 2, 8
  rs = np.random.RandomState(1)
  q = jnp.asarray(rs.randn(b, t, n, h), jnp.float32)
  k, v = (jnp.asarray(rs.randn(b, s, kv, h), jnp.float32) for _ in range(2))
  valid = np.zeros((b, s), bool)
  valid[0, :start + t] = True
  valid[1, 7:start + t] = True
  out = attention.attend(q, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.asarray(valid), "xla",
                         q_start=jnp.int32(start), heads_major=True)
  np.testing.assert_allclose(out, _reference(q, k, v, valid, start), atol=2e-5)


def _attention_grad_program(t, n=14, kv=2, h=64):
  """A jitted gradient of causal attention at the Qwen2.5-0.5B head geometry, B = 1."""
  spec = lambda heads: jax.ShapeDtypeStruct((1, t, heads, h), jnp.float32)

  def loss(q, k, v, valid):
    return jnp.sum(attention.attend(q, k, v, valid, "xla") ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grad, (spec(n), spec(kv), spec(kv), jax.ShapeDtypeStruct((1, t), jnp.bool_))


def test_flash_temp_memory_is_linear_in_t():
  """XLA's own buffer plan for the attention gradient: temp bytes grow ~linearly from T = 2k to
  8k (a dense kernel's would grow 16x; at 8k its float32 scores alone are 14·8k·8k·4 = 3.8 GB)."""
  temps = {}
  for t in (2048, 8192):
    grad, args = _attention_grad_program(t)
    temps[t] = grad.lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temps[8192] < 200e6, temps
  assert temps[8192] < 6 * temps[2048], temps


_RSS_PROBE = r"""
import resource, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from attention_test import _attention_grad_program
t = int(sys.argv[2])
grad, specs = _attention_grad_program(t)
rs = np.random.RandomState(0)
args = [jnp.asarray(rs.randn(*s.shape), s.dtype) for s in specs[:3]]
valid = np.ones((1, t), bool); valid[0, :t // 8] = False
compiled = grad.lower(*specs).compile()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = compiled(*args, jnp.asarray(valid))
jax.block_until_ready(out)
assert all(bool(jnp.isfinite(g).all()) for g in out)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_flash_gradient_at_4k_tokens_under_rss_bound():
  """A T = 4096 attention gradient (14 query heads, H = 64) raises the process's peak RSS by
  under 300 MB (its dense float32 scores alone would be 14·4k·4k·4 = 940 MB)."""
  out = subprocess.run([sys.executable, "-c", _RSS_PROBE, os.path.dirname(__file__), "4096"],
                       capture_output=True, text=True, timeout=900, check=True).stdout.split()
  before_kb, after_kb = int(out[0]), int(out[1])
  assert (after_kb - before_kb) * 1024 < 300e6, (before_kb, after_kb)


# ------------------------------------------------------------------------------ compile target


def test_platform_is_the_mesh_devices_not_the_host():
  """backend.platform() reads the devices of the enclosing mesh: a program traced for a TPU
  (here an abstract TPU mesh; experiments/aot_compile.py uses a real compile-only topology) gets
  the TPU kernel and none of the XLA:CPU tuning, on this CPU host."""
  assert backend.platform() == "cpu"
  with jax.set_mesh(jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))):
    assert backend.platform() == "cpu"
  tpu = jax.sharding.AbstractMesh((1, 1, 1), ("data", "fsdp", "tensor"),
                                  abstract_device=jax.sharding.AbstractDevice(
                                      device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
  with jax.sharding.use_abstract_mesh(tpu):
    assert backend.platform() == "tpu" and not backend.on_cpu()
    assert attention.resolve_impl("auto", dtype=jnp.bfloat16, head_dim=64) == "pallas"
    assert backend.decode_head(jnp.ones((8, 4)), jnp.float32) is None
  assert attention.resolve_impl("auto", dtype=jnp.bfloat16, head_dim=64) == "xla"


_SHARDED_PROBE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from attention_test import _inputs
from mixpo import sharding
from mixpo.models import attention
out = {}
for mesh_shape in [(2, 1, 2), (1, 1, 4)]:  # (1, 1, 4): 2 kv heads repeated to split over 4
  mesh = sharding.make_mesh(mesh_shape)
  q, k, v, valid, w = _inputs(t=100, b=4)
  for impl in ("pallas", "xla_rotation"):
    fn = (lambda q, k, v, m: attention.attend(q, k, v, m, "pallas")) if impl == "pallas" else (
        lambda q, k, v, m: attention._cudnn_attention(q, k, v, m, q.shape[-1] ** -0.5,
                                                      implementation="xla"))
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, valid).reshape(w.shape) * w)
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    with jax.set_mesh(mesh):
      hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
      got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    out[f"{mesh_shape}/{impl}"] = [float(jnp.abs(a - b).max()) for a, b in zip(got, want)] + [
        "shard_map" in hlo or "manual" in hlo]
print(json.dumps(out))
"""


def test_custom_call_kernels_run_per_device_block_under_a_mesh():
  """Under a 4-device mesh the Pallas kernel (interpret mode here) and the cuDNN path's row
  rotation (through jax.nn's XLA kernel) run in shard_map (rows over data × fsdp, heads over
  tensor, kv heads repeated where tensor does not divide them) with the gradients of the
  unsharded call."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", _SHARDED_PROBE, os.path.dirname(__file__)],
                       env=env, capture_output=True, text=True, timeout=900, check=True)
  results = json.loads(out.stdout.splitlines()[-1])
  assert len(results) == 4
  for name, (dq, dk, dv, manual) in results.items():
    assert manual, name
    assert max(dq, dk, dv) < 1e-4, (name, dq, dk, dv)
