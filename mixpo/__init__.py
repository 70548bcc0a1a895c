"""mixpo: RL with verifiable rewards for causal LMs in JAX/Flax NNX (DAPO, LUFFY, Mix-1, Mix-2)."""

__version__ = "0.1.0"
