"""mixpo: RL with verifiable rewards for causal LMs in JAX/Flax NNX (DAPO, LUFFY, Mix-1, Mix-2)."""

# First, before jax's first computation: host allocator settings (see mixpo/hostmem.py).
from mixpo import hostmem as _hostmem

_hostmem.keep_freed_memory()

__version__ = "0.1.0"
