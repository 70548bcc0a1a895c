"""Comparison-grid results: per-cell CSV rows, seed-aggregated plots, markdown summary tables.

Used by experiments/compare.py and the notebooks in colabs/. A "cell" is one run (algo, scheme,
γ, seed, regime); a "variant" is a cell without its seed (the unit plotted and tabulated).
Units: tokens are generated tokens (policy or guide, counted separately); wall_s is seconds;
accuracies and rewards are fractions in [0, 1]; response_length is tokens; entropy is nats/token.
"""

from __future__ import annotations

import csv
import glob
import math
import os

import numpy as np

from mixpo import flops
from mixpo.eval_metrics import bootstrap_ci

# Identity of a cell, then one row per evaluated step.
META_COLUMNS = ("grid", "regime", "policy_steps", "variant", "algo", "scheme", "gamma", "seed",
                "cell")
# CSV column ← metrics.jsonl key (train metrics carried from the latest step that logged them).
METRIC_KEYS = {
    "policy_tokens": "policy_tokens", "guide_tokens": "guide_tokens",
    "train_reward": "train/reward", "train_accuracy": "train/accuracy",
    "eval_accuracy": "eval/accuracy", "response_length": "train/response_length",
    "entropy": "train/entropy", "wall_s": "wall_s",
    # Cumulative model FLOPs (mixpo/flops.py) spent up to the row, in total and by part; the
    # grid runner adds them to the metrics (experiments/grid_flops.py).
    "flops": "flops", **{part: part for part in flops.PARTS},
}
# Seconds of offline guide generation charged to the cell up to the row (its share of its trace
# file's generation time; 0 for an online guide, whose generation is inside wall_s).
GUIDE_GEN_COLUMN = "guide_gen_s"
COLUMNS = META_COLUMNS + ("step",) + tuple(METRIC_KEYS) + (GUIDE_GEN_COLUMN,)
_INT_COLUMNS = ("policy_steps", "seed", "step", "policy_tokens", "guide_tokens")
_STR_COLUMNS = ("grid", "regime", "variant", "algo", "scheme", "cell")


def cell_rows(metrics: list[dict], meta: dict) -> list[dict]:
  """One CSV row per step of `metrics` (metrics.jsonl rows) that has eval/accuracy.

  Train metrics are carried from the latest step that logged them (NaN before the first). A
  resumed run restarts its wall clock; wall_s here is made cumulative across sessions (time
  between the last logged step and an interruption is lost).
  """
  missing = [k for k in META_COLUMNS if k not in meta]
  if missing:
    raise ValueError(f"cell_rows: meta lacks {missing}; expected the fields {META_COLUMNS}.")
  by_step = {}
  for r in metrics:  # a step logged twice (resumed run) keeps its last row.
    by_step[int(r["step"])] = r
  latest = {col: math.nan for col in METRIC_KEYS}
  wall_offset, last_wall, out = 0.0, 0.0, []
  for step in sorted(by_step):
    r = by_step[step]
    if isinstance(r.get("wall_s"), (int, float)):
      if r["wall_s"] < last_wall:
        wall_offset += last_wall
      last_wall = r["wall_s"]
      r = {**r, "wall_s": r["wall_s"] + wall_offset}
    for col, key in METRIC_KEYS.items():
      if col != "eval_accuracy" and isinstance(r.get(key), (int, float)):
        latest[col] = r[key]
    if isinstance(r.get("eval/accuracy"), (int, float)):
      out.append({**{k: meta[k] for k in META_COLUMNS}, "step": step, **latest,
                  "eval_accuracy": r["eval/accuracy"]})
  return out


def write_csv(rows: list[dict], path: str) -> str:
  """Writes `rows` with the columns COLUMNS (NaN as an empty field); returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                  for k, v in r.items()})
  return path


def _parse(col: str, value: str, where: str):
  if col in _STR_COLUMNS:
    return value
  if value == "":
    return math.nan
  try:
    return int(float(value)) if col in _INT_COLUMNS else float(value)
  except ValueError:
    raise ValueError(f"{where}: column {col!r} holds {value!r}, not a number.") from None


def read_csv(path: str) -> list[dict]:
  """Rows of a grid CSV written by `write_csv`, numbers parsed (empty fields → NaN)."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("regime", "variant", "seed", "step", "policy_tokens", "eval_accuracy")
               if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}; expected the columns of "
                       "mixpo.analysis.COLUMNS (written by experiments/compare.py).")
    return [{c: _parse(c, v, f"{path} row {i + 2}") for c, v in r.items()}
            for i, r in enumerate(reader)]


def read_results(results_dir: str) -> dict[str, list[dict]]:
  """{grid name: rows} for every <grid>.csv in `results_dir` (empty dict if none)."""
  return {os.path.basename(p)[:-4]: read_csv(p)
          for p in sorted(glob.glob(os.path.join(results_dir, "*.csv")))}


def _ordered(values) -> list:
  return list(dict.fromkeys(values))


def _runs(rows: list[dict]) -> dict:
  """{(regime, variant): {seed: rows sorted by step}}, in first-seen order."""
  out = {}
  for r in rows:
    out.setdefault((r["regime"], r["variant"]), {}).setdefault(r["seed"], []).append(r)
  for seeds in out.values():
    for s in seeds:
      seeds[s].sort(key=lambda r: r["step"])
  return out


def paired_differences(values: dict, baseline: dict) -> list[float]:
  """values[s] − baseline[s] for every seed s both hold with a number (seed order of `values`).

  A seed is the pairing unit: the same seed draws the same train prompts and eval problems in
  both variants, so the difference removes what the seed alone decides.
  """
  return [values[s] - baseline[s] for s in values
          if s in baseline and not (math.isnan(values[s]) or math.isnan(baseline[s]))]


def aggregate(seed_runs: dict, x_key: str, y_key: str = "eval_accuracy", band: str = "minmax"):
  """Mean and a band over seeds of y on a common x grid; returns (x, mean, lo, hi).

  Each seed's curve is linearly interpolated onto the union of the seeds' x values up to the
  smallest final x (so every point averages every seed; equal budgets end at about the same x).
  band: "minmax" (lo, hi = min and max over seeds) or "ci" (the 95 % bootstrap interval of the
  mean at each x, `bootstrap_ci`; NaN with one seed).
  """
  curves = []
  for rows in seed_runs.values():
    pts = [(r[x_key], r[y_key]) for r in rows
           if not (math.isnan(r[x_key]) or math.isnan(r[y_key]))]
    if pts:
      x, y = map(np.asarray, zip(*pts))
      curves.append((x.astype(np.float64), y.astype(np.float64)))
  if not curves:
    return (np.zeros(0),) * 4
  end = min(x.max() for x, _ in curves)
  grid = np.unique(np.concatenate([x[x <= end] for x, _ in curves]))
  ys = np.stack([np.interp(grid, x, y) for x, y in curves])
  if band == "ci":
    cis = np.asarray([bootstrap_ci(ys[:, j], n_boot=2000)[1:] for j in range(len(grid))])
    return grid, ys.mean(0), cis[:, 0], cis[:, 1]
  if band != "minmax":
    raise ValueError(f"aggregate: band={band!r}; expected 'minmax' or 'ci'.")
  return grid, ys.mean(0), ys.min(0), ys.max(0)


def plot_grid(rows: list[dict], x_key: str = "step", y_key: str = "eval_accuracy",
              title: str = "", band: str = "minmax"):
  """Figure with one panel per regime: per variant the seed mean (line) and a band: min–max over
  seeds ("minmax") or the 95 % bootstrap interval of the mean ("ci")."""
  import matplotlib  # noqa: PLC0415  Lazy: slow import.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  runs = _runs(rows)
  regimes = _ordered(r for r, _ in runs)
  fig = Figure(figsize=(5.5 * max(len(regimes), 1), 4), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, max(len(regimes), 1), squeeze=False)[0]
  # One colour per variant, the same in every panel; tab10 repeats after ten variants.
  variants = _ordered(v for _, v in runs)
  palette = [f"C{i}" for i in range(10)] if len(variants) <= 10 else [
      matplotlib.colormaps["tab20"](i) for i in range(20)]
  color = {v: palette[i % len(palette)] for i, v in enumerate(variants)}
  for ax, regime in zip(axes, regimes):
    for (reg, variant), seeds in runs.items():
      if reg != regime:
        continue
      x, mean, lo, hi = aggregate(seeds, x_key, y_key, band)
      line, = ax.plot(x, mean, marker="." if len(x) < 30 else None, color=color[variant],
                      label=f"{variant} (n={len(seeds)})")
      if len(seeds) > 1:
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(f"{title} {regime}".strip())
    ax.set_xlabel({"policy_tokens": "generated policy tokens",
                   "flops": "model FLOPs (train + guide)"}.get(x_key, x_key))
    ax.set_ylabel(y_key.replace("_", " ") + (" (seed mean, band min–max)" if band == "minmax"
                                              else " (seed mean, 95% bootstrap CI)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def _last(rows: list[dict], key: str) -> float:
  return rows[-1][key] if rows else math.nan


def _mean_std(values: list[float], fmt: str = "{:.3f}") -> str:
  v = np.asarray([x for x in values if not math.isnan(x)], np.float64)
  if not len(v):
    return "—"
  if len(v) == 1:
    return fmt.format(v[0])
  return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def tokens_to_threshold(rows: list[dict], threshold: float) -> float:
  """Policy tokens at the first eval with accuracy ≥ threshold (rows sorted by step), NaN if
  none; resolution is the eval interval (config.eval_every steps)."""
  for r in rows:
    if r["eval_accuracy"] >= threshold:
      return r["policy_tokens"]
  return math.nan


def summary_table(rows: list[dict], threshold: float | None = None,
                  threshold_delta: float = 0.2) -> str:
  """Markdown table per (regime, variant): final eval accuracy mean ± std (ddof=1) over seeds,
  policy tokens to reach the threshold accuracy (mean over the seeds that reached it, "k/n"
  seeds; "—" if none), final policy / guide tokens and steps (means).

  threshold: absolute accuracy, or None for (the regime's mean step-0 accuracy) + threshold_delta.
  """
  runs = _runs(rows)
  head = ("| regime | variant | seeds | final eval accuracy | threshold | policy tokens to "
          "threshold | policy tokens | guide tokens | steps |\n"
          "|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for regime in _ordered(r for r, _ in runs):
    inits = [s[0]["eval_accuracy"] for (reg, _), seeds in runs.items() if reg == regime
             for s in seeds.values() if s and s[0]["step"] == 0]
    thr = threshold if threshold is not None else (
        float(np.mean(inits)) + threshold_delta if inits else math.nan)
    for (reg, variant), seeds in runs.items():
      if reg != regime:
        continue
      cells = list(seeds.values())
      reached = [t for t in (tokens_to_threshold(c, thr) for c in cells) if not math.isnan(t)]
      to_thr = (f"{np.mean(reached):,.0f} ({len(reached)}/{len(cells)})" if reached else "—")
      lines.append(
          f"| {regime} | {variant} | {len(cells)} | "
          f"{_mean_std([_last(c, 'eval_accuracy') for c in cells])} | {thr:.3f} | {to_thr} | "
          f"{np.mean([_last(c, 'policy_tokens') for c in cells]):,.0f} | "
          f"{np.mean([_last(c, 'guide_tokens') for c in cells]):,.0f} | "
          f"{np.mean([_last(c, 'step') for c in cells]):.0f} |")
  return head + "\n".join(lines) + "\n"


def _fmt_ci(mean: float, lo: float, hi: float, signed: bool = False) -> str:
  if math.isnan(mean):
    return "—"
  m = f"{mean:+.3f}" if signed else f"{mean:.3f}"
  return m if math.isnan(lo) else f"{m} [{lo:+.3f}, {hi:+.3f}]" if signed else \
      f"{m} [{lo:.3f}, {hi:.3f}]"


def _threshold(runs: dict, regime: str, threshold: float | None, threshold_delta: float) -> float:
  if threshold is not None:
    return threshold
  inits = [s[0]["eval_accuracy"] for (reg, _), seeds in runs.items() if reg == regime
           for s in seeds.values() if s and s[0]["step"] == 0]
  return float(np.mean(inits)) + threshold_delta if inits else math.nan


def _wall_with_guide(rows: list[dict]) -> float:
  """The cell's final wall_s plus the offline guide generation charged to it (0 if none)."""
  if not rows:
    return math.nan
  gen = rows[-1].get(GUIDE_GEN_COLUMN, 0.0)
  return rows[-1]["wall_s"] + (0.0 if gen is None or math.isnan(gen) else gen)


def _nanmean(values: list[float]) -> float:
  v = [x for x in values if not math.isnan(x)]
  return float(np.mean(v)) if v else math.nan


def _baselines(baseline) -> tuple[str, ...]:
  return (baseline,) if isinstance(baseline, str) else tuple(baseline or ())


def _head(*groups) -> str:
  """A markdown table's header and rule from groups of column titles."""
  titles = [t for g in groups for t in g]
  return "| " + " | ".join(titles) + " |\n|" + "---|" * len(titles) + "\n"


def _paired(values: dict, runs: dict, regime: str, baseline: str, variant: str, key,
            n_boot: int) -> str:
  """Paired difference mean [95 % CI] of {seed: value} to the baseline's same seeds ("—" when
  the variant is the baseline or no seed is shared); key(cell rows) gives a seed's value."""
  base = {s: key(c) for s, c in runs.get((regime, baseline), {}).items()}
  diffs = paired_differences(values, base) if base and variant != baseline else []
  return _fmt_ci(*bootstrap_ci(diffs, n_boot=n_boot), signed=True) if diffs else "—"


def interval_table(rows: list[dict], baseline, threshold: float | None = None,
                   threshold_delta: float = 0.2, n_boot: int = 10_000) -> str:
  """Markdown table per (regime, variant) with 95 % bootstrap intervals over seeds.

  Columns: final eval accuracy, mean [95 % CI]; its paired difference to each `baseline` variant
  (a name or several) of the same regime (same seeds), mean [95 % CI] ("—" where the regime has
  no such baseline or no common seed); policy tokens to the threshold accuracy (mean over the
  seeds that reached it, k/n); final policy and guide tokens (means; a method that reads twice
  the guide tokens shows it here); wall-clock seconds including the guide's generation (online
  guides generate inside the run; a trace-fed cell is charged its share of the trace file's
  generation, the CSV's guide_gen_s), mean over seeds.
  """
  runs, baselines = _runs(rows), _baselines(baseline)
  final_acc = lambda c: _last(c, "eval_accuracy")
  head = _head(("regime", "variant", "seeds", "final eval accuracy [95% CI]"),
               [f"Δ vs {b} (paired) [95% CI]" for b in baselines],
               ("policy tokens to threshold", "policy tokens", "guide tokens",
                "wall s incl. guide"))
  lines = []
  for regime in _ordered(r for r, _ in runs):
    thr = _threshold(runs, regime, threshold, threshold_delta)
    for (reg, variant), seeds in runs.items():
      if reg != regime:
        continue
      final = {s: final_acc(c) for s, c in seeds.items()}
      acc = bootstrap_ci(list(final.values()), n_boot=n_boot)
      cells = list(seeds.values())
      reached = [t for t in (tokens_to_threshold(c, thr) for c in cells) if not math.isnan(t)]
      to_thr = f"{np.mean(reached):,.0f} ({len(reached)}/{len(cells)})" if reached else \
          f"— (0/{len(cells)})"
      wall = [_wall_with_guide(c) for c in cells]
      lines.append(
          f"| {regime} | {variant} | {len(cells)} | {_fmt_ci(*acc)} | "
          + "".join(f"{_paired(final, runs, regime, b, variant, final_acc, n_boot)} | "
                    for b in baselines)
          + f"{to_thr} (≥ {thr:.3f}) | "
          f"{np.mean([_last(c, 'policy_tokens') for c in cells]):,.0f} | "
          f"{np.mean([_last(c, 'guide_tokens') for c in cells]):,.0f} | "
          f"{_nanmean(wall):,.0f} |")
  return head + "\n".join(lines) + "\n"


def value_at(rows: list[dict], x_key: str, x: float, y_key: str = "eval_accuracy") -> float:
  """y of the last evaluation at x_key ≤ x (rows sorted by step): the model a run had after
  spending x; NaN when it had not been evaluated by then."""
  out = math.nan
  for r in rows:
    if not math.isnan(r[x_key]) and r[x_key] <= x * (1 + 1e-9):
      out = r[y_key]
  return out


def first_reaching(rows: list[dict], threshold: float, x_key: str) -> float:
  """x_key at the first eval with accuracy ≥ threshold (NaN if none)."""
  for r in rows:
    if r["eval_accuracy"] >= threshold:
      return r[x_key]
  return math.nan


def _fmt_big(mean: float, lo: float, hi: float) -> str:
  if math.isnan(mean):
    return "—"
  return f"{mean:.3g}" if math.isnan(lo) else f"{mean:.3g} [{lo:.3g}, {hi:.3g}]"


def has_flops(rows: list[dict]) -> bool:
  return any(not math.isnan(r.get("flops", math.nan)) for r in rows)


def compute_table(rows: list[dict], baseline, threshold: float | None = None,
                  threshold_delta: float = 0.2, n_boot: int = 10_000) -> str:
  """Markdown table per (regime, variant) at equal compute (model FLOPs, mixpo/flops.py).

  Per regime, F* = the smallest final FLOPs of any of its cells that trained (a cell with only
  its step-0 row spent nothing), so every seed of every variant has spent F*. Columns: final FLOPs (mean over seeds), with its training and guide parts;
  eval accuracy at F* (the last evaluation at ≤ F*: the model the run had after F* FLOPs), mean
  [95 % CI], and its paired difference to each `baseline`; FLOPs and policy tokens to the
  threshold accuracy, mean [95 % CI] over the seeds that reached it (k/n).
  """
  runs, baselines = _runs(rows), _baselines(baseline)
  head = _head(("regime", "variant", "seeds", "FLOPs (train + guide)", "accuracy at F* [95% CI]"),
               [f"Δ at F* vs {b} (paired) [95% CI]" for b in baselines],
               ("FLOPs to threshold [95% CI]", "policy tokens to threshold [95% CI]"))
  lines = []
  for regime in _ordered(r for r, _ in runs):
    cells_of = [c for (reg, _), seeds in runs.items() if reg == regime for c in seeds.values()]
    f_star = min((_last(c, "flops") for c in cells_of if _last(c, "step") > 0),
                 default=math.nan)
    thr = _threshold(runs, regime, threshold, threshold_delta)
    at = lambda c, f=f_star: value_at(c, "flops", f)
    lines.append(f"| {regime} | F* = {f_star:.3g} FLOPs | | | | " + "| " * len(baselines)
                 + f"(threshold {thr:.3f}) | |")
    for (reg, variant), seeds in runs.items():
      if reg != regime:
        continue
      cells = list(seeds.values())
      values = {s: at(c) for s, c in seeds.items()}
      guide = np.mean([_last(c, "flops_guide_gen") for c in cells])
      to_thr = {}
      for key in ("flops", "policy_tokens"):
        reached = [x for x in (first_reaching(c, thr, key) for c in cells) if not math.isnan(x)]
        to_thr[key] = (f"{_fmt_big(*bootstrap_ci(reached, n_boot=n_boot))} "
                       f"({len(reached)}/{len(cells)})")
      lines.append(
          f"| {regime} | {variant} | {len(cells)} | "
          f"{np.mean([_last(c, 'flops') for c in cells]):.3g} ({guide:.2g} guide) | "
          f"{_fmt_ci(*bootstrap_ci(list(values.values()), n_boot=n_boot))} | "
          + "".join(f"{_paired(values, runs, regime, b, variant, at, n_boot)} | "
                    for b in baselines)
          + f"{to_thr['flops']} | {to_thr['policy_tokens']} |")
  return head + "\n".join(lines) + "\n"


def plot_final(rows: list[dict], title: str = ""):
  """Figure with one panel per regime: each variant's final eval accuracy, seed mean with its
  95 % bootstrap interval (error bar) and the seeds as dots."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: slow import.
  from matplotlib.figure import Figure

  runs = _runs(rows)
  regimes = _ordered(r for r, _ in runs)
  width = max([sum(1 for r, _ in runs if r == reg) for reg in regimes] + [1])
  fig = Figure(figsize=(max(4.0, 0.6 * width + 1.5) * max(len(regimes), 1), 4), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, max(len(regimes), 1), squeeze=False)[0]
  for ax, regime in zip(axes, regimes):
    variants = [v for r, v in runs if r == regime]
    for i, variant in enumerate(variants):
      finals = [_last(c, "eval_accuracy") for c in runs[(regime, variant)].values()]
      mean, lo, hi = bootstrap_ci(finals)
      ax.scatter([i] * len(finals), finals, s=10, color="grey", alpha=0.6, zorder=2)
      err = None if math.isnan(lo) else [[mean - lo], [hi - mean]]
      ax.errorbar([i], [mean], yerr=err, fmt="o", color="C0", capsize=4, zorder=3)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=45, ha="right", fontsize="small")
    ax.set_title(f"{title} {regime}: mean, 95% bootstrap CI; dots = seeds".strip(),
                 fontsize="medium")
    ax.set_ylabel("final eval accuracy")
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return fig


def write_reports(rows: list[dict], out_dir: str, grid: str, threshold: float | None = None,
                  threshold_delta: float = 0.2, baseline=None) -> list[str]:
  """<grid>.csv, <grid>_accuracy_vs_step.png, <grid>_accuracy_vs_tokens.png and
  <grid>_summary.md in `out_dir`; returns their paths.

  With a `baseline` variant (e.g. "dapo", or several: ("dapo", "sft_dapo")), the summary adds
  `interval_table` (bootstrap intervals, paired differences to each baseline, wall-clock with the
  guide's generation), the curves' bands are 95 % bootstrap intervals of the mean instead of
  min–max, and <grid>_final_accuracy.png shows each variant's final accuracy with its interval.
  Rows that count model FLOPs add <grid>_accuracy_vs_flops.png and `compute_table` (equal FLOPs).
  """
  os.makedirs(out_dir, exist_ok=True)
  baselines = _baselines(baseline)
  band = "ci" if baselines else "minmax"
  paths = [write_csv(rows, os.path.join(out_dir, f"{grid}.csv"))]
  for x_key, name in (("step", "step"), ("policy_tokens", "tokens")):
    path = os.path.join(out_dir, f"{grid}_accuracy_vs_{name}.png")
    plot_grid(rows, x_key, title=f"{grid}:", band=band).savefig(path)
    paths.append(path)
  if baselines:
    path = os.path.join(out_dir, f"{grid}_final_accuracy.png")
    plot_final(rows, title=f"{grid}:").savefig(path)
    paths.append(path)
  if has_flops(rows):
    path = os.path.join(out_dir, f"{grid}_accuracy_vs_flops.png")
    plot_grid(rows, "flops", title=f"{grid}:", band=band).savefig(path)
    paths.append(path)
  path = os.path.join(out_dir, f"{grid}_summary.md")
  with open(path, "w") as f:
    f.write(f"# {grid} grid: eval accuracy at equal policy-token budgets\n\n")
    f.write(summary_table(rows, threshold, threshold_delta))
    if baselines:
      f.write(f"\n## 95 % bootstrap intervals over seeds; paired differences to "
              f"{', '.join(baselines)}\n\n")
      f.write(interval_table(rows, baselines, threshold, threshold_delta))
    if has_flops(rows):
      f.write("\n## At equal compute: model FLOPs (mixpo/flops.py; policy and guide generation, "
              "scoring, updates, SFT; evaluation not counted)\n\n")
      f.write(compute_table(rows, baselines, threshold, threshold_delta))
  paths.append(path)
  return paths


def run_figure(metrics: list[dict], keys=("eval/accuracy", "train/reward"), x_key: str = "step"):
  """Figure of one run's metrics.jsonl rows: one panel per key against `x_key` (notebooks)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: slow import.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(4.5 * len(keys), 3.5), dpi=100)
  FigureCanvasAgg(fig)
  for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
    pts = sorted((r[x_key], r[key]) for r in metrics
                 if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float)))
    if pts:
      ax.plot(*zip(*pts), marker=".")
    ax.set_title(key)
    ax.set_xlabel(x_key)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig
