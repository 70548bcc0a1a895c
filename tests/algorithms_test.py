"""algorithms.py: the table is the one place algorithms are named; a new entry runs end to end."""

import ast
import contextlib
import os
import re
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import grid
from experiments.configs import compare as compare_config
from experiments.configs import smoke
from mixpo import algorithms, loop, objectives, rl
from mixpo.logging import PhaseTimer
from mixpo.objectives import OFF, ON, ZERO, Term

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A made-up algorithm: one joint token mean over all three sets, one joint advantage pool.
FAKE = algorithms.Algorithm(
    name="fakejoint", summary="test entry: ON, ZERO and OFF in one token mean",
    guided=True, zero_set=True, zero_to_on=False, pools=((ON, ZERO, OFF),),
    terms=(Term(sets=(ON, ZERO, OFF), name="j_joint"),), grids=("main",))


def test_table_entries_are_consistent():
  assert algorithms.names() == tuple(algorithms.TABLE)
  for name, entry in algorithms.TABLE.items():
    assert entry.name == name and hash(entry) == hash(algorithms.get(name))
    cfg = entry.objective_config(eps_low=0.1, eps_high=0.3)
    assert cfg.terms == entry.terms
    assert cfg.eps_high == (0.1 if entry.symmetric_clip else 0.3)
    assert cfg.loss_agg == entry.loss_agg
  with pytest.raises(ValueError, match="config.algo='ppo'"):
    algorithms.get("ppo")


def test_entries_are_validated():
  with pytest.raises(ValueError, match="guided=False"):
    algorithms.Algorithm(name="x", summary="", guided=False, zero_set=False, zero_to_on=False,
                         pools=((ON,),), terms=(Term(sets=(OFF,)),))
  with pytest.raises(ValueError, match="zero_to_on"):
    algorithms.Algorithm(name="x", summary="", guided=False, zero_set=False, zero_to_on=True,
                         pools=((ON,),), terms=(Term(sets=(ZERO,)),))
  with pytest.raises(ValueError, match="already in the table"):
    algorithms.register(algorithms.TABLE[algorithms.names()[0]])


def test_grids_read_the_table():
  assert grid.GRIDS == algorithms.grids()
  base = compare_config.get_config("small")
  with algorithms.registered(FAKE):
    cells = grid.grid_cells("main", base, seeds=[0], regimes=["weak"])
    assert "fakejoint" in [c.algo for c in cells]
  assert "fakejoint" not in algorithms.TABLE
  assert "fakejoint" not in [c.algo for c in grid.grid_cells("main", base, seeds=[0],
                                                             regimes=["weak"])]


# Names that are spelled like an algorithm but belong to another namespace, allowed only in the
# one assignment that defines that namespace: the partition schemes ("dapo" = DAPO's kept groups,
# a scheme every algorithm can run under) and the trace-format alias ("luffy" = the verl / LUFFY
# parquet layout). Anything else reads these names from those tuples / dicts.
OTHER_NAMESPACES = {os.path.join("mixpo", "advantages.py"): "SCHEMES",
                    os.path.join("mixpo", "data", "traces.py"): "FORMAT_ALIASES"}


def _python_files():
  """mixpo/**/*.py and experiments/**/*.py, minus the table itself and experiments/configs."""
  for top in ("mixpo", "experiments"):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      if os.path.join("experiments", "configs") in root:
        continue
      for f in sorted(files):
        rel = os.path.relpath(os.path.join(root, f), REPO)
        if f.endswith(".py") and rel != os.path.join("mixpo", "algorithms.py"):
          yield rel


def _algorithm_literals(rel: str, names: set[str]) -> list[str]:
  """'path:line: literal' for every string constant of `rel` equal to an algorithm name, outside
  the assignment OTHER_NAMESPACES allows there (comments and docstrings are not constants equal to
  a bare name, so prose is free to name algorithms)."""
  tree = ast.parse(open(os.path.join(REPO, rel), encoding="utf-8").read(), rel)
  allowed = set()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Assign) and OTHER_NAMESPACES.get(rel) in
        [t.id for t in node.targets if isinstance(t, ast.Name)]):
      allowed.update(id(n) for n in ast.walk(node.value))
  return [f"{rel}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and n.value in names and id(n) not in allowed]


def test_no_algorithm_is_named_outside_the_table():
  """Code outside the table, configs and docs never names an algorithm (a string literal equal to
  a table name) nor matches config.algo against literals; help text generated from the table is
  fine. The names come from the table, so a new entry is covered too."""
  names = set(algorithms.names())
  match_algo = re.compile(r"(?<!for )\balgo\s*(==|!=|in)\s")
  hits = []
  for rel in _python_files():
    hits += _algorithm_literals(rel, names)
    for i, line in enumerate(open(os.path.join(REPO, rel), encoding="utf-8"), 1):
      if match_algo.search(line):
        hits.append(f"{rel}:{i}: {line.strip()}")
  assert not hits, "\n".join(hits)


def test_the_literal_scan_sees_a_misplaced_name(tmp_path, monkeypatch):
  """The scan above can fail: a literal "mix2" in a module (and "dapo" outside SCHEMES) is found,
  the SCHEMES definition is not."""
  pkg = tmp_path / "mixpo"
  pkg.mkdir()
  (pkg / "advantages.py").write_text('SCHEMES = ("paper", "dapo")\nX = "dapo"\n')
  (pkg / "rl.py").write_text('"""Runs "mix2" and dapo."""\nif a.name == "mix2":\n  pass\n')
  monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
  names = set(algorithms.names())
  assert _algorithm_literals(os.path.join("mixpo", "advantages.py"), names) == [
      os.path.join("mixpo", "advantages.py") + ":2: 'dapo'"]
  assert _algorithm_literals(os.path.join("mixpo", "rl.py"), names) == [
      os.path.join("mixpo", "rl.py") + ":2: 'mix2'"]


@pytest.mark.parametrize("entry", [FAKE, algorithms.get("chord")], ids=lambda a: a.name)
def test_a_registered_entry_runs_end_to_end(builtin_dir, tmp_path, entry):
  """A registered entry, and the table's chord (a Term with its own form), train end to end."""
  config = smoke.get_config()
  config.builtin_dir, config.export_hf, config.algo = builtin_dir, False, entry.name
  config.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}
  registered = entry is FAKE
  if registered:
    with pytest.raises(ValueError, match="fakejoint"):
      rl.resolve(config)  # not in the table yet.
  with algorithms.registered(entry) if registered else contextlib.nullcontext():
    exp, state, ckpt, _ = loop.setup(config, str(tmp_path / "run"))
    ckpt.close()
    assert exp.spec.algorithm is entry and exp.spec.sizes.m == config.rollout.m
    assert exp.spec.sizes.zero_groups == (config.rollout.zero_groups if entry.zero_set else 0)
    assert exp.guide is not None
    params0 = [np.array(x, copy=True) for x in jax.tree.leaves(state.params)]
    pos, timer = 0, PhaseTimer()
    with jax.set_mesh(exp.mesh):
      for _ in range(2):
        state, pos, metrics, samples = rl.rl_step(exp, state, pos, timer)
    exp.reward_runner.close()
  name = entry.terms[-1].name
  assert metrics["loss/skipped_updates"] == 0 and np.isfinite(metrics[f"loss/{name}"])
  assert "OFF" in {s["set"] for s in samples}
  assert any(np.abs(a - np.asarray(b)).max() > 0
             for a, b in zip(params0, jax.tree.leaves(state.params)))


def test_readme_shows_the_table():
  """README's excerpt of the table has every entry, with its flags as the table holds them."""
  rows = {}
  for line in open(os.path.join(REPO, "README.md"), encoding="utf-8"):
    m = re.match(r"\| `([\w-]+)` \| (yes|no) \| (yes|no) \| (yes|no) \| .* \| ([\w-]+) \| "
                 r"(symmetric|clip-higher) \|$", line.strip())
    if m:
      rows[m.group(1)] = m.groups()[1:]
  assert set(rows) == set(algorithms.names())
  yes = lambda b: "yes" if b else "no"
  for name, a in algorithms.TABLE.items():
    assert rows[name] == (yes(a.guided), yes(a.zero_set), yes(a.zero_to_on), a.loss_agg,
                          "symmetric" if a.symmetric_clip else "clip-higher"), name


def _worked_example() -> str:
  """The code block of algorithms.py's docstring (its indented lines after the prose)."""
  doc = algorithms.__doc__
  start = doc.index("  import jax\n")
  return textwrap.dedent(doc[start:doc.index("\nPut the form", start)])


def test_the_docstring_worked_example_adds_a_form_and_an_entry():
  """The docstring's CHORD-φ: a form, its registry entry and a table row give an algorithm whose
  objective equals its numpy reference, (1 − μ)·J_on + μ·mean_OFF(sg(φ)·log π), φ = p(1 − p)."""
  try:
    exec(_worked_example(), {})  # noqa: S102 — the repository's own docstring.
    entry = algorithms.get("chord_phi")
    cfg = entry.objective_config(sft_coef=0.3, dual_clip=None)
    rng = np.random.default_rng(0)
    b, t = 6, 5
    logp = -rng.uniform(0.05, 3.0, (b, t)).astype(np.float32)
    old = (logp + 0.1 * rng.standard_normal((b, t))).astype(np.float32)
    adv = rng.standard_normal(b).astype(np.float32)
    kind = np.array([ON, OFF, ON, OFF, ZERO, OFF], np.int32)
    mask = (rng.uniform(size=(b, t)) < 0.8).astype(np.float32)
    fn = lambda lp: objectives.objective(lp, old, old, adv, kind, mask, cfg)[0]
    loss, g = jax.value_and_grad(fn)(jnp.asarray(logp))
    m_on, m_off = mask * (kind == ON)[:, None], mask * (kind == OFF)[:, None]
    r = np.exp(logp - old)
    j_on = (np.minimum(r * adv[:, None], np.clip(r, 0.8, 1.28) * adv[:, None]) * m_on).sum()
    phi = np.exp(logp) * (1 - np.exp(logp))
    j_sft = (phi * logp * m_off).sum() / m_off.sum()
    np.testing.assert_allclose(loss, -(0.7 * j_on / m_on.sum() + 0.3 * j_sft), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g)[m_off > 0], (-0.3 * phi / m_off.sum())[m_off > 0],
                               rtol=1e-5)
    assert "phi_off" in objectives.objective(jnp.asarray(logp), old, old, adv, kind, mask,
                                             cfg)[1]
  finally:
    objectives.FORMS.pop("sft-phi", None)
    algorithms.TABLE.pop("chord_phi", None)
  assert "chord_phi" not in algorithms.names()
