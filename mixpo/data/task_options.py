"""The task / dataset options every binary shares: one declaration, one way to build the task.

`OPTIONS` declares each option once (name, default, which tasks take it, help). The default
config's `task_kwargs` is built from it (`config_defaults`), so `--config.task_kwargs.train_path=..`
works in train.py, and evaluate.py / sft.py / make_traces.py generate their `--train_path`, ... flags
from the same tuple (`mixpo.cli.define_task_flags`). `make_task` passes a task only the options it
takes: `task_kwargs` may hold the file task's options while `task="addition"`, as long as they keep
their defaults; a changed option the task does not take is an error naming it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from mixpo.data.tasks import get_task, registered_tasks

FILE, ADDITION = "file", "addition"


@dataclasses.dataclass(frozen=True)
class Option:
  name: str
  default: Any
  tasks: tuple  # task names that take it.
  help: str


OPTIONS = (
    Option("digits", 2, (ADDITION,), "addition: digits per operand (1-9)."),
    Option("terms", 2, (ADDITION,), "addition: operands per problem (>= 2)."),
    Option("reward", "exact", (ADDITION,), "addition: 'exact' (1 iff the sum) or 'digits' "
           "(partial credit per digit)."),
    Option("train_path", "", (FILE,), "file: the train dataset, a .jsonl or .parquet file."),
    Option("eval_path", "", (FILE,), "file: the eval dataset(s); comma-separated for several "
           "(train.py uses the first). Empty: a hashed eval_fraction of the train rows."),
    Option("prompt_field", "prompt", (FILE,), "file: dotted field path of the prompt (a string or "
           "a list of chat messages), e.g. 'prompt' or 'extra_info.question'."),
    Option("answer_field", "answer", (FILE,), "file: dotted field path of the reference answer, "
           "e.g. 'reward_model.ground_truth' (verl)."),
    Option("chat_template", False, (FILE,), "file: render prompts with the tokenizer's chat "
           "template (a string prompt becomes one user turn)."),
    Option("max_prompt_tokens", 0, (FILE,), "file: rows whose rendered prompt has more tokens are "
           "bad rows (0 = no limit)."),
    Option("skip_bad_rows", True, (FILE,), "file: skip and count bad rows (a WARNING names the "
           "first of each kind); False: the first bad row stops the run with its file and line."),
    Option("eval_fraction", 0.05, (FILE,), "file without eval_path: share of rows held out for "
           "eval (by a hash of the prompt)."),
    Option("eval_prompt_field", "", (FILE,), "file: dotted field path of the prompt in the "
           "eval_path file(s) when it differs from prompt_field; comma-separated: one per "
           "eval_path file. Empty: prompt_field."),
    Option("eval_answer_field", "", (FILE,), "file: dotted field path of the reference answer in "
           "the eval_path file(s) when it differs from answer_field; comma-separated: one per "
           "eval_path file. Empty: answer_field."),
    Option("schema", "plain", (FILE,), "file: field defaults of a known layout: plain (prompt, "
           "answer), verl (prompt, reward_model.ground_truth, chat template), openr1 (problem, "
           "answer); prompt_field / answer_field / chat_template changed from their defaults win."),
)
BY_NAME = {o.name: o for o in OPTIONS}


def config_defaults():
  """The declared options as an ml_collections ConfigDict (the default config's task_kwargs)."""
  import ml_collections
  return ml_collections.ConfigDict({o.name: o.default for o in OPTIONS})


class TaskOptionError(ValueError):
  """An option given to a task that does not take it; `field` names the option (or
  "task_knobs")."""

  def __init__(self, message: str, field: str):
    super().__init__(message)
    self.field = field


def parse_knobs(text: str) -> dict:
  """"digits=2,size=3" → {"digits": 2, "size": 3}: extra knobs of tasks not declared in OPTIONS
  (e.g. reasoning-gym datasets); values stay strings unless int / float parse."""
  out = {}
  for part in filter(None, (p.strip() for p in (text or "").split(","))):
    if "=" not in part:
      raise TaskOptionError(f"task_knobs: {part!r} is not key=value (e.g. 'min_numbers=3,"
                            "max_numbers=4')", "task_knobs")
    key, value = (s.strip() for s in part.split("=", 1))
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    out[key] = value
  return out


def _accepted(name: str) -> tuple[set, bool]:
  """(named parameters, takes **kwargs) of the task factory registered as `name`."""
  import mixpo.data.rg_tasks as rg
  factory = registered_tasks().get(name, rg.ReasoningGymTask if name.startswith("rg:") else None)
  if factory is None:
    return set(), False
  params = inspect.signature(factory).parameters.values()
  return ({p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)},
          any(p.kind == p.VAR_KEYWORD for p in params))


def task_kwargs(name: str, options, knobs: str = "") -> dict:
  """The keyword arguments `get_task(name, ...)` gets from `options` (a dict / ConfigDict).

  A declared option reaches the tasks it is declared for. For any other task it is dropped
  while it holds its declared default (so addition keeps its own eval_fraction, 0.1), passed when
  changed and the task takes a parameter of that name (cot_arithmetic's digits) or **kwargs, and
  otherwise raises TaskOptionError. Undeclared keys (a config file's own knobs) pass when the task takes them. `max_prompt_tokens=0` means no limit; `eval_path` keeps its first
  comma-separated file.
  """
  opts = dict(options.items()) if options is not None else {}
  named, var_kw = _accepted(name)
  out = {}
  for key, value in opts.items():
    declared = BY_NAME.get(key)
    if declared is not None and name in declared.tasks:
      out[key] = value
    elif declared is not None and value == declared.default:
      continue  # another task's option at its default: this task keeps its own default.
    elif key in named or var_kw:  # cot_arithmetic's digits=3; a subclass taking **kwargs.
      out[key] = value
    else:
      takes = ", ".join(sorted(named - {"dataset", "tokenizer"})) or "no options"
      where = (f"it applies to task={'/'.join(BY_NAME[key].tasks)}" if key in BY_NAME
               else "it is not a known task option")
      raise TaskOptionError(f"{key}={value!r} does not apply to task {name!r} ({where}; "
                            f"{name!r} takes: {takes}).", key)
  extra = parse_knobs(knobs)
  for key in extra:
    if not (key in named or var_kw):
      raise TaskOptionError(f"task_knobs: {name!r} takes no knob {key!r} (it takes: "
                            f"{', '.join(sorted(named))}).", "task_knobs")
  out.update(extra)
  if "max_prompt_tokens" in out and not out["max_prompt_tokens"]:
    out["max_prompt_tokens"] = None
  for key in ("eval_path", "eval_prompt_field", "eval_answer_field"):  # train.py reads one file
    if isinstance(out.get(key), str) and "," in out[key]:
      out[key] = out[key].split(",")[0].strip()
  if out.get("schema", "plain") != "plain":  # fields left at their defaults: the schema's.
    for key in ("prompt_field", "answer_field", "chat_template"):
      if key in out and out[key] == BY_NAME[key].default:
        del out[key]
  return out


def _split(value) -> list[str]:
  return [v.strip() for v in str(value or "").split(",")]


def file_fields(options) -> tuple[str, str, bool]:
  """(prompt field, answer field, chat template) of the train file: the options, or the schema's
  defaults for those left at theirs (`mixpo.data.schemas`)."""
  from mixpo.data.schemas import dataset_fields
  kw = task_kwargs(FILE, {k: v for k, v in options.items() if k in BY_NAME})
  return dataset_fields(kw.get("schema", "plain"), kw.get("prompt_field"), kw.get("answer_field"),
                        kw.get("chat_template"))


def eval_fields(options, index: int = 0) -> tuple[str, str]:
  """(prompt field, answer field) of the `index`-th eval_path file: eval_prompt_field /
  eval_answer_field (one value for every file, or one per file), else the train file's."""
  prompt, answer, _ = file_fields(options)
  out = []
  for value, default in ((options.get("eval_prompt_field", ""), prompt),
                         (options.get("eval_answer_field", ""), answer)):
    parts = _split(value)  # one value serves every file
    out.append(parts[min(index, len(parts) - 1)] or default)
  return out[0], out[1]


def eval_paths(options) -> list[str]:
  return [p for p in _split(options.get("eval_path", "")) if p]


def data_error_message(error: Exception, options, flag, fields: dict | None = None) -> str:
  """One line for a dataset error met while reading the task's files (a `DataError`, or an empty
  file / split): the flag of the option at fault, then the reader's message (file, row, field).

  `flag(option)` names an option's flag (`--config.task_kwargs.prompt_field`, `--prompt_field`).
  A missing or bad field names the option that set it: in an eval_path file eval_prompt_field /
  eval_answer_field (as resolved for that file), else prompt_field / answer_field, or a caller's
  own (`fields`: {option: field}, e.g. sft.py's response_field); a prompt over the limit names
  max_prompt_tokens; anything else the file's flag. With skip_bad_rows=False the hint says how to
  skip and count such rows instead.
  """
  import re
  message = " ".join(str(error).split())
  paths = eval_paths(options)
  at = [i for i, p in enumerate(paths) if p in message]
  reason = getattr(error, "reason", "")
  named = re.findall(r"field '([^']+)'", message)
  option = value = None
  if named and reason != "too_long":
    if at:
      candidates = dict(zip(("eval_prompt_field", "eval_answer_field"), eval_fields(options,
                                                                                 at[0])))
    else:
      candidates = dict(zip(("prompt_field", "answer_field"), file_fields(options)[:2]))
    candidates.update(fields or {})
    option = next((o for o, f in candidates.items() if f == named[0]), None)
    value = named[0]
  if option is None:
    option = ("max_prompt_tokens" if reason == "too_long" else
              "eval_path" if at else "train_path")
    value = options.get(option, "")
  hint = ""
  if reason and reason != "no_rows" and not options.get("skip_bad_rows", True):
    hint = f" ({flag('skip_bad_rows')}=True skips and counts such rows instead.)"
  return f"{flag(option)}={value}: {message}{hint}"


def make_task(name: str, options, knobs: str = "", tokenizer=None):
  """`get_task(name, **task_kwargs(...))`; a task that takes a `tokenizer` (the file task, the
  word problems) gets the one that renders and measures its prompts."""
  kwargs = task_kwargs(name, options, knobs)
  if name == FILE or "tokenizer" in _accepted(name)[0]:
    kwargs["tokenizer"] = tokenizer
  return get_task(name, **kwargs)  # the file task logs its dropped rows at WARNING itself.


def dropped_rows_warnings(task) -> list[str]:
  """One line per dataset file the task dropped rows of (for summary.json's warnings)."""
  out = []
  for summary in (getattr(task, "summary", None), getattr(task, "eval_summary", None)):
    if summary is None or not getattr(summary, "skipped", None):
      continue
    counts = ", ".join(f"{n} {r}" for r, n in summary.skipped.items())
    out.append(f"{summary.path}: {summary.rows - summary.kept} of {summary.rows} rows dropped "
               f"({counts})")
  return out
