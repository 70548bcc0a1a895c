"""The binaries' front door: flags checked before any model is built, errors that name the flag.

`run(main)` replaces `absl.app.run(main)` in experiments/*.py:
- `--config=<name>` resolves against the shipped configs (an unknown name lists them);
- every `--config.<field>=<value>` override is checked against the config it overrides: an unknown
  field gets did-you-mean suggestions from the config's own fields, a value of the wrong type says
  the expected type;
- a user error (`UserError`, a flag parse error, `FingerprintMismatchError`, an unusable workdir)
  prints one paragraph on stderr, `error: ...` naming the flag, and exits with code 2 — no
  traceback. Bugs still raise with their traceback;
- absl / orbax INFO chatter is kept below WARNING unless `--verbosity` (or `-v`) is given; mixpo's
  own INFO lines stay;
- `--help` prints the binary's docstring, its flags (the task flags included) and, for a binary
  with a config, every `--config.<field>` with its value and comment; `--helpfull` adds absl's
  and jax's flags. Both exit 0.
`check_config(config)` (train.py, before `loop.run`) builds the config's groups into their
dataclasses (`rl.validate`; each checks its own fields and names them, mixpo/fields.py), then
checks what no dataclass holds: paths that must exist (policy, guide, dataset files), task
options, reward specs and the run's top-level fields, naming `--config.<field>`. An old flat
field (`RENAMED`) is refused with its new name, as a flag and in a config file.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as pylogging
import os
import re
import sys
from typing import Callable

EXIT_USAGE = 2
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = (os.path.join(_REPO, "mixpo") + os.sep, os.path.join(_REPO, "experiments") + os.sep)


class UserError(Exception):
  """A mistake in the command line; the message names the flag and says what fixes it."""


# Fields of the old flat config → their place in the groups of experiments/configs/default.py.
# Both a `--config.<old>` flag and a config file that still sets `<old>` are refused with the new
# name (one spelling of every field in configs, fingerprints and grids).
RENAMED = {
    **{f: f"advantage.{f}" for f in ("scheme", "std_normalize")},
    **{f: f"objective.{f}" for f in (
        "eps_low", "eps_high", "gamma", "on_weight", "sft_coef", "dual_clip", "max_log_ratio",
        "shaping_grad", "zero_ratio", "loss_agg", "ratio_level", "seq_eps_low", "seq_eps_high",
        "cispo", "cispo_eps_low", "cispo_eps_high", "kl_coef", "kl_estimator", "entropy_coef",
        "entropy_agg")},
    **{f: f"rollout.{f}" for f in (
        "groups", "n", "m", "zero_groups", "dynamic_sampling", "max_num_gen_batches",
        "max_new_tokens", "temperature", "top_p", "top_k", "overlong_shaping", "overlong_cache",
        "mask_truncated")},
    "rollout_slots": "rollout.slots", "rollout_engine": "rollout.engine",
    "rollout_dtype": "rollout.dtype", "rollout_is": "rollout.importance",
    "rollout_is_cap": "rollout.importance_cap",
    **{f: f"optim.{f}" for f in ("learning_rate", "warmup_steps", "weight_decay", "grad_clip")},
    **{f: f"step.{f}" for f in ("epochs", "num_minibatches", "num_micro_batches")},
    "guide": "guide.path", "guide_source": "guide.source", "guide_logp": "guide.logp",
    "traces_path": "guide.traces_path", "traces": "guide.traces",
    "rewards": "reward.functions", "reward_weights": "reward.weights",
    **{f"reward_{f}": f"reward.{f}" for f in (
        "timeout_s", "batch_timeout_s", "on_error", "failure_warn_ratio")},
}


def renamed(field: str, config) -> str | None:
  """The new dotted name of `field` when it is an old flat one (or inside one: traces.format →
  guide.traces.format), else None. `guide` is a group now: only a value set on it is old."""
  if field in RENAMED:
    return RENAMED[field]
  head, _, rest = field.partition(".")
  if rest and head in RENAMED and head not in config:
    return f"{RENAMED[head]}.{rest}"
  return None


def check_renamed(config, source: str) -> None:
  """UserError for a top-level key of `config` (from `source`: a config file, or the config a
  library run was handed) that is an old flat field: `guide` holding a value instead of its
  group, or any other old name."""
  for key, value in config.items():
    if key in RENAMED and not (key == "guide" and hasattr(value, "items")):
      raise UserError(_renamed_in_file(source, key))


def _renamed_in_file(source: str, key: str) -> str:
  return (f"{source} sets config.{key}, which was renamed: set config.{RENAMED[key]} instead "
          "(README \"Config groups\").")


# ----------------------------------------------------------------------------- config names


def _configs_dir() -> str:
  return os.path.join(_REPO, "experiments", "configs")


def shipped_configs() -> list[str]:
  """Short names of experiments/configs/*.py (what --config=<name> accepts besides a path)."""
  return sorted(f[:-3] for f in os.listdir(_configs_dir())
                if f.endswith(".py") and not f.startswith("_"))


def resolve_config(value: str) -> str:
  """'smoke' / 'smoke.py' / 'qwen2.5-math-1.5b' / a path (with an optional ':arg') → a path."""
  name, sep, arg = value.partition(":")
  if os.path.isfile(name):
    return value
  base = name[:-3] if name.endswith(".py") else name
  candidate = os.path.join(_configs_dir(), base.replace(".", "_").replace("-", "_") + ".py")
  if os.path.isfile(candidate):
    return candidate + sep + arg
  names = shipped_configs()
  close = difflib.get_close_matches(base.replace(".", "_").replace("-", "_"), names, n=2)
  hint = f" Did you mean --config={close[0]}?" if close else ""
  raise UserError(f"--config={value}: no such config file, nor a shipped config name.{hint} "
                  f"Shipped configs: {', '.join(names)} (experiments/configs/); or pass the path "
                  "of your own config file.")


def load_config_file(value: str):
  """The ConfigDict that `--config=value` (a resolved path, optional ':arg') defines."""
  path, _, arg = value.partition(":")
  spec = importlib.util.spec_from_file_location("mixpo_cli_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"--config={value}: {path} defines no get_config(); a config file returns "
                    "its ml_collections.ConfigDict from get_config().")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (ValueError, TypeError) as e:  # a config argument it refuses (e.g. compare.py:<mode>).
    # ml_collections refuses a value over a group (`c.guide = "dir"`) before check_renamed can.
    old = re.search(r"override field '(\w+)'", str(e))
    if old and old.group(1) in RENAMED:
      raise UserError(_renamed_in_file(f"--config={value}: {path}", old.group(1))) from None
    raise UserError(f"--config={value}: {e}") from None
  check_renamed(config, f"--config={value}: {path}")
  return config


# ----------------------------------------------------------------------------- overrides


def flat_keys(config, prefix: str = "") -> list[str]:
  """Dotted paths of every field of a ConfigDict (nested ones included, and their parents)."""
  out = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    out.append(path)
    if hasattr(value, "items") and hasattr(value, "to_dict"):
      out += flat_keys(value, path + ".")
  return out


def _initials(name: str) -> str:
  return "".join(p[0] for p in name.split("_") if p)


def suggestions(typo: str, keys: list[str], n: int = 3) -> list[str]:
  """Fields a mistyped dotted path may have meant: close spellings of the whole path or its last
  part, fields whose initials it is ('lr' → 'learning_rate'), fields containing it."""
  last = typo.rsplit(".", 1)[-1]
  scored = []
  for key in keys:
    key_last = key.rsplit(".", 1)[-1]
    score = max(difflib.SequenceMatcher(None, typo, key).ratio(),
                difflib.SequenceMatcher(None, last, key_last).ratio())
    if last == _initials(key_last) and len(last) >= 2:
      score = max(score, 0.95)
    if len(last) >= 3 and last in key_last:
      score = max(score, 0.8)
    if score >= 0.6:
      scored.append((-score, key.count("."), key))
  return [k for _, _, k in sorted(scored)[:n]]


def _override_args(argv: list[str], name: str) -> list[tuple[str, str | None]]:
  """(dotted field, value or None) of every `--name.field=value` / `--name.field value`."""
  out, prefix = [], f"--{name}."
  for i, arg in enumerate(argv):
    if not arg.startswith(prefix):
      continue
    field, sep, value = arg[len(prefix):].partition("=")
    if not sep:
      value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
    out.append((field, value))
  return out


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _type_error(flag: str, value: str, current) -> str | None:
  """Why `value` cannot override a field whose current value is `current`, or None."""
  if isinstance(current, bool):
    if value.lower() not in _BOOLS:
      return f"{flag}={value}: expected true or false."
  elif isinstance(current, int):
    try:
      int(value)
    except ValueError:
      return f"{flag}={value}: expected an integer (the config has {current})."
  elif isinstance(current, float):
    try:
      float(value)
    except ValueError:
      return f"{flag}={value}: expected a number (the config has {current})."
  return None


def check_overrides(argv: list[str], config, name: str = "config") -> None:
  """UserError for an override of a field the config lacks (with suggestions) or a bad value."""
  keys = flat_keys(config)
  for field, value in _override_args(argv, name):
    flag = f"--{name}.{field}"
    new = renamed(field, config)
    if new is not None:
      raise UserError(f"{flag} was renamed: use --{name}.{new}")
    node, parts = config, field.split(".")
    for depth, part in enumerate(parts):
      if not (hasattr(node, "items") and part in node):
        known = ".".join(parts[:depth])
        close = suggestions(field, keys)
        hint = (f" Did you mean {' or '.join(f'--{name}.{k}' for k in close)}?" if close else "")
        where = f"config.{known}" if known else "the config"
        raise UserError(f"{flag}: {where} has no field {part!r}.{hint} Every field is listed, "
                        "with a comment, in experiments/configs/default.py.")
      node = node[part]
    if value is not None and node is not None:
      why = _type_error(flag, value, node)
      if why:
        raise UserError(why)


# ----------------------------------------------------------------------------- config checks


def flagify(message: str, prefix: str = "--config.") -> str:
  """A library message's `config.x` names → the flag `--config.x`."""
  return re.sub(r"(?<![\w.\-/])config\.(?!json\b)(?=\w)", prefix, message)


def _enum(flag: str, value, valid) -> None:
  if value not in valid:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise UserError(f"{flag}={value}: not a valid value; expected one of "
                    f"{', '.join(map(str, valid))}.{hint}")


def _checkpoint_dir(flag: str, path: str, builtin_ok: bool = True) -> None:
  alt = " or 'builtin'" if builtin_ok else ""
  if not os.path.isdir(path):
    raise UserError(f"{flag}={path}: no such directory; pass a Hugging Face checkpoint directory "
                    f"(config.json, *.safetensors, tokenizer files){alt}.")
  if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(
      os.path.join(path, "export", "config.json")):
    raise UserError(f"{flag}={path}: a mixpo run directory (its config.json is the run's config); "
                    f"its trained policy is {os.path.join(path, 'export')}.")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise UserError(f"{flag}={path}: the directory has no config.json, so it is not a Hugging "
                    "Face checkpoint; pass the directory that holds config.json and the "
                    f"*.safetensors files{alt}.")


DATASET_EXTENSIONS = (".jsonl", ".json", ".parquet")


def check_dataset_path(flag: str, path: str) -> None:
  if not path.endswith(DATASET_EXTENSIONS):
    raise UserError(f"{flag}={path}: a dataset must be a .jsonl or .parquet file.")
  if not os.path.isfile(path):
    raise UserError(f"{flag}={path}: no such file.")


def check_task(task: str, options, knobs: str, flag: Callable[[str], str],
               need_train: bool = True) -> None:
  """Task name, option applicability and dataset paths; `flag(option)` names an option's flag."""
  from mixpo.data import task_options, tasks
  names = sorted(tasks.registered_tasks())
  if task not in names and not task.startswith("rg:"):
    _enum(flag("task"), task, names + ["rg:<reasoning-gym dataset>"])
  try:
    kwargs = task_options.task_kwargs(task, options, knobs)
  except task_options.TaskOptionError as e:
    raise UserError(f"{flag(e.field)}: {e}") from None
  if task == task_options.FILE:
    train = kwargs.get("train_path", "")
    if need_train:
      if not train:
        raise UserError(f"{flag('task')}=file needs {flag('train_path')}=<.jsonl or .parquet>.")
      check_dataset_path(flag("train_path"), train)
    for path in filter(None, (p.strip() for p in str(options.get("eval_path", "")).split(","))):
      check_dataset_path(flag("eval_path"), path)


def check_config(config) -> None:
  """Every check that needs no model: UserError naming `--config.<field>` and the fix. The groups'
  fields are checked by the dataclasses `rl.validate` builds (FieldError names the field)."""
  from mixpo import algorithms, rl
  from mixpo.rewards import custom
  _enum("--config.algo", config.algo, algorithms.names())
  for field in ("dtype", "param_dtype"):
    _enum(f"--config.model.{field}", config.model[field], ("float32", "bfloat16", "float16"))
  try:
    rl.validate(config)
  except ValueError as e:
    raise UserError(field_error_message(e)) from None
  for field, positive in (("num_steps", 1), ("eval_every", 1), ("checkpoint_every", 1),
                          ("keep_checkpoints", 1), ("eval_size", 1), ("eval_batch_size", 1)):
    if config[field] < positive:
      raise UserError(f"--config.{field}={config[field]}: must be >= {positive}.")
  if config.policy != "builtin":
    _checkpoint_dir("--config.policy", config.policy)
  if config.guide.path not in ("builtin", "") and algorithms.get(config.algo).guided:
    _checkpoint_dir("--config.guide.path", config.guide.path)
  check_task(config.task, config.task_kwargs, config.task_knobs,
             lambda o: "--config." + (o if o in ("task", "task_knobs") else f"task_kwargs.{o}"))
  try:
    custom.reward_fns(config.reward.functions, config.reward.weights, _no_reward)
  except custom.RewardSpecError as e:
    field = "weights" if "weight" in str(e) else "functions"
    raise UserError(f"--config.reward.{field}: {e}.") from None


def field_error_message(e: ValueError) -> str:
  """A config check's message naming the flag: a FieldError's field as `--config.<field>=value`,
  any other's `config.<x>` mentions as flags."""
  from mixpo.fields import FieldError
  if isinstance(e, FieldError):
    return f"--config.{e.field}={e.value}: {flagify(e.reason)}"
  return flagify(str(e))


def _no_reward(prompts, completions, **columns):  # stands for the task's verifier in checks.
  del prompts, columns
  return [0.0] * len(completions)


# ----------------------------------------------------------------------------- task flags


def define_task_flags(flag_values=None) -> None:
  """--task, --task_knobs and one flag per mixpo.data.task_options.OPTIONS entry (their one
  declaration; the same fields as train.py's --config.task_kwargs.*)."""
  from absl import flags
  from mixpo.data import task_options
  fv = flag_values or flags.FLAGS
  # The flags belong to the binary that calls this: its --help lists them (not "mixpo.cli").
  flags.disclaim_key_flags()
  flags.DEFINE_string("task", "addition", "Task: addition, file (a dataset: --train_path / "
                      "--eval_path), or rg:<reasoning-gym dataset>.", flag_values=fv)
  flags.DEFINE_string("task_knobs", "", "Extra task knobs as k=v,k=v (e.g. rg tasks).",
                      flag_values=fv)
  for o in task_options.OPTIONS:
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}[type(o.default)]
    define(o.name, o.default, o.help, flag_values=fv)


def task_flag_values(flag_values=None) -> tuple[str, dict, str]:
  """(task, options, knobs) from the flags define_task_flags made."""
  from absl import flags
  from mixpo.data import task_options
  fv = flag_values or flags.FLAGS
  return fv.task, {o.name: fv[o.name].value for o in task_options.OPTIONS}, fv.task_knobs


def check_task_flags(need_train: bool = True) -> None:
  task, options, knobs = task_flag_values()
  check_task(task, options, knobs, lambda o: f"--{o}", need_train=need_train)


def check_model_dir(flag: str, path: str) -> None:
  """UserError naming `flag` unless `path` is a Hugging Face checkpoint directory."""
  _checkpoint_dir(flag, path, builtin_ok=False)


# ----------------------------------------------------------------------------- help


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def config_field_docs(*paths: str) -> dict[str, str]:
  """{dotted field: comment} from config files: the comment ending a `c.<field> = ...` line, or
  the comment lines right above it; builtin_models()'s `b.<field>` lines are `builtin.<field>`;
  task_kwargs.* get their task_options.OPTIONS help. Later files win."""
  from mixpo.data import task_options
  docs = {f"task_kwargs.{o.name}": o.help for o in task_options.OPTIONS}
  assign = re.compile(r"^\s*([cb])\.([\w.]+)\s*=\s*(.*?)\s*$")
  for path in paths:
    above = []
    for line in open(path, encoding="utf-8"):
      stripped = line.strip()
      if stripped.startswith("#"):
        above.append(stripped.lstrip("# "))
        continue
      m = assign.match(line)
      if m:
        prefix, field, rest = m.groups()
        inline = rest.split("  # ", 1)[1].strip() if "  # " in rest else ""
        doc = inline or " ".join(above)
        if doc:
          docs[("builtin." if prefix == "b" else "") + field] = doc
      above = []
  return docs


def config_help(config, path: str) -> str:
  """Every field of `config` as `--config.<field>=<value>` with its comment (config_field_docs of
  experiments/configs/default.py and `path`)."""
  docs = config_field_docs(os.path.join(_configs_dir(), "default.py"), path)
  lines = [f"config fields ({path}; override any with --config.<field>=<value>, nested ones "
           "with dots):"]
  for key in flat_keys(config):
    node = config
    for part in key.split("."):
      node = node[part]
    if hasattr(node, "items") and hasattr(node, "to_dict") and key != "guide.traces.fields":
      continue  # a group: its fields follow
    value = node.to_dict() if hasattr(node, "to_dict") else node
    lines.append(f"  --config.{key}=" + (f"'{value}'" if isinstance(value, str) else f"{value}"))
    if docs.get(key):
      lines.append(f"      {docs[key]}")
  return "\n".join(lines)


def print_help(argv: list[str], config_flag: str | None) -> None:
  """What --help / --helpfull print (to stdout): the docstring, the binary's flags, the config."""
  from absl import flags
  main = sys.modules.get("__main__")
  print((getattr(main, "__doc__", None) or "").strip() + "\n")
  if "--helpfull" in argv:
    print(flags.FLAGS.get_help())
  else:
    print("flags:\n" + flags.FLAGS.main_module_help() +
          "\n\n(--helpfull also lists absl's and jax's flags)")
  if config_flag is None:
    return
  value = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{config_flag}=")),
               "default")
  path = resolve_config(value).partition(":")[0]
  print("\n" + config_help(load_config_file(resolve_config(value)), path))


# ----------------------------------------------------------------------------- running


class _QuietThirdParty(pylogging.Filter):
  """Passes WARNING and above from anywhere, INFO only from mixpo's own code."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or record.pathname.startswith(_OWN_CODE)


def _verbosity_given(argv: list[str]) -> bool:
  return any(a == "-v" or a.startswith(("--verbosity", "-v=", "--v=")) for a in argv[1:])


def quiet_logging() -> None:
  """absl / orbax / jax INFO lines below WARNING; mixpo's INFO lines kept."""
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_QuietThirdParty())


def user_error_message(exc: BaseException) -> str | None:
  """The one-paragraph message of a user error, or None for anything else (a bug)."""
  from absl import app, flags
  from mixpo import checkpoint
  if isinstance(exc, checkpoint.FingerprintMismatchError):
    return (str(exc).replace("pass overwrite=True", "pass --config.overwrite=True") +
            " (--config.overwrite=True deletes the old checkpoints; --workdir=<new dir> keeps "
            "them.)")
  if isinstance(exc, checkpoint.CheckpointDirectoryError):
    return f"--workdir: {exc}"
  from mixpo import builtin
  if isinstance(exc, builtin.UntrustedDirectoryError):
    return flagify(str(exc))
  if isinstance(exc, UserError):
    return str(exc)
  from mixpo.fields import FieldError
  if isinstance(exc, FieldError):  # a group's dataclass refused a value after check_config
    return field_error_message(exc)
  preflight = sys.modules.get("mixpo.preflight")  # loaded whenever it raised
  if preflight is not None and isinstance(exc, preflight.SetupError):
    return flagify(str(exc))
  if isinstance(exc, (app.UsageError, flags.Error)):
    return flagify(str(exc))
  return None


def exit_with(message: str) -> None:
  sys.stderr.write(f"error: {' '.join(message.split())}\n")
  sys.stderr.flush()
  sys.exit(EXIT_USAGE)


def prepare_argv(argv: list[str], config_flag: str | None = "config") -> list[str]:
  """Resolves --config=<name> and checks --config.* overrides; returns the argv to parse."""
  argv = list(argv)
  if config_flag is None:
    return argv
  prefix = f"--{config_flag}="
  config = None
  for i, arg in enumerate(argv):
    if arg.startswith(prefix):
      argv[i] = prefix + resolve_config(arg[len(prefix):])
      config = load_config_file(argv[i][len(prefix):])
  if config is not None:
    check_overrides(argv, config, config_flag)
  elif _override_args(argv, config_flag):
    raise UserError(f"--{config_flag}.* overrides need --{config_flag}=<name or file> first "
                    f"(shipped: {', '.join(shipped_configs())}).")
  return argv


def run(main: Callable, config_flag: str | None = "config", argv: list[str] | None = None) -> None:
  """absl.app.run(main) with the checks and error handling of the module docstring."""
  from absl import app, flags
  argv = list(sys.argv if argv is None else argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    try:
      print_help(argv, config_flag)
    except UserError as e:
      exit_with(str(e))
    sys.exit(0)
  try:
    argv = prepare_argv(argv, config_flag)
  except UserError as e:
    exit_with(str(e))
  quiet = not _verbosity_given(argv)

  def parse(args):
    try:
      return flags.FLAGS(args)
    except Exception as e:  # noqa: BLE001  (config_flags raises plain errors for bad values)
      message = str(e).strip().strip('"').strip("'")
      exit_with(flagify(message) + " (see --helpfull for the flags)")

  def wrapped(args):
    if quiet:
      quiet_logging()
    try:
      return main(args)
    except BaseException as e:  # noqa: BLE001
      message = user_error_message(e)
      if message is None:
        raise
      exit_with(message)

  app.run(wrapped, argv=argv, flags_parser=parse)
