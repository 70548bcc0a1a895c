"""Untrusted model output through the reward path: no code runs, every call is bounded in time,
workers are contained and survive a scheduler's group-wide SIGTERM.

The marker-file tests use payloads that would create a file if any scorer evaluated them.
"""

import functools
import inspect
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mixpo.data import rg_tasks
from mixpo.data.arithmetic import exact_integer_reward
from mixpo.rewards import RewardRunner, sandbox
from mixpo.rewards.math_answer import format_reward, math_answer_reward

# A 3x slower machine than the one the deadlines below were chosen on still meets these.
SLACK_S = 20.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _payloads(marker: str) -> list[str]:
  touch = f"__import__('os').system('touch {marker}')"
  write = f"open('{marker}', 'w').write('x')"
  return [
      touch, write, f"[{touch}]", f"''.join([{touch}])", f"(lambda: {touch})()",
      f"[c for c in {touch!r} if {touch}]", f"__import__('subprocess').run(['touch', '{marker}'])",
      f"(1).__class__.__base__.__subclasses__()", f"exec({touch!r})",
      "9**9**9**9", "(" * 5000 + "1" + ")" * 5000, "[" * 100_000 + "]" * 100_000, "1" * 1_000_000,
      r"\boxed{9^{9^{9^{9}}}}", r"\boxed{100000000!}",
  ]


def _wrapped(payloads):
  return [f"<answer>{p}</answer>" for p in payloads] + payloads


@functools.lru_cache(maxsize=None)
def _rg_entry(name: str) -> dict:
  import reasoning_gym
  return reasoning_gym.create_dataset(name, seed=0, size=1)[0]


def _accepted():
  return sorted(rg_tasks.SAFE_SCORERS | set(rg_tasks.PREPARSED))


# --- layer 3: what reasoning-gym datasets are accepted, and why


def test_every_reasoning_gym_dataset_is_either_accepted_or_refused_with_the_reason():
  import reasoning_gym
  names = set(reasoning_gym.factory.DATASETS)
  assert set(_accepted()) <= names
  for name in sorted(names - set(_accepted())):
    with pytest.raises(ValueError, match=rf"rg:{name}: refused.*eval or sympy's parse_expr"):
      rg_tasks.ReasoningGymTask(name)
  with pytest.raises(ValueError, match="refused"):
    rg_tasks.ReasoningGymReward("simple_integration")


_EVALUATORS = ("eval", "exec", "sympify", "parse_expr", "literal_eval", "parse_latex")


def _evaluations(source: str) -> list[str]:
  """Arguments of calls to evaluating functions, except functions the source defines itself
  (propositional_logic has a recursive-descent parser of its own called parse_expr)."""
  own = set(re.findall(r"\bdef\s+(\w+)\s*\(", source))
  names = "|".join(n for n in _EVALUATORS if n not in own)
  return re.findall(rf"(?<![\w.])(?:[\w.]*\.)?(?:{names})\s*\(([^,)]*)", source)


# What the four reviewed modules evaluate: their own problem text, generator code and reference.
_OWN_TEXT = {"basic_arithmetic": ['exp.replace("/"'], "bitwise_arithmetic": ["problem_str", "problem"],
             "codeio": ["full_code"], "number_sorting": ['entry["answer"]']}


@pytest.mark.parametrize("name", sorted(rg_tasks.SAFE_SCORERS))
def test_safe_scorers_do_not_evaluate_text(name):
  """The allow-list is checked against the installed reasoning-gym's source: the scorer never
  evaluates text, and its module evaluates nothing but the reviewed expressions of its own."""
  from reasoning_gym.factory import DATASETS
  cls = DATASETS[name][0]
  scorer = inspect.getsource(cls.score_answer)
  module = inspect.getsource(inspect.getmodule(cls))
  assert all(arg in _OWN_TEXT.get(name, []) for arg in _evaluations(scorer)), scorer
  assert _evaluations(module) == _OWN_TEXT.get(name, []), name
  assert set(_OWN_TEXT) == rg_tasks.MODULES_EVALUATING_OWN_TEXT


@pytest.mark.parametrize("name,good,bad", [
    ("countdown", ["(3 + 4) * 5 - 2 / 1", "100-7*3"], ["9**9", "__import__('os')", "abs(3)",
                                                      "1" * 12, "(" * 40 + "1" + ")" * 40]),
    ("puzzle24", ["(8 - 2) * (6 - 2)"], ["x", "8 ** 2", "[8]"]),
    ("polynomial_multiplication", ["-3*x**3 + 2*x^2 - 1", "(x+1)*(y-2)"],
     ["x**99999", "os.system", "x**y", "S(1)/0 if 1 else 2"]),
    ("n_queens", ["_ Q _ _\nQ _ _ _", "[['_', 'Q'], ['Q', '_']]"], ["__import__", "[Q()]"]),
    ("string_insertion", ["ABCDEAB", "['A', 'B']"], ["A.B", "print('a')"]),
    ("spiral_matrix", ["1 2 3\n-4 5 6", "[1, 2, 3]"], ["sum([1])", "1;2"]),
    ("binary_matrix", ["0 1\n1 0", "[[0, 1], [1, 2]]", "3 2\n1 0"], ["[[x]]", "1+1", "1;2"]),
])
def test_preparse_grammars(name, good, bad):
  grammar = rg_tasks.PREPARSED[name]
  assert all(grammar(g) for g in good), [g for g in good if not grammar(g)]
  assert not any(grammar(b) for b in bad), [b for b in bad if grammar(b)]


def test_preparse_alone_stops_the_countdown_exploit(tmp_path):
  """Layer 3 without layer 1: the runner's guard off, the grammar still keeps the text out."""
  marker = str(tmp_path / "MARK")
  entry = _rg_entry("countdown")
  fn = rg_tasks.ReasoningGymReward("countdown", {})
  with RewardRunner([(fn, 1.0)], timeout_s=5, guard=False, num_workers=1) as r:
    res = r(["p"] * 2, [f"<answer>__import__('os').system('touch {marker}')</answer>",
                        f"<answer>{entry['metadata']['expression']}</answer>"],
            metadata=[{"rg_entry": entry}] * 2)
  assert not os.path.exists(marker)
  np.testing.assert_array_equal(res.rewards, [0.0, 1.0])


# --- layer 1: the audit-hook guard


def _attempt(code: str):
  g = sandbox.guarded()
  try:
    with g:
      return "ran", eval(code)  # noqa: S307 — the point of the test
  except sandbox.SandboxViolation as e:
    return "blocked", str(e)
  except Exception as e:  # noqa: BLE001
    return "error", type(e).__name__


def test_guard_refuses_code_from_text_and_allows_data_and_arithmetic(tmp_path):
  marker = str(tmp_path / "MARK")
  for code in [f"__import__('os').system('touch {marker}')", f"open({marker!r}, 'w')",
               "(lambda: 1)()", "[x for x in (1,)]", "(1).__class__", "getattr(1, 'real')"]:
    assert _attempt(code)[0] == "blocked", code
  assert not os.path.exists(marker)
  assert _attempt("[['_', 'Q'], [1, -2.5]]") == ("ran", [["_", "Q"], [1, -2.5]])
  assert _attempt("ABCD") == ("error", "NameError")  # a bare name is looked up, never called
  from sympy.parsing.sympy_parser import parse_expr
  with sandbox.guarded() as g:
    assert str(parse_expr("(3 + 4) * 5")) == "35" and str(parse_expr("-3*x**3 + 2*x")) == \
        "-3*x**3 + 2*x"
    assert math_answer_reward(["q"], [r"\boxed{\frac{x^2-1}{x-1}}"], answer=["x+1"]) == [1.0]
  assert g.violation is None


def test_guard_holds_when_the_scorer_swallows_the_violation(tmp_path):
  marker = str(tmp_path / "MARK")

  def sloppy_scorer(text):
    try:
      eval(text)  # noqa: S307
    except:  # noqa: E722 — like reasoning-gym's rubiks_cube scorer
      pass
    try:
      eval(text)  # noqa: S307 — a second attempt is refused too
    except:  # noqa: E722
      pass
    return 1.0

  with sandbox.guarded() as g:
    sloppy_scorer(f"__import__('os').system('touch {marker}')")
  assert g.violation and not os.path.exists(marker)


def test_guard_is_per_thread(tmp_path):
  """Armed in one thread, it leaves the trainer's other threads (loggers, checkpoint writers)."""
  out = []
  with sandbox.guarded():
    t = threading.Thread(target=lambda: out.append(open(tmp_path / "log", "w").write("ok")))
    t.start()
    t.join()
    assert _attempt(f"open({str(tmp_path / 'x')!r}, 'w')")[0] == "blocked"
  assert out == [2]


# --- the marker test through the real path: RewardRunner workers, every accepted dataset


def test_no_completion_runs_code_through_any_reward(tmp_path):
  """Every accepted reasoning-gym dataset, math-verify, the addition and format rewards, under
  eval-style payloads, power towers, 1 MB strings and deep nesting: no marker file, and the call
  returns within its batch deadline."""
  marker = str(tmp_path / "MARK")
  payloads = _wrapped(_payloads(marker))
  names = _accepted()
  rg_items = [(c, {"rg_entry": _rg_entry(n)}) for n in names for c in payloads[:10]]
  rg_items += [(c, {"rg_entry": _rg_entry(n)}) for n in ("countdown", "n_queens",
                                                         "string_insertion") for c in payloads]
  completions = [c for c, _ in rg_items]
  batch_s = 60.0
  with RewardRunner([(rg_tasks.ReasoningGymReward(None), 1.0)], timeout_s=2, on_error="zero",
                    batch_timeout_s=batch_s) as r:
    t = time.monotonic()
    res = r(["p"] * len(completions), completions, metadata=[m for _, m in rg_items])
    elapsed = time.monotonic() - t
  assert not os.path.exists(marker)
  assert elapsed < batch_s + SLACK_S, elapsed
  # Nothing reaches an evaluating scorer (the grammars stop it) and no scorer fails on its set-up.
  assert np.isfinite(res.rewards).all() and res.errors == 0, res.metrics()

  fns = [(math_answer_reward, 1.0), (exact_integer_reward, 1.0), (format_reward, 1.0)]
  with RewardRunner(fns, timeout_s=2, on_error="zero", batch_timeout_s=batch_s) as r:
    t = time.monotonic()
    res = r(["p"] * len(payloads), payloads, answer=["7"] * len(payloads))
    elapsed = time.monotonic() - t
  assert not os.path.exists(marker)
  assert elapsed < batch_s + SLACK_S, elapsed
  assert np.isfinite(res.rewards).all(), res.metrics()
  # None of them is the answer 7 (the format reward rightly accepts a well-formed box).
  assert float(res.per_fn["math_answer"].max()) == float(res.per_fn["exact_integer_reward"].max()) == 0.0


# --- batch deadline, worker death, containment


def sleep_forever_reward(prompts, completions, **kw):
  time.sleep(10_000)
  return [0.0]


def test_batch_deadline_bounds_a_call_whatever_the_items():
  """16 items that each hang: without a batch deadline this costs 16 x timeout / 2 workers."""
  with RewardRunner([(sleep_forever_reward, 1.0)], timeout_s=2.0, batch_timeout_s=1.0) as r:
    t = time.monotonic()
    res = r(["p"] * 16, ["x"] * 16)
    elapsed = time.monotonic() - t
    assert res.batch_timeouts == 16 and res.timeouts == 16 and res.errors == 0
    assert elapsed < 1.0 + SLACK_S, elapsed
    assert (res.rewards == 0).all() and res.timed_out.all()
    # The runner is still usable: the stopped workers were replaced.
    res = r(["p"], ["x"])
    assert res.batch_timeouts == 1


def _die_unless_flagged(prompts, completions, flag_dir, **kw):
  flag = os.path.join(flag_dir[0], completions[0])
  if not os.path.exists(flag):
    open(flag, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
  return [1.0]


def _always_die(prompts, completions, **kw):
  os.kill(os.getpid(), signal.SIGKILL)


def test_dead_worker_is_replaced_and_its_item_retried_once(tmp_path):
  with RewardRunner([(_die_unless_flagged, 1.0)], timeout_s=10, guard=False) as r:
    res = r(["p"] * 3, ["a", "b", "c"], flag_dir=[str(tmp_path)] * 3)
  assert res.retries == 3 and res.errors == 0 and (res.rewards == 1).all(), res.metrics()
  with RewardRunner([(_always_die, 1.0)], timeout_s=10, on_error="zero", guard=False) as r:
    res = r(["p"], ["a"])
  assert res.retries == 1 and res.errors == 1


def containment_probe(prompts, completions, **kw):
  """Answers one yes/no question about the worker it runs in."""
  q = completions[0]
  if q == "own_session":
    ok = os.getsid(0) != int(kw["parent_sid"][0])
  elif q == "no_secret":
    ok = "MIXPO_TEST_SECRET" not in os.environ
  elif q == "no_core":
    ok = resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
  elif q == "memory_limit":
    ok = resource.getrlimit(resource.RLIMIT_AS)[0] == 1 << 33
  elif q == "ignores_sigterm":
    ok = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
  elif q == "cpu_backstop":
    ok = resource.getrlimit(resource.RLIMIT_CPU)[0] != resource.RLIM_INFINITY
  elif q == "unprivileged":
    ok = os.getuid() != 0
  else:
    raise ValueError(q)
  return [float(ok)]


def test_workers_run_contained(monkeypatch):
  monkeypatch.setenv("MIXPO_TEST_SECRET", "hunter2")
  qs = ["own_session", "no_secret", "no_core", "memory_limit", "ignores_sigterm", "cpu_backstop"]
  with RewardRunner([(containment_probe, 1.0)], timeout_s=10) as r:
    res = r(["p"] * len(qs), qs, parent_sid=[os.getsid(0)] * len(qs))
    report = r.sandbox
  assert dict(zip(qs, res.rewards.tolist())) == {q: 1.0 for q in qs}
  assert report["own_session"] and report["privilege_drop"]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_drop_root_when_asked():
  limits = sandbox.WorkerLimits(drop_privileges=True)
  with RewardRunner([(containment_probe, 1.0)], timeout_s=10, limits=limits) as r:
    res = r(["p"], ["unprivileged"])
    assert r.sandbox["user"] == "nobody" and r.sandbox["privilege_drop"] == "done"
  assert res.rewards.tolist() == [1.0]


def test_privilege_drop_auto_says_why_it_is_skipped(tmp_path):
  private = tmp_path / "home"
  private.mkdir(mode=0o700)
  assert not sandbox._world_readable_path(str(private / "lib"))
  assert sandbox._world_readable_path("/")
  reason = sandbox.privilege_drop_blocker(sandbox.WorkerLimits(drop_privileges=False))
  assert reason and ("disabled" in reason or "not running as root" in reason)


# --- the trainer's environment and files stay out of reach of reward code run on model text

ENV_PROBE = '''
import json, os, sys
from mixpo.rewards import RewardRunner


def read_file(prompts, completions, **kw):
  """1.0 when the file named by the completion holds the secret ("ppid": the worker's parent)."""
  path = f"/proc/{os.getppid()}/environ" if completions[0] == "ppid" else completions[0]
  with open(path, "rb") as f:
    return [float(b"hunter2" in f.read())]


def read_environ(prompts, completions, **kw):
  return [float(any("hunter2" in v for v in os.environ.values()))]


if __name__ == "__main__":
  targets = [t.replace("TRAINER", str(os.getpid())) for t in json.loads(sys.argv[1])]
  out = {}
  for guard in (True, False):
    with RewardRunner([(read_file, 1.0), (read_environ, 1.0)], timeout_s=60, on_error="zero",
                      guard=guard) as r:
      res = r(["p"] * len(targets), targets)
      out[str(guard)] = {"file": res.per_fn["read_file"].tolist(), "blocked": res.blocked,
                         "environ": res.per_fn["read_environ"].tolist(), "sandbox": r.sandbox}
  print(json.dumps(out))
'''


def test_reward_workers_cannot_read_the_trainers_secrets(tmp_path):
  """A secret in the trainer's environment, home and run directory: the worker's start-up block
  (/proc/self/environ, inherited from the fork server) and the fork server's own hold none even
  unguarded, and the guard refuses every read outside its allow-list (the trainer's environ too)."""
  home, run = tmp_path / "home", tmp_path / "run"
  home.mkdir()
  run.mkdir()
  (home / ".netrc").write_text("machine example.com password hunter2\n")
  (run / "secrets.env").write_text("TOKEN=hunter2\n")
  (tmp_path / "probe.py").write_text(ENV_PROBE)
  targets = ["/proc/self/environ", "ppid", "/proc/TRAINER/environ", str(home / ".netrc"),
             str(run / "secrets.env")]
  env = dict(os.environ, MIXPO_TEST_SECRET="hunter2", HOME=str(home),
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  out = subprocess.run([sys.executable, str(tmp_path / "probe.py"), json.dumps(targets)],
                       cwd=run, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  guarded, bare = got["True"], got["False"]
  assert guarded["file"] == [0.0] * 5 and guarded["blocked"] == 5, guarded
  assert guarded["environ"] == bare["environ"] == [0.0] * 5
  assert guarded["sandbox"]["environ"] == "scrubbed"
  # Unguarded (RewardRunner(guard=False), trusted reward code): the start-up blocks hold no
  # secret, whereas the trainer's environ and the user's files are theirs to read.
  assert bare["file"] == [0.0, 0.0, 1.0, 1.0, 1.0] and bare["blocked"] == 0, bare


def test_guard_read_allow_list(tmp_path):
  import sympy
  secret = tmp_path / "secret.txt"
  secret.write_text("hunter2")
  for path in ("/proc/self/environ", f"/proc/{os.getppid()}/environ", str(secret),
               os.path.expanduser("~/.bashrc")):
    assert _attempt(f"open({path!r}).read()")[0] == "blocked", path
    assert sandbox.read_refusal(path), path
  with sandbox.guarded() as g:  # the interpreter's and the libraries' files, this test's source
    for path in (sympy.__file__, os.__file__, __file__):
      with open(path, "rb") as f:
        assert f.read(1)
  assert g.violation is None
