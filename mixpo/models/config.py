"""`ModelConfig`: the decoder's hyper-parameters, parsed from a Hugging Face config.json.

One decoder covers the Llama family as implemented in transformers; the families differ only in
the switches of `FAMILIES` (one row per config.json `model_type`):
  llama  (Llama 2 / 3 / 3.1; rope "llama3" scaling, optional attention_bias on q/k/v/o)
  qwen2  (Qwen2 / Qwen2.5; bias on q/k/v only, tied or untied embeddings)
  qwen3  (Qwen3; RMSNorm on q and k per head, explicit head_dim, optional attention_bias)
docs/models.md says how to add a family. Anything else fails in `from_hf_config` with an error
naming the config.json field and value, as do sizes that are not positive integers, head counts
that do not divide, an odd head_dim, a rope_theta / rms_norm_eps / rope factor that is not a
finite number > 0 (they give NaN logits), and any field read of the wrong JSON type (a quoted
"false" where a boolean belongs, a string where a list or object belongs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax.numpy as jnp
import numpy as np



@dataclasses.dataclass(frozen=True)
class Family:
  """How a config.json `model_type` sets the decoder's per-family switches (`ModelConfig`)."""
  qkv_bias: bool | None  # bias on the q/k/v projections; None: config.json `attention_bias`.
  o_bias: bool | None  # bias on the output projection; None: config.json `attention_bias`.
  qk_norm: bool  # per-head RMSNorm on q and k before RoPE.


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias=None, o_bias=None, qk_norm=False),
    "qwen2": Family(qkv_bias=True, o_bias=False, qk_norm=False),
    "qwen3": Family(qkv_bias=None, o_bias=None, qk_norm=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
ATTENTION_IMPLS = ("auto", "xla", "dot_product_attention", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of `CausalLM`; hashable, so it can live on the module as static data."""
  model_type: str  # "llama" | "qwen2" | "qwen3" (config.json `model_type`).
  vocab_size: int  # V: rows of the embedding / columns of the logits.
  hidden_size: int  # D: residual stream width.
  intermediate_size: int  # F: SwiGLU MLP width.
  num_layers: int  # L: decoder blocks (`num_hidden_layers`).
  num_heads: int  # N: query heads (`num_attention_heads`).
  num_kv_heads: int  # K: key/value heads (GQA; N % K == 0).
  head_dim: int  # H: per-head width (explicit in Qwen3, else D // N).
  max_position_embeddings: int  # longest context the checkpoint was built for.
  rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm.
  rope_theta: float = 10000.0  # RoPE base wavelength.
  rope_type: str = "default"  # "default" | "llama3" | "linear".
  rope_factor: float = 1.0  # llama3 / linear scaling factor.
  rope_low_freq_factor: float = 1.0  # llama3 only.
  rope_high_freq_factor: float = 4.0  # llama3 only.
  rope_original_max_position_embeddings: int = 8192  # llama3 only: pre-scaling context.
  qkv_bias: bool = False  # bias on q/k/v projections (always on in Qwen2).
  o_bias: bool = False  # bias on the output projection (Llama/Qwen3 `attention_bias`).
  qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3).
  tie_word_embeddings: bool = False  # logits use embed/embedding^T instead of lm_head/kernel.
  dtype: Any = jnp.float32  # compute dtype of activations and matmuls (float32 or bfloat16).
  param_dtype: Any = jnp.float32  # storage dtype of the parameters.
  remat: bool = False  # rematerialise each decoder block in the backward pass (models/remat.py).
  # "auto" (by backend) | "xla" | "dot_product_attention" | "cudnn" | "pallas": see
  # mixpo/models/attention.py.
  attention_impl: str = "auto"
  # The source config.json, re-emitted by save_pretrained (keeps token ids etc.); not compared.
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def __post_init__(self):
    # A backstop for configs built directly (from_hf_config has checked config.json already,
    # naming its fields): bad sizes would otherwise divide by zero or give NaN logits.
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      positive_int(name, getattr(self, name), where="ModelConfig.")
    for name in ("rms_norm_eps", "rope_theta", "rope_factor"):
      positive_float(name, getattr(self, name), where="ModelConfig.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r} is not one of "
                       f"{ATTENTION_IMPLS}; pick one of those.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_kv_heads}; fix config.json.")
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"rope type {self.rope_type!r} is not supported (supported: "
                       f"{SUPPORTED_ROPE_TYPES}).")

  @property
  def hf_config(self) -> dict:
    return json.loads(self.hf_config_json)


OPTION_NAMES = ("dtype", "param_dtype", "remat", "attention_impl")
# config.json fields every supported family must have.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads")


def positive_int(field: str, value, where: str = "config.json field ") -> int:
  """`value` if it is an integer > 0 (not a bool, not 64.0), else ValueError naming `field`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{where}{field}={value!r} must be a positive integer; fix it.")
  return int(value)


def positive_float(field: str, value, where: str = "config.json field ") -> float:
  """`value` as a float if it is a finite number > 0, else ValueError naming `field`."""
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
      or not math.isfinite(value) or value <= 0):
    raise ValueError(f"{where}{field}={value!r} must be a finite number > 0 (zero or negative "
                     "values give NaN logits); fix it.")
  return float(value)


def boolean(field: str, value, default: bool) -> bool:
  """A JSON true / false (`default` when absent or null), else ValueError naming `field`.

  A string such as "false" is refused, not read as truthy: it would flip the setting silently.
  """
  if value is None:
    return default
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"config.json field {field}={value!r} must be true or false (a JSON "
                     "boolean, unquoted); fix it.")
  return bool(value)


def _number(field: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"config.json field {field}={value!r} must be a number; fix it.")
  return float(value)


def _rope_fields(hf: dict) -> dict:
  """Reads rope settings in both config.json styles: transformers>=5 `rope_parameters`
  and the older `rope_theta` + `rope_scaling`."""
  params = hf.get("rope_parameters")
  group = "rope_parameters" if params is not None else "rope_scaling"
  if params is None:
    params = hf.get("rope_scaling")
    params = {} if params is None else params
    if not isinstance(params, dict):
      raise ValueError(f"config.json field rope_scaling={params!r} must be an object or null; "
                       "fix it.")
    params = dict(params)
    if "rope_theta" in hf:
      params["rope_theta"] = hf["rope_theta"]
  if not isinstance(params, dict):
    raise ValueError(f"config.json field rope_parameters={params!r} must be an object; fix it.")
  if "rope_type" not in params and "type" in params:  # pre-4.45 spelling.
    params = {**params, "rope_type": params["type"]}
  field = f"{group}.rope_type"
  rope_type = params.get("rope_type", "default")
  if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
    raise ValueError(f"config.json field {field}={rope_type!r} is not supported; supported rope "
                     f"types: {SUPPORTED_ROPE_TYPES}.")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if _number("partial_rotary_factor", partial) != 1.0:
    raise ValueError(f"config.json field partial_rotary_factor={partial} is not supported "
                     "(only full rotary embeddings, 1.0).")
  prefix = field.rsplit(".", 1)[0]
  theta_field = "rope_parameters.rope_theta" if "rope_parameters" in hf else "rope_theta"

  def get(key):
    if key not in params:
      raise ValueError(f"config.json field {prefix} lacks {key!r}, which rope type "
                       f"{rope_type!r} requires; add it.")
    return params[key]

  out = dict(rope_theta=positive_float(theta_field, params.get("rope_theta", 10000.0)),
             rope_type=rope_type)
  if rope_type in ("llama3", "linear"):
    out["rope_factor"] = positive_float(f"{prefix}.factor", get("factor"))
  if rope_type == "llama3":
    low = positive_float(f"{prefix}.low_freq_factor", get("low_freq_factor"))
    high = positive_float(f"{prefix}.high_freq_factor", get("high_freq_factor"))
    if high <= low:  # The smoothing divides by high - low.
      raise ValueError(f"config.json field {prefix}.high_freq_factor={high!r} must exceed "
                       f"low_freq_factor={low!r}; fix it.")
    out.update(rope_low_freq_factor=low, rope_high_freq_factor=high,
               rope_original_max_position_embeddings=positive_int(
                   f"{prefix}.original_max_position_embeddings",
                   get("original_max_position_embeddings")))
  return out


def from_hf_config(hf_config, **options) -> ModelConfig:
  """`ModelConfig` from a config.json dict or a transformers `PretrainedConfig`.

  options: any of dtype, param_dtype, remat, attention_impl (see ModelConfig).
  Raises ValueError naming the config.json field and value of an unsupported or invalid setting
  (`hf_io.from_pretrained` adds the file's path and checks num_hidden_layers against the tensors).
  """
  hf = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
  hf = {k: v for k, v in hf.items() if k != "_name_or_path"}
  unknown = set(options) - set(OPTION_NAMES)
  if unknown:
    raise TypeError(f"unknown model options {sorted(unknown)}; allowed: {OPTION_NAMES}.")
  # Every field read here is type-checked: JSON written by hand or by other tools may quote a
  # boolean ("false" is truthy) or nest a value differently, and a wrong type must not pass as
  # another setting.
  model_type = hf.get("model_type")
  if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"config.json field model_type={model_type!r} is not supported; supported: "
                     f"{SUPPORTED_MODEL_TYPES}.")
  archs = hf.get("architectures")
  if archs is not None and (not isinstance(archs, list)
                            or not all(isinstance(a, str) for a in archs)):
    raise ValueError(f"config.json field architectures={archs!r} must be a list of class names "
                     "(e.g. [\"Qwen2ForCausalLM\"]); fix it.")
  for arch in archs or ():
    if not arch.endswith("ForCausalLM"):
      raise ValueError(f"config.json field architectures={hf['architectures']!r} is not a causal "
                       "LM; only *ForCausalLM checkpoints are supported.")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json field hidden_act={act!r} is not supported (only 'silu').")
  if boolean("use_sliding_window", hf.get("use_sliding_window"), False):
    raise ValueError("config.json field use_sliding_window=true is not supported; set it false "
                     "(full causal attention only).")
  if boolean("mlp_bias", hf.get("mlp_bias"), False):
    raise ValueError("config.json field mlp_bias=true is not supported.")
  missing = [f for f in REQUIRED_FIELDS if f not in hf]
  if missing:
    raise ValueError(f"config.json is missing field {', '.join(missing)} (required for "
                     f"model_type={model_type!r}); add it.")
  sizes = {f: positive_int(f, hf[f]) for f in REQUIRED_FIELDS}
  num_heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
  num_kv_heads = hf.get("num_key_value_heads")
  num_kv_heads = (num_heads if num_kv_heads is None
                  else positive_int("num_key_value_heads", num_kv_heads))
  if num_heads % num_kv_heads:
    raise ValueError(f"config.json field num_key_value_heads={num_kv_heads!r} does not divide "
                     f"num_attention_heads={num_heads}: grouped-query attention shares each kv "
                     "head among an equal number of query heads; fix config.json.")
  head_dim = hf.get("head_dim")
  if head_dim is None:
    if hidden % num_heads:
      raise ValueError(f"config.json field hidden_size={hidden!r} is not a multiple of "
                       f"num_attention_heads={num_heads} and there is no head_dim field; fix "
                       "config.json (or give head_dim explicitly).")
    head_dim = hidden // num_heads
  head_dim = positive_int("head_dim", head_dim)
  if head_dim % 2:
    raise ValueError(f"config.json field head_dim={head_dim!r} (hidden_size / "
                     "num_attention_heads when absent) is odd; rotary embeddings rotate pairs "
                     "of dimensions, so it must be even. Fix config.json.")
  attention_bias = boolean("attention_bias", hf.get("attention_bias"), False)
  family = FAMILIES[model_type]
  return ModelConfig(
      model_type=model_type,
      vocab_size=sizes["vocab_size"],
      hidden_size=hidden,
      intermediate_size=sizes["intermediate_size"],
      num_layers=sizes["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      max_position_embeddings=positive_int("max_position_embeddings",
                                           hf.get("max_position_embeddings", 2048)),
      rms_norm_eps=positive_float("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
      o_bias=attention_bias if family.o_bias is None else family.o_bias,
      qk_norm=family.qk_norm,
      tie_word_embeddings=boolean("tie_word_embeddings", hf.get("tie_word_embeddings"), False),
      hf_config_json=json.dumps(hf, sort_keys=True),
      **_rope_fields(hf),
      **options,
  )


@functools.lru_cache(maxsize=64)
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] float32, as transformers' ROPE_INIT_FUNCTIONS compute them."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv = inv.astype(np.float32)
  if config.rope_type == "linear":
    inv = inv / np.float32(config.rope_factor)
  elif config.rope_type == "llama3":
    factor, old_len = config.rope_factor, config.rope_original_max_position_embeddings
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)
