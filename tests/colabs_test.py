"""colabs/*.ipynb execute headless (nbclient, python3 kernel) in small mode (MIXPO_SMALL=1)."""

import math
import os

import nbformat
import pytest
from nbclient import NotebookClient

from mixpo import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("quickstart", "objectives", "results")


def _synthetic_results(directory):
  """A main.csv of 2 algos × 2 seeds × 1 regime (test data, not results)."""
  rows = []
  for algo, slope in (("dapo", 1.0), ("mix2", 2.0)):
    for seed in (0, 1):
      meta = {"grid": "main", "regime": "weak", "policy_steps": 120, "variant": algo,
              "algo": algo, "scheme": "dapo", "gamma": 0.1, "seed": seed,
              "cell": f"{algo}-dapo-s{seed}"}
      for step in (0, 5, 10):
        train = math.nan if step == 0 else 0.02 * slope * step
        rows.append({**meta, "step": step, "policy_tokens": 100 * step + seed,
                     "guide_tokens": 20 * step if algo == "mix2" else 0, "train_reward": train,
                     "train_accuracy": train,
                     "eval_accuracy": 0.1 + (0.03 * slope + 0.01 * seed) * step,
                     "response_length": 4.0, "entropy": 1.0, "wall_s": float(step)})
  analysis.write_csv(rows, os.path.join(directory, "main.csv"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_small_mode(name, tmp_path, monkeypatch):
  # The kernel inherits this process's environment.
  monkeypatch.setenv("MIXPO_SMALL", "1")
  monkeypatch.setenv("MIXPO_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("MIXPO_RESULTS_DIR", str(tmp_path / "results"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  _synthetic_results(str(tmp_path / "results"))
  path = os.path.join(COLABS, f"{name}.ipynb")
  nb = nbformat.read(path, as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      f"{path}: commit notebooks without outputs (Kernel → Restart & Clear Output).")
  client = NotebookClient(nb, timeout=240, kernel_name="python3",
                          resources={"metadata": {"path": COLABS}})
  client.execute()  # raises CellExecutionError naming the cell on any error.
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, f"{name}.ipynb drew no figure"
