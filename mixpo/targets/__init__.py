"""Compile targets: TPU slices and GPU hosts a program can be compiled for without the hardware.

`get(name)` names a `Target` ("v5e-16", "v5p-32", "v6e-8", "v4-32", "h100-8", "a100-8", "cpu-8");
`devices(target)` returns its devices (`jax.experimental.topologies`: compile-only TPU / GPU
devices, or simulated host devices for "cpu-N"), over which `sharding.make_mesh` builds the
mesh of `experiments/aot_compile.py`. A program traced under `jax.set_mesh` of such a mesh is
compiled for that platform by its own compiler (XLA:TPU from libtpu, XLA:GPU from jax's CUDA
plugin), kernels included (`mixpo.models.backend.platform()` reads the mesh's devices).

TPU names follow Cloud TPU's accelerator types: the count is of TensorCores for v4 / v5p (two per
chip, driven as one "megacore" device) and of chips for v5e / v6e. GPU targets are hosts of 8
GPUs (h100-16: two hosts); each GPU kind is described to XLA by a GpuTargetConfigProto text file
in this package (<kind>.txtpb), written by the project from the vendor's published device
properties. Needs, besides jax: `libtpu` (TPU targets) or `jax-cuda12-plugin` +
`jax-cuda12-pjrt` (GPU targets; no CUDA libraries or GPU needed); see BUILD_NOTES.
"""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # e.g. "v5e-16": the --topology value.
  platform: str  # "tpu" | "gpu" | "cpu".
  num_devices: int  # devices jax sees (megacore chips on v4 / v5p, GPUs, host devices).
  hbm_bytes: int | None  # memory of one device (None for cpu-N: host memory is shared).
  topology: str = ""  # TPU: "v5e:4x4"; GPU: "slices x hosts x GPUs per host".
  chip_config: str = "default"  # TPU: "megacore" for v4 / v5p.
  gpu_kind: str = ""  # GPU: the <kind>.txtpb target config of this package.


# Chips of a slice → its torus shape (2D for v5e / v6e, 3D for v4 / v5p).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
# generation → (topology prefix, cores per chip, chip_config, HBM GiB per chip)
_TPU = {"v4": ("v4", 2, "megacore", 32), "v5p": ("v5", 2, "megacore", 95),
        "v5e": ("v5e", 1, "default", 16), "v6e": ("v6e", 1, "default", 32)}
# GPU kind → HBM GiB per GPU
_GPU = {"h100": 80, "h200": 141, "a100": 80}
_GPUS_PER_HOST = 8
# Chips per TPU host as Cloud TPU VMs have them (it sets process indices only, not the program).
_CHIPS_PER_HOST = (2, 2, 1)


def names() -> list[str]:
  """Every target name `get` accepts (cpu-N: any N)."""
  out = []
  for gen, (_, cores, _, _) in _TPU.items():
    shapes = _SHAPES_2D if cores == 1 else _SHAPES_3D
    out += [f"{gen}-{chips * cores}" for chips in shapes]
  out += [f"{kind}-{n}" for kind in _GPU for n in (1, 8, 16, 32)]
  return out + ["cpu-N"]


def get(name: str) -> Target:
  """The target called `name`; ValueError naming the valid ones otherwise."""
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
  if m and m[1] in _TPU:
    prefix, cores, chip_config, hbm = _TPU[m[1]]
    count = int(m[2])
    shapes = _SHAPES_2D if cores == 1 else _SHAPES_3D
    if count % cores == 0 and count // cores in shapes:
      return Target(name, "tpu", count // cores, hbm * GIB,
                    topology=f"{prefix}:{shapes[count // cores]}", chip_config=chip_config)
  elif m and m[1] in _GPU:
    count = int(m[2])
    hosts = max(1, count // _GPUS_PER_HOST)
    if count in (1, 2, 4) or count % _GPUS_PER_HOST == 0:
      return Target(name, "gpu", count, _GPU[m[1]] * GIB,
                    topology=f"1x{hosts}x{count // hosts}", gpu_kind=m[1])
  elif m and m[1] == "cpu" and int(m[2]) > 0:
    return Target(name, "cpu", int(m[2]), None)
  raise ValueError(f"--topology={name!r} is not a known target; pick one of "
                   f"{', '.join(names())}.")


def gpu_target_config(kind: str) -> str:
  """The GpuTargetConfigProto text of GPU kind `kind` (the <kind>.txtpb file here)."""
  with open(os.path.join(os.path.dirname(__file__), f"{kind}.txtpb")) as f:
    return f.read()


def prepare_process(target: Target) -> None:
  """Process settings a compile-only run needs before jax starts a backend: jax computes on the
  host CPU only (an installed TPU / CUDA runtime is never initialised, so no chip, driver or
  metadata server is looked for), libtpu is told it is on one host (else it warns that it
  cannot find the TPU VM's worker list), and cpu-N targets get N host devices. Values already
  in the environment are kept. Several compile-only processes may load libtpu at once (it runs no
  TPU, so its one-process lock guards nothing here)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  if target.platform == "cpu":
    import jax  # noqa: PLC0415  (after the environment above)
    jax.config.update("jax_num_cpu_devices", target.num_devices)


def devices(target: Target) -> list:
  """The target's devices: compile-only TPU / GPU devices (their programs compile, never run),
  or host CPU devices for cpu-N. RuntimeError naming the missing package if its compiler is not
  installed."""
  import jax  # noqa: PLC0415
  from jax.experimental import topologies  # noqa: PLC0415
  if target.platform == "cpu":
    found = jax.devices("cpu")
    if len(found) < target.num_devices:
      raise RuntimeError(f"--topology={target.name}: {len(found)} host devices, not "
                         f"{target.num_devices}: jax's CPU backend started before "
                         "targets.prepare_process(); call it first.")
    return found[:target.num_devices]
  if target.platform == "tpu":
    try:
      topo = topologies.get_topology_desc(
          topology_name=target.topology, platform="tpu", chip_config_name=target.chip_config,
          chips_per_host_bounds=_CHIPS_PER_HOST, num_slices=1, wrap=(False, False, False))
    except RuntimeError as e:
      if "not installed" in str(e):
        raise RuntimeError(f"--topology={target.name} needs libtpu (XLA:TPU's compiler): "
                           "pip install 'mixpo[test]' or libtpu (BUILD_NOTES).") from None
      raise
  else:
    try:
      topo = topologies.get_topology_desc(
          platform="cuda", topology_name="cuda", topology=target.topology,
          target_config=gpu_target_config(target.gpu_kind))
    except NotImplementedError:
      raise RuntimeError(f"--topology={target.name} needs jax's CUDA plugin (XLA:GPU's "
                         "compiler): pip install jax-cuda12-plugin jax-cuda12-pjrt "
                         "(BUILD_NOTES).") from None
  found = list(topo.devices)
  if len(found) != target.num_devices:
    raise RuntimeError(f"--topology={target.name}: the topology {target.topology} has "
                       f"{len(found)} devices, expected {target.num_devices}.")
  return found
