"""algorithms.py: the table is the one place algorithms are named; a new entry runs end to end."""

import os
import re

import jax
import numpy as np
import pytest

from experiments import grid
from experiments.configs import compare as compare_config
from experiments.configs import smoke
from mixpo import algorithms, builtin, loop, rl
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


def test_no_algorithm_is_named_outside_the_table():
  """Code outside the table, configs and docs never matches an algorithm by name."""
  pattern = re.compile(r"""["'](grpo|mix1|mix2)["']|(?<!for )\balgo\s*(==|!=|in)\s""")
  hits = []
  for top in ("mixpo", "experiments"):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      if os.path.join("experiments", "configs") in root:
        continue
      for f in files:
        path = os.path.join(root, f)
        if f.endswith(".py") and not path.endswith(os.path.join("mixpo", "algorithms.py")):
          for i, line in enumerate(open(path, encoding="utf-8"), 1):
            if pattern.search(line):
              hits.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
  assert not hits, "\n".join(hits)


def test_a_registered_entry_runs_end_to_end(tmp_path):
  builtin_dir = str(tmp_path / "builtin")
  builtin.ensure_builtin_models(builtin_dir, smoke.get_config().builtin)
  config = smoke.get_config()
  config.builtin_dir, config.export_hf, config.algo = builtin_dir, False, "fakejoint"
  config.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}
  with pytest.raises(ValueError, match="fakejoint"):
    rl.resolve(config)  # not in the table yet.
  with algorithms.registered(FAKE):
    exp, state, ckpt, _ = loop.setup(config, str(tmp_path / "run"))
    ckpt.close()
    assert exp.spec.algorithm is FAKE and exp.spec.sizes.m == config.m
    assert exp.spec.sizes.zero_groups == config.zero_groups and exp.guide is not None
    params0 = [np.array(x, copy=True) for x in jax.tree.leaves(state.params)]
    pos, timer = 0, PhaseTimer()
    with jax.set_mesh(exp.mesh):
      for _ in range(2):
        state, pos, metrics, samples = rl.rl_step(exp, state, pos, timer)
    exp.reward_runner.close()
  assert metrics["loss/skipped_updates"] == 0 and np.isfinite(metrics["loss/j_joint"])
  assert "OFF" in {s["set"] for s in samples}
  assert any(np.abs(a - np.asarray(b)).max() > 0
             for a, b in zip(params0, jax.tree.leaves(state.params)))
