r"""Equal-budget comparison of GRPO / DAPO / LUFFY / Mix-1 / Mix-2 on the built-in task.

  python experiments/compare.py --grid=main --seeds=0,1,2 --regimes=weak,moderate
  python experiments/compare.py --grid=gamma --budget_tokens=100000
  python experiments/compare.py --grid=scheme --config.optim.learning_rate=5e-4
  python experiments/compare.py --grid=main --small --algos=dapo,mix2 --seeds=0   # seconds

Grids (each cell = one loop.run in <workroot>/<grid>/<regime>/<algo>-<scheme>[-g<γ>]-s<seed>/):
  main:   algos (all five) × regimes × seeds.
  gamma:  Mix-2 × config.compare.gammas × regimes × seeds.
  scheme: Mix-1, Mix-2 × partition schemes (paper, dapo) × regimes × seeds, binary rewards.
Scheme rule: the scheme only changes what Mix-1 / Mix-2 are (the paper's literal ON = R > 0 vs
DAPO's kept groups), so they run under config.advantage.scheme (main, gamma) or both (scheme
grid); GRPO, DAPO and LUFFY always run under "dapo", the partition their own papers' losses use.
Equal budgets: every cell stops once it has generated --budget_tokens policy tokens (its step ends
with an eval and a checkpoint); guide tokens are counted and reported apart. All cells of a regime
share one weak start and one guide (<workroot>/models/<regime>, built once, reused).
The work root defaults to ./workdir_compare (./workdir_compare_small with --small), never a
shared temp path: its cached models and summary.json files are trusted on reuse, so a root that
another user owns or that every user may write is refused.
Resumable: a cell with summary.json and policy_tokens ≥ the budget is skipped; any other cell
resumes from its checkpoint (a larger budget continues finished cells). A cell whose saved config
differs from the current one is refused (name it in the error) unless --overwrite.
Writes <out_dir>/<grid>.csv, <grid>_accuracy_vs_{step,tokens}.png, <grid>_summary.md.
Reproducing a committed grid: rerun some of its cells into another --out_dir with
--check_against=experiments/results/<grid>.csv (BUILD_NOTES "Reproducing the committed grids").

Reasoning grids (chain-of-thought arithmetic; experiments/configs/compare_reasoning.py):
  python experiments/compare.py --config=compare_reasoning --grid=main --seeds=0,1,2,3,4
  python experiments/compare.py --config=compare_reasoning --grid=style --seeds=0,1,2,3,4
  python experiments/compare.py --config=compare_reasoning --grid=source --seeds=0,1,2,3,4
  main:   GRPO, DAPO, LUFFY / Mix-1 / Mix-2 under both shaping_grad modes, LUFFY as published
          (offline traces, πϕ ≡ 1) under both modes, SFT on the guide's traces; weak + moderate.
  style:  DAPO; LUFFY, Mix-1, Mix-2 × a guide of the policy's solution style or the words style.
  source: DAPO; Mix-1, Mix-2 × online guide, offline traces with πϕ ≡ 1, traces with stored
          log-probs (config.compare.baseline, DAPO, opens every grid: paired differences).
Cells: <workroot>/<grid>/<regime>/<variant>-s<seed>/ (variants: experiments/grid.py's
reasoning_variants; --algos keeps variant labels or algorithms). Output goes to
experiments/results/reasoning/, the summary with 95 % bootstrap intervals over seeds, paired
differences to DAPO and wall-clock including the guide's generation (offline traces: each
trace-fed cell is charged its share of the file's generation time).

Real-model grid (SmolLM2-135M-Instruct on word problems; experiments/configs/compare_real.py):
  python experiments/compare.py --config=compare_real --seeds=0,1,2 --workroot=workdir_real
  main:   GRPO, DAPO, LUFFY / Mix-1 / Mix-2 with the online guide, LUFFY as published, SFT on the
          guide's traces, SFT → DAPO, single-stage SFT + RL (experiments/real_grid.py); the
          models are built by the binaries into <workroot>/models (--prepare_only stops there).
Every row of a grid's CSV carries the model FLOPs spent up to it (mixpo/flops.py;
experiments/grid_flops.py); the summary compares at equal policy tokens and at equal FLOPs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.configs import resolve_config_path  # noqa: E402
from experiments.grid import (GRIDS, REASONING_GRIDS, check_rows, collect_rows,  # noqa: E402
                              grid_cells, prepare, run_cells)

_DEFAULT_CONFIG = resolve_config_path("compare")


def _fix_argv(argv: list[str]) -> list[str]:
  """Resolves short --config names; --small with no --config selects compare.py:small."""
  out = ["--config=" + resolve_config_path(a.split("=", 1)[1]) if a.startswith("--config=")
         else a for a in argv]
  if not any(a.startswith("--config=") for a in out):
    small = any(a in ("--small", "--small=true", "--small=True") for a in out)
    # Before any --config.<field>=v override, which ml_collections refuses ahead of --config.
    out.insert(1, f"--config={_DEFAULT_CONFIG}" + (":small" if small else ""))
  return out


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base run config with a `compare` field (default experiments/configs/"
    "compare.py; with --small, compare.py:small). --config.<field>=v overrides.")
_GRID = flags.DEFINE_string("grid", "main", f"Which grid to run (module docstring): {list(GRIDS)}, "
                            f"or with --config=compare_reasoning {list(REASONING_GRIDS)}.")
_ALGOS = flags.DEFINE_list("algos", None, "Override the grid's algorithms (e.g. dapo,mix2); in a "
                           "reasoning grid, variant labels or algorithms (e.g. dapo,mix2-step).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "RL seeds (config.seed) of every variant.")
_REGIMES = flags.DEFINE_list("regimes", None, "Regime names (keys of config.compare.regimes; "
                             "default: all of them).")
_GAMMAS = flags.DEFINE_list("gammas", None, "γ values of the gamma grid (default "
                            "config.compare.gammas).")
_BUDGET = flags.DEFINE_integer("budget_tokens", None, "Policy tokens per cell (default "
                               "config.max_policy_tokens).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Accuracy for 'tokens to threshold' (default: "
                                "the regime's initial accuracy + config.compare.threshold_delta).")
_WORKROOT = flags.DEFINE_string("workroot", None, "Run directories and shared models (default "
                                "./workdir_compare, ./workdir_compare_small with --small); must "
                                "be yours and not writable by every user.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "CSV / PNG / summary directory (default "
                               "experiments/results; <workroot>/results with --small).")
_SMALL = flags.DEFINE_bool("small", False, "Seconds-scale mode for tests (smoke-sized models).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rerun cells whose saved config differs.")
_CHECK = flags.DEFINE_string("check_against", None, "A committed <grid>.csv: after the run, every "
                              "row written is compared with its row there (all columns but "
                              "wall_s, as printed); exit status 1 on any difference.")
_PREPARE_ONLY = flags.DEFINE_bool("prepare_only", False, "Build (or check) the models and trace "
                                   "file the grid's cells share, then stop (the real-model and "
                                   "reasoning grids).")
_KEEP_GOING = flags.DEFINE_bool("keep_going", True, "A failing cell is logged and the grid goes "
                                "on (exit status 1 at the end); false: stop at the first.")


def default_workroot(small: bool) -> str:
  """./workdir_compare[_small] under the current directory: the user's own, not shared /tmp."""
  return os.path.abspath("workdir_compare_small" if small else "workdir_compare")


def check_workroot(workroot: str) -> None:
  """Refuses a reused work root that someone else could have filled.

  Cached models are loaded and summary.json files trusted without rerunning, so the root (and
  its shared models directory) must be owned by this user and not writable by every user; a
  symlinked root must be a link this user or root made. A root that does not exist yet is fine.
  """
  from mixpo.builtin import untrusted_reason  # noqa: PLC0415 — after hostmem (main)
  for path in (workroot, os.path.join(workroot, "models")):
    why = untrusted_reason(path)
    if why is not None:
      raise app.UsageError(
          f"--workroot={workroot}: {path} {why}. Its cached models and summary.json files would "
          "be reused as they are; pass a --workroot of your own (default ./workdir_compare), or "
          "fix its owner / `chmod o-w` it if you trust its contents.")


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  from mixpo import analysis  # noqa: PLC0415
  base, small = _CONFIG.value, _SMALL.value
  if "compare" not in base:
    raise app.UsageError(f"--config: {base!r:.60} has no `compare` field (regimes, gammas); start "
                         "from experiments/configs/compare.py.")
  budget = _BUDGET.value if _BUDGET.value is not None else int(base.max_policy_tokens)
  if budget <= 0:
    raise app.UsageError(f"--budget_tokens={budget}: equal-budget cells need a positive budget.")
  workroot = os.path.abspath(_WORKROOT.value or default_workroot(small))
  check_workroot(workroot)
  out_dir = _OUT_DIR.value or (os.path.join(workroot, "results") if small else os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      base.compare.get("results_subdir", "")))
  if _CHECK.value and not os.path.isfile(_CHECK.value):
    raise app.UsageError(f"--check_against={_CHECK.value}: no such file (a <grid>.csv, e.g. "
                         "experiments/results/main.csv).")
  if _CHECK.value and os.path.realpath(_CHECK.value) == os.path.realpath(
      os.path.join(out_dir, f"{_GRID.value}.csv")):
    raise app.UsageError(f"--check_against={_CHECK.value} is the CSV this run writes; pass "
                         "another --out_dir.")
  # Every cell compiles the same functions again (its jit caches are cleared between cells): a
  # persistent compilation cache in the work root turns all but the first into disk reads.
  import jax  # noqa: PLC0415
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workroot, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    seeds = [int(s) for s in _SEEDS.value]
    cells = grid_cells(_GRID.value, base, _ALGOS.value, seeds, _REGIMES.value, _GAMMAS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info("%s grid: %d cells, budget %d policy tokens, workroot %s", _GRID.value, len(cells),
               budget, workroot)
  if _PREPARE_ONLY.value:
    for what, seconds in prepare(cells, base, workroot).items():
      print(f"compare: {what} ready ({seconds:.0f} s)")
    return
  done = run_cells(cells, base, workroot, budget, _OVERWRITE.value, _KEEP_GOING.value)
  paths = analysis.write_reports(collect_rows(cells, workroot, base, budget), out_dir,
                                 _GRID.value, _THRESHOLD.value, base.compare.threshold_delta,
                                 # reasoning / real grids: intervals, paired differences.
                                 baseline=base.compare.get("baseline") or None)
  print(f"compare: ran {len(done['ran'])} cells, skipped {len(done['skipped'])} finished, "
        f"failed {len(done['failed'])}")
  for label, err in done["failed"].items():
    print(f"  FAILED {label}: {err}")
  print("wrote:", *paths, sep="\n  ")
  mismatched = False
  if _CHECK.value:
    matched, problems = check_rows(paths[0], _CHECK.value)
    print(f"check against {_CHECK.value}: {matched} rows identical (wall_s aside), "
          f"{len(problems)} differences", *problems, sep="\n  ")
    mismatched = bool(problems)
  if "preempted" in done:
    label, signame = done["preempted"]
    print(f"compare: stopped by {signame} in cell {label} (checkpointed); rerun the same command "
          "to resume it and the cells after it")
    sys.exit(130 if signame == "SIGINT" else 143)
  if done["failed"] or mismatched:
    sys.exit(1)


if __name__ == "__main__":
  sys.argv = _fix_argv(sys.argv)
  app.run(main)
