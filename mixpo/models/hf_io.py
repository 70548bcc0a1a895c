"""Hugging Face checkpoints in and out: config.json + *.safetensors <-> `CausalLM`.

HF_NAME_TABLE is the one mapping between transformers tensor names and mixpo parameter paths
(`{i}` = layer index; "T" = stored transposed: torch Linear.weight is [out, in], kernel is
[in, out]). Partition rules can match the mixpo paths with regexes like r"layers/\\d+/attn/q_proj/kernel".

  HF tensor                                        mixpo path                        shape (mixpo)
  model.embed_tokens.weight                        embed/embedding                   [V, D]
  model.layers.{i}.input_layernorm.weight          layers/{i}/attn_norm/scale        [D]
  model.layers.{i}.self_attn.q_proj.weight     T   layers/{i}/attn/q_proj/kernel     [D, N*H]
  model.layers.{i}.self_attn.q_proj.bias           layers/{i}/attn/q_proj/bias       [N*H]  qkv_bias
  model.layers.{i}.self_attn.k_proj.weight     T   layers/{i}/attn/k_proj/kernel     [D, K*H]
  model.layers.{i}.self_attn.k_proj.bias           layers/{i}/attn/k_proj/bias       [K*H]  qkv_bias
  model.layers.{i}.self_attn.v_proj.weight     T   layers/{i}/attn/v_proj/kernel     [D, K*H]
  model.layers.{i}.self_attn.v_proj.bias           layers/{i}/attn/v_proj/bias       [K*H]  qkv_bias
  model.layers.{i}.self_attn.o_proj.weight     T   layers/{i}/attn/o_proj/kernel     [N*H, D]
  model.layers.{i}.self_attn.o_proj.bias           layers/{i}/attn/o_proj/bias       [D]    o_bias
  model.layers.{i}.self_attn.q_norm.weight         layers/{i}/attn/q_norm/scale      [H]    qk_norm
  model.layers.{i}.self_attn.k_norm.weight         layers/{i}/attn/k_norm/scale      [H]    qk_norm
  model.layers.{i}.post_attention_layernorm.weight layers/{i}/mlp_norm/scale         [D]
  model.layers.{i}.mlp.gate_proj.weight        T   layers/{i}/mlp/gate_proj/kernel   [D, F]
  model.layers.{i}.mlp.up_proj.weight          T   layers/{i}/mlp/up_proj/kernel     [D, F]
  model.layers.{i}.mlp.down_proj.weight        T   layers/{i}/mlp/down_proj/kernel   [F, D]
  model.norm.weight                                final_norm/scale                  [D]
  lm_head.weight                               T   lm_head/kernel                    [D, V]  untied
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from mixpo.models.config import ModelConfig, from_hf_config
from mixpo.models.model import CausalLM

# (HF name template, mixpo path template, transposed); the table in the module docstring.
HF_NAME_TABLE = (
    ("model.embed_tokens.weight", "embed/embedding", False),
    ("model.layers.{i}.input_layernorm.weight", "layers/{i}/attn_norm/scale", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/q_proj/kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/{i}/attn/q_proj/bias", False),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/attn/k_proj/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/{i}/attn/k_proj/bias", False),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/attn/v_proj/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/{i}/attn/v_proj/bias", False),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/o_proj/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers/{i}/attn/o_proj/bias", False),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/{i}/attn/q_norm/scale", False),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/{i}/attn/k_norm/scale", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/mlp_norm/scale", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/{i}/mlp/gate_proj/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/{i}/mlp/up_proj/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/{i}/mlp/down_proj/kernel", True),
    ("model.norm.weight", "final_norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)
# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")

_SAFE_DTYPES = {"F32": jnp.float32, "F16": jnp.float16, "BF16": jnp.bfloat16, "F64": jnp.float64}


def param_path(var_path) -> str:
  """"layers/3/attn/q_proj/kernel" from an nnx state path tuple."""
  return "/".join(str(k) for k in var_path)


def _abstract_model(config: ModelConfig) -> CausalLM:
  return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))


def hf_names(model: CausalLM) -> dict[str, tuple[str, bool]]:
  """{HF tensor name: (mixpo path, transposed)} for every parameter of `model`."""
  by_path = {}
  for i in range(model.config.num_layers):
    for hf, path, transposed in HF_NAME_TABLE:
      by_path[path.format(i=i)] = (hf.format(i=i), transposed)
  out = {}
  for var_path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path = param_path(var_path)
    if path not in by_path:
      raise KeyError(f"parameter {path} has no entry in hf_io.HF_NAME_TABLE; add one.")
    hf, transposed = by_path[path]
    out[hf] = (path, transposed)
  return out


def _variable(model: CausalLM, path: str) -> nnx.Variable:
  obj = model
  for key in path.split("/"):
    obj = obj[int(key)] if key.isdigit() else getattr(obj, key)
  return obj


def _read_config(path: str) -> dict:
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no config.json in {path!r}: pass a Hugging Face checkpoint "
                            "directory (config.json + *.safetensors).")
  with open(config_file) as f:
    return json.load(f)


def _weight_files(path: str) -> dict[str, list[str]]:
  """{safetensors file: [tensor names]} from the index, or from the single model.safetensors."""
  index_file = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index_file):
    with open(index_file) as f:
      weight_map = json.load(f)["weight_map"]
    files = collections.defaultdict(list)
    for name, file in weight_map.items():
      files[os.path.join(path, file)].append(name)
    return dict(files)
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    with safe_open(single, framework="numpy") as f:
      return {single: list(f.keys())}
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}; "
                          "only safetensors checkpoints are supported (convert .bin with "
                          "transformers' save_pretrained(safe_serialization=True)).")


def from_pretrained(path: str, shardings=None, **options) -> CausalLM:
  """Loads a Hugging Face checkpoint directory into a `CausalLM`.

  options: dtype (compute), param_dtype (storage; tensors are cast), remat, attention_impl.
  Tensors are read one at a time with safe_open, so host memory holds at most one tensor
  beyond the model itself. shardings: None (tensors land on the default device), or
  `fn(param_path, shape) -> jax.sharding.Sharding` (`mixpo.sharding.path_shardings(mesh)`):
  each tensor is then built with make_array_from_callback, every device reading only its own
  slice of the file (no full copy on one device; multi-host: each process reads its shards). Raises naming the tensor and file on missing / unexpected tensors,
  wrong shapes or non-float dtypes.
  """
  config = from_hf_config(_read_config(path), **options)
  model = _abstract_model(config)
  expected = hf_names(model)
  files = _weight_files(path)
  loaded = set()
  for file, names in files.items():
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file!r} is listed in model.safetensors.index.json of {path!r} "
                              "but does not exist; re-download the checkpoint.")
    # numpy slices (bf16 via ml_dtypes): host memory only, never an array on the mesh (under
    # jax.set_mesh a jax array would be replicated over every device, and in a multi-process run
    # could not be handed to make_array_from_callback).
    with safe_open(file, framework="numpy") as f:
      available = set(f.keys())
      for name in names:
        if _IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
          continue
        if name not in expected:
          raise ValueError(f"unexpected tensor {name!r} in {file!r}: not a parameter of a "
                           f"{config.model_type} model with this config.json (check model_type, "
                           "attention_bias, tie_word_embeddings).")
        if name not in available:
          raise ValueError(f"tensor {name!r} is listed for {file!r} in the index but missing "
                           "from the file.")
        mixpo_path, transposed = expected[name]
        var = _variable(model, mixpo_path)
        want = tuple(var.get_value().shape)
        tensor_slice = f.get_slice(name)
        shape = tuple(tensor_slice.get_shape())
        dtype = tensor_slice.get_dtype()
        if dtype not in _SAFE_DTYPES:
          raise ValueError(f"tensor {name!r} in {file!r} has dtype {dtype}; expected a float "
                           f"dtype ({sorted(_SAFE_DTYPES)}).")
        got = shape[::-1] if transposed else shape
        if got != want:
          want_hf = want[::-1] if transposed else want
          raise ValueError(f"tensor {name!r} in {file!r} has shape {shape}, config.json implies "
                           f"{want_hf}; the checkpoint and its config.json disagree.")
        if shardings is None:
          value = f.get_tensor(name)
          value = jnp.asarray((value.T if transposed else value).astype(config.param_dtype))
        else:
          value = jax.make_array_from_callback(
              want, shardings(mixpo_path, want),
              functools.partial(_read_shard, tensor_slice, transposed, config.param_dtype))
        var.set_value(value)
        loaded.add(name)
  missing = sorted(set(expected) - loaded)
  if missing:
    raise ValueError(f"checkpoint {path!r} lacks tensors {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing) that its "
                     "config.json requires; searched " + ", ".join(sorted(files)))
  return model


def _read_shard(tensor_slice, transposed: bool, dtype, index_mixpo):
  """The block `index_mixpo` (slices of the mixpo-layout array) read from a safetensors slice."""
  index = tuple(index_mixpo)[::-1] if transposed else tuple(index_mixpo)
  value = tensor_slice[index] if index else tensor_slice[:]
  return (value.T if transposed else value).astype(dtype)


def save_pretrained(model: CausalLM, path: str, max_shard_bytes: int | None = None) -> None:
  """Writes config.json + model.safetensors (or shards + index when the weights exceed
  max_shard_bytes) that transformers.AutoModelForCausalLM.from_pretrained loads."""
  os.makedirs(path, exist_ok=True)
  config = model.config
  hf = config.hf_config
  hf["dtype"] = jnp.dtype(config.param_dtype).name
  hf.pop("torch_dtype", None)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  shards, current, size = [], {}, 0
  for hf_name, (mixpo_path, transposed) in hf_names(model).items():
    value = _variable(model, mixpo_path).get_value()
    value = jnp.asarray(value.T if transposed else value)
    nbytes = value.size * value.dtype.itemsize
    if max_shard_bytes and current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[hf_name] = value
    size += nbytes
  shards.append(current)
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=metadata)
    return
  weight_map, total = {}, 0
  for n, shard in enumerate(shards):
    file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata=metadata)
    for name, value in shard.items():
      weight_map[name] = file
      total += value.size * value.dtype.itemsize
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def load_tokenizer(path: str):
  """transformers AutoTokenizer from a local checkpoint directory (never downloads)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist.")
  import transformers  # Local import: the model itself does not need transformers.
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
