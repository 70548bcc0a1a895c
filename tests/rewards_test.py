"""Tests for mixpo.rewards: extraction, math-verify equivalence, runner timeouts/errors, overlong."""

import json
import random
import sys
import time

import numpy as np
import pytest

from mixpo.rewards import (FormatReward, MathAnswerReward, OverlongConfig, RewardError,
                           RewardRunner, combine, extract_answer, format_reward,
                           math_answer_reward, overlong_penalty, shape_rewards,
                           truncation_loss_mask, verify_answer)


# Module-level so they pickle into the runner's worker processes.
def sleep_forever_reward(prompts, completions, **_):
  time.sleep(10_000)
  return [1.0] * len(completions)


def sleep_if_x_reward(prompts, completions, **_):
  return [time.sleep(10_000) if c == "x" else 1.0 for c in completions]


def raising_reward(prompts, completions, **_):
  raise ZeroDivisionError("boom")


def nan_reward(prompts, completions, **_):
  return [float("nan")] * len(completions)


def length_reward(prompts, completions, **_):
  return [float(len(c)) for c in completions]


# Deadline tests assert what a deadline guarantees (an item ends within about timeout_s), with
# margins that a 3x slower, loaded machine meets: a worker's first item includes unpickling the
# fn (importing this module), so a deadline that must not fire is far above that cost, and the
# hang being cut off (10,000 s sleeps, power towers) is far above any bound asserted.
FUZZ_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def runner():
  with RewardRunner([(math_answer_reward, 1.0)], timeout_s=FUZZ_TIMEOUT_S, on_error="zero") as r:
    yield r


@pytest.fixture(scope="module")
def patient_runner():
  """For tests about values, not deadlines: no item may time out, however loaded the machine."""
  with RewardRunner([(math_answer_reward, 1.0)], timeout_s=60.0, on_error="zero") as r:
    yield r


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("The answer is 42.", "42"),
    ("Answer: $x+1$", "x+1"),
    ("we get 3 apples and 1,000 pears", "1,000"),
    ("no digits here", None),
    ("\\boxed{1 + {2", None),  # unbalanced last box: malformed, not the last number
    ("", None),
])
def test_extract_answer_reward(text, want):
  assert extract_answer(text) == want


@pytest.mark.parametrize("completion,answer", [
    ("0.5", "1/2"), ("\\boxed{\\frac{1}{2}}", "0.5"), ("The answer is 1/2", "$\\frac{1}{2}$"),
    ("\\boxed{1,000}", "1000"), ("so 1000", "1,000"), ("\\boxed{1+x^2}", "x^2+1"),
    ("The answer is 82", "82"), ("\\boxed{\\dfrac{3}{4}}", "0.75"),
])
def test_verify_equivalent_answers(completion, answer):
  assert verify_answer(completion, answer) == 1.0


@pytest.mark.parametrize("completion,answer", [
    ("0.51", "1/2"), ("\\boxed{\\frac{1}{3}}", "0.5"), ("\\boxed{100}", "1000"),
    ("83", "82"), ("\\boxed{x^2-1}", "x^2+1"), ("", "3"), ("no answer", "3"),
])
def test_verify_non_equivalent_answers(completion, answer):
  assert verify_answer(completion, answer) == 0.0


def test_verify_numeric_tolerance_reward():
  assert verify_answer("3.14", "3.14159") == 0.0
  assert verify_answer("3.14", "3.14159", rel_tol=1e-3) == 1.0
  assert MathAnswerReward(rel_tol=1e-3)(["p"], ["\\boxed{3.1416}"], answer=["3.14159"]) == [1.0]


def test_verify_unparsable_reference_raises_not_zero():
  with pytest.raises(ValueError, match="does not parse"):
    verify_answer("3", "")


def test_format_reward():
  assert format_reward(["p"] * 3, ["\\boxed{2}", "\\boxed{}", "2"]) == [1.0, 0.0, 0.0]
  assert FormatReward(r"-?\d+")(["p"] * 3, ["82", " 82\n", "8 2"]) == [1.0, 1.0, 0.0]


def test_combine_reward_weights():
  fn = combine([(math_answer_reward, 1.0), (format_reward, 0.5)])
  assert fn(["p", "p"], ["\\boxed{3}", "3"], answer=["3", "3"]) == [1.5, 1.0]


def test_runner_reward_values_and_counts(patient_runner):
  res = patient_runner(["p"] * 4, ["\\boxed{3}", "3", "4", "junk"], answer=["3", "3", "3", "3"])
  np.testing.assert_array_equal(res.rewards, [1, 1, 0, 0])
  assert res.rewards.dtype == np.float32 and res.timeouts == 0 and res.errors == 0
  assert set(res.metrics()) >= {"reward/mean", "reward/timeouts", "reward/errors"}


def test_runner_reward_timeout_sleep_forever_cut_off_and_counted():
  timeout_s = 5.0  # above a cold worker's first item on a slow machine, so only "x" times out
  with RewardRunner([(sleep_if_x_reward, 1.0), (length_reward, 0.0)], timeout_s=timeout_s) as r:
    t = time.monotonic()
    res = r(["p"] * 4, ["a", "x", "bb", "x"])
    elapsed = time.monotonic() - t
    assert res.timeouts == 2 and res.errors == 0
    np.testing.assert_array_equal(res.timed_out, [False, True, False, True])
    np.testing.assert_array_equal(res.per_fn["sleep_if_x_reward"], [1, 0, 1, 0])
    np.testing.assert_array_equal(res.per_fn["length_reward"], [1, 1, 2, 1])
    # Each of the 8 (fn, item) tasks ends within its deadline (sequential at worst), against
    # 10,000 s sleeps: nominally ~1 timeout_s, as the two sleeps run on two workers at once.
    assert elapsed < 8 * timeout_s, elapsed
    # The replaced workers keep serving the next step.
    assert r(["p"], ["ok"]).rewards.tolist() == [1.0]


def test_runner_reward_signal_backend_timeout_for_unpicklable_fn():
  fn = lambda prompts, completions, **_: sleep_forever_reward(prompts, completions)  # noqa: E731
  with RewardRunner([(fn, 1.0)], timeout_s=0.3) as r:
    assert r.backend == "signal"
    t = time.monotonic()
    res = r(["p", "p"], ["a", "b"])
    # Two 0.3 s deadlines (nominally 0.6 s) against two 10,000 s sleeps.
    assert res.timeouts == 2 and time.monotonic() - t < 10


def test_deadline_survives_an_alarm_swallowed_in_a_destructor(monkeypatch):
  # The first alarm lands inside __del__, where Python prints and ignores exceptions (as in JAX's
  # gc callback); a one-shot alarm would be lost and the loop below would run its full 30 s.
  import signal
  from mixpo.rewards.deadline import DeadlineExceeded, deadline

  class SlowToDelete:
    def __del__(self):
      t = time.monotonic()
      while time.monotonic() - t < 0.3:
        pass

  old = signal.getsignal(signal.SIGALRM)
  # The swallowed alarm does not reach the outer hook: formatting it there (pytest's hook) can be
  # cut by the next alarm, which pytest then reports as a test error (seen under load).
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  t0 = time.monotonic()
  with pytest.raises(DeadlineExceeded):
    with deadline(0.1):
      SlowToDelete()  # deleted at once (refcount 0): the alarm fires inside __del__
      while time.monotonic() - t0 < 30:
        pass
  assert time.monotonic() - t0 < 10  # nominally ~0.45 s: 0.1 s, the 0.3 s __del__, one re-arm
  assert sys.unraisablehook == seen.append and not seen
  assert signal.getsignal(signal.SIGALRM) is old and signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_parse_gold_deadline_on_pathological_reference():
  from mixpo.rewards.math_answer import parse_gold
  t0 = time.monotonic()
  with pytest.raises(ValueError, match="took over 0.5 s"):
    parse_gold("(" * 5000, 0.5)
  assert time.monotonic() - t0 < 10  # nominally ~0.6 s; without the deadline, minutes


def test_runner_reward_error_names_function_or_counts_zero():
  with RewardRunner([(raising_reward, 1.0)], timeout_s=60.0) as r:
    with pytest.raises(RewardError, match="raising_reward.*ZeroDivisionError.*on_error='zero'"):
      r(["p"], ["a"])
  with RewardRunner([(raising_reward, 1.0), (nan_reward, 1.0), (length_reward, 1.0)],
                    timeout_s=60.0, on_error="zero") as r:
    res = r(["p", "p"], ["a", "bcd"])
    assert res.errors == 4 and res.rewards.tolist() == [1.0, 3.0]


def test_runner_reward_column_length_mismatch(runner):
  with pytest.raises(ValueError, match="column 'answer' has 1 entries, expected 2"):
    runner(["p", "p"], ["1", "2"], answer=["1"])


def test_fuzz_reward_adversarial_completions_never_crash_or_hang(runner):
  rng = random.Random(0)
  bad_utf8 = bytes(rng.randrange(256) for _ in range(300)).decode("utf-8", errors="replace")
  comps = [
      "", " ", "\\boxed{", "}" * 50, "\\boxed{" * 300 + "1" + "}" * 300,
      "\\frac{" * 200 + "1" + "}{2}" * 200, "9" * 5000, "\\boxed{" + "9" * 100_000 + "}",
      "1e99999", "10^{10^{10^{10}}}", "\\boxed{10^{10^{10^{10^{10}}}}}", bad_utf8,
      "x" * 1_000_000, "The answer is " + "(" * 10_000, "\\boxed{\\sqrt{\\sqrt{\\sqrt{-1}}}}",
      "\x00\x01\ud800", "\\boxed{1/0}", "\\boxed{\\infty}", "nan", "\\begin{pmatrix}1&2\\end{pmatrix}",
  ]
  comps += ["".join(rng.choice("\\{}^_012345689abc+-*/=$() boxedfrac") for _ in range(200))
            for _ in range(20)]
  t = time.monotonic()
  res = runner(["p"] * len(comps), comps, answer=["7"] * len(comps))
  # Each item ends within its deadline, so the batch within len(comps) deadlines even if every
  # item timed out on one worker (nominally ~10 s); a hang would never end.
  assert time.monotonic() - t < len(comps) * FUZZ_TIMEOUT_S
  # 10^{10^{10^{10^{10}}}} hangs sympy: it is cut off (counted) and the rest still score.
  assert res.timeouts >= 1 and res.timed_out[10]
  assert res.errors == 0 and np.all(res.rewards == 0.0)  # malformed → 0 (no 7 anywhere)


@pytest.mark.parametrize("length,want", [
    (0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0), (1000, -1.0)])
def test_overlong_penalty_boundaries(length, want):
  # max_len 16, cache 4: 0 up to 12, linear to −1 at 16, −1 beyond.
  assert overlong_penalty([length], max_len=16, cache_len=4)[0] == pytest.approx(want)


def test_overlong_dapo_defaults_and_mask():
  cfg = OverlongConfig()
  assert (cfg.shaping, cfg.max_len, cfg.cache_len, cfg.mask_truncated) == (True, 20480, 4096, False)
  np.testing.assert_allclose(overlong_penalty([16384, 18432, 20480], 20480, 4096), [0, -0.5, -1])
  r, m = shape_rewards([1.0, 1.0], [5, 16], [True, False], OverlongConfig(max_len=16, cache_len=4))
  np.testing.assert_allclose(r, [1.0, 0.0])
  np.testing.assert_array_equal(m, [1, 1])
  np.testing.assert_array_equal(truncation_loss_mask([True, False], mask_truncated=True), [1, 0])
  with pytest.raises(ValueError, match="cache_len"):
    OverlongConfig(max_len=4, cache_len=8)


# --- correct answers score 1 inside the real worker sandbox (process workers, guard armed)


def test_worker_scores_integrals_and_number_forms_as_their_text_means(patient_runner):
  """Honest \\int answers were refused by the guard (sympy imports manualintegrate lazily, and its
  dataclasses are code built from text); references such as 1e-7 read as e − 7, 3e8 as 3·e·8 and
  10\\,000 or 2 500 000 as 0, so the right answer scored 0 and \\boxed{0} scored 1."""
  cases = [  # (completion, reference, want)
      ("\\boxed{\\int_0^1 x\\,dx}", "1/2", 1), ("\\boxed{\\frac12}", "\\int_0^1 x^2\\,dx", 0),
      ("\\boxed{\\frac{x^2}{2}}", "\\int x\\,dx", 1),
      ("\\boxed{\\int_0^{\\pi}\\sin x\\,dx}", "2", 1),
      ("\\boxed{0.0000001}", "1e-7", 1), ("\\boxed{10^{-7}}", "1e-7", 1), ("\\boxed{0}", "1e-7", 0),
      ("\\boxed{300000000}", "3e8", 1), ("\\boxed{3\\times 10^8}", "3e8", 1),
      ("\\boxed{0}", "3e8", 0), ("\\boxed{10000}", "10\\,000", 1), ("\\boxed{0}", "10\\,000", 0),
      ("\\boxed{1000}", "1 000", 1), ("\\boxed{0}", "1 000", 0),
      ("\\boxed{2500000}", "2 500 000", 1), ("\\boxed{0}", "2 500 000", 0),
      ("\\boxed{10\\,000}", "10000", 1), ("The answer is 2 500 000", "2500000", 1),
      ("so 10\u2009000", "10000", 1), ("\\boxed{1.5e3}", "1500", 1),
      ("\\boxed{3e8}", "300000000", 1),
      ("\\boxed{1 2}", "2", 0),  # not one number: no reading of it is the answer
  ]
  res = patient_runner(["p"] * len(cases), [c for c, _, _ in cases],
                       answer=[a for _, a, _ in cases])
  got = dict(zip(cases, res.rewards.tolist()))
  assert got == {c: float(c[2]) for c in cases}
  assert res.blocked == res.unverifiable == res.errors == res.timeouts == 0, res.metrics()


@pytest.mark.parametrize("reference,value", [
    ("1e-7", "1/10000000"), ("3e8", "300000000"), ("1.5E+3", "1500"), ("-2.5e-3", "-1/400"),
    ("10\\,000", "10000"), ("10{,}000", "10000"), ("1 000", "1000"), ("2 500 000", "2500000"),
    ("1\u2009000\u2009000", "1000000"), ("$10\\,000.25$", "40001/4"), ("1,234", "1234"),
])
def test_reference_number_forms_parse_to_their_number(reference, value):
  import sympy
  from mixpo.rewards.math_answer import parse_gold
  assert sympy.nsimplify(parse_gold(reference)[0]) == sympy.Rational(value)


@pytest.mark.parametrize("reference", ["1 2", "10 00", "1,00,000", "1.000.000", "1, 000",
                                       "3.141 592"])
def test_reference_digit_groups_that_are_not_one_number_are_refused(reference):
  from mixpo.rewards.math_answer import ReferenceMisread, parse_gold
  with pytest.raises(ReferenceMisread, match="is not one number"):
    parse_gold(reference)


def prepare_fails_reward(prompts, completions, **_):
  return [0.0] * len(completions)


def _broken_prepare():
  raise OSError("lookup table missing")


prepare_fails_reward.prepare = _broken_prepare


def test_a_failing_prepare_stops_the_runner_naming_the_fn():
  with pytest.raises(RuntimeError, match="prepare_fails_reward.*prepare\\(\\) raised OSError: "
                                         "lookup table missing"):
    RewardRunner([(prepare_fails_reward, 1.0)], timeout_s=60.0)


# --- reasoning-gym: every accepted dataset's own reference scores 1 in the worker sandbox

# The answer field of these entries is None (many answers are right); the entry's metadata holds
# one right answer, in the form the scorer reads.
RG_REFERENCE_IN_METADATA = {
    "graph_color": lambda md: json.dumps({str(k): v for k, v in md["possible_answer"].items()}),
    "propositional_logic": lambda md: md["example_answer"],
    "rubiks_cube": lambda md: md["example_correct_answer"],
}
# Datasets whose entries hold no right answer at all: scored (no error, not blocked) but not 1.
RG_NO_REFERENCE = {
    "boxnet": "a plan moving boxes to their targets; many are right and the entry holds none",
    "rush_hour": "a move sequence solving the board; the entry holds only its minimum length",
}
# The default suite's sample: eval-guarded scorers, data-file datasets, metadata references,
# decimal_arithmetic (it sets the decimal precision) and one without a reference.
RG_SAMPLE = ("countdown", "binary_matrix", "n_queens", "graph_color", "codeio", "arc_agi",
             "decimal_arithmetic", "prime_factorization", "rubiks_cube", "boxnet")


def _rg_references(names, seeds):
  import decimal
  import reasoning_gym
  items = []
  for name in names:
    for seed in seeds:
      with decimal.localcontext():  # decimal_arithmetic changes the precision as it generates
        entry = reasoning_gym.create_dataset(name, seed=seed, size=1)[0]
      md = entry["metadata"]
      answer = RG_REFERENCE_IN_METADATA.get(name, lambda _: entry["answer"])(md)
      items.append((name, f"<answer>{answer}</answer>", {"rg_entry": entry}))
  return items


@pytest.fixture(scope="module")
def rg_runner():
  """The default backend (process workers, guard armed), default on_error ("raise")."""
  from mixpo.data.rg_tasks import ReasoningGymReward
  with RewardRunner([(ReasoningGymReward(None), 1.0)], timeout_s=60.0) as r:
    assert r.backend == "process" and r.guard
    yield r


def _check_rg_references(runner, names, seeds):
  items = _rg_references(names, seeds)
  res = runner(["p"] * len(items), [c for _, c, _ in items], metadata=[m for _, _, m in items])
  m = res.metrics()
  assert m["reward/blocked"] == m["reward/errors"] == m["reward/timeouts"] == 0, m
  assert m.get("reward/scorer_errors") == 0, m
  got = {}
  for (name, _, _), r in zip(items, res.rewards.tolist()):
    got[name] = min(got.get(name, 1.0), r)
  assert {n for n, r in got.items() if r != 1.0} == set(RG_NO_REFERENCE) & set(names), got


def test_rg_references_score_one_in_the_worker_sandbox(rg_runner):
  _check_rg_references(rg_runner, RG_SAMPLE, seeds=(0,))


@pytest.mark.slow
def test_every_accepted_rg_dataset_reference_scores_one_in_the_worker_sandbox(rg_runner):
  from mixpo.data import rg_tasks
  accepted = sorted(rg_tasks.SAFE_SCORERS | set(rg_tasks.PREPARSED))
  assert set(RG_NO_REFERENCE) | set(RG_REFERENCE_IN_METADATA) <= set(accepted)
  _check_rg_references(rg_runner, accepted, seeds=(0, 1))


def test_scorer_exception_on_model_text_is_a_counted_zero_not_a_run_error(rg_runner):
  """Malformed answers that make accepted scorers raise (ValueError / TypeError / KeyError): 0,
  counted as reward/scorer_errors, under the default on_error="raise", in workers and in-process."""
  from mixpo.data.rg_tasks import ReasoningGymReward
  items = _rg_references(["prime_factorization", "boxnet", "game_of_life"], seeds=(0,))
  bad = ["<answer>None</answer>", "<answer>0</answer>", "<answer>{}</answer>"]
  metadata = [m for _, _, m in items]
  for backend in ("process", "signal"):
    if backend == "process":
      res = rg_runner(["p"] * 3, bad, metadata=metadata)
    else:
      with RewardRunner([(ReasoningGymReward(None), 1.0)], backend=backend, timeout_s=60.0) as r:
        res = r(["p"] * 3, bad, metadata=metadata)
    m = res.metrics()
    assert res.rewards.tolist() == [0.0] * 3, backend
    assert (m["reward/errors"], m["reward/blocked"], m.get("reward/scorer_errors")) == (0, 0, 3), m


@pytest.mark.slow
def test_rg_countdown_run_from_the_command_line_has_no_blocked_rewards(tmp_path):
  """The finding end to end: `train.py --config.task=rg:countdown` logged blocked 16/16 per step
  (every item, correct ones included) and summary.json said warnings: []."""
  import os
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "experiments/train.py", "--config=smoke", f"--workdir={tmp_path}",
         "--config.task=rg:countdown", "--config.algo=grpo", "--config.num_steps=2",
         "--config.eval_size=4", "--config.eval_batch_size=4",
         "--config.builtin.max_positions=512"]  # countdown prompts are ~400 characters
  out = subprocess.run(cmd, cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  steps = [r for r in rows if "reward/items" in r]
  # At least one batch of 16 scored a step (dynamic sampling may score more draws: all counted).
  assert len(steps) == 2 and all(r["reward/items"] >= 16 for r in steps), steps
  assert all(r["reward/blocked"] == r["reward/errors"] == 0 for r in steps), steps
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["reward_blocked"] == 0 and summary["reward_failure_steps"] == 0
