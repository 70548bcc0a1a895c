"""A character-level tokenizer for the built-in tasks, as a real transformers tokenizer.

Built locally with the `tokenizers` library (WordLevel over single characters), wrapped in
`transformers.PreTrainedTokenizerFast`, so `save_pretrained(dir)` writes tokenizer.json +
tokenizer_config.json and `transformers.AutoTokenizer.from_pretrained(dir)` loads it back: the same
code path as a real Qwen / Llama tokenizer, and a checkpoint dir is self-contained.

Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then the alphabet in order. Encoding with
add_special_tokens=True (the default) prepends <bos>; EOS is never added by encoding — the trainer
appends it to completions. Characters outside the alphabet encode to <unk>.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

DEFAULT_ALPHABET = "0123456789+-*/=() "
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
  """A char-level tokenizer over `alphabet` (vocab size len(alphabet) + 4); see module docstring."""
  if len(set(alphabet)) != len(alphabet) or not alphabet:
    raise ValueError(f"char_tokenizer(alphabet={alphabet!r}): characters must be unique and non-empty")
  vocab = {tok: i for i, tok in enumerate(SPECIAL)}
  for ch in alphabet:
    vocab[ch] = len(vocab)
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tk.decoder = decoders.Fuse()  # join characters without the default space
  tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                    special_tokens=[("<bos>", BOS_ID)])
  return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                 eos_token="<eos>", unk_token="<unk>", padding_side="left")
