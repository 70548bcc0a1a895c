"""Cells of the comparison grids and running them (experiments/compare.py is the binary).

No absl flags here, so tests and notebooks import it freely. A cell is one `loop.run` in
<workroot>/<grid>/<regime>/<algo>-<scheme>[-g<γ>]-s<seed>/; the rules (which algos, schemes and
γ each grid holds) are in experiments/compare.py's docstring.
"""

import copy
import dataclasses
import json
import os
import shutil
import time

from absl import logging

from mixpo import advantages, algorithms

# {grid: algorithms}, from each table entry's `grids` (mixpo/algorithms.py).
GRIDS = algorithms.grids()


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid; `variant` is its label in plots and tables (the cell without seed)."""

  grid: str
  regime: str
  policy_steps: int  # builtin.policy_steps of the regime's weak start.
  algo: str
  scheme: str
  gamma: float
  seed: int

  @property
  def name(self) -> str:
    g = f"-g{self.gamma:g}" if self.grid == "gamma" else ""
    return f"{self.algo}-{self.scheme}{g}-s{self.seed}"

  @property
  def variant(self) -> str:
    if self.grid == "gamma":
      return f"{self.algo} γ={self.gamma:g}"
    if self.grid == "scheme":
      return f"{self.algo} ({self.scheme})"
    return self.algo

  def meta(self) -> dict:
    return {**dataclasses.asdict(self), "variant": self.variant, "cell": self.name}


def grid_cells(grid: str, base, algos=None, seeds=(0, 1, 2), regimes=None, gammas=None):
  """The cells of `grid` (order: regime, algo, scheme / γ, seed) for the base config `base`."""
  grids = algorithms.grids()  # read now: an entry registered after import counts too.
  if grid not in grids:
    raise ValueError(f"--grid={grid!r}: expected one of {sorted(grids)}.")
  table = dict(base.compare.regimes)
  regimes = list(regimes or table)
  unknown = [r for r in regimes if r not in table]
  if unknown:
    raise ValueError(f"--regimes: {unknown} not in config.compare.regimes {sorted(table)}; add "
                     "them there (name → builtin.policy_steps).")
  algos = list(algos or grids[grid])
  gammas = [float(g) for g in (gammas or base.compare.gammas)] if grid == "gamma" else [base.gamma]
  cells = []
  for regime in regimes:
    for algo in algos:
      if grid == "scheme":
        schemes = list(advantages.SCHEMES)
      else:
        # The baselines run under the scheme their papers' losses use (the entry's grid_scheme).
        schemes = [algorithms.get(algo).grid_scheme or base.scheme]
      for scheme in schemes:
        for gamma in gammas:
          cells.extend(Cell(grid, regime, int(table[regime]), algo, scheme, gamma, int(s))
                       for s in seeds)
  return cells


def cell_config(base, cell: Cell, workroot: str, budget: int):
  """The run config of `cell`: base minus `compare`, the cell's fields, the shared models."""
  c = copy.deepcopy(base)
  with c.unlocked():  # config_flags locks the config it parses.
    del c["compare"]
  c.algo, c.scheme, c.gamma, c.seed = cell.algo, cell.scheme, cell.gamma, cell.seed
  c.builtin.policy_steps = cell.policy_steps
  c.builtin_dir = os.path.join(workroot, "models", cell.regime)
  c.max_policy_tokens = int(budget)
  c.progress = False
  if cell.grid == "scheme":  # the paper-vs-dapo question is about binary rewards.
    c.task_kwargs = {**dict(c.task_kwargs), "reward": "exact"}
  return c


def cell_dir(workroot: str, cell: Cell) -> str:
  return os.path.join(workroot, cell.grid, cell.regime, cell.name)


def cell_state(workdir: str, config, budget: int, overwrite: bool = False) -> str:
  """"done" (skip), "resume" (from its checkpoint) or "todo" (from scratch, its directory cleared).

  Raises naming the cell if its saved config differs, unless `overwrite` (then "todo").
  """
  from mixpo import loop  # noqa: PLC0415 (jax import after flag parsing)
  cfg_file = os.path.join(workdir, "cell_config.json")
  want = json.loads(json.dumps(loop.fingerprint(config), sort_keys=True, default=str))
  if os.path.exists(cfg_file):
    with open(cfg_file) as f:
      have = json.load(f)
    if have != want:
      diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
      if not overwrite:
        raise ValueError(f"{workdir}: this cell was run with another config (fields {diff}); "
                         "pass --overwrite to rerun it, or use a new --workroot.")
      return "todo"
  summary_file = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_file):
    with open(summary_file) as f:
      summary = json.load(f)
    if (summary.get("policy_tokens", 0) >= budget
        or summary.get("final_step", 0) >= config.num_steps):
      return "done"
  return "resume" if os.path.exists(os.path.join(workdir, "checkpoints")) else "todo"


def run_cells(cells, base, workroot: str, budget: int, overwrite=False, keep_going=True) -> dict:
  """Runs every unfinished cell; returns {"ran": [...], "skipped": [...], "failed": {name: err}}."""
  import jax  # noqa: PLC0415
  from tqdm import tqdm  # noqa: PLC0415

  from mixpo import loop  # noqa: PLC0415
  done = {"ran": [], "skipped": [], "failed": {}}
  bar = tqdm(cells, desc="cells", unit="cell", dynamic_ncols=True)
  for cell in bar:
    label = f"{cell.regime}/{cell.name}"
    workdir, config = cell_dir(workroot, cell), cell_config(base, cell, workroot, budget)
    state = cell_state(workdir, config, budget, overwrite)
    if state == "done":
      done["skipped"].append(label)
      continue
    bar.set_postfix_str(f"{label} ({state})")
    if state == "todo" and os.path.exists(workdir):  # a stale config or no checkpoint to resume:
      shutil.rmtree(workdir)  # start clean (metrics.jsonl is appended to, never truncated).
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "cell_config.json"), "w") as f:
      json.dump(loop.fingerprint(config), f, sort_keys=True, indent=1, default=str)
    t0 = time.time()
    try:
      summary = loop.run(config, workdir)
    except Exception as e:  # noqa: BLE001 — one bad cell must not lose a night's grid.
      if not keep_going:
        raise
      logging.exception("cell %s failed", label)
      done["failed"][label] = f"{type(e).__name__}: {e}"
      continue
    finally:
      jax.clear_caches()  # every cell compiles its own functions; do not accumulate them.
    logging.info("cell %s: %d steps, %d policy / %d guide tokens, eval %.3f, %.0f s", label,
                 summary["final_step"], summary["policy_tokens"], summary["guide_tokens"],
                 summary.get("final_eval_accuracy", float("nan")), time.time() - t0)
    done["ran"].append(label)
  return done


def collect_rows(cells, workroot: str) -> list[dict]:
  """CSV rows (mixpo.analysis.COLUMNS) of every cell that has logged metrics."""
  from mixpo import analysis  # noqa: PLC0415
  from mixpo import logging as mlog  # noqa: PLC0415
  rows = []
  for cell in cells:
    workdir = cell_dir(workroot, cell)
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      rows.extend(analysis.cell_rows(mlog.read_metrics(workdir), cell.meta()))
  return rows


def check_rows(rows_csv: str, reference_csv: str, ignore=("wall_s",)) -> tuple[int, list[str]]:
  """(rows matched, problems): every row of `rows_csv` (a rerun's <grid>.csv) against the row of
  `reference_csv` (a committed one) with the same grid, regime, cell and step, field by field as
  written (to the last printed digit), except the `ignore`d columns (wall-clock time). A cell's
  steps must be the same in both; cells of the reference that were not rerun are not checked."""
  import csv  # noqa: PLC0415

  def load(path):
    with open(path, newline="") as f:
      return [r for r in csv.DictReader(f)]

  key = lambda r: (r["grid"], r["regime"], r["cell"])
  ref: dict[tuple, dict[str, dict]] = {}
  for r in load(reference_csv):
    ref.setdefault(key(r), {})[r["step"]] = r
  new: dict[tuple, dict[str, dict]] = {}
  for r in load(rows_csv):
    new.setdefault(key(r), {})[r["step"]] = r
  matched, problems = 0, []
  for cell, steps in new.items():
    name = "/".join(cell)
    if cell not in ref:
      problems.append(f"{name}: not in {reference_csv}")
      continue
    if list(steps) != list(ref[cell]):
      problems.append(f"{name}: steps {list(steps)} vs {list(ref[cell])} in {reference_csv}")
    for step, row in steps.items():
      want = ref[cell].get(step)
      if want is None:
        continue
      diff = [f"{c}={row[c]!r} (reference {want.get(c)!r})" for c in row
              if c not in ignore and row[c] != want.get(c)]
      if diff:
        problems.append(f"{name} step {step}: " + ", ".join(diff))
      else:
        matched += 1
  return matched, problems

