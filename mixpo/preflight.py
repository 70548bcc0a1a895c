"""A run's front door: everything checked from files before any model is built or trained.

`loop.setup` calls these first: the policy's tokenizer (the built-in char tokenizer without
building it), the guide's tokenizer compared with it by content, the dataset and eval files, the
trace file, the logger backends. A mistake is a `SetupError` whose message names
`config.<field>`, the file, the row and the field (`mixpo.cli` prints it as the flag, exit 2).
Also here: which built-in models a run uses (only those are built), the warnings for settings a
run ignores, and the resolved `config.json` a run directory starts with.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
from absl import logging

from mixpo import algorithms, builtin, models, rl
from mixpo import logging as mlog
from mixpo.data import task_options
from mixpo.data.chat_render import TemplateLimitError
from mixpo.data.readers import DataError
from mixpo.guide_source import TraceSource

CONFIG_FILE = "config.json"


class SetupError(ValueError):
  """Something the config points at cannot be used: a dataset, trace, tokenizer or guide file.
  Found before any model is built; the message names `config.<field>` (the binaries print it as
  the flag `--config.<field>`), the file, and the row and field at fault."""


def builtin_models_used(config, spec: rl.RunSpec) -> tuple[str, ...]:
  """The built-in models (ensure_builtin_models' names) the run loads: the policy only when
  config.policy='builtin', the guide only when the algorithm loads a guide and config.guide.path
  is 'builtin'. A dapo run, or one from a checkpoint of your own, builds none it does not use."""
  used = ("policy_init",) if config.policy == "builtin" else ()
  if spec.guide.needs_model and config.guide.path == "builtin":
    used += ("guide",)
  return used


def tokenizer_of(config, field: str):
  """The tokenizer of config.<field> ('policy' / 'guide.path'): the built-in char tokenizer for
  'builtin', else the checkpoint's tokenizer files."""
  path = config.policy if field == "policy" else config.guide.path
  if path == "builtin":
    return builtin.builtin_tokenizer(config.builtin)
  try:
    return models.load_tokenizer(path)
  except (OSError, ValueError) as e:
    raise SetupError(f"config.{field}={path}: cannot load its tokenizer ({e}); a checkpoint "
                     "directory holds tokenizer.json / tokenizer_config.json next to config.json."
                     ) from None


def warn_unused(config, spec: rl.RunSpec) -> None:
  """WARNING for settings the resolved run does not use (they would otherwise pass silently)."""
  algo = spec.algorithm.name
  if not spec.algorithm.guided and config.guide.source == "traces":
    guided = ", ".join(n for n in algorithms.names() if algorithms.get(n).guided)
    logging.warning("config.algo=%s is unguided: config.guide.source='traces' makes %s the "
                    "prompt stream only; its guide responses are not trained on (a guided algo "
                    "trains on them: %s).", algo, config.guide.traces_path, guided)
  if not spec.guide.needs_model and config.guide.path not in ("", "builtin"):
    logging.warning("config.guide.path=%s is not loaded: config.algo=%s with guide.source=%r "
                    "and guide.logp=%r uses no guide model.", config.guide.path, algo,
                    spec.guide.source, spec.guide.logp)


def check_guide(config, spec: rl.RunSpec, tokenizer) -> None:
  """The guide the run loads shares the policy's tokenizer (by content, `rl.check_vocabularies`);
  your own policy with the default built-in guide is named as such."""
  if not spec.guide.needs_model:
    return
  try:
    rl.check_vocabularies(tokenizer, tokenizer_of(config, "guide.path"))
  except ValueError as e:
    if config.guide.path == "builtin":
      raise SetupError(
          f"config.guide.path=builtin with config.policy={config.policy}: the built-in guide is "
          f"a char-level model of the built-in addition task, not a guide for this policy "
          f"({str(e).rstrip('.')}). "
          f"config.algo={spec.algorithm.name} trains on a guide's samples: set config.guide.path "
          "to a checkpoint that shares the policy's tokenizer, or config.guide.source=traces "
          "with config.guide.logp=one, or an unguided config.algo (grpo, dapo).") from None
    raise SetupError(f"config.guide.path={config.guide.path}: {e}") from None


def _task_flag(option: str) -> str:
  return "config." + (option if option in ("task", "task_knobs") else f"task_kwargs.{option}")


def make_task(config, tokenizer):
  """(task, eval examples); a dataset problem (a missing field, a bad row with skip_bad_rows=
  False, no usable row, an empty eval split) is a SetupError naming the option at fault."""
  try:
    task = task_options.make_task(config.task, config.task_kwargs, config.task_knobs,
                                  tokenizer=tokenizer)
  except (DataError, TemplateLimitError, FileNotFoundError) as e:
    raise SetupError(task_options.data_error_message(e, config.task_kwargs, _task_flag)) from None
  examples = task.eval_examples(config.eval_size)
  if not examples:
    raise SetupError(f"config.task_kwargs.eval_fraction={config.task_kwargs.eval_fraction}: the "
                     f"held-out eval split of {getattr(task, 'name', config.task)} is empty; set "
                     "config.task_kwargs.eval_path to an eval file, or raise eval_fraction.")
  return task, examples


def read_traces(config, spec: rl.RunSpec, tokenizer) -> TraceSource | None:
  """The trace file as the train stream (guide.source='traces'); any problem with it (not a trace
  file, a bad row, log-probs of another tokenizer or temperature) is a SetupError naming it."""
  if spec.guide.source != "traces":
    return None
  try:
    traces = TraceSource.from_options(spec.guide.traces, tokenizer,
                                      max_new_tokens=spec.sample.max_new_tokens,
                                      temperature=spec.sample.temperature)
  except (DataError, ValueError, KeyError, FileNotFoundError) as e:
    message = " ".join(str(e).strip("'\"").split())
    if getattr(e, "reason", "") == "missing_field":
      message += (". A trace file holds each prompt, its reference answer and the guide's "
                  "response(s): the formats mixpo (experiments/make_traces.py), verl / LUFFY and "
                  "openr1 (config.guide.traces.format); other field names: "
                  "config.guide.traces.fields")
    raise SetupError(f"config.guide.traces_path={config.guide.traces_path}: {message}") from None
  logging.info("guide traces: %s; %s", traces.summary, traces.report())
  return traces


def write_run_config(config, workdir: str, spec: rl.RunSpec, policy_path: str,
                     guide_path: str | None) -> dict:
  """Writes workdir/config.json: every config field as run (overrides applied) and, under
  "_resolved", what they resolved to (model paths, mesh, devices). Returns the dict."""
  d = json.loads(json.dumps(config.to_dict(), default=str))
  d["_resolved"] = {"policy": os.path.abspath(policy_path),
                    "guide": os.path.abspath(guide_path) if guide_path else None,
                    "guide_source": spec.guide.source, "guide_logp": spec.guide.logp,
                    "mesh_shape": list(spec.mesh_shape), "devices": jax.device_count(),
                    "backend": jax.default_backend(), "jax": jax.__version__}
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(d, f, indent=1)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))
  return d


def loggers(config) -> tuple[str, ...]:
  """config.loggers ("tb", "tb,wandb", "" = metrics.jsonl only) as a tuple of backend names."""
  names = tuple(n.strip() for n in str(config.loggers).split(",") if n.strip())
  unknown = [n for n in names if n not in mlog.LOGGERS]
  if unknown:
    raise SetupError(f"config.loggers={config.loggers}: unknown logger {unknown[0]!r}; use a "
                     f"comma-separated subset of {', '.join(mlog.LOGGERS)} (metrics.jsonl is "
                     "always written).")
  if "wandb" in names and importlib.util.find_spec("wandb") is None:
    raise SetupError(f"config.loggers={config.loggers}: the wandb package is not installed; "
                     "pip install -e \".[wandb]\" (or drop wandb from config.loggers).")
  return names
