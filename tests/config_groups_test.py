"""The config's groups map onto their dataclasses; old flat names are refused with the new one."""

import os
import subprocess
import sys

import pytest

from experiments.configs import default
from mixpo import advantages, algorithms, cli, objectives, rl, train
from mixpo.fields import FieldError
from mixpo.rewards.runner import RewardConfig
from mixpo.rollout import SampleSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")

# The top-level fields of experiments/configs/default.py before the grouping (commit 61ca350).
OLD_FLAT_FIELDS = (
    "algo", "builtin", "builtin_dir", "checkpoint_every", "cispo", "cispo_eps_high",
    "cispo_eps_low", "dual_clip", "dynamic_sampling", "entropy_agg", "entropy_coef", "epochs",
    "eps_high", "eps_low", "eval_batch_size", "eval_every", "eval_size", "export_hf", "gamma",
    "grad_clip", "groups", "guide", "guide_logp", "guide_source", "keep_checkpoints", "kl_coef",
    "kl_estimator", "learning_rate", "log_samples_every", "loggers", "lora", "loss_agg", "m",
    "mask_truncated", "max_consecutive_skips", "max_log_ratio", "max_new_tokens",
    "max_num_gen_batches", "max_policy_tokens", "max_skip_ratio", "mesh_shape", "model", "n",
    "no_signal_steps", "num_micro_batches", "num_minibatches", "num_steps", "on_weight",
    "overlong_cache", "overlong_shaping", "overwrite", "policy", "progress", "ratio_level",
    "reward_batch_timeout_s", "reward_failure_warn_ratio", "reward_on_error", "reward_timeout_s",
    "reward_weights", "rewards", "rollout_dtype", "rollout_engine", "rollout_is",
    "rollout_is_cap", "rollout_slots", "scheme", "seed", "seq_eps_high", "seq_eps_low",
    "sft_coef", "shaping_grad", "std_normalize", "task", "task_knobs", "task_kwargs",
    "temperature", "top_k", "top_p", "traces", "traces_path", "wandb_project", "warmup_steps",
    "weight_decay", "zero_groups", "zero_ratio")


def _binary(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def _last_error(out) -> str:
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
  return out.stderr.strip().splitlines()[-1]


def _leaf(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def test_every_old_field_is_kept_at_the_top_or_renamed_to_a_field_that_exists():
  config = default.get_config()
  keys = set(cli.flat_keys(config))
  for old in OLD_FLAT_FIELDS:
    assert (old in config and old not in cli.RENAMED) or cli.RENAMED[old] in keys, old
  assert set(cli.RENAMED) <= set(OLD_FLAT_FIELDS)  # the table names only fields that existed


@pytest.mark.parametrize("old", sorted(cli.RENAMED))
def test_an_old_flat_flag_is_refused_with_its_new_name(old):
  with pytest.raises(cli.UserError) as e:
    cli.prepare_argv(["train.py", "--config=default", f"--config.{old}=1"])
  assert str(e.value) == f"--config.{old} was renamed: use --config.{cli.RENAMED[old]}"


def test_a_field_under_an_old_group_is_refused_with_its_new_path():
  with pytest.raises(cli.UserError, match=r"^--config.traces.format was renamed: use "
                     r"--config.guide.traces.format$"):
    cli.prepare_argv(["train.py", "--config=default", "--config.traces.format", "verl"])
  cli.prepare_argv(["train.py", "--config=default", "--config.guide.traces.format=verl",
                    "--config.guide.path=", "--config.rollout.n=4"])


def test_the_binary_refuses_an_old_flag_naming_the_new_one(tmp_path):
  err = _last_error(_binary("--config=smoke", f"--workdir={tmp_path}", "--config.eps_low=0.1"))
  assert err == "error: --config.eps_low was renamed: use --config.objective.eps_low"
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("line,old", [("c.eps_low = 0.1", "eps_low"),
                                      ("c.guide = '/models/guide'", "guide"),
                                      ("c.traces_path = 'x.jsonl'", "traces_path")])
def test_a_config_file_that_sets_an_old_field_is_refused(tmp_path, line, old):
  path = tmp_path / "mine.py"
  path.write_text("from experiments.configs import default\n\n\ndef get_config():\n"
                  f"  c = default.get_config()\n  {line}\n  return c\n")
  with pytest.raises(cli.UserError) as e:
    cli.load_config_file(str(path))
  assert f"{path} sets config.{old}, which was renamed: set config.{cli.RENAMED[old]}" in str(
      e.value)


def test_the_binary_refuses_a_config_file_with_an_old_field(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text("from experiments.configs import smoke\n\n\ndef get_config():\n"
                  "  c = smoke.get_config()\n  c.learning_rate = 1e-4\n  return c\n")
  err = _last_error(_binary(f"--config={path}", f"--workdir={tmp_path / 'w'}"))
  assert "sets config.learning_rate, which was renamed: set config.optim.learning_rate" in err


@pytest.mark.parametrize("field,value,expected", [
    ("objective.eps_low", 1.5, "must lie in [0, 1)"),
    ("objective.gamma", 0.0, "γ > 0"),
    ("objective.dual_clip", 0.5, "must be > 1"),
    ("objective.loss_agg", "mean", "'default'"),
    ("objective.ratio_level", "row", "'sequence'"),
    ("objective.kl_coef", -1.0, ">= 0"),
    ("advantage.scheme", "x", "('paper', 'dapo')"),
    ("rollout.n", 1, "at least 2"),
    ("rollout.max_new_tokens", 0, ">= 1"),
    ("rollout.engine", "trt", "('jax', 'vllm')"),
    ("rollout.dtype", "float16", "'bfloat16'"),
    ("rollout.importance", "row", "'sequence'"),
    ("rollout.importance_cap", 0.5, ">= 1"),
    ("rollout.slots", -1, ">= 0"),
    ("step.epochs", 0, ">= 1"),
    ("step.num_micro_batches", 0, ">= 1"),
    ("optim.learning_rate", -1.0, "finite"),
    ("guide.source", "file", "'traces'"),
    ("guide.logp", "file", "--config.guide.source='traces'"),
    ("reward.on_error", "ignore", "('raise', 'zero')"),
    ("reward.timeout_s", 0.0, "> 0 seconds"),
    ("reward.batch_timeout_s", -1.0, ">= 0 seconds"),
    ("reward.failure_warn_ratio", 1.5, "in [0, 1]"),
])
def test_each_group_is_checked_by_its_dataclass_and_named_as_the_flag(field, value, expected):
  config = default.get_config()
  group, name = field.rsplit(".", 1)
  _leaf(config, group)[name] = value
  with pytest.raises(FieldError) as e:
    rl.validate(config)
  assert e.value.field == field
  with pytest.raises(cli.UserError) as e:
    cli.check_config(config)
  assert str(e.value).startswith(f"--config.{field}={value}: "), str(e.value)
  assert expected in str(e.value), str(e.value)


def test_the_binary_names_a_dataclass_refusal_as_the_flag(tmp_path):
  err = _last_error(_binary("--config=smoke", f"--workdir={tmp_path}",
                            "--config.objective.eps_low=1.5"))
  assert err == "error: --config.objective.eps_low=1.5: must lie in [0, 1)."


def test_groups_build_their_dataclasses_as_they_are():
  config = default.get_config()
  train.OptimConfig(**config.optim)
  advantages.AdvantageConfig(**config.advantage)
  rl.RolloutConfig(**config.rollout)
  RewardConfig(**config.reward)
  objective = algorithms.get(config.algo).objective_config(**config.objective)
  assert objective.dual_clip == 3.0
  config.objective.dual_clip = 0.0  # 0 = off
  assert algorithms.get(config.algo).objective_config(**config.objective).dual_clip is None


def test_the_default_run_spec_is_the_one_before_the_grouping():
  """The default experiment resolves to the RunSpec it resolved to from the flat config."""
  mix2 = algorithms.get("mix2")
  objective = objectives.ObjectiveConfig(terms=mix2.terms, loss_agg_tokens=6)
  expected = rl.RunSpec(
      algorithm=mix2, scheme="dapo", std_normalize=True,
      sizes=rl.Sizes(n=8, m=8, groups=16, zero_groups=16),
      step=train.StepConfig(objective=objective, response_tokens=6, temperature=1.0),
      sample=SampleSpec(max_new_tokens=6), guide=rl.GuideSpec("model", "builtin", "model"),
      dynamic_sampling=True, max_num_gen_batches=3, seed=0, mesh_shape=(1, 1, 1))
  assert rl.validate(default.get_config()) == expected


def test_help_lists_grouped_fields_with_their_comments():
  text = cli.config_help(default.get_config(), os.path.join(ROOT, "experiments", "configs",
                                                            "default.py"))
  lines = text.splitlines()
  for flag, comment in (("--config.objective.eps_low=0.2", "clip range below 1."),
                        ("--config.rollout.importance='none'", "Truncated importance sampling"),
                        ("--config.guide.traces.format='auto'", '"mixpo" | "verl"'),
                        ("--config.step.num_minibatches=1", "optimizer updates per epoch"),
                        ("--config.guide.traces.fields={}", "dotted field paths")):
    i = lines.index("  " + flag)
    assert comment in lines[i + 1], (flag, lines[i + 1])


def test_a_library_run_refuses_a_config_with_an_old_field(tmp_path):
  from mixpo import loop  # noqa: PLC0415
  config = default.get_config()
  config.kl_coef = 0.05  # a new, unread field of the ConfigDict
  with pytest.raises(cli.UserError, match=r"the config sets config.kl_coef, which was renamed: "
                     r"set config.objective.kl_coef"):
    loop.setup(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
