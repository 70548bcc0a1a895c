"""mixpo: RL with verifiable rewards for causal LMs in JAX/Flax NNX (DAPO, LUFFY, Mix-1, Mix-2).

Importing mixpo changes nothing process-global (allocator, jax config, mesh): binaries call
`mixpo.hostmem.keep_freed_memory()` themselves, first in main.
"""

__version__ = "0.1.0"
