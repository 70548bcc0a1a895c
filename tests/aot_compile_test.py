"""experiments/aot_compile.py and mixpo/targets: a run's programs compiled for TPU / GPU targets on
this CPU host (the kernels chosen for the target), its one-line errors, its FLOP count.

The compiles need libtpu (TPU) and jax-cuda12-plugin / jax-cuda12-pjrt (GPU), which the `test`
extra installs (BUILD_NOTES); without them those tests are skipped with the reason."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import aot_compile
from mixpo import targets
from mixpo.models import from_hf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (XLA:TPU's compiler, the test extra) is missing")
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="jax-cuda12-plugin / jax-cuda12-pjrt (XLA:GPU's compiler, the test extra) are missing")


def _run(tmp_path, *args, timeout=900):
  """(returncode, stdout, stderr, json figures or None) of aot_compile.py with `args`."""
  out = tmp_path / "aot.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "aot_compile.py"),
                         *args, f"--json_out={out}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  figures = json.loads(out.read_text()) if out.exists() else None
  return proc.returncode, proc.stdout, proc.stderr, figures


@needs_libtpu
def test_smoke_run_compiles_for_v5e_8_with_the_pallas_kernel(tmp_path):
  """The smoke run's train step, θ_old / guide scoring and generation compile with XLA:TPU for a
  v5e-8 (2x4) slice, its 8 devices split over data × fsdp × tensor; attention_impl=auto resolves
  to Pallas splash for the TPU target, compiled as Mosaic kernels (not interpret mode) inside the
  shard_map the mesh needs. Generation's KV-cache attention is XLA's einsum on every platform."""
  rc, stdout, stderr, fig = _run(tmp_path, "--topology=v5e-8", "--config=smoke", "--prompt_len=16",
                                 "--config.mesh_shape=(2,2,2)", "--config.model.dtype=bfloat16")
  assert rc == 0, stderr[-2000:]
  assert "attention_impl=auto → pallas" in stdout
  assert fig["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  programs = {p["program"]: p for p in fig["programs"]}
  assert set(programs) == {"train_step", "score_policy", "score_guide", "generate_policy",
                           "generate_guide"}
  # Forward, backward dq and dkv per layer (the smoke policy has one layer, no remat).
  assert programs["train_step"]["kernel_calls"]["Mosaic (Pallas)"] >= 3
  assert programs["score_policy"]["kernel_calls"]["Mosaic (Pallas)"] >= 1
  assert "Mosaic (Pallas)" not in programs["generate_policy"]["kernel_calls"]
  for p in programs.values():
    assert 0 < p["peak"] < fig["hbm_bytes"] and p["model_flops"] > 0
  assert programs["train_step"]["collectives"]  # fsdp / tensor: gathers and reductions


@needs_cuda_plugin
def test_h100_8_compiles_the_train_step(tmp_path):
  rc, stdout, stderr, fig = _run(tmp_path, "--topology=h100-8", "--config=smoke",
                                 "--prompt_len=16", "--programs=train")
  assert rc == 0, stderr[-2000:]
  assert "8 × NVIDIA H100 80GB HBM3" in stdout
  (program,) = fig["programs"]
  assert program["program"] == "train_step" and 0 < program["peak"] < fig["hbm_bytes"]


def test_unknown_topology_is_one_line_exit_2(tmp_path):
  rc, _, stderr, _ = _run(tmp_path, "--topology=v5e-7", "--config=smoke", timeout=300)
  assert rc == 2
  assert stderr.count("\n") == 1 and "--topology='v5e-7' is not a known target" in stderr
  assert "v5e-16" in stderr and "Traceback" not in stderr


@needs_libtpu
def test_program_that_does_not_fit_is_one_line_exit_2(tmp_path):
  """A one-layer model with a 500k-token vocabulary (2 GB of float32 embedding, 6 GB with Adam's
  moments, 8 GB with its gradient) replicated on every device by pure data parallelism."""
  big = dict(model_type="qwen2", vocab_size=500_000, hidden_size=1024, intermediate_size=64,
             num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
             max_position_embeddings=64)
  path = tmp_path / "config.json"
  path.write_text(json.dumps(big))
  rc, _, stderr, _ = _run(tmp_path, "--topology=v5e-8", "--config=smoke", "--prompt_len=16",
                          f"--model={path}", f"--guide_model={path}", "--programs=train")
  assert rc == 2, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: train_step does not fit v5e-8") and "--config.mesh_shape" in last
  assert "Traceback" not in stderr


def test_targets_names_and_errors():
  v5e16 = targets.get("v5e-16")
  assert (v5e16.platform, v5e16.num_devices, v5e16.topology, v5e16.hbm_bytes) == (
      "tpu", 16, "v5e:4x4", 16 * 2**30)
  v4 = targets.get("v4-32")  # 32 TensorCores = 16 megacore chips
  assert (v4.num_devices, v4.topology, v4.chip_config) == (16, "v4:2x2x4", "megacore")
  assert targets.get("v5p-16").topology == "v5:2x2x2"
  h100 = targets.get("h100-16")
  assert (h100.platform, h100.num_devices, h100.topology) == ("gpu", 16, "1x2x8")
  for name in ("v5e-16", "v5p-32", "v6e-8", "v4-32", "h100-8", "a100-8"):
    assert name in targets.names()
  for bad in ("v5e-7", "v4-6", "tpu", "h100-3"):
    with pytest.raises(ValueError, match="not a known target"):
      targets.get(bad)


def test_forward_flops_match_xla_on_a_loop_free_program():
  """The analytic count equals XLA's cost analysis of a forward pass with no loop in it (XLA
  counts a loop body once), to the few percent of elementwise work (norms, softmax, RoPE) that
  the count leaves out."""
  from mixpo import sampling  # noqa: PLC0415
  from mixpo.models import CausalLM  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  cfg = from_hf_config(dict(model_type="qwen2", vocab_size=2048, hidden_size=256,
                            intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2))
  b, t = 4, 32
  model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok))
  cost = fn.lower(state, jax.ShapeDtypeStruct((b, t), jnp.int32)).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  # XLA multiplies out the full [T, T] scores of the dense kernel; the count is causal (T²/2).
  analytic = sum(aot_compile.forward_flops(cfg, b * t, t).values())
  assert 0.9 < analytic / xla < 1.0, (analytic, xla)
  assert aot_compile.score_flops(cfg, b, t) < analytic  # causal attention: half the pairs
  full = aot_compile.train_flops(cfg, b, t, epochs=1, lora_rank=0, remat=False)
  assert full == pytest.approx(3 * aot_compile.score_flops(cfg, b, t))  # forward + 2x backward
  assert aot_compile.train_flops(cfg, b, t, epochs=1, lora_rank=8, remat=False) < full
  recomputed = aot_compile.forward_flops(cfg, b * t, (t + 1) / 2)
  np.testing.assert_allclose(
      aot_compile.train_flops(cfg, b, t, epochs=2, lora_rank=0, remat=True, head_remat=True) / 2,
      full + sum(recomputed.values()))


@needs_libtpu
def test_binaries_start_quietly_on_the_cpu_with_libtpu_installed():
  """libtpu (installed for compile-only TPU targets) on a host without a TPU chip: a binary's
  first call (hostmem.keep_freed_memory) keeps jax from starting the TPU runtime (which logged
  TPU-VM lookup warnings at every start), and the XLA:CPU allocator settings apply (they were
  skipped, libtpu counting as an accelerator)."""
  code = ("from mixpo import hostmem; ok = hostmem.keep_freed_memory()\n"
          "import jax; jax.numpy.ones(3).block_until_ready()\n"
          "print(ok, hostmem.status, jax.config.jax_platforms, jax.default_backend())")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "MIXPO_MALLOC")}
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=True)
  assert out.stdout.split() == ["True", "on", "cpu", "cpu"], out.stdout
  assert out.stderr == "", out.stderr[-2000:]


@pytest.mark.parametrize("num_devices", [1, 8, 16])
def test_qwen_recipe_is_a_run_the_trainer_accepts(num_devices):
  """The shipped Qwen2.5-Math-1.5B recipe on one device and on 8 / 16-device slices: its rows
  divide into micro-batches over the data × fsdp devices, prompt + response fit the model's
  4096-token context, and the guide it names has the policy's vocabulary (the run refuses
  each otherwise, before computing)."""
  from experiments.configs import qwen2_5_math_1_5b  # noqa: PLC0415
  config = qwen2_5_math_1_5b.get_config()
  policy = aot_compile.hf_config_for(config.policy, "--config.policy")
  guide = aot_compile.hf_config_for(config.guide.path, "--config.guide.path")
  from mixpo import sampling  # noqa: PLC0415
  p = sampling.bucket_length(config.task_kwargs.max_prompt_tokens)
  spec, policy_cfg, guide_cfg, _ = aot_compile.resolve_run(config, num_devices, policy, guide, p)
  assert (policy_cfg.num_layers, policy_cfg.hidden_size, guide_cfg.vocab_size) == (28, 1536, 151936)
  assert p + spec.sample.max_new_tokens <= policy_cfg.max_position_embeddings
  assert spec.sizes.rows % (spec.step.num_minibatches * spec.step.num_micro_batches
                            * num_devices) == 0


def test_lowered_programs_are_the_ones_generate_and_score_run():
  """sampling.lower_generate / lower_score (inputs as shapes, nothing placed) lower the very
  programs `generate` / `score` run on values: the same StableHLO."""
  from flax import nnx  # noqa: PLC0415
  from mixpo import sampling  # noqa: PLC0415
  from mixpo.models import CausalLM  # noqa: PLC0415
  cfg = from_hf_config(dict(model_type="qwen2", vocab_size=64, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2))
  graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  b, p, n = 4, 8, 5
  shape = lambda t: jax.ShapeDtypeStruct((b, t), jnp.int32)
  ones = lambda t: jnp.ones((b, t), jnp.int32)
  got = sampling.lower_generate((graphdef, abstract), shape(p), shape(p), n, temperature=0.7,
                                top_k=10).as_text()
  want = sampling._generate_program.lower(  # pylint: disable=protected-access
      graphdef, state, ones(p), ones(p), jax.random.key(0), np.float32(0.7), np.float32(1.0),
      np.full((1,), 3, np.int32), np.int32(0), max_new_tokens=n, greedy=False, top_k=10,
      use_top_p=False).as_text()
  assert got == want
  got = sampling.lower_score((graphdef, abstract), shape(p + n), shape(p + n),
                             shape(p + n)).as_text()
  want = sampling._score_program.lower(  # pylint: disable=protected-access
      graphdef, state, ones(p + n), ones(p + n), ones(p + n), np.float32(1.0),
      chunk_size=sampling.auto_chunk_size(b, p + n - 1, 64), return_entropy=False).as_text()
  assert got == want
