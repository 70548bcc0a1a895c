"""compare.py, grid.py, mixpo/analysis.py: grid rules, equal budgets, resume, reports."""

import ast
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from experiments import grid
from experiments.configs import compare as compare_config
from mixpo import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_rules():
  base = compare_config.get_config("small")
  main = grid.grid_cells("main", base, seeds=(0, 1, 2))
  assert len(main) == 5 * 2 * 3  # algos × regimes × seeds.
  assert {c.scheme for c in main if c.algo in ("grpo", "dapo", "luffy")} == {"dapo"}
  scheme = grid.grid_cells("scheme", base, seeds=(0,), regimes=["weak"])
  assert [(c.algo, c.scheme) for c in scheme] == [("mix1", "paper"), ("mix1", "dapo"),
                                                  ("mix2", "paper"), ("mix2", "dapo")]
  gamma = grid.grid_cells("gamma", base, seeds=(0,), regimes=["weak"], gammas=["0.01", "1"])
  assert [c.name for c in gamma] == ["mix2-dapo-g0.01-s0", "mix2-dapo-g1-s0"]
  assert gamma[0].variant == "mix2 γ=0.01"
  config = grid.cell_config(base, scheme[0], "/root", budget=123)
  assert "compare" not in config and config.max_policy_tokens == 123
  assert config.builtin.policy_steps == base.compare.regimes.weak
  assert config.builtin_dir == "/root/models/weak" and config.task_kwargs["reward"] == "exact"
  with pytest.raises(ValueError, match="config.compare.regimes"):
    grid.grid_cells("main", base, regimes=["strong"])


def test_cell_rows_carry_train_metrics_and_accumulate_wall_time():
  meta = {k: 0 for k in analysis.META_COLUMNS}
  metrics = [
      {"step": 0, "eval/accuracy": 0.1, "policy_tokens": 0, "guide_tokens": 0},
      {"step": 1, "train/reward": 0.5, "policy_tokens": 10, "guide_tokens": 2, "wall_s": 3.0},
      # Step 2 ran after a resume: its wall clock restarted.
      {"step": 2, "train/reward": 0.6, "policy_tokens": 20, "guide_tokens": 4, "wall_s": 1.0,
       "eval/accuracy": 0.3}]
  rows = analysis.cell_rows(metrics, meta)
  assert [r["step"] for r in rows] == [0, 2]
  assert math.isnan(rows[0]["train_reward"]) and rows[1]["train_reward"] == 0.6
  assert rows[1]["wall_s"] == 4.0 and rows[1]["guide_tokens"] == 4


def _compare(tmp_path, *extra):
  cmd = [sys.executable, "experiments/compare.py", "--small", "--grid=main", "--algos=dapo,mix2",
         "--seeds=0", "--regimes=weak", "--budget_tokens=1", f"--workroot={tmp_path / 'work'}",
         f"--out_dir={tmp_path / 'out'}", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_compare_small_grid_equal_budget_resume_and_reports(tmp_path):
  stdout = _compare(tmp_path)
  assert "ran 2 cells, skipped 0 finished" in stdout
  out = tmp_path / "out"
  for name in ("main.csv", "main_accuracy_vs_step.png", "main_accuracy_vs_tokens.png",
               "main_summary.md"):
    assert (out / name).stat().st_size > 0, name
  with open(out / "main.csv", newline="") as f:
    assert tuple(csv.DictReader(f).fieldnames) == analysis.COLUMNS
  rows = analysis.read_csv(str(out / "main.csv"))
  assert {(r["algo"], r["step"]) for r in rows} == {("dapo", 0), ("dapo", 1), ("mix2", 0),
                                                    ("mix2", 1)}  # budget 1 token: one step.
  final = {r["algo"]: r for r in rows if r["step"] == 1}
  assert final["dapo"]["guide_tokens"] == 0 and final["mix2"]["guide_tokens"] > 0
  assert all(r["policy_tokens"] >= 1 and not math.isnan(r["train_reward"]) for r in final.values())
  cell = tmp_path / "work" / "main" / "weak" / "mix2-dapo-s0"
  summary = json.load(open(cell / "summary.json"))
  assert summary["budget_reached"] and summary["final_step"] == 1
  assert "| weak | mix2 | 1 |" in (out / "main_summary.md").read_text()

  before = (out / "main.csv").read_bytes()
  stdout = _compare(tmp_path, f"--out_dir={tmp_path / 'out2'}", f"--check_against={out}/main.csv")
  assert "ran 0 cells, skipped 2 finished" in stdout  # nothing reruns.
  assert f"check against {out}/main.csv: 4 rows identical (wall_s aside), 0 differences" in stdout
  assert (tmp_path / "out2" / "main.csv").read_bytes() == before

  # A cell run under another config is refused by name rather than silently reused.
  config = grid.cell_config(compare_config.get_config("small"), grid.grid_cells(
      "main", compare_config.get_config("small"), ["mix2"], [0], ["weak"])[0],
      str(tmp_path / "work"), budget=1)
  assert grid.cell_state(str(cell), config, budget=1) == "done"
  assert grid.cell_state(str(cell), config, budget=10**6) == "resume"  # a larger budget goes on.
  # A run that failed (here: as the real grid's did, saving its last checkpoint on a full disk)
  # counted the tokens of a step it never logged: it is resumed, not reported as finished.
  failed = {**summary, "error": "CheckpointDirectoryError: disk full", "budget_reached": False}
  (cell / "summary.json").write_text(json.dumps(failed))
  assert grid.cell_state(str(cell), config, budget=1) == "resume"
  (cell / "summary.json").write_text(json.dumps(summary))
  config.optim.learning_rate *= 2
  with pytest.raises(ValueError, match="mix2-dapo-s0.*learning_rate"):
    grid.cell_state(str(cell), config, budget=1)


def test_check_rows_reports_every_difference_but_wall_time(tmp_path):
  meta = {"grid": "main", "regime": "weak", "policy_steps": 120, "variant": "mix2", "algo": "mix2",
          "scheme": "dapo", "gamma": 0.1, "seed": 0, "cell": "mix2-dapo-s0"}
  rows = [{**meta, "step": s, "policy_tokens": 100 * s, "eval_accuracy": 0.1 + s / 3,
           "wall_s": 1.5 * s} for s in (0, 5, 9)]
  ref = analysis.write_csv(rows, str(tmp_path / "ref.csv"))
  rerun = lambda rs: analysis.write_csv(rs, str(tmp_path / "new.csv"))
  assert grid.check_rows(rerun([{**r, "wall_s": 7.0} for r in rows]), ref) == (3, [])
  changed = [dict(r) for r in rows]
  changed[1]["eval_accuracy"] += 1e-15  # a last-digit change of the printed float.
  matched, problems = grid.check_rows(rerun(changed), ref)
  assert matched == 2 and len(problems) == 1 and "step 5: eval_accuracy=" in problems[0], problems
  matched, problems = grid.check_rows(rerun(rows[:2]), ref)  # the trajectory ends elsewhere.
  assert matched == 2 and problems == [f"main/weak/mix2-dapo-s0: steps ['0', '5'] vs "
                                       f"['0', '5', '9'] in {ref}"]
  other = [{**r, "cell": "mix2-dapo-s1", "seed": 1} for r in rows]
  assert grid.check_rows(rerun(other), ref) == (0, [f"main/weak/mix2-dapo-s1: not in {ref}"])


def test_config_overrides_work_without_an_explicit_config():
  """`compare.py --config.x=v` (as README's commands write it) puts the default --config first."""
  code = ("import sys; sys.argv = ['x']\n"
          "from experiments.compare import _fix_argv\n"
          "print(_fix_argv(['compare.py', '--config.rollout.m=4', '--small', '--grid=main']))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       check=True).stdout
  argv = ast.literal_eval(out.strip().splitlines()[-1])
  assert argv[1].startswith("--config=") and argv[1].endswith("compare.py:small"), argv
  assert argv[2:] == ["--config.rollout.m=4", "--small", "--grid=main"]


def test_a_preempted_cell_stops_the_grid(tmp_path, monkeypatch):
  # loop.run catches SIGTERM, checkpoints and returns preempted; the grid must not go on to the
  # next cell (whose own handler would swallow the scheduler's signal for good).
  from mixpo import loop
  base = compare_config.get_config("small")
  cells = grid.grid_cells("main", base, ["dapo", "mix2"], [0], ["weak"])
  started = []

  def fake_run(config, workdir):
    started.append(workdir)
    return {"final_step": 1, "policy_tokens": 1, "guide_tokens": 0, "preempted": True,
            "preempted_by": "SIGTERM"}

  monkeypatch.setattr(loop, "run", fake_run)
  done = grid.run_cells(cells, base, str(tmp_path), budget=1)
  assert len(started) == 1 and done["preempted"][1] == "SIGTERM"
  assert done["preempted"][0].startswith("weak/") and len(done["ran"]) == 1
