"""colabs/*.ipynb execute headless (nbclient, python3 kernel) in small mode (MIXPO_SMALL=1), their
shared install cell in local mode (MIXPO_INSTALL=local: this checkout, nothing installed); the
install cell's Colab paths are checked as commands (dry) and as the error that says what to set."""

import math
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from mixpo import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("quickstart", "objectives", "results", "own_model")


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
  monkeypatch.setenv("MIXPO_INSTALL", "local")
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


def _first_code_cell(name):
  nb = nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code")


def test_every_notebook_opens_with_the_same_install_cell():
  cells = {name: _first_code_cell(name) for name in NOTEBOOKS}
  assert len(set(cells.values())) == 1, "the install cells differ between notebooks"
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)
    assert "colab-badge" in nb.cells[0].source, f"{name}.ipynb: no Open in Colab badge"


def test_install_cell_in_colab_mode_clones_and_installs_for_the_accelerator(tmp_path):
  # Dry mode prints the commands Colab would run; the clone target does not exist yet.
  env = dict(os.environ, MIXPO_INSTALL="dry", MIXPO_CLONE_DIR=str(tmp_path / "mixpo"),
             MIXPO_REPO_URL="https://example.org/fork/mixpo")
  env.pop("COLAB_TPU_ADDR", None)
  out = subprocess.run([sys.executable, "-c", _first_code_cell("quickstart")], env=env,
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == f"$ git clone --depth=1 https://example.org/fork/mixpo {tmp_path / 'mixpo'}"
  assert lines[1].startswith(f"$ {sys.executable} -m pip install -q -e {tmp_path / 'mixpo'}")
  assert "-c constraints.txt" not in lines[1]  # Colab keeps its own jax / numpy where it can.


def test_install_cell_without_a_repository_says_what_to_set(tmp_path):
  # Before: it cloned the placeholder https://github.com/YOUR_ORG/mixpo and failed in git.
  env = dict(os.environ, MIXPO_INSTALL="clone", MIXPO_CLONE_DIR=str(tmp_path / "mixpo"))
  env.pop("MIXPO_REPO_URL", None)
  out = subprocess.run([sys.executable, "-c", _first_code_cell("quickstart")], env=env,
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert "set REPO_URL in this cell to the git URL of your mixpo repository" in last, last
  assert not os.path.exists(tmp_path / "mixpo")
  for name in os.listdir(COLABS):
    assert "YOUR_ORG" not in open(os.path.join(COLABS, name)).read(), name
