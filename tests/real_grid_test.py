"""The real-model grid (experiments/configs/compare_real.py, experiments/real_grid.py): variants,
the two-stage SFT → DAPO cell, FLOPs per row, the equal-compute table, and a smoke grid of the
recipe end to end on a tiny stand-in written through the same GGUF conversion."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from experiments import grid, grid_flops, real_grid
from experiments.configs import compare_real
from mixpo import algorithms, analysis, flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variants_hold_the_issue_baselines():
  base = compare_real.get_config()
  labels = [c.variant for c in grid.grid_cells("main", base, seeds=[0])]
  assert labels == [*algorithms.grids()["main"], "luffy_paper", "sft", "sft_dapo", "sft_mix"]
  assert {"grpo", "dapo", "luffy", "mix1", "mix2"} <= set(labels)
  # The single-stage SFT + RL variant runs a table entry (CHORD's by default).
  base.compare.sft_mix_algo = "no_such_entry"
  with pytest.raises(ValueError, match="sft_mix_algo='no_such_entry'"):
    grid.grid_cells("main", base, seeds=[0])
  base.compare.sft_mix_algo = "mix2"  # any entry of the table enables it.
  [cell] = grid.grid_cells("main", base, algos=["sft_mix"], seeds=[1])
  assert (cell.algo, cell.name) == ("mix2", "sft_mix-s1")
  with pytest.raises(ValueError, match="one grid, 'main'"):
    grid.grid_cells("style", base)


def test_cell_configs_and_the_two_stage_budget():
  base = compare_real.get_config()

  def config(label):
    [cell] = grid.grid_cells("main", base, algos=[label], seeds=[2])
    return cell, grid.cell_config(base, cell, "/w", budget=1000)

  _, c = config("mix2")
  assert (c.policy, c.guide.path, c.guide.source) == ("/w/models/base/policy_init",
                                                 "/w/models/guide-same/guide", "model")
  assert c.objective.shaping_grad == base.compare.shaping_grad and c.max_policy_tokens == 1000
  _, c = config("luffy_paper")
  assert (c.algo, c.guide.source, c.guide.logp, c.rollout.n, c.rollout.m) == (
      "luffy", "traces", "one", 7, 1)
  assert c.guide.traces_path == "/w/models/guide-same/traces.jsonl" and c.guide.traces.only_correct
  cell, rl = config("sft_dapo")
  sft, rl_again = real_grid.stage_configs(base, cell, "/w", 1000)
  assert rl.to_dict() == rl_again.to_dict()  # the grid's config of the cell is its RL stage.
  assert sft.max_policy_tokens + rl.max_policy_tokens == 1000  # the same budget in all.
  assert sft.max_policy_tokens == round(1000 * base.compare.sft_stage_fraction)
  assert sft.export_hf and sft.optim.learning_rate == base.compare.sft_learning_rate
  assert sft.guide.traces_path.endswith("traces.jsonl") and rl.guide.traces_path == ""
  assert rl.algo == "dapo" and rl.policy == os.path.join(
      grid.cell_dir("/w", cell), real_grid.SFT_STAGE, "export")
  assert (rl.seed, sft.seed) == (2, 2)
  # An SFT step trains groups × m rows, an RL step groups × n: SFT evals at about the same tokens.
  g = base.compare
  assert g.sft_eval_every * base.rollout.groups * base.rollout.m == pytest.approx(
      base.eval_every * base.rollout.groups * base.rollout.n)
  assert sft.eval_every == g.sft_eval_every and rl.eval_every == base.eval_every
  _, c = config("sft")
  assert c.eval_every == g.sft_eval_every
  cmd = real_grid.guide_sft_command(base, "/b", "/g")
  assert "--task_knobs=max_value=20,min_steps=1,steps=2" in cmd and "--init=/b" in cmd


def test_flops_accumulate_per_step_and_resumed_steps_count_once(tiny_converted):
  policy = tiny_converted[0]
  base = compare_real.get_config("small")
  cell = grid.grid_cells("main", base, algos=["dapo"], seeds=[0])[0]  # (sft_dapo runs dapo too)
  assert cell.label == "dapo"
  c = grid.cell_config(base, cell, "/w", 10)
  c.policy = policy
  step = {"step_policy_tokens": 40, "train/rows_on": 8, "train/rows_zero": 0,
          "train/rows_off": 0, "train/response_length": 5.0, "dynamic/gen_batches": 1}
  metrics = [{"step": 0}, {"step": 1, **step}, {"step": 2, **step}, {"step": 2, **step}]
  rows = grid_flops.with_flops(metrics, c)
  one = flops.rl_step_flops(step, grid_flops.step_cost(c), c.rollout.groups, c.rollout.n)
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert rows[0]["flops"] == 0 and rows[2]["flops"] == pytest.approx(2 * sum(one.values()))
  assert grid_flops.step_cost(c).prompt_tokens > 20  # the chat template's tokens count.
  sft_rows = grid_flops.with_flops([{"step": 0}, {"step": 1, "policy_tokens": 30},
                                    {"step": 2, "policy_tokens": 50}], c, sft=True)
  assert sft_rows[2]["flops"] == sft_rows[2]["flops_sft"] > sft_rows[1]["flops_sft"] > 0


def _rows(variant, finals, flops_end, seeds=(0, 1, 2)):
  out = []
  for seed, acc in zip(seeds, finals):
    meta = {"grid": "main", "regime": "base", "policy_steps": 0, "variant": variant,
            "algo": variant, "scheme": "dapo", "gamma": 0.1, "seed": seed, "cell": f"c{seed}"}
    for step, (a, f, tokens) in enumerate(((0.1, 0.0, 0), (acc - 0.1, flops_end / 2, 500),
                                           (acc, flops_end, 1000))):
      out.append({**meta, "step": step, "eval_accuracy": a, "policy_tokens": tokens,
                  "guide_tokens": 0, "wall_s": 1.0, "flops": f, "flops_guide_gen": 0.0})
  return out


def test_compute_table_compares_at_the_smallest_final_flops():
  rows = (_rows("dapo", [0.3, 0.4, 0.5], 100.0) + _rows("mix2", [0.5, 0.6, 0.7], 400.0)
          + _rows("sft_dapo", [0.4, 0.5, 0.6], 200.0))
  table = analysis.compute_table(rows, ("dapo", "sft_dapo"), threshold=0.25)
  assert "F* = 100 FLOPs" in table
  mix2 = next(line for line in table.splitlines() if "| mix2 |" in line)
  # At 100 FLOPs mix2 has only its step-0 model (its first eval after step 0 is at 200).
  assert "| 0.100 [0.100, 0.100] |" in mix2 and "-0.300 [-0.400, -0.200]" in mix2
  sft_dapo = next(line for line in table.splitlines() if "| sft_dapo |" in line)
  assert "| 0.400 [0.300, 0.500] |" in sft_dapo  # its 100-FLOP eval: acc − 0.1.
  dapo = next(line for line in table.splitlines() if "| dapo |" in line)
  # No Δ to itself; equal to sft_dapo at F* (0.4 − 0.1 vs 0.3: ±0 in float).
  assert re.search(r"\| — \| [+-]0\.000 \[[+-]0\.000, [+-]0\.000\] \|", dapo)
  assert "(3/3)" in dapo and math.isnan(analysis.value_at(rows[:3], "flops", -1.0))
  # The accuracy-vs-FLOPs plot and the table go into the report only with FLOP columns.
  assert analysis.has_flops(rows) and not analysis.has_flops(
      [{**r, "flops": math.nan} for r in rows])


def test_real_smoke_grid(tiny_gguf, tmp_path):
  """compare.py over the real-model recipe at stand-in size: the tiny GGUF converted by the
  binary, a guide by experiments/sft.py, the trace file, and SFT → DAPO (SFT on the traces, then
  DAPO from its export), one step each; FLOPs in every row; a rerun resumes (skips the cell).
  (Trace-fed RL cells run in tests/reasoning_grid_test.py's smoke grid.)"""
  work, out = tmp_path / "work", tmp_path / "out"
  cmd = [sys.executable, "experiments/compare.py", "--config=compare_real:small",
         f"--config.compare.gguf={tiny_gguf[0]}", "--algos=sft_dapo", "--seeds=0",
         f"--workroot={work}", f"--out_dir={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "ran 1 cells, skipped 0 finished, failed 0" in res.stdout
  # A finished cell's checkpoints are gone (config.compare.keep_checkpoints=False); its metrics
  # stay, and the rerun below still counts it finished.
  assert list(work.glob("main/*/*/metrics.jsonl")) and not list(work.glob("main/*/*/checkpoints"))
  models = work / "models"
  convert = json.load(open(models / "base" / "policy_init" / "convert.json"))
  assert convert["chat_template"] and convert["max_logit_error"] < 1e-4
  assert json.load(open(models / "guide-same" / "guide" / "sft_eval.json"))["steps"] == 4
  meta = json.load(open(models / "guide-same" / "traces_meta.json"))
  assert meta["responses"] > 0 and meta["flops"] > 0
  rows = analysis.read_csv(str(out / "main.csv"))
  by_cell = {}
  for r in rows:
    by_cell.setdefault(r["variant"], []).append(r)
  assert set(by_cell) == {"sft_dapo"}
  two = by_cell["sft_dapo"]
  assert two[0]["flops"] == 0 and all(b["flops"] > a["flops"] for a, b in zip(two, two[1:]))
  last = two[-1]
  assert last["flops"] == pytest.approx(sum(last[p] for p in flops.PARTS))
  assert last["flops_guide_gen"] > 0  # it read the trace file: charged its share.
  # The SFT stage's rows, then the RL stage's continuing its steps and tokens.
  assert [r["step"] for r in two] == [0, 1, 2]
  assert two[1]["flops_sft"] > 0 and two[1]["flops_update"] == 0
  assert two[2]["flops_update"] > 0 and two[2]["flops_sft"] == two[1]["flops_sft"]
  assert two[2]["policy_tokens"] > two[1]["policy_tokens"] == two[1]["guide_tokens"] > 0
  summary = (out / "main_summary.md").read_text()
  assert "paired differences to dapo, sft_dapo" in summary and "At equal compute" in summary
  assert (out / "main_accuracy_vs_flops.png").stat().st_size > 0
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0 and "ran 0 cells, skipped 1 finished" in res.stdout, res.stderr[-2000:]
