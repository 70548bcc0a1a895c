"""End-to-end test of experiments/make_traces.py on a tiny random guide over the addition task."""

import os
import subprocess
import sys

from mixpo import builtin, models
from mixpo.data import char_tokenizer, read_traces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_traces_task_writes_readable_traces(tmp_path):
  tok = char_tokenizer()
  guide = str(tmp_path / "guide")
  model = models.init_from_config(builtin.tiny_hf_config(tok, hidden=32, layers=1, heads=2,
                                                         kv_heads=1, intermediate=64), rng=0)
  models.save_pretrained(model, guide)
  tok.save_pretrained(guide)
  out = str(tmp_path / "traces.jsonl")
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "make_traces.py"),
                  f"--guide={guide}", "--task=addition", "--task_knobs=digits=1,terms=2",
                  "--n_prompts=3", "--n_per_prompt=2", "--max_new_tokens=4", f"--out={out}",
                  "--batch_size=2"], check=True, cwd=ROOT, capture_output=True, timeout=120)
  traces, summary = read_traces(out)
  assert summary.kept == 6 and all(t.has_guide_logp for t in traces)
  assert traces[0].prompt == traces[1].prompt and traces[0].prompt.endswith("=")
  for t in traces:
    assert 1 <= len(t.response_tokens) <= 4 and all(x <= 0 for x in t.guide_logp)
