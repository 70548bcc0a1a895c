"""The reasoning grids (experiments/compare.py --config=compare_reasoning): variants, cell configs,
the interval statistics of mixpo/analysis.py, and a smoke grid run end to end."""

import json
import math
import os
import subprocess
import sys

import matplotlib.colors
import numpy as np
import pytest

from experiments import grid
from experiments.configs import compare_reasoning
from mixpo import algorithms, analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
  mean, lo, hi = analysis.bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5])
  assert mean == pytest.approx(0.3) and 0.1 < lo < 0.3 < hi < 0.5
  assert analysis.bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5]) == (mean, lo, hi)  # fixed seed.
  wide = analysis.bootstrap_ci([0.0, 0.0, 1.0, 1.0, 0.5])
  assert wide[2] - wide[1] > hi - lo  # more spread, wider interval.
  assert analysis.bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4, 0.4))
  one = analysis.bootstrap_ci([0.7, math.nan])  # NaNs dropped; one value has no interval.
  assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])
  # Against a large-sample reference: the percentile interval of the mean of 400 draws is about
  # mean ± 1.96 σ/√n.
  v = np.random.default_rng(1).normal(0.5, 0.1, 400)
  _, lo, hi = analysis.bootstrap_ci(v, n_boot=4000)
  assert (hi - lo) / 2 == pytest.approx(1.96 * v.std() / 20, rel=0.1)


def test_paired_differences_pair_by_seed():
  a = {0: 0.5, 1: 0.6, 2: 0.7, 3: math.nan}
  base = {0: 0.4, 2: 0.5, 3: 0.1, 4: 0.9}
  assert analysis.paired_differences(a, base) == pytest.approx([0.1, 0.2])


def _rows(variant, finals, wall=10.0, gen=0.0, regime="weak"):
  rows = []
  for seed, acc in enumerate(finals):
    meta = {"grid": "main", "regime": regime, "policy_steps": 1, "variant": variant,
            "algo": variant, "scheme": "dapo", "gamma": 0.1, "seed": seed, "cell": f"c{seed}"}
    rows.append({**meta, "step": 0, "eval_accuracy": 0.1, "policy_tokens": 0, "guide_tokens": 0,
                 "wall_s": math.nan, "guide_gen_s": 0.0})
    rows.append({**meta, "step": 5, "eval_accuracy": acc, "policy_tokens": 1000,
                 "guide_tokens": 500 if gen else 0, "wall_s": wall, "guide_gen_s": gen})
  return rows


def test_interval_table_paired_difference_and_wall_with_guide():
  rows = _rows("dapo", [0.2, 0.3, 0.4]) + _rows("mix2", [0.3, 0.4, 0.5], wall=20.0, gen=5.0)
  table = analysis.interval_table(rows, "dapo", threshold=0.25)
  mix2 = next(line for line in table.splitlines() if "| mix2 |" in line)
  # Every seed gains exactly 0.1: a paired difference with a zero-width interval, although the
  # two variants' own intervals overlap.
  assert "+0.100 [+0.100, +0.100]" in mix2
  assert "| 1,000 (3/3) (≥ 0.250) |" in mix2  # all three seeds pass 0.25 at their final eval.
  assert mix2.endswith("| 1,000 | 500 | 25 |")  # wall 20 s + 5 s of offline guide generation.
  dapo = next(line for line in table.splitlines() if "| dapo |" in line)
  assert "| 0.300 [0.200, 0.400] | — |" in dapo and "(2/3)" in dapo


def test_curves_of_eleven_variants_get_eleven_colours():
  # The main reasoning grid has 11 variants: matplotlib's default cycle repeats after 10, which
  # drew GRPO and the SFT baseline in the same colour.
  variants = [f"v{i}" for i in range(11)]
  rows = [r for v in variants for r in _rows(v, [0.2, 0.3]) + _rows(v, [0.2], regime="moderate")]
  fig = analysis.plot_grid(rows, "policy_tokens")
  for ax in fig.axes:
    colours = {tuple(np.round(matplotlib.colors.to_rgba(line.get_color()), 4))
               for line in ax.get_lines()}
    assert len(ax.get_lines()) == 11 and len(colours) == 11


def test_reports_with_a_baseline_write_intervals_and_the_final_accuracy_plot(tmp_path):
  rows = _rows("dapo", [0.2, 0.3]) + _rows("luffy", [0.1, 0.5], gen=3.0)
  paths = analysis.write_reports(rows, str(tmp_path), "main", baseline="dapo")
  assert os.path.basename(paths[3]) == "main_final_accuracy.png"
  summary = (tmp_path / "main_summary.md").read_text()
  assert "paired differences to dapo" in summary and "| weak | luffy | 2 |" in summary
  back = analysis.read_csv(str(tmp_path / "main.csv"))
  assert [r["guide_gen_s"] for r in back if r["step"] == 5] == [0.0, 0.0, 3.0, 3.0]


def test_reasoning_grids_hold_the_issue_variants():
  base = compare_reasoning.get_config()
  main = grid.grid_cells("main", base, seeds=range(5))
  labels = list(dict.fromkeys(c.variant for c in main))
  guided = [a for a in algorithms.grids()["main"] if algorithms.get(a).guided]
  assert set(labels) == ({"grpo", "dapo", "sft", "luffy_paper-step", "luffy_paper-exact"}
                         | {f"{a}-{m}" for a in guided for m in ("step", "exact")})
  assert {c.regime for c in main} == {"weak", "moderate"} and len(main) == len(labels) * 2 * 5
  assert [c.variant for c in grid.grid_cells("style", base, seeds=[0])] == ["dapo"] + [
      f"{a}-{s}" for a in guided for s in ("same", "words")]
  assert [c.variant for c in grid.grid_cells("source", base, seeds=[0])] == ["dapo"] + [
      f"mix{i}-{s}" for i in (1, 2) for s in ("online", "traces-one", "traces-file")]
  with pytest.raises(ValueError, match="match no variant"):
    grid.grid_cells("main", base, algos=["mix3"])
  with pytest.raises(ValueError, match="reasoning grids"):
    grid.grid_cells("gamma", base)


def test_reasoning_cell_configs():
  base = compare_reasoning.get_config()

  def config(grid_name, label, regime=None):
    [cell] = grid.grid_cells(grid_name, base, algos=[label], seeds=[3], regimes=regime or ["weak"])
    return cell, grid.cell_config(base, cell, "/w", budget=777)

  cell, c = config("main", "luffy_paper-exact")
  assert cell.name == "luffy_paper-exact-s3" and grid.cell_dir("/w", cell).endswith(
      "main/weak/luffy_paper-exact-s3")
  assert (c.algo, c.rollout.n, c.rollout.m, c.guide.source, c.guide.logp,
          c.objective.shaping_grad) == ("luffy", 7, 1, "traces", "one", "exact")
  assert c.guide.traces_path == "/w/models/guide-same/traces.jsonl" and c.guide.traces.only_correct
  assert c.policy == "/w/models/weak/policy_init" and c.max_policy_tokens == 777
  assert c.seed == 3 and "compare" not in c
  _, c = config("main", "mix2-step", ["moderate"])
  assert c.objective.shaping_grad == "paper_step" and c.policy == "/w/models/moderate/policy_init"
  assert c.builtin.policy_steps == base.compare.regimes.moderate
  _, c = config("main", "sft")
  assert c.optim.learning_rate == base.compare.sft_learning_rate
  assert c.guide.traces_path.endswith(".jsonl")
  _, c = config("style", "mix1-words")
  assert c.guide.path == "/w/models/guide-words/guide"
  assert c.rollout.max_new_tokens == base.compare.style_max_new_tokens
  words = grid._style_builtin(base, "words")
  assert dict(words.guide_task_kwargs) == {"style": "words"} and words.max_answer_tokens == 144
  assert words.guide_steps == base.compare.style_guide_steps
  assert grid._style_builtin(base, "same").to_dict() == base.builtin.to_dict()
  _, c = config("source", "mix2-traces-file")
  assert (c.guide.source, c.guide.logp, c.guide.path, c.objective.zero_ratio) == (
      "traces", "file", "/w/models/guide-same/guide", "old")  # no stored πϕ for ZERO rows.
  _, c = config("source", "mix1-traces-file")
  assert c.objective.zero_ratio == base.objective.zero_ratio
  _, c = config("source", "mix2-online")
  assert c.guide.source == "model" and c.guide.traces_path == ""


def test_reasoning_overlong_window_never_penalises_a_solution():
  """The overlong ramp starts after the longest solution of every style a grid's guide or policy
  writes, so only a truncated (overlong) chain is penalised."""
  from mixpo.data import char_tokenizer, get_task
  from mixpo.data.cot import COT_ALPHABET
  base = compare_reasoning.get_config()
  tok = char_tokenizer(COT_ALPHABET)
  for style, width in (("columns", base.rollout.max_new_tokens),
                       ("words", base.compare.style_max_new_tokens)):
    task = get_task("cot_arithmetic", **{**base.task_kwargs, "style": style})
    longest = task.max_solution_chars + 1  # char tokens, plus EOS.
    assert longest <= width - base.rollout.overlong_cache, (style, longest, width)
    assert len(tok(task.examples("train", 1)[0].metadata["solution"],
                   add_special_tokens=False)["input_ids"]) < longest


def test_reasoning_smoke_grid(tmp_path):
  """compare.py's reasoning path end to end at smoke size: shared models and a trace file built
  once, an RL cell, a trace-fed LUFFY-as-published cell and the SFT baseline, equal budgets,
  CSV and summary with intervals and the offline guide's generation charged."""
  work, out = tmp_path / "work", tmp_path / "out"
  cmd = [sys.executable, "experiments/compare.py", "--config=compare_reasoning:small",
         "--grid=main", "--algos=dapo,luffy_paper-exact,sft", "--seeds=0", "--regimes=weak",
         f"--workroot={work}", f"--out_dir={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "ran 3 cells, skipped 0 finished, failed 0" in res.stdout
  meta = json.load(open(work / "models" / "guide-same" / "traces_meta.json"))
  assert meta["responses"] > 0 and meta["guide_tokens"] > 0 and meta["seconds"] > 0
  rows = analysis.read_csv(str(out / "main.csv"))
  final = {r["variant"]: r for r in rows if r["step"] > 0}
  assert set(final) == {"dapo", "luffy_paper-exact", "sft"}
  assert all(r["policy_tokens"] >= 1 and r["step"] == 1 for r in final.values())  # budget 1.
  assert final["dapo"]["guide_tokens"] == 0 and final["dapo"]["guide_gen_s"] == 0
  for trace_fed in ("luffy_paper-exact", "sft"):
    assert final[trace_fed]["guide_tokens"] > 0 and final[trace_fed]["guide_gen_s"] > 0
  # SFT's budget counts the guide tokens it trains on.
  assert final["sft"]["policy_tokens"] == final["sft"]["guide_tokens"]
  summary = (out / "main_summary.md").read_text()
  assert "paired differences to dapo" in summary and "| weak | sft | 1 |" in summary
  assert (out / "main_final_accuracy.png").stat().st_size > 0
