"""Run logging: metrics to jsonl (+ TensorBoard, Weights & Biases), samples, a progress bar, phase
timers, plots, the printed summary.

Files under `workdir`:
```
metrics.jsonl   one JSON object per `MetricLogger.write`: {"step": int, "<key>": number, ...}
samples.jsonl   one JSON object per sample row: {"step": int, "prompt": str, "response": str, ...}
events.jsonl    run events the plots mark: {"step": int, "event": "resumed", "time": unix s}
tb/             TensorBoard event files (tensorboardX), one scalar per metric key, and the run's
                config as hparams (loggers "tb"; the viewer: pip install -e ".[tensorboard]")
wandb/          the Weights & Biases run (loggers "wandb"; pip install -e ".[wandb]"): the same
                keys as metrics.jsonl, the config as the run's config; WANDB_MODE=offline keeps it
                local (`wandb sync` uploads it later)
plots/          PNGs written by `plot_run` at the end of a run (finished, preempted or failed)
```
JSON has no NaN/Infinity, so non-finite floats are written as the strings "nan", "inf" and
"-inf"; `read_metrics` turns them back into floats. Each line is flushed as written, so a crash
loses at most the line being written (which `read_metrics` then skips with a warning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Iterable

import numpy as np

from mixpo.fields import FieldError

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
EVENTS_FILE = "events.jsonl"
LOGGERS = ("tb", "wandb")  # backends besides metrics.jsonl (config.loggers).
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _scalar(value: Any, where: str) -> int | float | str:
  """A Python int/float from a Python, numpy or jax scalar; non-finite floats as strings."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int):
    return value
  try:
    arr = np.asarray(value)  # Also pulls a jax array to host.
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"{where}: cannot convert {type(value).__name__} to a number: {e}") from e
  if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    raise TypeError(f"{where} must be a scalar number, got {type(value).__name__} with dtype "
                    f"{arr.dtype} and shape {arr.shape}; log a reduction (mean, sum) instead.")
  item = arr.reshape(()).item()
  if isinstance(item, float) and not math.isfinite(item):
    return "nan" if math.isnan(item) else ("inf" if item > 0 else "-inf")
  return int(item) if isinstance(item, bool) else item


def _jsonable(value: Any, where: str) -> Any:
  """Sample-row values: strings/None kept, scalars via `_scalar`, arrays and lists as lists."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict):
    return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
  arr = np.asarray(value)
  if arr.ndim > 0:
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(arr.tolist())]
  return _scalar(value, where)


def _decode(row: dict) -> dict:
  return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}


def read_jsonl(path: str, decode_nonfinite: bool = True) -> list[dict]:
  """Rows of a jsonl file; a truncated final line (a crash mid-write) is skipped with a warning."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (was the run's workdir given, and did the "
                            "main process write any rows?)")
  with open(path) as f:
    lines = f.read().split("\n")
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # No trailing newline: the write was cut short.
        logging.warning("%s:%d: skipping truncated last line (%s).", path, i + 1, e)
        continue
      raise ValueError(f"{path}:{i + 1}: not valid JSON ({e}); fix or delete that line.") from e
    rows.append(_decode(row) if decode_nonfinite else row)
  return rows


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `workdir/metrics.jsonl` in order written, "nan"/"inf"/"-inf" back as floats."""
  return read_jsonl(os.path.join(workdir, METRICS_FILE))


def _drop_after(path: str, step: int) -> int:
  """Rewrites a jsonl file without rows whose step > `step`; returns how many were dropped."""
  if not os.path.exists(path):
    return 0
  rows = read_jsonl(path, decode_nonfinite=False)
  keep = [r for r in rows if r.get("step", -1) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in keep)
  os.replace(tmp, path)
  return len(rows) - len(keep)


def flat_config(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
  """A nested config dict as {"dotted.key": scalar}: lists, tuples and None as text (what
  TensorBoard's hparams and experiment trackers take)."""
  out = {}
  for k, v in config.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flat_config(v, key + "."))
    elif isinstance(v, (bool, int, float, str)):
      out[key] = v
    else:
      out[key] = json.dumps(v, default=str)
  return out


class _TensorBoard:
  """tb/: one scalar per metric key; the config as hparams (the HParams tab lists the run by its
  config fields next to eval/accuracy and reward/mean)."""

  HPARAM_METRICS = ("eval/accuracy", "reward/mean", "train/reward")

  def __init__(self, workdir: str, resume_step: int | None, config: dict | None):
    from tensorboardX import SummaryWriter  # Lazy: pulls in protobuf.
    from tensorboardX.summary import hparams
    self._w = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30,
                            purge_step=None if resume_step is None else resume_step + 1)
    if config:
      writer = self._w._get_file_writer()  # the run's own event file, not an hparams sub-run
      for summary in hparams(flat_config(config), {k: 0.0 for k in self.HPARAM_METRICS}):
        writer.add_summary(summary)

  def write(self, step: int, row: dict) -> None:
    for k, v in row.items():
      self._w.add_scalar(k, v, step)
    self._w.flush()

  def close(self) -> None:
    self._w.close()


class _Wandb:
  """A Weights & Biases run in workdir/wandb: the same keys and steps as metrics.jsonl, the config
  as the run config. The run id is fixed by the workdir, so a resumed run continues the same
  wandb run (wandb's history is append-only: rows a crashed attempt logged after its last
  checkpoint stay there; metrics.jsonl is the record). Project: config.wandb_project; entity,
  mode (WANDB_MODE=offline) and credentials: wandb's own environment variables."""

  def __init__(self, workdir: str, config: dict | None, project: str):
    import hashlib

    import wandb  # Lazy: optional (pip install -e ".[wandb]").
    path = os.path.abspath(workdir)
    run_id = hashlib.sha256(path.encode()).hexdigest()[:16]
    self._run = wandb.init(dir=path, project=project or "mixpo", id=run_id, resume="allow",
                           name=os.path.basename(path.rstrip(os.sep)), config=config or {},
                           reinit="create_new")

  def write(self, step: int, row: dict) -> None:
    self._run.log(dict(row), step=step)

  def close(self) -> None:
    self._run.finish()


class MetricLogger:
  """Appends metrics to `workdir/metrics.jsonl` and the `loggers` backends, samples to
  `samples.jsonl`, run events to `events.jsonl`.

  Non-main processes (`is_main=False`, i.e. `jax.process_index() != 0`) write nothing, so every
  host can call the same code. `resume_step`: when resuming from a checkpoint at that step, rows
  with a larger step (logged after the checkpoint by the run that crashed) are dropped from both
  jsonl files and purged from TensorBoard, so the resumed run's rows don't duplicate them.
  `loggers`: backends of `LOGGERS` ("tb", "wandb"; default: "tb" unless tensorboard=False);
  `config` (a JSON-ready dict) becomes TensorBoard's hparams and the wandb run's config.
  """

  def __init__(self, workdir: str, *, is_main: bool = True, tensorboard: bool = True,
               resume_step: int | None = None, loggers=None, config: dict | None = None,
               project: str = "mixpo"):
    self.workdir = os.fspath(workdir)
    self.is_main = is_main
    self._metrics = self._samples = None
    self._backends = []
    if not is_main:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if resume_step is not None:
      for name in (METRICS_FILE, SAMPLES_FILE):
        dropped = _drop_after(os.path.join(self.workdir, name), resume_step)
        if dropped:
          logging.info("%s: dropped %d rows after resume step %d.", name, dropped, resume_step)
    self._metrics = open(os.path.join(self.workdir, METRICS_FILE), "a")
    loggers = tuple(("tb",) if tensorboard else ()) if loggers is None else tuple(loggers)
    for name in loggers:
      if name == "tb":
        self._backends.append(_TensorBoard(self.workdir, resume_step, config))
      elif name == "wandb":
        self._backends.append(_Wandb(self.workdir, config, project))
      else:
        raise ValueError(f"MetricLogger: unknown logger {name!r}; expected some of {LOGGERS}.")

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Logs one row {"step": step, **metrics}; values are Python/numpy/jax scalars."""
    if not self.is_main:
      return
    step = int(step)
    row = {"step": step}
    for k, v in metrics.items():
      if k == "step":
        raise ValueError(f"MetricLogger.write(step={step}): 'step' is reserved; rename the metric.")
      row[k] = _scalar(v, f"MetricLogger.write(step={step}) metric {k!r}")
    self._metrics.write(json.dumps(row) + "\n")
    self._metrics.flush()
    values = {k: _NONFINITE.get(v, v) if isinstance(v, str) else v
              for k, v in row.items() if k != "step"}
    for backend in self._backends:
      backend.write(step, values)

  def write_samples(self, step: int, rows: Iterable[dict]) -> None:
    """Appends sample rows (prompt, response, reward, set, ...) to samples.jsonl with `step`."""
    if not self.is_main:
      return
    if self._samples is None:
      self._samples = open(os.path.join(self.workdir, SAMPLES_FILE), "a")
    step = int(step)
    for i, r in enumerate(rows):
      row = {"step": step, **_jsonable(dict(r), f"write_samples(step={step}) row {i}")}
      self._samples.write(json.dumps(row, ensure_ascii=False) + "\n")
    self._samples.flush()

  def event(self, step: int, event: str) -> None:
    """Appends {"step", "event", "time"} to events.jsonl (e.g. "resumed": the plots mark it)."""
    if not self.is_main:
      return
    with open(os.path.join(self.workdir, EVENTS_FILE), "a") as f:
      f.write(json.dumps({"step": int(step), "event": event, "time": time.time()}) + "\n")

  def close(self) -> None:
    for f in (self._metrics, self._samples, *self._backends):
      if f is not None:
        f.close()
    self._metrics = self._samples = None
    self._backends = []

  def __enter__(self) -> "MetricLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _hms(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _AboveBar:
  """A stream whose lines tqdm writes above the bar (clear, write, redraw), so log lines never
  break it."""

  def __init__(self, bar, stream):
    self._bar, self._stream = bar, stream

  def write(self, text: str) -> int:
    self._bar.write(text, file=self._stream, end="")
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def __getattr__(self, name):  # isatty, fileno, encoding, ... of the real stream
    return getattr(self._stream, name)


class Progress:
  """tqdm bar over steps: the step's sample reward, the last eval accuracy, seconds per step, ETA.

  "reward" is `reward/mean`: the mean (weighted sum of config.reward.functions) reward the policy's
  fresh samples got, over the step's last generation batch (every sample of `groups` prompts, before
  DAPO's dynamic sampling keeps the groups with reward variance) — the reward users mean;
  `train/reward` in metrics.jsonl is over the rows trained on, which dynamic sampling biases towards
  groups of mixed rewards. The ETA counts the steps after the first of this invocation (the first
  also compiles). While the bar is shown, absl's log lines (INFO, WARNING) are written above it, not
  through it.
  """

  KEYS = (("reward/mean", "reward"), ("eval/accuracy", "acc"), ("time/step", "s/step"))
  FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

  def __init__(self, total: int, initial: int = 0, disable: bool = False):
    from tqdm.auto import tqdm  # Lazy: tqdm.auto probes for notebooks.
    self._bar = tqdm(total=total, initial=initial, disable=disable, dynamic_ncols=True,
                     unit="step", bar_format=self.FORMAT)
    self.total = int(total)
    self.step = int(initial)  # Tracked here: a disabled tqdm does not count.
    self._last: dict[str, Any] = {}  # Eval runs only every N steps: keep showing the last.
    self._first: tuple[int, float] | None = None  # (step, time) the first step ended
    self._restore = None
    if not disable and "notebook" not in type(self._bar).__module__:  # widgets need no help
      self._restore = self._lines_above_bar()

  def _lines_above_bar(self):
    """Routes stderr (what absl logs to before and after flag parsing, warnings, prints) through
    tqdm.write while the bar is shown; returns the function that undoes it."""
    import sys

    from absl import logging as absl_logging
    stderr, handler = sys.stderr, absl_logging.get_absl_handler().python_handler
    above = _AboveBar(self._bar, stderr)
    sys.stderr = above
    own_stream = handler.stream is stderr
    if own_stream:
      handler.setStream(above)

    def restore():
      if sys.stderr is above:
        sys.stderr = stderr
      if own_stream and handler.stream is above:
        handler.setStream(stderr)
    return restore

  def update(self, step: int, metrics: dict[str, Any] | None = None) -> None:
    """Moves the bar to `step` (steps done) and refreshes the shown metrics."""
    now = time.perf_counter()
    for key, short in self.KEYS:
      if metrics and key in metrics:
        v = _scalar(metrics[key], f"Progress.update metric {key!r}")
        self._last[short] = f"{_NONFINITE.get(v, v) if isinstance(v, str) else v:.3g}"
    if self._first is None:
      self._first = (int(step), now)
    elif int(step) > self._first[0]:
      per_step = (now - self._first[1]) / (int(step) - self._first[0])
      self._last["eta"] = _hms(per_step * max(self.total - int(step), 0))
    if self._last:
      self._bar.set_postfix(self._last, refresh=False)
    self._bar.update(int(step) - self.step)
    self.step = int(step)

  def close(self) -> None:
    if self._restore is not None:
      self._restore()
      self._restore = None
    self._bar.close()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_summary(summary: dict, workdir: str | None = None) -> str:
  """The run's summary as a person reads it at the end of a run: one line per fact, the
  warnings one per line, the files last (summary.json holds the same as JSON)."""
  s = summary
  lines = ["run summary:"]
  stop = (f"preempted by {s.get('preempted_by')}" if s.get("preempted") else
          f"stopped by {s['error']}" if s.get("error") else
          "token budget reached" if s.get("budget_reached") else "finished")
  lines.append(f"  steps            {s.get('start_step', 0)} -> {s.get('final_step', '?')} ({stop})")
  if "final_eval_accuracy" in s:
    lines.append(f"  eval accuracy    {s.get('initial_eval_accuracy', float('nan')):.3f} -> "
                 f"{s['final_eval_accuracy']:.3f} (greedy, {s.get('eval_size', '?')} problems)")
  lines.append(f"  tokens generated {s.get('policy_tokens', 0):,} policy, "
               f"{s.get('guide_tokens', 0):,} guide")
  counts = {k: s.get(k, 0) for k in ("skipped_update_steps", "no_signal_steps",
                                     "reward_timeouts", "reward_errors")}
  lines.append("  health           " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                for k, v in counts.items()))
  shown = {"start_step", "final_step", "preempted", "preempted_by", "error", "budget_reached",
           "final_eval_accuracy", "initial_eval_accuracy", "eval_size", "policy_tokens",
           "guide_tokens", "warnings", "plots", *counts}
  for k, v in s.items():
    if k not in shown:
      lines.append(f"  {k:<16} {v}")
  warnings = s.get("warnings") or []
  lines.append(f"  warnings         {len(warnings) or 'none'}")
  lines += [f"    - {w}" for w in warnings]
  if workdir:
    lines.append(f"  files            {workdir}/: summary.json, config.json, metrics.jsonl, "
                 "samples.jsonl, plots/")
  return "\n".join(lines)


class PhaseTimer:
  """Wall-clock seconds per named phase of a step.

  ```
  timer = PhaseTimer()
  with timer("generate_policy"): ...
  with timer("update"): ...
  logger.write(step, {**metrics, **timer.metrics()})   # also starts the next step's clock
  ```
  Repeated phases accumulate. JAX dispatches asynchronously: block on the phase's outputs
  (`jax.block_until_ready`) inside the `with`, or their compute is billed to a later phase.
  """

  def __init__(self):
    self._phases: dict[str, float] = {}
    self._active: str | None = None
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def __call__(self, name: str):
    if self._active is not None:
      raise RuntimeError(f"PhaseTimer: phase {name!r} started inside phase {self._active!r}; "
                         "phases must not nest (time/other would double-count).")
    self._active = name
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - t0
      self._active = None

  def reset(self) -> None:
    """Drops the phases so far and restarts the step clock."""
    self._phases = {}
    self._start = time.perf_counter()

  def metrics(self) -> dict[str, float]:
    """{"time/<phase>": s, ..., "time/step": s since last reset, "time/other": step − phases}."""
    total = time.perf_counter() - self._start
    out = {f"time/{k}": v for k, v in self._phases.items()}
    out["time/step"] = total
    out["time/other"] = max(total - sum(self._phases.values()), 0.0)
    self.reset()
    return out


# (file name, title, y label, y keys, x key); x key "step" or "policy_tokens".
PANELS = (
    ("reward_vs_step.png", "Reward", "mean reward", ("reward/mean", "train/reward"), "step"),
    ("accuracy_vs_step.png", "Eval accuracy", "accuracy", ("eval/accuracy",), "step"),
    ("reward_vs_tokens.png", "Reward", "mean reward", ("reward/mean", "train/reward"),
     "policy_tokens"),
    ("accuracy_vs_tokens.png", "Eval accuracy", "accuracy", ("eval/accuracy",), "policy_tokens"),
    ("loss.png", "Loss", "loss (minimised)", ("loss/loss",), "step"),
    ("grad_norm.png", "Gradient norm", "global L2 norm (before clipping)", ("loss/grad_norm",),
     "step"),
    ("kl.png", "KL to the reference policy", "nats / token", ("loss/kl",), "step"),
    ("response_length.png", "Response length", "tokens", ("train/response_length",), "step"),
    ("entropy.png", "Policy entropy", "nats / token", ("train/entropy",), "step"),
    ("clipfrac.png", "Clip fraction", "fraction of tokens",
     ("loss/clipfrac_on", "loss/clipfrac_zero"), "step"),
    ("guide_ratio.png", "Guide ratio on OFF", "mean", ("loss/ratio_guide_off", "loss/f_ratio_off"),
     "step"),
)


def reward_components(rows: list[dict]) -> tuple[str, ...]:
  """The per-function reward keys (`reward/<function>`) a run logged, in first-seen order: not
  the runner's weighted mean and counters, nor their per-source repeats (reward/<source>/*)."""
  from mixpo.rewards.runner import RewardResult  # noqa: PLC0415  (the counters' one list)
  not_functions = {"reward/mean", *RewardResult.COUNTERS}
  seen = {}
  for r in rows:
    for k in r:
      if k.startswith("reward/") and k.count("/") == 1 and k not in not_functions:
        seen.setdefault(k, None)
  return tuple(seen)


def _series(rows: list[dict], key: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) for rows holding a finite `key`; x from the row or, failing that, its step's rows."""
  by_step = {}
  if x_key != "step":  # e.g. eval rows written apart from the train row carrying policy_tokens.
    for r in rows:
      if isinstance(r.get(x_key), (int, float)):
        by_step[r.get("step")] = r[x_key]
  xs, ys = [], []
  for r in rows:
    y = r.get(key)
    x = r.get(x_key, by_step.get(r.get("step")))
    if isinstance(y, (int, float)) and isinstance(x, (int, float)) and math.isfinite(y):
      xs.append(x)
      ys.append(y)
  return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def run_label(workdir: str) -> str:
  """"<algo> · seed <s> · <task>" of the run in `workdir`, from its config.json (or the config
  its checkpoints recorded, checkpoints/fingerprint.json); "" when there is none."""
  config = None
  for path in (os.path.join(workdir, "config.json"),
               os.path.join(workdir, "checkpoints", "fingerprint.json")):
    try:
      with open(path) as f:
        config = json.load(f)
      break
    except (OSError, ValueError):
      continue
  if not isinstance(config, dict):
    return ""
  task = str(config.get("task", ""))
  kwargs = config.get("task_kwargs") or {}
  if task == "file" and isinstance(kwargs, dict) and kwargs.get("train_path"):
    task = f"file {os.path.basename(str(kwargs['train_path']))}"
  parts = [str(config.get("algo", "")), f"seed {config['seed']}" if "seed" in config else "", task]
  return " · ".join(p for p in parts if p)


def read_events(workdir: str) -> list[dict]:
  """events.jsonl's rows ([] when the run has none)."""
  path = os.path.join(workdir, EVENTS_FILE)
  return read_jsonl(path) if os.path.exists(path) else []


def _eval_size(rows: list[dict]) -> int | None:
  sizes = [r["eval/num_examples"] for r in rows if isinstance(r.get("eval/num_examples"), int)]
  return sizes[-1] if sizes else None


def run_figures(workdir: str, label: str | None = None) -> list[tuple[str, Any]]:
  """[(file name, matplotlib Figure)], one per panel (PANELS, and with several reward functions
  reward_components.png, one line each) that has data.

  Titles carry `label` (default `run_label(workdir)`: algorithm, seed, task) and, on accuracy
  panels, the eval-set size; step axes have integer ticks; dashed vertical lines mark the steps
  a run resumed from (events.jsonl); accuracy axes start at 0 (rewards may be negative). Panels
  whose keys are absent from metrics.jsonl are skipped (logged at debug), never an error. Uses
  matplotlib's object API with the Agg canvas, so no global backend is changed.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: slow import.
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  label = run_label(workdir) if label is None else label
  rows = read_metrics(workdir)
  resumed = [e["step"] for e in read_events(workdir) if e.get("event") == "resumed"]
  tokens_at = {r["step"]: r["policy_tokens"] for r in rows
               if isinstance(r.get("policy_tokens"), (int, float))}
  eval_size = _eval_size(rows)
  components = reward_components(rows)
  panels = PANELS + ((("reward_components.png", "Reward per function", "mean reward",
                       components, "step"),) if len(components) > 1 else ())
  figures = []
  for fname, title, ylabel, keys, x_key in panels:
    series = [(k, *_series(rows, k, x_key)) for k in keys]
    series = [s for s in series if len(s[1])]
    if not series:
      logging.debug("plot_run: skipping %s (no rows with %s and %s).", fname, keys, x_key)
      continue
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, x, y in series:
      order = np.argsort(x, kind="stable")
      x, y = x[order], y[order]
      line, = ax.plot(x, y, alpha=0.35 if len(y) > 20 else 1.0, label=key,
                      marker="o" if len(y) <= 20 else None, markersize=3)
      if len(y) > 20:  # Noisy per-step values: overlay a moving average.
        w = max(len(y) // 20, 2)
        ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color=line.get_color(),
                label=f"{key} (mean of {w})")
    marks = resumed if x_key == "step" else [tokens_at[s] for s in resumed if s in tokens_at]
    for i, x in enumerate(marks):
      ax.axvline(x, color="grey", linestyle="--", linewidth=0.8,
                 label="resumed" if i == 0 else None)
    if ylabel == "accuracy" and eval_size:
      title = f"{title}, {eval_size} problems"
    ax.set_title(f"{title} ({label})" if label else title, fontsize="medium")
    ax.set_xlabel("generated policy tokens" if x_key == "policy_tokens" else "step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and tokens are counts
    ax.set_ylabel(ylabel)
    if ylabel == "accuracy":  # a fraction: an axis below 0 only misleads.
      ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    figures.append((fname, fig))
  return figures


def plot_run(workdir: str, out_dir: str | None = None, label: str | None = None) -> list[str]:
  """Writes `run_figures(workdir, label)` as PNGs to out_dir (default workdir/plots); returns
  their paths."""
  out_dir = os.path.join(workdir, "plots") if out_dir is None else out_dir
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for fname, fig in run_figures(workdir, label):
    path = os.path.join(out_dir, fname)
    fig.savefig(path)
    written.append(path)
  return written


class CompileCounter:
  """Counts XLA backend compilations in this process (jax.monitoring's compile-duration event).

  The trainer logs `compile/count` every step: after the first step (and the first evaluation)
  it must stay flat, otherwise shapes are leaking into the jitted programs.
  """

  _count = 0
  _registered = False

  @classmethod
  def install(cls) -> None:
    if not cls._registered:
      import jax.monitoring  # pylint: disable=g-import-not-at-top

      def _listener(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == "/jax/core/compile/backend_compile_duration":
          cls._count += 1

      jax.monitoring.register_event_duration_secs_listener(_listener)
      cls._registered = True

  @classmethod
  def count(cls) -> int:
    cls.install()
    return cls._count


class RunHealth:
  """Watches each step's metrics for problems a person must see; they go to WARNING logs and
  to summary.json (`summary()`), never only to metrics.jsonl.

  - skipped updates (non-finite loss / gradients): a WARNING per step; more than `max_skip_ratio`
    of the steps (once `min_steps` are done) raises `RunHealthError`;
  - reward timeouts / errors scored 0: a WARNING per step that had them;
  - rewards that say nothing about the answers: a step where more than `reward_failure_ratio` of
    the reward items (`reward/items`) were blocked by the sandbox, errors, unverifiable, scorer
    errors or timeouts; one WARNING at the first such step, the others counted (their zeros are
    the reward code's or the sandbox's verdict, not the answers': a broken scorer would
    otherwise train on a reward of 0 everywhere with no sign);
  - no learning signal: a step whose loss is exactly 0, or that had no prompt group with reward
    variance and no guide (OFF) rows; after `no_signal_steps` such steps in a row, one WARNING
    per streak (0 = never).
  Counts cover this invocation (a resumed run counts from its restart).
  """

  # Reward counters of items scored 0 for a reason other than the answer being judged wrong.
  REWARD_FAILURES = ("reward/blocked", "reward/errors", "reward/unverifiable",
                     "reward/scorer_errors", "reward/timeouts")

  def __init__(self, max_skip_ratio: float = 1.0, no_signal_steps: int = 0, min_steps: int = 10,
               reward_failure_ratio: float = 0.5):
    self.max_skip_ratio, self.no_signal_steps, self.min_steps = (
        float(max_skip_ratio), int(no_signal_steps), int(min_steps))
    self.reward_failure_ratio = float(reward_failure_ratio)
    if not 0 <= self.reward_failure_ratio <= 1:
      raise FieldError("reward.failure_warn_ratio", reward_failure_ratio, "a share of the "
                       "reward items, in [0, 1]")
    self.steps = self.skipped_steps = self.no_signal_total = self.timeouts = self.errors = 0
    self.reward_failure_steps = self.reward_items = 0
    self.reward_failures = {k: 0 for k in self.REWARD_FAILURES}
    self._streak = 0
    self.warnings: list[str] = []

  def warn(self, message: str) -> None:
    """Logs `message` at WARNING and keeps it for summary.json (the first 20; then counts)."""
    logging.warning("%s", message)
    if len(self.warnings) < 20:
      self.warnings.append(message)

  @staticmethod
  def no_signal(metrics: dict[str, Any]) -> bool:
    loss = metrics.get("loss/loss")
    if isinstance(loss, (int, float)) and loss == 0:
      return True
    return (metrics.get("dynamic/variance_groups", 1) == 0
            and metrics.get("train/rows_off", 0) == 0)

  def observe(self, step: int, metrics: dict[str, Any]) -> None:
    self.steps += 1
    timeouts = int(metrics.get("reward/timeouts", 0) or 0)
    errors = int(metrics.get("reward/errors", 0) or 0)
    self.timeouts, self.errors = self.timeouts + timeouts, self.errors + errors
    if timeouts or errors:
      self.warn(f"step {step}: {timeouts} reward timeouts and {errors} reward errors scored 0 "
                "(config.reward.timeout_s / reward_on_error)")
    self._observe_reward_failures(step, metrics)
    if metrics.get("loss/skipped_updates", 0) > 0:
      self.skipped_steps += 1
      self.warn(f"step {step}: update skipped (non-finite loss or gradients; parameters "
                "unchanged)")
      if (self.steps >= self.min_steps
          and self.skipped_steps / self.steps > self.max_skip_ratio):
        raise RunHealthError(
            f"step {step}: {self.skipped_steps} of {self.steps} steps skipped their update, more "
            f"than config.max_skip_ratio={self.max_skip_ratio:g}; lower the learning rate or check"
            " the rewards / guide log-probs for non-finite values.")
    if self.no_signal(metrics):
      self.no_signal_total += 1
      self._streak += 1
      if self.no_signal_steps and self._streak == self.no_signal_steps:
        self.warn(f"step {step}: no learning signal for {self._streak} steps (no prompt group "
                  "with reward variance, or a zero loss): every sample of a group gets the same "
                  "reward. The task may be too hard or too easy for the policy, or the reward "
                  "always returns the same value; check samples.jsonl.")
    else:
      self._streak = 0

  def _observe_reward_failures(self, step: int, metrics: dict[str, Any]) -> None:
    items = int(metrics.get("reward/items", 0) or 0)
    counts = {k: int(metrics.get(k, 0) or 0) for k in self.REWARD_FAILURES}
    self.reward_items += items
    for k, v in counts.items():
      self.reward_failures[k] += v
    failed = sum(counts.values())
    if not items or failed <= self.reward_failure_ratio * items:
      return
    self.reward_failure_steps += 1
    if self.reward_failure_steps == 1:
      parts = ", ".join(f"{v} {k.split('/')[1]}" for k, v in counts.items() if v)
      self.warn(f"step {step}: {failed} of {items} reward items scored 0 without a verdict on the "
                f"answer ({parts}), more than config.reward.failure_warn_ratio="
                f"{self.reward_failure_ratio:g}: the rewards are mostly the reward code's or the "
                "sandbox's failures; see the reward workers' log lines and docs/rewards.md "
                "(later such steps are counted in summary.json, not logged)")

  def summary(self) -> dict[str, Any]:
    return {"warnings": list(self.warnings), "skipped_update_steps": self.skipped_steps,
            "no_signal_steps": self.no_signal_total, "reward_timeouts": self.timeouts,
            "reward_errors": self.errors, "reward_items": self.reward_items,
            "reward_blocked": self.reward_failures["reward/blocked"],
            "reward_unverifiable": self.reward_failures["reward/unverifiable"],
            "reward_scorer_errors": self.reward_failures["reward/scorer_errors"],
            "reward_failure_steps": self.reward_failure_steps}


class RunHealthError(RuntimeError):
  """Too many steps of a run skipped their update (config.max_skip_ratio)."""
