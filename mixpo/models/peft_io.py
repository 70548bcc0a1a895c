"""LoRA adapters in and out in PEFT's layout: adapter_config.json + adapter_model.safetensors.

What `peft.PeftModel.from_pretrained(hf_base, path)` loads onto the transformers base model, and
what PEFT's `save_pretrained` writes. Tensor names are transformers' module names (the
`hf_io.HF_NAME_TABLE` kernels without ".weight") under PEFT's "base_model.model." prefix, in
torch's [out, in] orientation:

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]    = Aᵀ
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]   = Bᵀ

for mixpo's `layers/{i}/attn/q_proj/lora/a` [in, r] and `.../lora/b` [r, out]. Both sides scale
the update by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).

Reading is exact or refused. PEFT adapts the modules the config selects (target_modules,
layers_to_transform / layers_pattern, exclude_modules, matched against the transformers module
names as `peft` does) and ignores tensors of any other module; `load_adapter` computes the same
selection and refuses an adapter whose tensors cover other modules than it selects, a selection
that reaches a module mixpo cannot adapt, and every setting that would change the function
(named by file and field), so an adapter never loads as a different model than in `peft`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mixpo.models import lora
from mixpo.models.hf_io import HF_NAME_TABLE

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(\.[^.]+)?\.weight$")


def module_names(num_layers: int) -> dict[str, str]:
  """{mixpo Linear path ("layers/0/attn/q_proj"): transformers module name
  ("model.layers.0.self_attn.q_proj")} for every Linear of a `num_layers`-deep model."""
  out = {}
  for hf, path, transposed in HF_NAME_TABLE:
    if not (transposed and path.endswith("/kernel")):
      continue
    for i in range(num_layers) if "{i}" in path else [0]:
      out[path.format(i=i)[:-len("/kernel")]] = hf.format(i=i)[:-len(".weight")]
  return out


def _write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)  # a reader never sees a half-written file.


def save_adapter(model, path: str, base_model_name_or_path: str | None = None) -> None:
  """Writes the adapters of `model` (`lora.apply`) as a PEFT LoRA adapter directory.

  All adapters must share one rank and scaling (one `LoraConfig`), which is what one
  adapter_config.json can say. target_modules lists the short module names ("q_proj") when
  every layer is adapted alike, else the full transformers module names.
  """
  found = lora.adapters(model)
  if not found:
    raise ValueError("save_adapter: the model has no LoRA adapters (apply lora.apply or "
                     "load_adapter first; for full weights use models.save_pretrained).")
  names = module_names(model.config.num_layers)
  ranks = {a.a.shape[1] for a in found.values()}
  scalings = {a.scaling for a in found.values()}
  if len(ranks) != 1 or len(scalings) != 1:
    raise ValueError(f"save_adapter: adapters have ranks {sorted(ranks)} and scalings "
                     f"{sorted(scalings)}; one adapter_config.json holds one of each.")
  rank, scaling = ranks.pop(), scalings.pop()
  tensors = {}
  for module, adapter in found.items():
    hf = names[module]
    tensors[f"{_PREFIX}{hf}.lora_A.weight"] = np.ascontiguousarray(np.asarray(adapter.a[...]).T)
    tensors[f"{_PREFIX}{hf}.lora_B.weight"] = np.ascontiguousarray(np.asarray(adapter.b[...]).T)
  short = sorted({p.rsplit("/", 1)[1] for p in found})  # "q_proj": the same name in both.
  every_layer = {p for p in names if p.startswith("layers/") and p.rsplit("/", 1)[1] in short}
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
      "lora_alpha": float(scaling * rank), "use_rslora": False, "lora_dropout": 0.0,
      "target_modules": short if set(found) == every_layer else sorted(names[p] for p in found),
      "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
      "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
      "rank_pattern": {}, "alpha_pattern": {},
      "base_model_name_or_path": base_model_name_or_path,
  }
  os.makedirs(path, exist_ok=True)
  _write_atomic(os.path.join(path, WEIGHTS_FILE),
                lambda f: save_file(tensors, f, metadata={"format": "pt"}))
  def write_config(f):
    with open(f, "w") as fh:
      json.dump(config, fh, indent=2, sort_keys=True)
  _write_atomic(os.path.join(path, CONFIG_FILE), write_config)


# Settings that change what the adapter computes: the values mixpo reproduces (the first is
# PEFT's default). Anything else is refused by name.
_NEUTRAL = {
    "peft_type": ("LORA",), "bias": ("none", None), "use_dora": (False, None),
    "fan_in_fan_out": (False, None), "modules_to_save": (None, []),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layer_replication": (None, []),
    "lora_bias": (False, None), "use_qalora": (False, None), "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}), "alora_invocation_tokens": (None, []),
    "megatron_config": (None, {}), "use_bdlora": (None, False), "arrow_config": (None, {}),
    "kasa_config": (None, {}), "velora_config": (None, {}), "monteclora_config": (None, {}),
    # Initialisations that rewrite the base weights (PiSSA, OLoRA, LoftQ, CorDA, ...) are refused;
    # for these the file's tensors replace the initial A and B.
    "init_lora_weights": (True, False, "gaussian", None),
}
# Fields that do not change the loaded function (metadata, training-only or init-only options).
_INERT = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
          "inference_mode", "lora_dropout", "megatron_core", "qalora_group_size",
          "runtime_config", "ensure_weight_tying", "loftq_config", "eva_config", "corda_config",
          "lora_ga_config", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
          "layers_to_transform", "layers_pattern"}


def _empty(value) -> bool:
  return value is None or value is False or value == "" or value == [] or value == {}


def _field_type(file: str, config: dict, field: str, ok, what: str):
  value = config.get(field)
  if not ok(value):
    raise ValueError(f"{file}: field {field}={value!r} must be {what}.")
  return value


def _names(value) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_config(path: str) -> dict:
  """adapter_config.json of a PEFT LoRA directory, with unsupported settings refused by name."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {path!r}: pass a PEFT LoRA adapter directory "
                            f"({CONFIG_FILE} + {WEIGHTS_FILE}).")
  with open(file) as f:
    config = json.load(f)
  if not isinstance(config, dict):
    raise ValueError(f"{file} is not a JSON object; re-save the adapter with PEFT.")
  for field, allowed in _NEUTRAL.items():
    value = config.get(field, allowed[0])
    if not any(value == a and type(value) is type(a) for a in allowed):
      raise ValueError(f"{file}: field {field}={value!r} is not supported (supported: "
                       f"{allowed}); mixpo reads plain LoRA adapters of the Linear layers.")
  for field in sorted(set(config) - set(_NEUTRAL) - _INERT):
    if not _empty(config[field]):  # A newer PEFT option, set: it may change the function.
      raise ValueError(f"{file}: field {field}={config[field]!r} is not a setting mixpo knows; "
                       "it may change what the adapter computes, so the adapter is refused.")
  _field_type(file, config, "r", lambda v: isinstance(v, int) and not isinstance(v, bool)
              and v > 0, "a positive integer")
  _field_type(file, config, "lora_alpha", lambda v: isinstance(v, (int, float))
              and not isinstance(v, bool) and math.isfinite(v), "a finite number")
  _field_type(file, config, "use_rslora", lambda v: v is None or isinstance(v, bool),
              "true or false")
  _field_type(file, config, "target_modules", lambda v: isinstance(v, str) or (
      _names(v) and v), "a regular expression or a non-empty list of module names (PEFT's "
              "per-model default is not applied: list the modules)")
  _field_type(file, config, "exclude_modules", lambda v: v is None or isinstance(v, str)
              or _names(v), "null, a regular expression or a list of module names")
  _field_type(file, config, "layers_to_transform", lambda v: v is None or (
      isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, list) and all(
          isinstance(i, int) and not isinstance(i, bool) for i in v)),
              "null, a layer index or a list of them")
  _field_type(file, config, "layers_pattern", lambda v: v is None or isinstance(v, str)
              or _names(v), "null, a name or a list of names")
  for field in ("target_modules", "exclude_modules"):
    if isinstance(config.get(field), str):
      try:
        re.compile(config[field])
      except re.error as e:
        raise ValueError(f"{file}: field {field}={config[field]!r} is not a valid regular "
                         f"expression ({e}).") from None
  if config.get("lora_dropout", 0.0):
    logging.warning("%s: lora_dropout=%s is not applied; mixpo trains LoRA without dropout.",
                    file, config["lora_dropout"])
  return config


def hf_module_names(model_config) -> list[str]:
  """Every module name of the transformers model of `model_config` (its `named_modules()`
  without the root), which PEFT matches a config's target_modules against."""
  names = ["model", "model.embed_tokens", "model.layers"]
  for i in range(model_config.num_layers):
    layer = f"model.layers.{i}"
    attn = [f"{layer}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if model_config.qk_norm:
      attn += [f"{layer}.self_attn.q_norm", f"{layer}.self_attn.k_norm"]
    names += [layer, f"{layer}.self_attn", *attn, f"{layer}.mlp",
              *(f"{layer}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj", "act_fn")),
              f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm"]
  return names + ["model.norm", "model.rotary_emb", "lm_head"]


def _layer_index(key: str, patterns) -> int | None:
  """The decoder-layer index in module name `key` ("model.layers.3.mlp.up_proj" -> 3): the first
  numbered segment, after one of `patterns` when given (PEFT's layers_pattern)."""
  if isinstance(patterns, str):
    patterns = [patterns]
  regexes = ([r".*?\.[^.]*\.(\d+)\."] if not patterns
             else [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns])
  for regex in regexes:
    m = re.match(regex, key)
    if m:
      return int(m.group(1))
  return None


def selects(config: dict, key: str) -> bool:
  """Whether a PEFT LoRA `config` adapts the transformers module named `key`.

  PEFT's rules: exclude_modules (a regex matched in full, or names matched exactly or as a dotted
  suffix) wins; a string target_modules is a regex matched in full ("all-linear": every Linear
  but the output head); a list selects names equal to an entry, or ending in "." + an entry
  within layers_to_transform (the first numbered segment, after layers_pattern when given).
  """
  exclude = config.get("exclude_modules")
  if isinstance(exclude, str):
    if re.fullmatch(exclude, key):
      return False
  elif exclude and (key in exclude or any(key.endswith("." + e) for e in exclude)):
    return False
  targets = config["target_modules"]
  if isinstance(targets, str) and targets.lower() == "all-linear":
    targets = list(_LINEAR_NAMES)
  if isinstance(targets, str):
    return re.fullmatch(targets, key) is not None
  if key in targets:  # An exact name is adapted whatever layers_to_transform says.
    return True
  if not any(key.endswith("." + t) for t in targets):
    return False
  layers = config.get("layers_to_transform")
  if layers is None or layers == []:
    return True
  index = _layer_index(key, config.get("layers_pattern"))
  if index is None:
    return False
  return index == layers if isinstance(layers, int) else index in layers


# The Linear layers of a decoder block: what PEFT's "all-linear" selects (the head excluded).
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_adapter(model, path: str, param_dtype: str = "float32") -> lora.LoraConfig:
  """Puts the PEFT adapter in `path` onto `model` (a plain `CausalLM` of the adapter's base, no
  adapters yet); in place. Returns the `LoraConfig` it amounts to.

  Raises naming the file and tensor on keys that are not LoRA A/B of a Linear of this model,
  shapes that disagree with the model or the config's `r`, and missing halves; naming the
  config's selection fields when the modules they select (`selects`, PEFT's rules) are not
  exactly the modules the tensors hold, or include one mixpo does not adapt.
  """
  config = read_config(path)
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path!r} (only safetensors adapters are "
                            "read; convert adapter_model.bin with PEFT's save_pretrained).")
  by_hf = {hf: p for p, hf in module_names(model.config.num_layers).items()}
  linears = lora.linears(model)
  selected = {k for k in hf_module_names(model.config) if selects(config, k)}
  config_file = os.path.join(path, CONFIG_FILE)
  fields = "target_modules / layers_to_transform / layers_pattern / exclude_modules"
  if not selected:
    raise ValueError(f"{config_file}: {fields} select no module of this "
                     f"{model.config.model_type} model (PEFT refuses such an adapter too).")
  for key in sorted(selected):
    if key not in by_hf or by_hf[key] not in linears or by_hf[key] == "lm_head":
      raise ValueError(f"{config_file}: {fields} select {key!r}, which mixpo does not adapt (LoRA "
                       "on the Linear layers of the decoder blocks only).")
  halves: dict[str, dict[str, np.ndarray]] = {}
  with safe_open(file, framework="numpy") as f:
    for key in f.keys():
      m = _KEY.match(key)
      if m is None or m["module"] not in by_hf:
        raise ValueError(f"{file}: tensor {key!r} is not the lora_A / lora_B weight of a Linear "
                         f"of this {model.config.model_type} model (expected names like "
                         f"{_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight).")
      if m["module"] not in selected:
        raise ValueError(f"{file}: tensor {key!r} is for {m['module']!r}, which {fields} in "
                         f"{config_file} do not select: PEFT would ignore it and load another "
                         "model than the tensors describe. Fix the config or the tensors.")
      halves.setdefault(by_hf[m["module"]], {})[m["ab"]] = f.get_tensor(key)
  unfilled = sorted(k for k in selected if by_hf[k] not in halves)
  if unfilled:
    raise ValueError(f"{file} holds no lora_A / lora_B for {unfilled[0]!r}"
                     f"{f' (and {len(unfilled) - 1} more)' if len(unfilled) > 1 else ''}, which "
                     f"{fields} in {config_file} select: PEFT would give it a fresh adapter. "
                     "Fix the config or the tensors.")
  rank = int(config["r"])
  for p, ab in sorted(halves.items()):
    if set(ab) != {"A", "B"}:
      raise ValueError(f"{file}: module {p} has lora_{''.join(ab)} but not both lora_A and "
                       "lora_B.")
    in_f, out_f = linears[p].kernel.shape
    if ab["A"].shape != (rank, in_f) or ab["B"].shape != (out_f, rank):
      raise ValueError(f"{file}: module {p} has lora_A {ab['A'].shape} / lora_B "
                       f"{ab['B'].shape}; r={rank} in {CONFIG_FILE} and the model imply "
                       f"{(rank, in_f)} / {(out_f, rank)}.")
  targets = "^(" + "|".join(re.escape(p) for p in sorted(halves)) + ")/kernel$"
  cfg = lora.LoraConfig(rank=rank, alpha=float(config["lora_alpha"]), targets=targets,
                        use_rslora=bool(config.get("use_rslora", False)),
                        param_dtype=param_dtype)
  lora.apply(model, cfg)
  for p, adapter in lora.adapters(model).items():
    adapter.a.set_value(jnp.asarray(halves[p]["A"].T, param_dtype))
    adapter.b.set_value(jnp.asarray(halves[p]["B"].T, param_dtype))
  return cfg
