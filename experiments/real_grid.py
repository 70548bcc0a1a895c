"""The real-model grid (experiments/configs/compare_real.py): variants, models built by the binaries,
the two-stage SFT → DAPO cell.

One regime, "base": the converted pretrained model. Variants (`real_variants`):
  grpo, dapo              unguided RL from the base model;
  luffy, mix1, mix2       the online guide (m samples a prompt and step, πϕ scored by it), under
                          config.compare.shaping_grad;
  luffy_paper             LUFFY as published: the guide's offline traces, πϕ ≡ 1, its switches;
  sft                     SFT on the guide's traces (experiments/sft_baseline.py);
  sft_dapo                SFT → RL: SFT on the traces for config.compare.sft_stage_fraction of
                          the policy-token budget, then config.compare.sft_rl_algo (DAPO) from
                          that checkpoint for the rest (the SFT stage counts its trained tokens,
                          as the sft cell does);
  sft_mix                 single-stage SFT + RL: the table entry config.compare.sft_mix_algo
                          (CHORD: an SFT term on the OFF rows); absent when that field is "".
Models, built once per work root by the binaries a user runs (`prepare_real`), each reused while
its recipe file (the GGUF's sha256; the SFT flags and the base weights' sha256) matches:
  models/base/policy_init        experiments/convert_gguf.py --gguf=<compare.gguf>
  models/guide-same/guide        experiments/sft.py --init=<base> on the task's worked solutions
  models/guide-same/traces.jsonl the guide's samples (grid._ensure_traces)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import logging

from experiments import convert_gguf, grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGIME = "base"
SFT_STAGE = "sft_stage"  # its first stage's directory inside the cell's.


def real_variants(base) -> list[tuple[str, str, dict]]:
  """[(label, algo, overrides)] of the real grid (module docstring); names from the table."""
  from mixpo import algorithms  # noqa: PLC0415
  g = base.compare
  out = []
  for algo in algorithms.grids()["main"]:
    guided = algorithms.get(algo).guided
    out.append((algo, algo, {"objective.shaping_grad": g.shaping_grad} if guided else {}))
  paper = grid.luffy_paper_overrides()
  out.append(("luffy_paper", paper["algo"], {**paper, "objective.shaping_grad": g.shaping_grad,
                                             "guide.traces.only_correct": True}))
  out.append((grid.SFT, grid.SFT, {grid.RUNNER: grid.SFT, "guide.traces.only_correct": True}))
  out.append((f"sft_{g.sft_rl_algo}", g.sft_rl_algo, {grid.RUNNER: grid.SFT_RL,
                                                      "guide.traces.only_correct": True}))
  if g.sft_mix_algo:
    if g.sft_mix_algo not in algorithms.names():
      raise ValueError(f"config.compare.sft_mix_algo={g.sft_mix_algo!r} is not an entry of "
                       f"mixpo/algorithms.py's table ({algorithms.names()}); set it to the "
                       "single-stage SFT + RL entry, or '' to leave the variant out.")
    out.append(("sft_mix", g.sft_mix_algo, {"objective.shaping_grad": g.shaping_grad}))
  return out


def stage_budgets(base, budget: int) -> tuple[int, int]:
  """(SFT tokens, RL policy tokens) of an SFT → RL cell with a `budget` policy-token budget."""
  sft = max(1, int(round(budget * float(base.compare.sft_stage_fraction))))
  return sft, max(1, budget - sft)


def stage_configs(base, cell, workroot: str, budget: int):
  """(SFT stage config, RL stage config) of a two-stage cell: the sft variant's config with the
  SFT share of the budget and an export, then the cell's RL config from that export."""
  import dataclasses  # noqa: PLC0415

  sft_tokens, rl_tokens = stage_budgets(base, budget)
  overrides = tuple((k, v) for k, v in cell.overrides if k != grid.RUNNER) + ((grid.RUNNER,
                                                                               grid.SFT),)
  sft_cell = dataclasses.replace(cell, algo=grid.SFT, overrides=overrides)
  sft = grid.reasoning_config(base, sft_cell, workroot, sft_tokens)
  sft.export_hf = True
  rl = grid.reasoning_config(base, cell, workroot, rl_tokens)
  rl.policy = os.path.join(grid.cell_dir(workroot, cell), SFT_STAGE, "export")
  rl.guide.traces_path = ""  # DAPO reads no traces: only the SFT stage did.
  return sft, rl


def run_two_stage(sft_config, rl_config, workdir: str) -> dict:
  """Stage 1 (SFT into workdir/sft_stage, kept while its summary reached the budget, its export
  is there and its config is the same), then stage 2 (RL, `loop.run` in `workdir`: resumes from
  its checkpoints). A redone stage 1 clears stage 2: it would resume from another start."""
  import shutil  # noqa: PLC0415

  from experiments import sft_baseline  # noqa: PLC0415
  from mixpo import loop  # noqa: PLC0415
  stage = os.path.join(workdir, SFT_STAGE)
  fingerprint = json.loads(json.dumps(loop.fingerprint(sft_config), sort_keys=True, default=str))
  done = False
  try:
    with open(os.path.join(stage, "summary.json")) as f, \
        open(os.path.join(stage, "stage_config.json")) as g:
      done = (json.load(f).get("budget_reached", False) and json.load(g) == fingerprint
              and os.path.exists(os.path.join(stage, "export", "config.json")))
  except FileNotFoundError:
    pass
  if not done:
    for name in (SFT_STAGE, "checkpoints", "metrics.jsonl", "summary.json", "tb"):
      path = os.path.join(workdir, name)  # metrics.jsonl is appended to: start both clean.
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    os.makedirs(stage)
    with open(os.path.join(stage, "stage_config.json"), "w") as f:
      json.dump(fingerprint, f, sort_keys=True, indent=1)
    sft_baseline.run(sft_config, stage)
  return loop.run(rl_config, workdir)


def _build(cmd: list[str], out: str, recipe: dict) -> float:
  """Runs `cmd` (a binary of this repo) unless `out`/mixpo_recipe.json holds `recipe`; returns
  the seconds spent (0 when reused). The recipe file is written last: a crash means "rebuild"."""
  recipe_file = os.path.join(out, "mixpo_recipe.json")
  if os.path.exists(recipe_file):
    with open(recipe_file) as f:
      if json.load(f) == recipe:
        return 0.0
  logging.info("real grid: building %s: %s", out, " ".join(cmd))
  t0 = time.time()
  res = subprocess.run([sys.executable] + cmd, cwd=REPO, capture_output=True, text=True)
  if res.returncode != 0:
    raise RuntimeError(f"real grid: `python {' '.join(cmd)}` failed (exit {res.returncode}):\n"
                       f"{res.stderr[-3000:]}")
  seconds = time.time() - t0
  with open(recipe_file, "w") as f:
    json.dump(recipe, f, indent=1)
  with open(os.path.join(out, "build.json"), "w") as f:
    json.dump({"command": "python " + " ".join(cmd), "seconds": seconds,
               "stdout_tail": res.stdout[-2000:]}, f, indent=1)
  return seconds


def guide_sft_command(base, base_dir: str, out: str) -> list[str]:
  """experiments/sft.py's command line of the guide (config.compare.guide_sft)."""
  s = base.compare.guide_sft
  knobs = ",".join(f"{k}={v}" for k, v in sorted(dict(base.task_kwargs).items()))
  return ["experiments/sft.py", f"--init={base_dir}", f"--out={out}", f"--task={base.task}",
          f"--task_knobs={knobs}", f"--steps={s.steps}", f"--batch_size={s.batch_size}",
          f"--lr={s.lr}", f"--seed={s.seed}", f"--max_response_tokens={s.max_response_tokens}",
          f"--eval_size={s.eval_size}", f"--eval_max_new_tokens={s.eval_max_new_tokens}"]


def prepare_real(cells, base, workroot: str) -> dict:
  """Builds (or reuses) the base model, the guide and the trace file; {what: seconds now}."""
  paths = grid.reasoning_paths(workroot, REGIME, "same")
  g, spent = base.compare, {}
  source = convert_gguf.gguf_path(g.gguf)
  cmd = ["experiments/convert_gguf.py", f"--gguf={source}", f"--out={paths['policy']}"]
  os.makedirs(paths["policy"], exist_ok=True)
  # Recipes hold contents, not paths: a work root moved to another machine is reused.
  spent["base model"] = _build(cmd, paths["policy"], {"sha256": convert_gguf.sha256(source)})
  os.makedirs(paths["guide"], exist_ok=True)
  cmd = guide_sft_command(base, paths["policy"], paths["guide"])
  weights = convert_gguf.sha256(os.path.join(paths["policy"], "model.safetensors"))
  spent["guide"] = _build(cmd, paths["guide"], {"command": cmd[3:], "base": weights})
  if any(dict(c.overrides).get("guide.source") == "traces"
         or c.runner in (grid.SFT, grid.SFT_RL) for c in cells):
    spent["traces"] = grid._ensure_traces(base, paths)
  return spent
