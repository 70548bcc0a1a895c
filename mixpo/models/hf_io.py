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
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil

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
# Files of an earlier export that save_pretrained drops: any weights or weight index a loader
# could prefer over the new files (transformers and mixpo pick different ones when both exist).
_WEIGHT_FILE = re.compile(r"(.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin"
                          r"|pytorch_model\.bin\.index\.json|tf_model.*\.h5|flax_model.*\.msgpack"
                          r"|config\.json)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Files a transformers tokenizer reads from its directory; an export with a tokenizer replaces
# all of them, so no file of the previous tokenizer is mixed into the new one.
_TOKENIZER_FILE = re.compile(r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json"
                             r"|chat_template\.jinja|chat_template\.json|additional_chat_templates"
                             r"|vocab\..*|merges\.txt|.*\.model|.*\.tiktoken)$")
# Files that hold a vocabulary: a tokenizer directory without any of them loads (silently) as
# an empty tokenizer.
_VOCAB_FILE = re.compile(r"(tokenizer\.json|.*\.model|vocab\..*|.*\.tiktoken)$")


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


def _read_config(path: str) -> tuple[dict, str]:
  """(config.json as a dict, its path)."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no config.json in {path!r}: pass a Hugging Face checkpoint "
                            "directory (config.json + *.safetensors).")
  with open(config_file) as f:
    return json.load(f), config_file


def _allowed_roots(path: str) -> list[str]:
  """Real directories a checkpoint's weight files may resolve into.

  The checkpoint directory itself, and for huggingface_hub's cache layout
  (`models--org--name/snapshots/<rev>/<file>` -> `../../blobs/<hash>`) the repo's blobs.
  """
  real = os.path.realpath(path)
  roots = [real]
  if os.path.basename(os.path.dirname(real)) == "snapshots":
    roots.append(os.path.join(os.path.dirname(os.path.dirname(real)), "blobs"))
  return roots


def _contained(path: str, entry, index_file: str | None, what: str = "weight file") -> str:
  """The full path of `what` `entry` of checkpoint `path`, refused if it lies outside.

  A weight_map may only name files inside the checkpoint directory: an index (or a symlink)
  that points elsewhere would make a downloaded checkpoint read files it does not ship.
  """
  where = (f"{index_file}: weight_map entry {entry!r}" if index_file
           else f"{what} {os.path.join(path, entry)!r}")
  if not isinstance(entry, str) or not entry:
    raise ValueError(f"{where} is not a file name; the index is corrupt (re-download it).")
  if os.path.isabs(entry) or ".." in re.split(r"[\\/]", entry):
    raise ValueError(f"{where} names a file outside the checkpoint directory {path!r} (absolute "
                     "path or '..'); an index may only name files in its own directory.")
  full = os.path.join(path, entry)
  real = os.path.realpath(full)
  if not any(real == root or real.startswith(root + os.sep) for root in _allowed_roots(path)):
    raise ValueError(f"{where} resolves through a symlink to {real!r}, outside the checkpoint "
                     f"directory {path!r}; copy the file into the directory instead of linking.")
  return full


def _weight_files(path: str) -> dict[str, list[str]]:
  """{safetensors file: [tensor names]} from the index, or from the single model.safetensors."""
  index_file = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index_file):
    with open(index_file) as f:
      index = json.load(f)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_file} has no weight_map object; the index is corrupt "
                       "(re-download it).")
    files = collections.defaultdict(list)
    for name, file in weight_map.items():
      files[_contained(path, file, index_file)].append(name)
    return dict(files)
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    single = _contained(path, "model.safetensors", None)
    with safe_open(single, framework="numpy") as f:
      return {single: list(f.keys())}
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}; "
                          "only safetensors checkpoints are supported (convert .bin with "
                          "transformers' save_pretrained(safe_serialization=True)).")


def _check_layer_count(num_layers: int, files: dict[str, list[str]], config_file: str) -> None:
  """Refuses a num_hidden_layers the tensors do not have, before a model is built from it."""
  layers = {int(m.group(1)) for names in files.values() for n in names if (m := _LAYER.match(n))}
  if layers != set(range(num_layers)):
    if not layers:
      found = "no model.layers.<i>.* tensors"
    elif layers == set(range(len(layers))):
      found = f"layers 0..{max(layers)}"
    else:
      found = f"layer indices {sorted(layers)[:8]}{' ...' if len(layers) > 8 else ''}"
    raise ValueError(f"{config_file}: config.json field num_hidden_layers={num_layers!r} does not "
                     f"match the weights, which hold {found} ({len(layers)} layers) in "
                     f"{', '.join(sorted(files)[:3])}{' ...' if len(files) > 3 else ''}; fix "
                     "num_hidden_layers in config.json (or "
                     "complete the checkpoint).")


def from_pretrained(path: str, shardings=None, **options) -> CausalLM:
  """Loads a Hugging Face checkpoint directory into a `CausalLM`.

  options: dtype (compute), param_dtype (storage; tensors are cast), remat, attention_impl.
  Tensors are read one at a time with safe_open, so host memory holds at most one tensor
  beyond the model itself. shardings: None (tensors land on the default device), or
  `fn(param_path, shape) -> jax.sharding.Sharding` (`mixpo.sharding.path_shardings(mesh)`):
  each tensor is then built with make_array_from_callback, every device reading only its own
  slice of the file (no full copy on one device; multi-host: each process reads its shards).
  Raises naming the tensor and file on missing / unexpected tensors, wrong shapes or non-float
  dtypes; naming the config.json path, field and value on invalid or inconsistent sizes (checked
  before the model is built); and naming the index and entry when a weight file lies outside
  `path` ('..', absolute, or a symlink out; huggingface_hub's snapshots -> blobs links are fine).
  """
  hf, config_file = _read_config(path)
  try:
    config = from_hf_config(hf, **options)
  except ValueError as e:
    raise ValueError(f"{config_file}: {e}") from None
  files = _weight_files(path)
  _check_layer_count(config.num_layers, files, config_file)
  model = _abstract_model(config)
  expected = hf_names(model)
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


def save_pretrained(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                    tokenizer=None) -> None:
  """Writes config.json + model.safetensors (or shards + index when the weights exceed
  max_shard_bytes) that transformers.AutoModelForCausalLM.from_pretrained loads, and the
  files of `tokenizer` (a transformers tokenizer) when given.

  Atomic: the export (weights, config and tokenizer) is written into a temporary sibling
  directory that then replaces `path` (an atomic exchange on Linux; elsewhere two renames,
  between which `path` is briefly absent). Over an earlier export, every weight file and index
  of it is dropped (a stale index would win in mixpo's loader while transformers reads the new
  file), and so is every tokenizer file when `tokenizer` is given; every other file or directory
  the user put there (generation_config.json, README, ...) is carried over. A crash or error
  leaves `path` as it was; a leftover `.<name>.tmp-*` sibling is safe to delete.
  A symlinked `path` keeps its link: the directory it points to is replaced.
  """
  path = os.path.realpath(path)
  parent, name = os.path.split(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"save_pretrained: {path!r} exists and is not a directory; pass a "
                             "directory path.")
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
  os.mkdir(tmp)  # Not mkdtemp: the export gets the usual umask permissions, not 0o700.
  try:
    _write_export(model, tmp, max_shard_bytes)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
      for root, _, files in os.walk(tmp):
        for file in files:
          _fsync(os.path.join(root, file))
    if os.path.isdir(path):
      _carry_over(path, tmp, drop_tokenizer=tokenizer is not None)
      shutil.copymode(path, tmp)
    _fsync(tmp)
    old = _swap_into_place(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  _fsync(parent)


def _write_export(model: CausalLM, path: str, max_shard_bytes: int | None) -> None:
  """config.json + weights (+ index) into the empty directory `path`, each file fsynced."""
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
  else:
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
      file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, file), metadata=metadata)
      for name, value in shard.items():
        weight_map[name] = file
        total += value.size * value.dtype.itemsize
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  for file in os.listdir(path):
    _fsync(os.path.join(path, file))


def _carry_over(old: str, new: str, drop_tokenizer: bool = False) -> None:
  """Links (or copies) every entry of `old` but weights, indices and config.json (and with
  drop_tokenizer, tokenizer files) into `new`."""
  for entry in os.listdir(old):
    src, dst = os.path.join(old, entry), os.path.join(new, entry)
    if (_WEIGHT_FILE.match(entry) or os.path.lexists(dst)
        or (drop_tokenizer and _TOKENIZER_FILE.match(entry))):
      continue
    if os.path.islink(src):
      os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
      shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:  # Another filesystem, or links not supported.
    shutil.copy2(src, dst)


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError:  # Some filesystems (and directories on some OSes) refuse fsync.
    pass
  finally:
    os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _swap_into_place(tmp: str, path: str) -> str | None:
  """Moves directory `tmp` to `path`; returns where the previous `path` now is (or None)."""
  if not os.path.lexists(path):
    os.rename(tmp, path)
    return None
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    renameat2 = None
  if renameat2 is not None:
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(tmp), at_fdcwd, os.fsencode(path), _RENAME_EXCHANGE) == 0:
      return tmp  # tmp now holds the previous export.
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
      raise OSError(err, f"cannot exchange {tmp!r} with {path!r}: {os.strerror(err)}")
  old = f"{tmp}.old"
  os.rename(path, old)
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(old, path)
    raise
  return old


def _check_tokenizer_files(path: str) -> None:
  """Refuses a tokenizer directory whose files lie outside it, or that holds no vocabulary.

  Tokenizer files are confined like weight files: a chat_template.jinja symlinked to, say, a
  credentials file would be rendered into every prompt, logged, trained on and exported.
  """
  entries = sorted(os.listdir(path))
  templates = os.path.join(path, "additional_chat_templates")
  if os.path.isdir(templates):
    entries += [os.path.join("additional_chat_templates", n) for n in sorted(os.listdir(templates))]
  for entry in entries:
    if entry == "additional_chat_templates" or os.path.isdir(os.path.join(path, entry)):
      continue  # Only files are read; the templates directory's files were listed above.
    _contained(path, entry, None, what="tokenizer directory file")
  if not any(_VOCAB_FILE.match(e) for e in entries):
    raise FileNotFoundError(
        f"no tokenizer files in {path!r} (tokenizer.json, tokenizer.model or vocab.json + "
        "merges.txt): a weights-only directory, or an export cut short before its tokenizer "
        "was written. Copy the tokenizer files of the model it came from into it.")


def load_tokenizer(path: str):
  """transformers AutoTokenizer from a local checkpoint directory (never downloads).

  Raises naming the file when a tokenizer file (chat template included) resolves outside
  `path` (huggingface_hub's snapshots -> blobs links are fine), and naming `path` when it holds
  no vocabulary file or loads as a tokenizer of fewer than 2 tokens.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist.")
  _check_tokenizer_files(path)
  import transformers  # Local import: the model itself does not need transformers.
  # A tokenizer saved from a `tokenizers` object (mixpo's char tokenizer) names no class of its
  # own; AutoTokenizer then builds the model type's (Qwen2Tokenizer from config.json), whose
  # pre-tokenizer drops spaces and newlines: load it as the generic fast tokenizer it was saved as.
  cfg_file = os.path.join(path, "tokenizer_config.json")
  saved_class = None
  if os.path.exists(cfg_file):
    with open(cfg_file) as f:
      saved_class = json.load(f).get("tokenizer_class")
  if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  else:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  if len(tokenizer) < 2:
    raise ValueError(f"the tokenizer files in {path!r} load as a tokenizer of {len(tokenizer)} "
                     "token(s): they are empty or truncated. Copy the tokenizer files of the "
                     "model it came from into it.")
  return tokenizer
