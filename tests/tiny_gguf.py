"""A tiny llama GGUF written with the `gguf` package, laid out as llama.cpp writes one: the stand-in
for SmolLM2-135M-Instruct's file in tests (random weights, a byte-level vocabulary with ChatML's
special tokens, the chat template, q / k rows in llama.cpp's rotary order, tied embeddings)."""

from __future__ import annotations

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2.
MERGES = ("Ġ t", "h e", "i n", "Ġ a")  # a few BPE merges (transformers needs merges or scores).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)


def byte_symbols() -> list[str]:
  """Byte-level BPE's symbols of newline, space and the printable ASCII bytes (bytes 0-32 are
  written chr(256 + byte): "\\n" is "Ċ", " " is "Ġ"; printable bytes are themselves). ASCII
  only: whatever a random model samples decodes to the text it was sampled as, so a trace
  re-encodes to the tokens it holds."""
  return [chr(256 + 10), chr(256 + 32)] + [chr(b) for b in range(ord("!"), ord("~") + 1)]


def rotary_rows(w, heads: int):
  """HF q / k projection rows ([heads·h, in], halves per head) in llama.cpp's pairwise order."""
  out, cols = w.shape
  return w.reshape(heads, 2, out // heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def write(path: str, seed: int = 0):
  """Writes the tiny GGUF to `path`; returns the float32 transformers model it holds."""
  import gguf
  import torch
  import transformers

  tokens = list(SPECIALS) + byte_symbols() + [m.replace(" ", "") for m in MERGES]
  config = transformers.LlamaConfig(vocab_size=len(tokens), **TINY)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms start at 1: perturb them so the mapping is really tested.
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  n, k = TINY["num_attention_heads"], TINY["num_key_value_heads"]
  w = gguf.GGUFWriter(path, "llama")
  w.add_context_length(TINY["max_position_embeddings"])
  w.add_embedding_length(TINY["hidden_size"])
  w.add_block_count(TINY["num_hidden_layers"])
  w.add_feed_forward_length(TINY["intermediate_size"])
  w.add_head_count(n)
  w.add_head_count_kv(k)
  w.add_rope_freq_base(TINY["rope_theta"])
  w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
  w.add_rope_dimension_count(TINY["hidden_size"] // n)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS)
                    + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
  w.add_token_merges(list(MERGES))
  w.add_bos_token_id(TINY["bos_token_id"])
  w.add_eos_token_id(TINY["eos_token_id"])
  w.add_unk_token_id(0)
  w.add_pad_token_id(TINY["pad_token_id"])
  w.add_add_bos_token(False)
  w.add_chat_template(CHAT_TEMPLATE)
  w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
  for i in range(TINY["num_hidden_layers"]):
    p = f"model.layers.{i}."
    names = {"attn_norm": "input_layernorm", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_q": "self_attn.q_proj"}
    for ours, hf in names.items():
      value = sd[p + hf + ".weight"]
      if ours in ("attn_q", "attn_k"):
        value = rotary_rows(value, n if ours == "attn_q" else k)
      w.add_tensor(f"blk.{i}.{ours}.weight", value)
  w.add_tensor("output_norm.weight", sd["model.norm.weight"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return model
