"""mixpo: DAPO and mixed-policy RL (Mix-1 / Mix-2) for causal LMs in JAX / Flax NNX.

Versions are pinned to a set that installs and passes the suite together on CPU Python 3.11
(see BUILD_NOTES.md for why each pin).
"""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "absl-py==2.5.1",
    "ml_collections==1.1.0",
    "numpy==2.4.6",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "math-verify==0.9.0",
    "reasoning-gym==0.1.25",
    "pyarrow==26.0.1",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        # CPU build; `pip install torch==2.13.0` takes the wheel shipped on this machine.
        "torch==2.13.0",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
    ],
    "bench": ["torch==2.13.0"],
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
