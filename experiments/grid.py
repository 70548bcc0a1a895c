"""Cells of the comparison grids and running them (experiments/compare.py is the binary).

No absl flags here, so tests and notebooks import it freely. A cell is one `loop.run` in
<workroot>/<grid>/<regime>/<algo>-<scheme>[-g<γ>]-s<seed>/; the rules (which algos, schemes and
γ each grid holds) are in experiments/compare.py's docstring.

The reasoning grids (a config whose `compare.kind` is "reasoning",
experiments/configs/compare_reasoning.py) are lists of *variants*: an algorithm of the table, or
"sft" (experiments/sft_baseline.py), plus config overrides (shaping_grad, the guide's style, the
guide source). Their cells live in <workroot>/<grid>/<regime>/<variant>-s<seed>/ and share models
built once by `prepare_reasoning`: one weak start per regime (<workroot>/models/<regime>), one
guide per style (<workroot>/models/guide-<style>) and one trace file of the same-style guide.

The real-model grid (`compare.kind` "real", experiments/configs/compare_real.py) is a reasoning
grid whose variants, models and two-stage SFT → RL cells are experiments/real_grid.py's; every
grid's CSV rows carry the model FLOPs spent (experiments/grid_flops.py).
"""

import copy
import dataclasses
import json
import math
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
  label: str = ""  # reasoning grids: the variant's name (REASONING_GRIDS).
  overrides: tuple = ()  # reasoning grids: ((dotted config field, value), ...) of the variant.

  @property
  def name(self) -> str:
    if self.label:
      return f"{self.label}-s{self.seed}"
    g = f"-g{self.gamma:g}" if self.grid == "gamma" else ""
    return f"{self.algo}-{self.scheme}{g}-s{self.seed}"

  @property
  def variant(self) -> str:
    if self.label:
      return self.label
    if self.grid == "gamma":
      return f"{self.algo} γ={self.gamma:g}"
    if self.grid == "scheme":
      return f"{self.algo} ({self.scheme})"
    return self.algo

  def meta(self) -> dict:
    meta = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("label", "overrides")}
    return {**meta, "variant": self.variant, "cell": self.name}

  @property
  def guide_style(self) -> str:
    return dict(self.overrides).get(GUIDE_STYLE, "same")

  @property
  def runner(self) -> str:
    return dict(self.overrides).get(RUNNER, "rl")


# ------------------------------------------------------------------------------------------------
# Reasoning grids.

GUIDE_STYLE = "_guide_style"  # pseudo-field of a variant's overrides: which guide it learns from.
RUNNER = "_runner"  # pseudo-field: what runs the cell, "rl" (mixpo.loop, the default) or SFT.
SFT = "sft"  # the off-policy baseline: SFT on the guide's traces (experiments/sft_baseline.py).
# config.objective.shaping_grad → label suffix.
SHAPING_LABELS = {"paper_step": "step", "exact": "exact"}
REASONING_GRIDS = ("main", "style", "source")
REAL = "real"  # config.compare.kind of the real-model grid (experiments/real_grid.py).
SFT_RL = "sft_rl"  # runner of a two-stage cell: SFT on the traces, then RL (real_grid.py).


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def luffy_paper_overrides() -> dict:
  """The fields experiments/configs/luffy_paper.py sets away from the default config (LUFFY's
  published switches), minus the trace path (each grid sets its own) and shaping_grad (a grid
  axis)."""
  from experiments.configs import default, luffy_paper  # noqa: PLC0415
  base, paper = _flat(default.get_config().to_dict()), _flat(luffy_paper.get_config().to_dict())
  return {k: v for k, v in paper.items()
          if base.get(k) != v and k not in ("guide.traces_path", "objective.shaping_grad")}


def reasoning_variants(grid: str, baseline: str = "") -> list[tuple[str, str, dict]]:
  """[(label, algo, overrides)] of a reasoning grid, algorithm names read from the table.

  `baseline` (config.compare.baseline, an unguided entry) opens the style and source grids too,
  so that every grid reports paired differences to it on its own widths and seeds.

  main:   the table's main-grid entries (GRPO, DAPO, LUFFY, Mix-1, Mix-2), the guided ones under
          both shaping_grad modes, LUFFY as published (offline traces, πϕ ≡ 1, its switches)
          under both modes, and SFT on the guide's traces;
  style:  the guided entries, each with the same-style guide and the words-style one;
  source: Mix-1 and Mix-2 with the online guide, its offline traces with πϕ ≡ 1, and the traces
          with their stored log-probs (Mix-2's ZERO rows then use πθ/πθ_old: zero_ratio="old").
  """
  table = algorithms.grids()["main"]
  guided = [a for a in table if algorithms.get(a).guided]
  out = []
  if grid == "main":
    for algo in table:
      modes = SHAPING_LABELS if algorithms.get(algo).guided else {None: ""}
      for mode, suffix in modes.items():
        over = {"objective.shaping_grad": mode} if mode else {}
        out.append((f"{algo}-{suffix}" if suffix else algo, algo, over))
    paper = luffy_paper_overrides()
    for mode, suffix in SHAPING_LABELS.items():
      out.append((f"luffy_paper-{suffix}", paper["algo"],
                  {**paper, "objective.shaping_grad": mode, "guide.traces.only_correct": True}))
    out.append((SFT, SFT, {RUNNER: SFT, "guide.traces.only_correct": True}))
  elif grid == "style":
    out += [(baseline, baseline, {})] if baseline else []
    for algo in guided:
      for style in ("same", "words"):
        out.append((f"{algo}-{style}", algo, {GUIDE_STYLE: style}))
  elif grid == "source":
    out += [(baseline, baseline, {})] if baseline else []
    # The paper's methods: the entries weighting J_on by w against an off-policy term.
    paper = [a for a in guided if any(t.weight == "on" for t in algorithms.get(a).terms)]
    for algo in paper:
      out.append((f"{algo}-online", algo, {}))
      for logp in ("one", "file"):
        over = {"guide.source": "traces", "guide.logp": logp}
        if logp == "file" and algorithms.get(algo).zero_set:
          # A trace file holds πϕ of the guide's responses only, not of the policy's ZERO
          # samples: their ratio falls back to πθ/πθ_old (rl.py refuses anything else).
          over["objective.zero_ratio"] = "old"
        out.append((f"{algo}-traces-{logp}", algo, over))
  else:
    raise ValueError(f"--grid={grid!r}: the reasoning grids are {REASONING_GRIDS}.")
  return out


def reasoning_cells(grid: str, base, variants=None, seeds=(0,), regimes=None) -> list[Cell]:
  """The cells of reasoning grid `grid` (order: regime, variant, seed). `variants` keeps those
  whose label or algorithm is listed; `regimes` defaults to config.compare.grid_regimes[grid]."""
  if base.compare.get("kind") == REAL:
    from experiments import real_grid  # noqa: PLC0415
    if grid != "main":
      raise ValueError(f"--grid={grid!r}: the real-model config has one grid, 'main'.")
    all_variants = real_grid.real_variants(base)
  else:
    all_variants = reasoning_variants(grid, base.compare.get("baseline", ""))
  if variants:
    unknown = [v for v in variants if not any(v in (lab, algo) for lab, algo, _ in all_variants)]
    if unknown:
      raise ValueError(f"--algos: {unknown} match no variant of the {grid} grid; expected labels "
                       f"or algorithms of {[lab for lab, _, _ in all_variants]}.")
    all_variants = [x for x in all_variants if x[0] in variants or x[1] in variants]
  table = dict(base.compare.regimes)
  regimes = list(regimes or base.compare.grid_regimes[grid])
  unknown = [r for r in regimes if r not in table]
  if unknown:
    raise ValueError(f"--regimes: {unknown} not in config.compare.regimes {sorted(table)}.")
  return [Cell(grid, regime, int(table[regime]), algo, base.advantage.scheme,
               base.objective.gamma, int(s), label, tuple(sorted(over.items())))
          for regime in regimes for label, algo, over in all_variants for s in seeds]


def reasoning_paths(workroot: str, regime: str, style: str) -> dict:
  """The shared models of a reasoning cell: weak start, guide of `style`, the guide's traces."""
  models_dir = os.path.join(workroot, "models")
  guide_dir = os.path.join(models_dir, f"guide-{style}")
  return {"policy_dir": os.path.join(models_dir, regime),
          "policy": os.path.join(models_dir, regime, "policy_init"),
          "guide_dir": guide_dir, "guide": os.path.join(guide_dir, "guide"),
          "traces": os.path.join(guide_dir, "traces.jsonl"),
          "traces_meta": os.path.join(guide_dir, "traces_meta.json")}


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def _style_builtin(base, style: str):
  """builtin recipe of the guide of `style`; a longer style gets longer SFT targets."""
  b = copy.deepcopy(base.builtin)
  b.guide_task_kwargs = dict(base.compare.guide_styles[style])
  if b.guide_task_kwargs:
    b.max_answer_tokens = max(int(b.max_answer_tokens), int(base.compare.style_max_new_tokens))
    b.guide_steps = int(base.compare.get("style_guide_steps") or b.guide_steps)
  return b


def reasoning_config(base, cell: Cell, workroot: str, budget: int):
  """The run config of a reasoning cell: base minus `compare`, the variant's overrides, the
  shared models (explicit paths: nothing is built inside the cell)."""
  c = copy.deepcopy(base)
  g = base.compare
  with c.unlocked():
    del c["compare"]
  c.algo, c.seed = cell.algo, cell.seed
  c.advantage.scheme, c.objective.gamma = cell.scheme, cell.gamma
  c.builtin.policy_steps = cell.policy_steps
  paths = reasoning_paths(workroot, cell.regime, cell.guide_style)
  c.policy, c.guide.path, c.builtin_dir = paths["policy"], paths["guide"], ""
  c.max_policy_tokens = int(budget)
  c.progress = False
  if cell.grid == "style":  # the words style is longer: every variant of the grid gets its room.
    c.rollout.max_new_tokens = int(g.style_max_new_tokens)
  for field, value in cell.overrides:
    if field not in (GUIDE_STYLE, RUNNER):
      _set(c, field, value)
  if c.guide.source == "traces" or cell.runner == SFT:
    c.guide.traces_path = paths["traces"]
  if not g.only_correct:  # the smoke grid's guide solves nothing: train on what it wrote.
    c.guide.traces.only_correct = False
  if cell.runner == SFT:  # supervised steps take a larger step than the RL learning rate.
    c.optim.learning_rate = float(g.sft_learning_rate)
    # An SFT step trains fewer rows than an RL step generates: its own eval cadence keeps the
    # evals at about the same policy tokens (0 = config.eval_every).
    c.eval_every = int(g.get("sft_eval_every", 0)) or c.eval_every
  return c


def prepare_reasoning(cells, base, workroot: str) -> dict:
  """Builds (or reuses) the models and the trace file the reasoning `cells` share.

  Returns {what: seconds spent building it now (0 when reused)}. The trace file holds
  config.compare.trace_per_prompt samples of the same-style guide for each of the first
  config.compare.trace_prompts train prompts (seed 0), with their log-probs; its generation time
  and tokens go to traces_meta.json, so the reports charge each trace-fed cell its share.
  """
  import time  # noqa: PLC0415

  from mixpo import builtin  # noqa: PLC0415
  g, spent = base.compare, {}
  for regime in dict.fromkeys(c.regime for c in cells):
    paths = reasoning_paths(workroot, regime, "same")
    b = copy.deepcopy(base.builtin)
    b.policy_steps = int(g.regimes[regime])
    t0 = time.time()
    builtin.ensure_builtin_models(paths["policy_dir"], b, only=("policy_init",))
    spent[f"weak start {regime}"] = time.time() - t0
  styles = dict.fromkeys(c.guide_style for c in cells)
  needs_traces = any(dict(c.overrides).get("guide.source") == "traces" or c.runner == SFT
                     for c in cells)
  if needs_traces:
    styles.setdefault("same")
  for style in styles:
    paths = reasoning_paths(workroot, cells[0].regime, style)
    t0 = time.time()
    builtin.ensure_builtin_models(paths["guide_dir"], _style_builtin(base, style), only=("guide",))
    spent[f"guide {style}"] = time.time() - t0
  if needs_traces:
    paths = reasoning_paths(workroot, cells[0].regime, "same")
    spent["traces"] = _ensure_traces(base, paths)
  return spent


def prepare(cells, base, workroot: str) -> dict:
  """Builds (or reuses) the models and trace file `cells` share; {what: seconds spent now}. The
  table grids build theirs inside each regime's first cell (loop.run's builtin_dir)."""
  if base.compare.get("kind") == REAL:
    from experiments import real_grid  # noqa: PLC0415
    return real_grid.prepare_real(cells, base, workroot)
  if any(c.label for c in cells):
    return prepare_reasoning(cells, base, workroot)
  return {}


def _ensure_traces(base, paths: dict) -> float:
  """Samples the same-style guide into paths["traces"] unless a file of this recipe exists."""
  import time  # noqa: PLC0415

  from experiments import grid_flops  # noqa: PLC0415
  from experiments.make_traces import make_traces  # noqa: PLC0415
  from mixpo import flops as mixpo_flops  # noqa: PLC0415
  from mixpo import models  # noqa: PLC0415
  from mixpo.data.traces import write_trace_prompts  # noqa: PLC0415
  g = base.compare
  recipe = {"guide": json.load(open(os.path.join(paths["guide"], "mixpo_recipe.json"))),
            "task": base.task, "task_kwargs": dict(base.task_kwargs),
            "prompts": int(g.trace_prompts), "per_prompt": int(g.trace_per_prompt),
            "max_new_tokens": int(base.rollout.max_new_tokens),
            "temperature": float(base.rollout.temperature)}
  if os.path.exists(paths["traces_meta"]):
    with open(paths["traces_meta"]) as f:
      if json.load(f).get("recipe") == recipe:
        return 0.0
  t0 = time.time()
  tokenizer = models.load_tokenizer(paths["guide"])
  task = grid_flops.make_task(base, tokenizer)  # a chat model's task renders its prompts.
  examples = task.examples("train", recipe["prompts"], seed=0)
  prompts, counts = make_traces(paths["guide"], examples, recipe["per_prompt"],
                                recipe["max_new_tokens"], recipe["temperature"], batch_size=64,
                                seed=0, with_logp=True, reward_fn=task.reward_fn)
  write_trace_prompts(paths["traces"], prompts)
  seconds = time.time() - t0
  responses = [r for p in prompts for r in p.responses]
  guide_tokens = sum(len(r.tokens) for r in responses)
  # Model FLOPs: every sample generated (an unfinished one ran to max_new_tokens), then the
  # log-prob forward over each kept response.
  hf = grid_flops.hf_config(paths["guide"])
  prompt_tokens = grid_flops.mean_prompt_tokens(tokenizer, examples)
  sampled = guide_tokens + counts["unfinished"] * recipe["max_new_tokens"]
  flops = mixpo_flops.traces_flops(hf, prompt_tokens, counts["samples"], sampled,
                                   len(responses), guide_tokens)
  meta = {"recipe": recipe, "seconds": seconds, "counts": counts,
          "responses": len(responses), "correct": sum(bool(r.correct) for r in responses),
          "guide_tokens": guide_tokens, "flops": flops, "prompt_tokens": prompt_tokens}
  with open(paths["traces_meta"], "w") as f:  # written last: a crash before it means "redo".
    json.dump(meta, f, indent=1)
  logging.info("guide traces: %d responses (%d correct) for %d prompts in %.0f s → %s",
               meta["responses"], meta["correct"], len(prompts), seconds, paths["traces"])
  return seconds


def grid_cells(grid: str, base, algos=None, seeds=(0, 1, 2), regimes=None, gammas=None):
  """The cells of `grid` (order: regime, algo, scheme / γ, seed) for the base config `base`.

  A reasoning config (`compare.kind == "reasoning"`) has its own grids: `reasoning_cells`.
  """
  if base.compare.get("kind") in ("reasoning", REAL):
    return reasoning_cells(grid, base, algos, seeds, regimes)
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
  gammas = ([float(g) for g in (gammas or base.compare.gammas)] if grid == "gamma"
            else [base.objective.gamma])
  cells = []
  for regime in regimes:
    for algo in algos:
      if grid == "scheme":
        schemes = list(advantages.SCHEMES)
      else:
        # The baselines run under the scheme their papers' losses use (the entry's grid_scheme).
        schemes = [algorithms.get(algo).grid_scheme or base.advantage.scheme]
      for scheme in schemes:
        for gamma in gammas:
          cells.extend(Cell(grid, regime, int(table[regime]), algo, scheme, gamma, int(s))
                       for s in seeds)
  return cells


def cell_config(base, cell: Cell, workroot: str, budget: int):
  """The run config of `cell`: base minus `compare`, the cell's fields, the shared models."""
  if cell.runner == SFT_RL:  # the RL stage; its SFT stage: real_grid.stage_configs.
    from experiments import real_grid  # noqa: PLC0415
    return real_grid.stage_configs(base, cell, workroot, budget)[1]
  if cell.label:
    return reasoning_config(base, cell, workroot, budget)
  c = copy.deepcopy(base)
  with c.unlocked():  # config_flags locks the config it parses.
    del c["compare"]
  c.algo, c.seed = cell.algo, cell.seed
  c.advantage.scheme, c.objective.gamma = cell.scheme, cell.gamma
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
      have_flat, want_flat = _flat(have), _flat(want)  # name the grouped fields by their path
      diff = sorted(k for k in set(have_flat) | set(want_flat)
                    if have_flat.get(k) != want_flat.get(k))
      if not overwrite:
        raise ValueError(f"{workdir}: this cell was run with another config (fields {diff}); "
                         "pass --overwrite to rerun it, or use a new --workroot.")
      return "todo"
  summary_file = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_file):
    with open(summary_file) as f:
      summary = json.load(f)
    # A run that stopped on an error counted the tokens of the step it failed in, which was
    # neither logged nor checkpointed: resume it, never call it finished.
    if not summary.get("error") and (summary.get("policy_tokens", 0) >= budget
                                     or summary.get("final_step", 0) >= config.num_steps):
      return "done"
  return "resume" if os.path.exists(os.path.join(workdir, "checkpoints")) else "todo"


def run_cells(cells, base, workroot: str, budget: int, overwrite=False, keep_going=True) -> dict:
  """Runs every unfinished cell; returns {"ran": [...], "skipped": [...], "failed": {name: err}}
  and, when a cell was stopped by SIGTERM / Ctrl-C, "preempted": (cell label, signal name): the
  grid stops there and a rerun of the same command resumes that cell from its checkpoint."""
  import jax  # noqa: PLC0415
  from tqdm import tqdm  # noqa: PLC0415

  from mixpo import loop  # noqa: PLC0415
  done = {"ran": [], "skipped": [], "failed": {}}
  for what, seconds in prepare(cells, base, workroot).items():
    logging.info("grid models: %s ready (%.0f s)", what, seconds)
  bar = tqdm(cells, desc="cells", unit="cell", dynamic_ncols=True)
  for cell in bar:
    label = f"{cell.regime}/{cell.name}"
    workdir, config = cell_dir(workroot, cell), cell_config(base, cell, workroot, budget)
    # A two-stage cell's RL stage has the budget its SFT stage left (config.max_policy_tokens).
    state = cell_state(workdir, config, int(config.max_policy_tokens), overwrite)
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
      if cell.runner == SFT:
        from experiments import sft_baseline  # noqa: PLC0415
        summary = sft_baseline.run(config, workdir)
      elif cell.runner == SFT_RL:
        from experiments import real_grid  # noqa: PLC0415
        summary = real_grid.run_two_stage(
            real_grid.stage_configs(base, cell, workroot, budget)[0], config, workdir)
      else:
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
    if not base.compare.get("keep_checkpoints", True) and cell_state(
        workdir, config, int(config.max_policy_tokens)) == "done":
      # Checkpoints only resume a cell; a finished one is read from metrics.jsonl. A 135 M model's
      # two kept checkpoints are 3 GB: 27 cells would hold 80 GB.
      shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    if summary.get("preempted"):
      # The cell caught SIGTERM / Ctrl-C and checkpointed; the signal was meant for the grid,
      # so stop here rather than start the next cell (whose own handler would swallow it).
      done["preempted"] = (label, summary.get("preempted_by", "a signal"))
      break
  return done


def collect_rows(cells, workroot: str, base=None, budget: int = 0) -> list[dict]:
  """CSV rows (mixpo.analysis.COLUMNS) of every cell that has logged metrics; with the `base`
  config and `budget` of the run, each row carries the model FLOPs spent up to it
  (experiments/grid_flops.py; NaN where a cell's models are gone)."""
  from mixpo import analysis  # noqa: PLC0415
  rows = []
  for cell in cells:
    metrics = cell_metrics(cell, workroot, base, budget)
    if metrics:
      cell_rows = analysis.cell_rows(metrics, cell.meta())
      if cell.label:
        _charge_offline_guide(cell_rows, cell, workroot)
      rows.extend(cell_rows)
  return rows


def cell_metrics(cell: Cell, workroot: str, base=None, budget: int = 0) -> list[dict]:
  """metrics.jsonl rows of a cell (FLOPs added when `base` is given); a two-stage cell's SFT stage
  first, then its RL stage with steps, tokens, wall time and FLOPs continuing from the SFT's."""
  from experiments import grid_flops  # noqa: PLC0415
  from mixpo import logging as mlog  # noqa: PLC0415
  workdir = cell_dir(workroot, cell)

  def read(path, config, sft):
    if not os.path.exists(os.path.join(path, "metrics.jsonl")):
      return []
    metrics = mlog.read_metrics(path)
    if base is None:
      return metrics
    try:
      return grid_flops.with_flops(metrics, config, sft)
    except FileNotFoundError as e:  # the shared models were deleted: no FLOPs, rows still.
      logging.warning("cell %s: no FLOPs (%s)", cell.name, e)
      return metrics

  if cell.runner != SFT_RL:
    config = cell_config(base, cell, workroot, budget) if base is not None else None
    return read(workdir, config, cell.runner == SFT)
  from experiments import real_grid  # noqa: PLC0415
  sft_config, rl_config = real_grid.stage_configs(base, cell, workroot, budget)
  first = read(os.path.join(workdir, real_grid.SFT_STAGE), sft_config, True)
  second = read(workdir, rl_config, False)
  if not first:
    return []
  end = first[-1]
  offsets = {k: end[k] for k in ("step", "policy_tokens", "guide_tokens", "wall_s", "flops",
                                 *grid_flops.mixpo_flops.PARTS) if isinstance(end.get(k), (int,
                                                                                           float))}
  # The RL stage's step 0 evaluates the SFT stage's final model again: keep the SFT stage's row.
  return first + [{**r, **{k: r[k] + v for k, v in offsets.items() if isinstance(r.get(k), (
      int, float))}} for r in second if int(r["step"]) > 0]


def check_rows(rows_csv: str, reference_csv: str,
               ignore=("wall_s", "guide_gen_s")) -> tuple[int, list[str]]:
  """(rows matched, problems): every row of `rows_csv` (a rerun's <grid>.csv) against the row of
  `reference_csv` (a committed one) with the same grid, regime, cell and step, field by field as
  written (to the last printed digit), except the `ignore`d columns (wall-clock times) and those
  the reference does not have. A cell's steps must be the same in both; cells of the reference
  that were not rerun are not checked."""
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
      # A column the reference predates (the FLOP counts) has nothing to be checked against.
      diff = [f"{c}={row[c]!r} (reference {want[c]!r})" for c in row
              if c in want and c not in ignore and row[c] != want[c]]
      if diff:
        problems.append(f"{name} step {step}: " + ", ".join(diff))
      else:
        matched += 1
  return matched, problems


def _charge_offline_guide(rows: list[dict], cell: Cell, workroot: str) -> None:
  """Trace-fed cells did not pay for their guide's generation inside the run: charge each row
  the trace file's generation seconds, and its model FLOPs (when the rows count FLOPs), in
  proportion to the guide tokens the cell used up to it (an online guide's generation is already
  inside wall_s and the run's own FLOPs)."""
  meta_file = reasoning_paths(workroot, cell.regime, "same")["traces_meta"]
  overrides = dict(cell.overrides)
  offline = overrides.get("guide.source") == "traces" or cell.runner in (SFT, SFT_RL)
  meta = None
  if offline and os.path.exists(meta_file):
    with open(meta_file) as f:
      meta = json.load(f)
  for r in rows:
    # A trace drawn twice (a second epoch over the file) was generated once.
    share = (min(1.0, r["guide_tokens"] / meta["guide_tokens"])
             if meta and meta["guide_tokens"] else 0.0)
    r["guide_gen_s"] = meta["seconds"] * share if meta else 0.0
    if meta and meta.get("flops") and not math.isnan(r.get("flops", math.nan)):
      r["flops_guide_gen"] += meta["flops"] * share
      r["flops"] += meta["flops"] * share
