r"""RL training binary: any algorithm of mixpo/algorithms.py's table on a task, with resume.

  python experiments/train.py --config=default --workdir=workdir/default
  python experiments/train.py --config=experiments/configs/smoke.py --workdir=/tmp/s --algo=dapo
  python experiments/train.py --config=default --workdir=/tmp/mine --config.task=file \
      --config.task_kwargs.train_path=data/train.jsonl --config.policy=/models/my_hf_checkpoint

Every error in the flags (an unknown or mistyped field, a bad value, a missing file) is one line
on stderr naming the flag, exit code 2 (mixpo/cli.py). --verbosity=0 shows third-party INFO logs.
"""

import ipaddress
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mixpo import cli  # noqa: E402
from mixpo import algorithms  # noqa: E402  (the table only: no jax computation at import)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (or a short "
                                          "name: default, smoke, qwen2.5-math-1.5b).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, plots).")
_ALGO = flags.DEFINE_enum("algo", None, list(algorithms.names()), "Shortcut for --config.algo.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                 "(multi-host TPU pods / GPU clusters).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port "
                                   "of process 0 (default: auto-detected on TPU / SLURM / MPI, or "
                                   "$JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: the number of "
                                      "processes (default: auto-detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index "
                                   "(default: auto-detected).")
_BIND = flags.DEFINE_string("coordinator_bind_address", None, "With --distributed: host:port the "
                            "coordinator service (process 0) listens on (default: "
                            "$JAX_COORDINATOR_BIND_ADDRESS, else the coordinator address itself, "
                            "never all interfaces; 0.0.0.0:port to listen on every interface).")


def distributed_kwargs(coordinator_address, num_processes, process_id, bind_address) -> dict:
  """Arguments of jax.distributed.initialize; binds the coordinator to its own address.

  Left to itself jax binds process 0's coordinator service to [::]:port, every interface of the
  host. Without an explicit bind address (flag or $JAX_COORDINATOR_BIND_ADDRESS) this binds it
  to the coordinator address, which jax's cluster detection (TPU, SLURM, MPI) finds when unset.
  """
  kwargs = dict(coordinator_address=coordinator_address or os.environ.get(
      "JAX_COORDINATOR_ADDRESS"), num_processes=num_processes, process_id=process_id)
  if bind_address or os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
    return dict(kwargs, coordinator_bind_address=bind_address)  # None: jax reads the env.
  if None in kwargs.values():
    from jax._src import clusters  # noqa: PLC0415  (the detection initialize() would run)
    address, n, i, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        kwargs["coordinator_address"], num_processes, process_id, None, None, 300)
    kwargs = dict(coordinator_address=address, num_processes=n, process_id=i,
                  local_device_ids=local_ids)
  address = kwargs["coordinator_address"]
  if address is None:
    raise app.UsageError("--distributed: no coordinator address given or detected; pass "
                         "--coordinator_address=host:port.")
  host = address.rsplit(":", 1)[0].strip("[]")
  try:
    loopback = all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, 0))
  except (OSError, ValueError):
    loopback = False
  if loopback and host != "localhost" and not host.startswith(("127.", "::1")):
    logging.warning("--distributed: the coordinator address %s resolves to a loopback address on "
                    "this host, so the coordinator bound to it is unreachable from other hosts; "
                    "pass --coordinator_bind_address=<this host's cluster IP>:port.", address)
  return dict(kwargs, coordinator_bind_address=address)


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize(**distributed_kwargs(_COORDINATOR.value, _NUM_PROCESSES.value,
                                                    _PROCESS_ID.value, _BIND.value))
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required, e.g. --config=default "
                         "--workdir=workdir/default.")
  if _ALGO.value:
    config.algo = _ALGO.value
  cli.check_config(config)  # before any model is built or any directory made.
  from mixpo import loop
  try:
    summary = loop.run(config, _WORKDIR.value)
  except KeyboardInterrupt:  # a second Ctrl-C: the last checkpoint is intact, the step is lost.
    print("interrupted: stopped without finishing the step; rerun the same command to resume "
          "from the last checkpoint", file=sys.stderr)
    sys.exit(130)
  from mixpo import logging as mlog
  print(mlog.format_summary(summary, _WORKDIR.value), flush=True)


if __name__ == "__main__":
  cli.run(main)
