"""End-to-end test of experiments/make_traces.py on a tiny random guide over the addition task."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mixpo import builtin, models
from mixpo.data import DataError, char_tokenizer, get_task, read_traces
from mixpo.data.traces import read_trace_prompts, tokenizer_fingerprint
from mixpo.guide_source import TraceOptions, TraceSource, response_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _guide(tmp_path):
  tok = char_tokenizer()
  guide = str(tmp_path / "guide")
  model = models.init_from_config(builtin.tiny_hf_config(tok, hidden=32, layers=1, heads=2,
                                                         kv_heads=1, intermediate=64), rng=0)
  models.save_pretrained(model, guide)
  tok.save_pretrained(guide)
  return guide


def test_make_traces_task_writes_what_the_loop_reads(tmp_path):
  guide = _guide(tmp_path)
  out = str(tmp_path / "traces.jsonl")
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "make_traces.py"),
                  f"--guide={guide}", "--task=addition", "--digits=1", "--terms=2",
                  "--n_prompts=4", "--n_per_prompt=4", "--max_new_tokens=12", f"--out={out}",
                  "--batch_size=2"], check=True, cwd=ROOT, capture_output=True, timeout=300)
  tok = models.load_tokenizer(guide)
  prompts, summary = read_trace_prompts(out)
  assert summary.fmt == "mixpo" and summary.rows == len(prompts) >= 2  # one line per prompt
  task_prompts = [e.prompt for e in get_task("addition", digits=1, terms=2).examples(
      "train", 4, seed=0)]
  assert all(p.prompt in task_prompts and 1 <= len(p.responses) <= 4 for p in prompts)
  for p in prompts:
    for r in p.responses:
      assert r.tokens == response_tokens(tok, r.text) and len(r.tokens) <= 12
      assert len(r.logp) == len(r.tokens) and all(x < 0 for x in r.logp)
      assert r.tokenizer == tokenizer_fingerprint(tok) and r.logp_temperature == 1.0
      assert r.correct is not None  # the task's reward marks each response
  flat, _ = read_traces(out)  # the one-response-per-trace view of the same file
  assert len(flat) == summary.responses and all(t.has_guide_logp for t in flat)
  src = TraceSource.from_options(TraceOptions(out, guide_logp="file"), tok, max_new_tokens=12)
  assert src.stats["responses"] == summary.responses and src.stats["dropped_bad"] == 0


def test_make_traces_without_logp_reads_under_one_not_file(tmp_path):
  from experiments.make_traces import make_traces
  from mixpo.data.traces import write_trace_prompts
  guide = _guide(tmp_path)
  exs = get_task("addition", digits=1, terms=2).examples("train", 2, seed=0)
  prompts, counts = make_traces(guide, exs, n_per_prompt=4, max_new_tokens=12, temperature=1.0,
                                batch_size=2, seed=0, with_logp=False)
  assert counts["samples"] == 8
  assert counts["unfinished"] + sum(len(p.responses) for p in prompts) == 8
  out = str(tmp_path / "t.jsonl")
  write_trace_prompts(out, prompts)
  tok = models.load_tokenizer(guide)
  one = TraceSource.from_options(TraceOptions(out, guide_logp="one"), tok, max_new_tokens=12)
  np.testing.assert_array_equal(one.guide_rows(range(len(one)), 4).guide_logp_BxN, 0.0)
  with pytest.raises(DataError, match=r"t\.jsonl:line 1: response 0 has no stored log-probs"):
    TraceSource.from_options(TraceOptions(out, guide_logp="file"), tok, max_new_tokens=12)
