r"""RL training binary: GRPO / DAPO / LUFFY / Mix-1 / Mix-2 on a task, with resume.

  python experiments/train.py --config=default --workdir=workdir/default
  python experiments/train.py --config=experiments/configs/smoke.py --workdir=/tmp/s --algo=dapo
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.configs import resolve_config_path  # noqa: E402

for i, arg in enumerate(sys.argv):
  if arg.startswith("--config="):
    sys.argv[i] = "--config=" + resolve_config_path(arg.split("=", 1)[1])

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (or a short "
                                          "name: default, smoke, qwen2.5-math-1.5b).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, plots).")
_ALGO = flags.DEFINE_enum("algo", None, ["grpo", "dapo", "luffy", "mix1", "mix2"],
                          "Shortcut for --config.algo.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                 "(multi-host TPU pods / GPU clusters).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port "
                                   "of process 0 (default: auto-detected on TPU / SLURM / MPI, or "
                                   "$JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: the number of "
                                      "processes (default: auto-detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index "
                                   "(default: auto-detected).")


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from mixpo import loop
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  if _ALGO.value:
    config.algo = _ALGO.value
  try:
    summary = loop.run(config, _WORKDIR.value)
  except KeyboardInterrupt:  # a second Ctrl-C: the last checkpoint is intact, the step is lost.
    print("interrupted: stopped without finishing the step; rerun the same command to resume "
          "from the last checkpoint", file=sys.stderr)
    sys.exit(130)
  logging.info("summary: %s", summary)
  print("summary:", {k: v for k, v in summary.items() if k != "plots"})


if __name__ == "__main__":
  app.run(main)
