"""LoRA adapters in and out in PEFT's layout: adapter_config.json + adapter_model.safetensors.

What `peft.PeftModel.from_pretrained(hf_base, path)` loads onto the transformers base model, and
what PEFT's `save_pretrained` writes. Tensor names are transformers' module names (the
`hf_io.HF_NAME_TABLE` kernels without ".weight") under PEFT's "base_model.model." prefix, in
torch's [out, in] orientation:

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]    = Aᵀ
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]   = Bᵀ

for mixpo's `layers/{i}/attn/q_proj/lora/a` [in, r] and `.../lora/b` [r, out]. Both sides scale
the update by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
"""

from __future__ import annotations

import json
import logging
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


def read_config(path: str) -> dict:
  """adapter_config.json of a PEFT LoRA directory, with unsupported settings refused by name."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {path!r}: pass a PEFT LoRA adapter directory "
                            f"({CONFIG_FILE} + {WEIGHTS_FILE}).")
  with open(file) as f:
    config = json.load(f)
  refuse = {"peft_type": ("LORA",), "bias": ("none", None), "use_dora": (False, None),
            "fan_in_fan_out": (False, None), "modules_to_save": (None, []),
            "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
            "layer_replication": (None, [])}
  for field, allowed in refuse.items():
    if config.get(field, allowed[-1]) not in allowed:
      raise ValueError(f"{file}: field {field}={config[field]!r} is not supported (supported: "
                       f"{allowed}); mixpo reads plain LoRA adapters of the Linear layers.")
  if config.get("lora_dropout", 0.0):
    logging.warning("%s: lora_dropout=%s is not applied; mixpo trains LoRA without dropout.",
                    file, config["lora_dropout"])
  return config


def load_adapter(model, path: str, param_dtype: str = "float32") -> lora.LoraConfig:
  """Puts the PEFT adapter in `path` onto `model` (a plain `CausalLM` of the adapter's base, no
  adapters yet); in place. Returns the `LoraConfig` it amounts to.

  Raises naming the file and tensor on keys that are not LoRA A/B of a Linear of this model,
  shapes that disagree with the model or the config's `r`, and missing halves.
  """
  config = read_config(path)
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path!r} (only safetensors adapters are "
                            "read; convert adapter_model.bin with PEFT's save_pretrained).")
  by_hf = {hf: p for p, hf in module_names(model.config.num_layers).items()}
  halves: dict[str, dict[str, np.ndarray]] = {}
  with safe_open(file, framework="numpy") as f:
    for key in f.keys():
      m = _KEY.match(key)
      if m is None or m["module"] not in by_hf:
        raise ValueError(f"{file}: tensor {key!r} is not the lora_A / lora_B weight of a Linear "
                         f"of this {model.config.model_type} model (expected names like "
                         f"{_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight).")
      halves.setdefault(by_hf[m["module"]], {})[m["ab"]] = f.get_tensor(key)
  if not halves:
    raise ValueError(f"{file} holds no tensors.")
  rank = int(config["r"])
  linears = lora.linears(model)
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
  cfg = lora.LoraConfig(rank=rank, alpha=float(config.get("lora_alpha", rank)), targets=targets,
                        use_rslora=bool(config.get("use_rslora", False)),
                        param_dtype=param_dtype)
  lora.apply(model, cfg)
  for p, adapter in lora.adapters(model).items():
    adapter.a.set_value(jnp.asarray(halves[p]["A"].T, param_dtype))
    adapter.b.set_value(jnp.asarray(halves[p]["B"].T, param_dtype))
  return cfg
