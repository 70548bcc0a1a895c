"""Rollout engines other than mixpo's own JAX sampler (`mixpo.sampling.generate`).

  vllm.py  VllmEngine: an in-process vLLM engine (the `vllm` extra) whose `generate` returns a
           `sampling.Rollout`, its weights updated in place from the policy after each step.

Nothing is imported here: `mixpo.engines.vllm` imports vLLM itself only when an engine is built,
so mixpo installs and imports without it.
"""
