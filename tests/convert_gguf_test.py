"""experiments/convert_gguf.py: a GGUF round trip on a tiny file the test writes (tests/tiny_gguf.py),
the logit check, the tokenizer and chat template, tied embeddings, and the binary's errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from experiments import convert_gguf
from mixpo import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tiny_gguf, tiny_converted):
  return tiny_converted[0], tiny_gguf[1], *tiny_converted[1:]


def test_round_trip_gives_the_original_models_logits(converted):
  out, reference, _, _ = converted
  tokenizer = models.load_tokenizer(out)
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}],
                                         tokenize=False, add_generation_prompt=True)
  ids = np.asarray([tokenizer(prompt)["input_ids"]], np.int32)
  with torch.no_grad():
    want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  # The GGUF holds q / k rows in llama.cpp's rotary order: a wrong un-permutation (or a lost
  # norm, or an untied head) is off by O(1), float32 summation order by ~1e-6.
  np.testing.assert_allclose(np.asarray(models.from_pretrained(out)(ids)), want, atol=1e-4)


def test_tied_embeddings_and_chat_template_survive(converted):
  out, _, _, tokenizer = converted
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["tie_word_embeddings"] and config["model_type"] == "llama"
  with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
    assert "lm_head.weight" not in f.keys()  # one tensor, read back as both.
  assert models.from_pretrained(out).config.tie_word_embeddings
  loaded = models.load_tokenizer(out)
  assert (loaded.eos_token_id, loaded.bos_token_id) == (2, 1)
  text = "Mia has 12 stickers.\nShe buys 7 more."
  assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
  rendered = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True)
  assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
  assert tokenizer.chat_template == loaded.chat_template


def test_check_logits_passes_the_conversion_and_catches_a_wrong_mapping(converted):
  out, _, model, tokenizer = converted
  report = convert_gguf.check_logits(out, model, tokenizer, convert_gguf.TOLERANCE)
  assert report["max_logit_error"] < 1e-4 and report["tokens_compared"] > 20
  with torch.no_grad():  # a model that is not the converted one: the check must refuse it.
    model.model.norm.weight.mul_(2.0)
  try:
    with pytest.raises(ValueError, match="differ from transformers'"):
      convert_gguf.check_logits(out, model, tokenizer, convert_gguf.TOLERANCE)
  finally:
    with torch.no_grad():
      model.model.norm.weight.div_(2.0)


def test_binary_names_the_flag_of_a_bad_gguf(tmp_path):
  not_gguf = tmp_path / "model.bin"
  not_gguf.write_text("x")
  for value, words in ((str(tmp_path / "missing.gguf"), "no such file"),
                       (str(not_gguf), "expected a .gguf file")):
    res = subprocess.run([sys.executable, "experiments/convert_gguf.py", f"--gguf={value}",
                          f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and f"--gguf={value}: {words}" in res.stderr, res.stderr[-2000:]
