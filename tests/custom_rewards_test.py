"""mixpo/rewards/custom.py: reward functions named by 'module:fn' or 'file.py:fn', TRL and verl
signatures, through the RewardRunner's worker processes."""

import os
import pickle
import sys

import numpy as np
import pytest

from mixpo.rewards import RewardRunner, custom, math_answer_reward

TRL_MODULE = '''
def length_reward(prompts, completions, **columns):
  return [float(len(c)) for c in completions]


def answer_match(prompts, completions, answer):  # no **kwargs: gets only the columns it names.
  return [float(c.strip() == a) for c, a in zip(completions, answer)]
'''
VERL_MODULE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
  return {"score": 1.0 if solution_str.strip() == ground_truth else -1.0, "acc": 0}
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
  (tmp_path / "my_pkg").mkdir()
  (tmp_path / "my_pkg" / "__init__.py").write_text("")
  (tmp_path / "my_pkg" / "rewards.py").write_text(TRL_MODULE)
  (tmp_path / "verl_score.py").write_text(VERL_MODULE)
  monkeypatch.chdir(tmp_path)  # a module spec resolves against the current directory.
  yield tmp_path
  for name in [m for m in sys.modules if m.startswith(("my_pkg", "mixpo_user_reward_"))]:
    del sys.modules[name]


def test_module_spec_and_file_spec_and_verl_in_worker_processes(user_dir):
  fns = custom.reward_fns(
      f"task,my_pkg.rewards:length_reward,my_pkg.rewards:answer_match,{user_dir}/verl_score.py:"
      "compute_score", "1,0.5,2,1", math_answer_reward)
  assert [w for _, w in fns] == [1.0, 0.5, 2.0, 1.0] and fns[0][0] is math_answer_reward
  assert fns[3][0].verl  # recognised by its first parameter, data_source.
  with RewardRunner(fns, backend="process") as runner:
    assert runner.backend == "process"
    out = runner(["p", "p"], ["7", "12"], answer=["7", "8"], metadata=[{}, {}])
  np.testing.assert_allclose(out.per_fn["length_reward"], [1.0, 2.0])
  np.testing.assert_allclose(out.per_fn["answer_match"], [1.0, 0.0])
  np.testing.assert_allclose(out.per_fn["compute_score"], [1.0, -1.0])
  np.testing.assert_allclose(out.rewards, [1 + 0.5 + 2 + 1, 0 + 1.0 - 1])


def test_pickles_by_spec_not_by_function(user_dir):
  fn = custom.ImportedReward("verl_score.py:compute_score")
  state = fn.__getstate__()
  assert set(state) == {"spec", "target", "search_path", "verl", "__name__"}  # no function
  clone = pickle.loads(pickle.dumps(fn))
  assert clone.spec == fn.spec and clone._fn is not None
  assert clone(["p"], ["3"], answer=["3"], metadata=[None]) == [1.0]


def test_verl_prefix_and_empty_spec(user_dir):
  fn = custom.ImportedReward("verl:verl_score.py:compute_score")
  assert fn.verl and fn(["p"], ["x"], answer=["y"], metadata=[{"data_source": "d"}]) == [-1.0]
  assert custom.reward_fns("", "", math_answer_reward) == [(math_answer_reward, 1.0)]


@pytest.mark.parametrize("spec,weights,match", [
    ("no_such_module_xyz:fn", "", "cannot import module"),
    ("my_pkg.rewards:nope", "", "has no 'nope'.*length_reward"),
    ("missing.py:fn", "", "does not exist"),
    ("my_pkg.rewards", "", "is not 'pkg.module:function'"),
    ("task,my_pkg.rewards:length_reward", "1", "1 weights .* for 2 reward functions"),
    ("task", "one", "not comma-separated numbers"),
])
def test_bad_specs_say_what_is_wrong(user_dir, spec, weights, match):
  with pytest.raises(custom.RewardSpecError, match=match):
    custom.reward_fns(spec, weights, math_answer_reward)


WRITER_MODULE = '''
import os

# Top-level code: records which process imported the module.
open(os.path.join({marks!r}, f"imported-{{os.getpid()}}"), "w").close()


def writes_a_file(prompts, completions, **columns):
  open(os.path.join({marks!r}, "written-by-a-call"), "w").close()
  return [1.0] * len(completions)
'''


def _writer(tmp_path):
  marks = tmp_path / "marks"
  marks.mkdir()
  (tmp_path / "writer.py").write_text(WRITER_MODULE.format(marks=str(marks)))
  return f"{tmp_path}/writer.py:writes_a_file", marks


def test_reward_module_is_trusted_code_and_only_its_calls_are_guarded(tmp_path):
  """What docs/rewards.md says: loading the spec runs the module's top-level code in this (the
  trainer's) process, unsandboxed; each worker imports it again before its guard is armed; a
  call on a completion that writes a file is refused and counted."""
  spec, marks = _writer(tmp_path)
  fns = custom.reward_fns(spec, "", math_answer_reward)
  assert (marks / f"imported-{os.getpid()}").exists()
  with RewardRunner(fns, timeout_s=60.0) as r:
    res = r(["p"], ["x"])
  assert res.blocked == 1 and res.rewards.tolist() == [0.0]
  assert not (marks / "written-by-a-call").exists()
  assert len(list(marks.glob("imported-*"))) >= 2  # the trainer and at least one worker


def test_a_run_whose_rewards_are_all_blocked_says_so(builtin_dir, tmp_path):
  """The run trains on zeros that are the sandbox's verdict, not the answers': summary.json and
  the log say so at the first step (before: warnings: [])."""
  from rl_test import smoke_config  # the smoke config on the session's built-in models
  from mixpo import loop
  spec, _ = _writer(tmp_path)
  summary = loop.run(smoke_config(builtin_dir, num_steps=1, **{"reward.functions": spec}),
                     str(tmp_path / "run"))
  assert summary["reward_blocked"] == summary["reward_items"] > 0
  assert summary["reward_failure_steps"] == 1
  assert any(w.startswith("step 1: ") and "without a verdict" in w for w in summary["warnings"])
