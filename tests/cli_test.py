"""mixpo/cli.py: every user error of the binaries names its flag, exits 2, prints no traceback."""

import os
import re
import subprocess
import sys

import pytest

from experiments.configs import default
from mixpo import cli
from mixpo.data import task_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")


def _train(args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, TRAIN, f"--workdir={workdir}"] + args, cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


# The cases, each end to end through the binary: (args, what the message must contain).
BAD_FLAGS = {
    "config_name": (["--config=defualt"], ["--config=defualt", "default", "smoke",
                                           "qwen2_5_math_1_5b"]),
    "unknown_key": (["--config=default", "--config.lr=abc"],
                    ["--config.lr", "did you mean", "--config.optim.learning_rate"]),
    "bad_enum": (["--config=default", "--config.algo=mix3"],
                 ["--config.algo=mix3", "grpo, dapo, luffy, mix1, mix2"]),
    "policy_typo": (["--config=smoke", "--config.policy=/no/such/checkpoint"],
                    ["--config.policy=/no/such/checkpoint", "no such directory"]),
    "dataset_missing": (["--config=smoke", "--config.task=file",
                         "--config.task_kwargs.train_path=/no/such/data.jsonl"],
                        ["--config.task_kwargs.train_path=/no/such/data.jsonl", "no such file"]),
}


def _assert_user_error(out, expected):
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
  err = out.stderr.strip().splitlines()[-1]
  assert err.startswith("error: "), out.stderr[-2000:]
  for text in expected:
    assert text.lower() in err.lower(), (text, err)


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_names_the_flag_and_exits_2(case, tmp_path):
  args, expected = BAD_FLAGS[case]
  out = _train(args, tmp_path / "w")
  _assert_user_error(out, expected)
  # Found before any model or checkpoint directory is made.
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.fixture(scope="module")
def own_files(tmp_path_factory):
  from experiments import byo_example
  return byo_example.make_files(str(tmp_path_factory.mktemp("own")), n_train=8, n_test=4,
                                hidden=32, layers=1)


@pytest.mark.parametrize("script,args,expected", [
    ("evaluate.py", ["--model=/no/such/model"], ["--model=/no/such/model", "config.json"]),
    ("sft.py", ["--out=OUT", "--init=/no/such/ckpt", "--task=file", "--train_path=x.jsonl"],
     ["--train_path=x.jsonl", "no such file"]),
    ("make_traces.py", ["--guide=/no/such/guide", "--out=OUT"], ["--guide=/no/such/guide"]),
    # Before: a traceback naming the internal max_answer_tokens, no row, after loading the model.
    ("sft.py", ["--out=OUT", "--init=INIT", "--task=file", "--train_path=TRAIN",
                "--eval_path=TEST", "--prompt_field=question", "--response_field=solution",
                "--max_response_tokens=3"],
     ["--max_response_tokens=3", "train.jsonl:line ", "field 'solution' needs", "the longest"]),
    # Before: a 30-line traceback.
    ("make_traces.py", ["--guide=INIT", "--out=OUT", "--dataset=TRAIN", "--prompt_field=qestion"],
     ["--prompt_field=qestion", "train.jsonl", "line 1", "field 'qestion' is missing"]),
])
def test_other_binaries_name_their_flags(script, args, expected, tmp_path, request):
  if any("INIT" in a for a in args):
    own = request.getfixturevalue("own_files")
    for name in ("init", "train", "test"):
      args = [a.replace(name.upper(), own[name]) for a in args]
  args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script)] + args,
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=300)
  _assert_user_error(out, expected)


# Further cases through the same functions in-process (each subprocess costs a jax import).
def test_override_of_wrong_type_names_the_flag():
  config = default.get_config()
  with pytest.raises(cli.UserError, match=r"--config.optim.learning_rate=abc: expected a number"):
    cli.check_overrides(["x", "--config.optim.learning_rate=abc"], config)
  with pytest.raises(cli.UserError, match=r"--config.rollout.n=2.5: expected an integer"):
    cli.check_overrides(["x", "--config.rollout.n=2.5"], config)
  with pytest.raises(cli.UserError, match=r"--config.model.remat=maybe: expected true or false"):
    cli.check_overrides(["x", "--config", "default", "--config.model.remat", "maybe"], config)
  cli.check_overrides(["x", "--config.optim.learning_rate=1e-5", "--config.task_kwargs.digits=3"],
                      config)


@pytest.mark.parametrize("overrides,expected", [
    ({"rollout.n": 1}, ["--config.rollout.n=1", "at least 2"]),
    ({"guide.path": "/"}, ["--config.guide.path=/", "config.json"]),
    ({"task_kwargs.train_path": "x.jsonl"}, ["--config.task_kwargs.train_path", "task=file"]),
    ({"task": "file"}, ["--config.task_kwargs.train_path"]),
    ({"task": "fle"}, ["--config.task=fle", "did you mean file"]),
    ({"reward.functions": "no_such_pkg.mod:fn"}, ["--config.reward.functions", "no_such_pkg.mod"]),
    ({"reward.weights": "1,2"}, ["--config.reward.weights", "2 weights"]),
    ({"mesh_shape": ("2", "x")}, ["--config.mesh_shape", "3 integers"]),
    # Before: a traceback from the optimizer's set-up, after the models were built.
    ({"optim.learning_rate": float("inf")}, ["--config.optim.learning_rate=inf", "finite"]),
])
def test_more_bad_values_name_the_flag(overrides, expected):
  config = default.get_config()
  for field, value in overrides.items():
    *parents, last = field.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[last] = value
  with pytest.raises(cli.UserError) as e:
    cli.check_config(config)
  for text in expected:
    assert text.lower() in str(e.value).lower(), (text, str(e.value))


def test_guide_logp_file_is_accepted_with_traces_and_refused_without(tmp_path):
  """README's trace workflow passes --config.guide.logp=file: the front door must let it through
  to the trace reader (and name the missing trace source when there is none)."""
  traces = tmp_path / "traces.jsonl"
  traces.write_text("")
  config = default.get_config()
  config.algo, config.guide.logp = "mix1", "file"
  config.guide.source, config.guide.traces_path = "traces", str(traces)
  cli.check_config(config)
  config.guide.source = "model"
  with pytest.raises(cli.UserError,
                     match=r"--config.guide.logp=file: .*--config.guide.source='traces'"):
    cli.check_config(config)


def test_fingerprint_mismatch_names_overwrite_flag(tmp_path):
  os.makedirs(tmp_path / "checkpoints" / "5")  # a step of some other run, no fingerprint.json.
  out = _train(["--config=smoke", f"--config.builtin_dir={tmp_path / 'models'}"], tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert "--config.overwrite=True" in out.stderr.splitlines()[-1]
  assert not os.path.exists(tmp_path / "models"), "models were built before the check"


def test_a_config_argument_the_file_refuses_is_a_user_error():
  with pytest.raises(cli.UserError, match=r"--config=.*compare.py:bogus: .*'small'"):
    cli.prepare_argv(["train.py", "--config=compare:bogus"])


def test_suggestions_come_from_the_configs_own_fields():
  keys = cli.flat_keys(default.get_config())
  assert "optim.learning_rate" in cli.suggestions("lr", keys)
  assert cli.suggestions("model.dtyp", keys)[0] == "model.dtype"
  assert "task_kwargs.train_path" in cli.suggestions("task_kwargs.trian_path", keys)
  assert cli.suggestions("zzzz", keys) == []


def test_flagify_maps_library_names_but_not_file_names():
  msg = cli.flagify("need config.objective.gamma > 0 (see config.json)")
  assert msg == "need --config.objective.gamma > 0 (see config.json)"


def test_task_options_reach_only_the_tasks_that_take_them():
  opts = default.get_config().task_kwargs
  assert task_options.task_kwargs("addition", opts) == {"digits": 2, "terms": 2,
                                                        "reward": "exact"}
  file_kwargs = task_options.task_kwargs("file", opts)
  assert file_kwargs["max_prompt_tokens"] is None and file_kwargs["skip_bad_rows"] is True
  assert "digits" not in file_kwargs
  assert task_options.task_kwargs("rg:countdown", opts, "max_numbers=4") == {"max_numbers": 4}
  # Another task's option, changed, reaches a task that takes it (reasoning.py's digits=3).
  assert task_options.task_kwargs("cot_arithmetic", {**opts.to_dict(), "digits": 3})["digits"] == 3
  assert "digits" not in task_options.task_kwargs("cot_arithmetic", opts)
  # A registered subclass taking **kwargs (tests/reliability_test.py's hang_addition) gets it too.
  from mixpo.data import AdditionTask, register_task

  class Forwarding(AdditionTask):
    def __init__(self, **kw):
      super().__init__(**kw)

  register_task("forwarding_addition_for_cli_test", Forwarding)
  assert task_options.task_kwargs("forwarding_addition_for_cli_test",
                                  {**opts.to_dict(), "digits": 1}) == {"digits": 1}
  with pytest.raises(task_options.TaskOptionError, match="train_path"):
    task_options.task_kwargs("addition", {**opts.to_dict(), "train_path": "x.jsonl"})


def test_third_party_info_is_quiet_unless_verbosity_is_given():
  import logging

  import orbax.checkpoint
  orbax_file = os.path.join(os.path.dirname(orbax.checkpoint.__file__), "checkpoint_manager.py")
  own_file = os.path.join(ROOT, "mixpo", "loop.py")
  quiet = cli._QuietThirdParty()
  record = lambda path, level: logging.LogRecord("absl", level, path, 1, "m", None, None)
  assert not quiet.filter(record(orbax_file, logging.INFO))
  assert quiet.filter(record(orbax_file, logging.WARNING))
  assert quiet.filter(record(own_file, logging.INFO))
  assert not cli._verbosity_given(["train.py", "--config=smoke"])
  assert cli._verbosity_given(["train.py", "--verbosity=0"]) and cli._verbosity_given(["x", "-v", "1"])


def test_help_lists_the_flags_and_config_fields_and_exits_0():
  run = lambda script, *args: subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", script), *args], cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  out = run("train.py", "--config=smoke", "--help")
  assert out.returncode == 0, out.stderr[-2000:]  # before: exit 1, no --config.* field listed
  assert "--config.optim.learning_rate=0.0003" in out.stdout
  assert "RL from the weak start collapses at 1e-3" in out.stdout  # the field's comment
  assert "--config.task_kwargs.eval_prompt_field=''" in out.stdout
  assert "--config.builtin.guide_steps=20" in out.stdout  # smoke's own value
  out = run("evaluate.py", "--help")
  assert out.returncode == 0, out.stderr[-2000:]
  # The task flags are listed with the binary's own flags (before: hidden under "mixpo.cli").
  own = out.stdout.split("experiments/evaluate.py:", 1)[1]
  assert "--eval_prompt_field" in own and "--train_path" in own and "strict_boxed" in own


def test_every_config_field_the_docs_name_exists():
  """README and docs name config fields as --config.<field> or task_kwargs.<field>; each must be
  a field of the default config (README once named task_kwargs.schema, which did not exist)."""
  keys = set(cli.flat_keys(default.get_config()))
  texts = [open(os.path.join(ROOT, "README.md")).read()]
  for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
    if name.endswith(".md"):
      texts.append(open(os.path.join(ROOT, "docs", name)).read())
  named = set()
  for text in texts:
    named |= set(re.findall(r"--config\.([a-z_][\w.]*[a-z0-9_])", text))
    named |= {f"task_kwargs.{f}" for f in re.findall(r"(?<![\w.])task_kwargs\.([a-z_]\w*)", text)}
  assert named, "no config field found in the docs"
  missing = sorted(f for f in named - {"lr"} if f not in keys)  # README's example of a typo
  assert not missing, f"fields named in the docs that the config lacks: {missing}"
