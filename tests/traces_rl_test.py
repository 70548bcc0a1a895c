"""Offline guide traces in the RL loop: make_traces → luffy / mix1 / mix2 under file / model / one."""

import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import luffy_paper, smoke
from experiments.make_traces import make_traces
from mixpo import builtin, loop, models, objectives, rl, sampling
from mixpo import logging as mlog
from mixpo.data import char_tokenizer, get_task
from mixpo.data.traces import read_trace_prompts, write_trace_prompts
from mixpo.guide_source import response_tokens
from mixpo.logging import PhaseTimer
from rl_test import set_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = {"digits": 2, "terms": 2, "reward": "digits"}  # partial credit: groups have variance.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random guide and policy (the built-in architecture, char tokenizer) and a trace
  file the guide wrote with make_traces over the built-in task's train split."""
  d = tmp_path_factory.mktemp("traces_rl")
  tok = char_tokenizer()
  paths = {}
  for name, seed in (("guide", 1), ("policy", 2)):
    paths[name] = str(d / name)
    cfg = builtin.tiny_hf_config(tok, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    models.save_pretrained(models.init_from_config(cfg, rng=seed), paths[name])
    tok.save_pretrained(paths[name])
  exs = get_task("addition", **TASK).examples("train", 48, seed=0)
  prompts, _ = make_traces(paths["guide"], exs, n_per_prompt=3, max_new_tokens=6,
                           temperature=1.0, batch_size=48, seed=0)
  paths["traces"] = str(d / "traces.jsonl")
  write_trace_prompts(paths["traces"], prompts)
  return paths


def traces_config(tiny, **overrides):
  c = smoke.get_config()
  c.policy, c.guide.path = tiny["policy"], tiny["guide"]
  c.task_kwargs = dict(TASK)
  c.guide.source, c.guide.traces_path = "traces", tiny["traces"]
  c.export_hf = False
  # A reward past its deadline scores 0: on a loaded machine that would make two equal runs
  # differ, and this file compares runs bit for bit.
  c.reward.timeout_s = 120.0
  return set_fields(c, overrides)


def one_step_batch(exp, state):
  """The phases of one rl_step up to the scored batch (what train_step receives)."""
  timer = PhaseTimer()
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
  policy = exp.policy.pair(state.params)
  collected = rl.collect_policy(exp, policy, key, 0, timer)
  policy_rows, n_groups = rl.policy_block(collected, exp.spec.sizes)
  guide_rows, guide_real = rl.collect_traces(exp, policy_rows.prompts, policy_rows.answers, timer)
  asm = rl.assemble(exp.spec, policy_rows, n_groups, guide_rows, guide_real)
  return asm, rl.score(exp, policy, asm.batch, timer), n_groups


CASES = [("luffy", "one"), ("mix1", "file"), ("mix2", "model")]  # each algo and each πϕ once
SLOW = [(a, g) for a in ("luffy", "mix1", "mix2") for g in ("file", "model", "one")
        if (a, g) not in CASES]


@pytest.mark.parametrize("algo,guide_logp", CASES + [
    pytest.param(a, g, marks=pytest.mark.slow) for a, g in SLOW])
def test_guided_algorithms_train_from_traces(tiny, tmp_path, algo, guide_logp):
  config = traces_config(tiny, algo=algo, **{"guide.logp": guide_logp})
  if algo == "mix2" and guide_logp == "file":
    config.objective.zero_ratio = "old"  # ZERO rows are the policy's: a trace holds no πϕ for them.
  exp, state, ckpt, _ = loop.setup(config, str(tmp_path))
  ckpt.close()
  assert (exp.guide is not None) == (guide_logp == "model")  # no checkpoint unless it scores
  traces = {g.prompt: g for g in read_trace_prompts(tiny["traces"])[0]}
  tok = exp.tokenizer
  with jax.set_mesh(exp.mesh):
    asm, batch, n_groups = one_step_batch(exp, state)
    p = asm.rows.prompt_BxP.shape[1]
    kind, real = np.asarray(batch.kind_B), np.asarray(batch.real_B)
    tokens, mask = np.asarray(batch.tokens_BxT), np.asarray(batch.mask_BxT)
    off = np.flatnonzero((kind == objectives.OFF) & real)
    assert off.size and np.all(asm.is_guide_B[off]) and not np.any(asm.is_guide_B & ~real & (
        kind == objectives.OFF) & (np.asarray(batch.loss_mask_BxT).sum(1) > 0))
    drawn = [asm.row_prompt[i] for i in range(n_groups * config.rollout.n)]
    assert set(drawn) <= set(traces)  # the step's prompts come from the trace file
    r = config.rollout
    m, base = r.m, (r.groups + exp.spec.sizes.zero_groups) * r.n
    want_off = 0
    for g in range(n_groups):
      prompt = asm.rows.prompts[g]
      texts = [r.text for r in traces[prompt].responses][:m]
      want_off += len(texts)
      for j, text in enumerate(texts):  # OFF row j of group g is exactly trace j's tokens
        b = base + g * m + j
        assert b in off and asm.row_prompt[b] == prompt
        got = tokens[b, p:][mask[b, p:] == 1].tolist()
        assert got == response_tokens(tok, text)
        if guide_logp == "file":
          stored = traces[prompt].responses[j].logp
          np.testing.assert_allclose(np.asarray(batch.guide_logp_BxT)[b, p:p + len(stored)],
                                     stored, atol=1e-6)
    assert off.size == want_off
    trained = np.asarray(batch.loss_mask_BxT)[off] > 0  # the OFF rows' response tokens
    guide_logp = np.asarray(batch.guide_logp_BxT)[off][trained]
    if config.guide.logp == "one":
      np.testing.assert_array_equal(guide_logp, 0.0)  # πϕ ≡ 1
    else:  # stored or scored: the guide model's log-probs of exactly these tokens
      guide = models.from_pretrained(tiny["guide"])
      scores = np.asarray(sampling.score(guide, batch.tokens_BxT, batch.mask_BxT,
                                         batch.positions_BxT))[off][trained]
      np.testing.assert_allclose(guide_logp, scores, atol=1e-4)
      assert np.all(guide_logp < 0)
    params0 = [np.array(x) for x in jax.tree.leaves(state.params)]
    pos, timer = 0, PhaseTimer()
    for _ in range(2):
      state, pos, metrics, samples = rl.rl_step(exp, state, pos, timer)
  exp.reward_runner.close()
  assert metrics["loss/skipped_updates"] == 0 and metrics["train/rows_off"] > 0
  assert any(np.abs(a - np.asarray(b)).max() > 0
             for a, b in zip(params0, jax.tree.leaves(state.params)))
  assert {s["prompt"] for s in samples} <= set(traces)


def _rows(workdir):
  drop = lambda r: {k: v for k, v in r.items()
                    if not k.startswith(("time/", "compile/")) and k != "wall_s"}
  return [drop(r) for r in mlog.read_metrics(str(workdir))]


def test_traces_run_resumes_bit_identically_and_reports(tiny, tmp_path):
  full = traces_config(tiny, algo="mix1", num_steps=4, checkpoint_every=2,
                       **{"guide.logp": "file"})
  loop.run(full, str(tmp_path / "full"))
  part = copy.deepcopy(full)
  part.num_steps = 2
  loop.run(part, str(tmp_path / "split"))
  summary = loop.run(full, str(tmp_path / "split"))  # resumes at step 2, trace position included
  assert summary["start_step"] == 2 and summary["final_step"] == 4
  assert _rows(tmp_path / "full") == _rows(tmp_path / "split")
  saved = json.load(open(tmp_path / "split" / "summary.json"))
  assert saved["guide_source"] == "traces" and saved["guide_logp"] == "file"
  assert saved["traces/path"] == tiny["traces"] and saved["traces/prompts"] >= 10
  assert _rows(tmp_path / "full")[-1]["data_pos"] > 0


def test_luffy_paper_preset_is_seven_rollouts_plus_one_trace_normalised_together(tiny, tmp_path):
  config = luffy_paper.get_config()
  config.policy, config.guide.path = tiny["policy"], ""
  config.task_kwargs = dict(TASK)
  config.guide.traces_path = tiny["traces"]
  config.rollout.groups, config.export_hf, config.eval_size, config.eval_batch_size = 4, False, 8, 8
  spec = rl.resolve(config)
  assert (spec.algorithm.name, spec.sizes.n, spec.sizes.m, spec.guide.logp) == ("luffy", 7, 1,
                                                                                 "one")
  assert not spec.std_normalize and spec.objective.gamma == 0.1
  # LUFFY's 0.001 on a token mean beside its Σ/T loss of S = 128 rows: 0.001 / S in mixpo's J
  # (experiments/configs/luffy_paper.py; set at the preset's own sizes).
  assert spec.objective.entropy_coef == pytest.approx(0.001 / 128) and not spec.dynamic_sampling
  assert spec.objective.entropy_agg == "token-mean"
  exp, state, ckpt, _ = loop.setup(config, str(tmp_path))
  ckpt.close()
  assert exp.guide is None  # πϕ ≡ 1 needs no guide checkpoint
  with jax.set_mesh(exp.mesh):
    asm, batch, n_groups = one_step_batch(exp, state)
  exp.reward_runner.close()
  kind, real, adv = (np.asarray(batch.kind_B), np.asarray(batch.real_B),
                     np.asarray(batch.adv_B))
  rewards = asm.rows.rewards_B
  assert n_groups == 4 and real.all()
  for g in range(n_groups):
    rows = np.concatenate([np.arange(g * 7, g * 7 + 7), [4 * 7 + g]])  # 7 rollouts + its trace
    assert list(kind[rows]) == [objectives.ON] * 7 + [objectives.OFF]
    np.testing.assert_allclose(adv[rows], rewards[rows] - rewards[rows].mean(), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(batch.guide_logp_BxT), 0.0)


@pytest.mark.parametrize("overrides,match", [
    ({"guide.source": "file"}, "guide.source='file'"),
    ({"guide.source": "traces", "guide.traces_path": ""}, "guide.traces_path='': empty"),
    ({"guide.source": "traces", "guide.traces_path": "t.jsonl", "guide.logp": "maybe"},
     "guide.logp='maybe'"),
    ({"guide.logp": "file"}, "'file' needs config.guide.source='traces'"),
    ({"guide.source": "traces", "guide.traces_path": "t.jsonl", "guide.logp": "file",
      "algo": "mix2"}, "zero_ratio='old'"),
    ({"guide.source": "traces", "guide.traces_path": "t.jsonl", "guide.logp": "model",
      "guide.path": ""}, "needs a guide policy"),
])
def test_trace_config_errors_name_the_field(overrides, match):
  config = set_fields(smoke.get_config(), overrides)
  with pytest.raises(ValueError, match=match):
    rl.resolve(config)


@pytest.mark.slow
def test_readme_two_command_workflow(tmp_path):
  """make_traces from the built-in guide, then train from the traces (README "Running")."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  models_dir = tmp_path / "models"
  train = [sys.executable, "experiments/train.py", "--config=smoke",
           f"--config.builtin_dir={models_dir}", "--config.num_steps=2"]
  # The built-in models (guide and weak policy) are built by a first, trace-free guided run (an
  # unguided one builds only the policy it uses).
  out = subprocess.run(train + [f"--workdir={tmp_path / 'w0'}", "--config.algo=mix1"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  traces = tmp_path / "traces.jsonl"
  out = subprocess.run([sys.executable, "experiments/make_traces.py",
                        f"--guide={models_dir / 'guide'}", "--task=addition",
                        "--digits=2", "--terms=2", "--n_prompts=64", "--max_new_tokens=6",
                        f"--out={traces}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  out = subprocess.run(train + [f"--workdir={tmp_path / 'w1'}", "--config.algo=mix1",
                                "--config.guide.source=traces",
                                f"--config.guide.traces_path={traces}", "--config.guide.logp=file"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(tmp_path / "w1" / "summary.json"))
  assert summary["final_step"] == 2 and summary["guide_source"] == "traces"


@pytest.mark.parametrize("fmt", ["verl", "openr1"])
def test_luffy_trains_from_the_other_trace_formats(tiny, tmp_path, fmt):
  """The same traces written as a verl / LUFFY parquet (chat-list prompt, target_lst) or an
  OpenR1 parquet (problem, answer, generations): prompts and OFF rows reach training."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  groups = read_trace_prompts(tiny["traces"])[0]
  if fmt == "verl":
    rows = [{"data_source": "addition", "prompt": [{"role": "user", "content": g.prompt}],
             "reward_model": {"ground_truth": g.answer},
             "target_lst": [[{"role": "assistant", "content": r.text}] for r in g.responses]}
            for g in groups]
  else:
    rows = [{"problem": g.prompt, "answer": g.answer,
             "generations": [r.text for r in g.responses],
             "correctness_math_verify": [True] * len(g.responses)} for g in groups]
  path = str(tmp_path / f"{fmt}.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  config = traces_config(tiny, algo="luffy", **{"guide.logp": "one", "guide.traces_path": path})
  config.guide.traces.format = fmt
  if fmt == "verl":  # chat-list prompts need the policy tokenizer's chat template
    with pytest.raises(ValueError, match="has none.*chat_template=never"):
      loop.setup(config, str(tmp_path / "refused"))
    import shutil
    policy = str(tmp_path / "policy_with_template")
    shutil.copytree(tiny["policy"], policy)
    tok = models.load_tokenizer(policy)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(policy)
    config.policy = policy
  exp, state, ckpt, _ = loop.setup(config, str(tmp_path / "run"))
  ckpt.close()
  with jax.set_mesh(exp.mesh):
    state, _, metrics, _ = rl.rl_step(exp, state, 0, PhaseTimer())
  exp.reward_runner.close()
  assert metrics["train/rows_off"] > 0 and metrics["loss/skipped_updates"] == 0, metrics
