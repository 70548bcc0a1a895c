"""NNX causal LM (Llama 3 / Qwen2 / Qwen2.5 / Qwen3) with a KV cache and HF checkpoints in/out.

  config.py  ModelConfig, parsed from config.json (unsupported fields fail by name); FAMILIES,
             the one table of per-family switches (docs/models.md: adding a family)
  layers.py  Linear / Embed / RMSNorm / RoPE / GQA attention layer / SwiGLU
  attention.py  the attention kernels, chosen for the compile target (attention_impl="auto")
  backend.py the platform a program is compiled for, and the XLA:CPU-only tuning
  model.py   CausalLM (forward, hidden_states, logits_from_hidden, init_cache, decode), KVCache
  hf_io.py   from_pretrained / save_pretrained / load_tokenizer and the HF <-> mixpo name table
  lora.py    LoRA adapters on the Linear layers (apply, merged, without_adapters)
  peft_io.py LoRA adapters in and out in PEFT's layout (save_adapter / load_adapter)
"""

from mixpo.models import attention
from mixpo.models.config import ModelConfig, from_hf_config
from mixpo.models.hf_io import HF_NAME_TABLE, from_pretrained, load_tokenizer, save_pretrained
from mixpo.models.lora import LoraConfig
from mixpo.models.model import CausalLM, KVCache, check_tokens, init_from_config
from mixpo.models.peft_io import load_adapter, save_adapter

__all__ = [
    "ModelConfig", "CausalLM", "KVCache", "init_from_config", "from_pretrained", "save_pretrained",
    "load_tokenizer", "from_hf_config", "check_tokens", "HF_NAME_TABLE", "LoraConfig",
    "save_adapter", "load_adapter",
]
