"""Supervised fine-tuning and the built-in tiny guide / weak-start models of the default experiment.

`sft` trains any `CausalLM` on (prompt, answer) pairs with the token-mean NLL of the answer and
EOS. `ensure_builtin_models` makes (or reuses from the workdir) a char-level tokenizer, a tiny
guide that solves the built-in task well, and a weak starting policy, all as self-contained
Hugging Face directories (config.json + safetensors + tokenizer files), so the RL code path is
exactly the one a user takes with a real checkpoint.
"""

from __future__ import annotations

import json
import os
import stat

import jax
import numpy as np
from absl import logging

from mixpo import models, train
from mixpo.batch import make_batch
from mixpo.data import char_tokenizer, get_task
from mixpo.data.tokenizer import DEFAULT_ALPHABET
from mixpo.rollout import encode_prompts


class UntrustedDirectoryError(ValueError):
  """A directory whose contents would be reused as they are could have been filled by others."""


def untrusted_reason(path: str) -> str | None:
  """Why reusing `path` (an existing directory of cached models or results) is unsafe, or None.

  It must be a directory owned by this user and not writable by every user; a symlink must be
  one this user or root made. A path that does not exist is fine (it will be created).
  """
  if not os.path.lexists(path):
    return None
  uid = os.getuid()
  link, st = os.lstat(path), (os.stat(path) if os.path.exists(path) else None)
  if st is None:
    return "is a dangling symlink"
  if stat.S_ISLNK(link.st_mode) and link.st_uid not in (uid, 0):
    return f"is a symlink owned by uid {link.st_uid}"
  if not stat.S_ISDIR(st.st_mode):
    return "is not a directory"
  if st.st_uid != uid:
    return f"is owned by uid {st.st_uid}, not by you (uid {uid})"
  if st.st_mode & stat.S_IWOTH:
    return f"is writable by every user (mode {stat.S_IMODE(st.st_mode):o})"
  return None


def tiny_hf_config(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, intermediate: int = 384, max_positions: int = 64) -> dict:
  """A Qwen2-architecture config.json dict for a tiny model over `tokenizer`'s vocabulary."""
  return {
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
      "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": intermediate,
      "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
      "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
      "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "float32",
      "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
      "pad_token_id": tokenizer.pad_token_id,
  }


def sft_batch(tokenizer, examples, max_answer_tokens: int):
  """`Batch` of prompt (left-padded) + target + EOS (right-padded), loss on target and EOS.

  The target is the example's worked solution (`metadata["solution"]`, chain-of-thought tasks)
  when it has one, else its answer.
  """
  prompt_BxP, prompt_mask_BxP = encode_prompts(tokenizer, [e.prompt for e in examples], 1)
  resp = np.full((len(examples), max_answer_tokens), tokenizer.pad_token_id or 0, np.int32)
  resp_mask = np.zeros(resp.shape, np.float32)
  for i, e in enumerate(examples):
    target = e.metadata.get("solution", e.answer)
    ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) > max_answer_tokens:
      raise ValueError(f"sft: target {target[:60]!r} needs {len(ids)} tokens with EOS, more than "
                       f"max_answer_tokens={max_answer_tokens}")
    resp[i, :len(ids)] = ids
    resp_mask[i, :len(ids)] = 1.0
  return make_batch(prompt_BxP, prompt_mask_BxP, resp, resp_mask)


def sft(model, tokenizer, task, *, steps: int, batch_size: int, learning_rate: float, seed: int,
        max_answer_tokens: int = 5, warmup_steps: int = 50, log_every: int = 0, callback=None):
  """Trains `model` for `steps` AdamW updates on the task's train split; returns the new model.

  `callback(step, model)` runs every `log_every` steps (e.g. an evaluation).
  """
  policy = train.Policy(model)
  optimizer = train.make_optimizer(train.OptimConfig(
      learning_rate=learning_rate, warmup_steps=min(warmup_steps, steps), weight_decay=0.0))
  state = train.init_state(policy, optimizer, seed)
  step_fn = train.make_sft_step(policy, optimizer)
  for step in range(steps):
    exs = task.examples("train", batch_size, seed=seed, start=step * batch_size)
    state, metrics = step_fn(state, sft_batch(tokenizer, exs, max_answer_tokens))
    if log_every and (step + 1) % log_every == 0:
      logging.info("sft step %d/%d: loss %.4f", step + 1, steps, float(metrics["loss"]))
      if callback is not None:
        callback(step + 1, policy.merge(state.params))
  return policy.merge(state.params)


def builtin_tokenizer(cfg):
  """The built-in models' char tokenizer (`cfg`: the config's `builtin` recipe), without building
  them: what the front door compares a guide's or policy's tokenizer with."""
  return char_tokenizer(cfg.get("alphabet") or DEFAULT_ALPHABET)


def ensure_builtin_models(directory: str, cfg,
                          only=("guide", "policy_init")) -> tuple[str, str]:
  """Makes (or reuses) `directory`/{guide,policy_init}; returns their paths.

  `only` names the models to make (the comparison grids share one guide between weak starts);
  both paths are returned either way.

  `cfg` is the config's `builtin` ConfigDict (model size, SFT steps of guide and policy). Both
  models share one char tokenizer and one architecture; the weak policy is the same recipe with
  far fewer steps, so it rarely solves the task. Optional fields: `alphabet` (the tokenizer's
  characters), `guide_task_kwargs` (knobs the guide's SFT task overrides, e.g. another solution
  style), `max_answer_tokens` (SFT target length). A directory is reused only if its recipe file
  matches `cfg` exactly; otherwise it is rebuilt.

  Raises UntrustedDirectoryError when `directory` or a model directory in it exists but is not
  this user's alone (`untrusted_reason`): its models would be loaded as they are.
  """
  for path in (directory, *(os.path.join(directory, n) for n in ("guide", "policy_init"))):
    if (why := untrusted_reason(path)) is not None:
      raise UntrustedDirectoryError(
          f"built-in models directory {path} {why}; its models would be reused as they are. "
          "Pass a config.builtin_dir (or --workdir) of your own, or fix its owner / `chmod o-w` "
          "it if you trust its contents.")
  recipe = json.dumps(cfg.to_dict(), sort_keys=True)
  tokenizer = builtin_tokenizer(cfg)
  tasks = {"guide": get_task(cfg.task, **{**cfg.task_kwargs, **cfg.get("guide_task_kwargs", {})}),
           "policy_init": get_task(cfg.task, **cfg.task_kwargs)}
  paths = {}
  for name, steps, seed in (("guide", cfg.guide_steps, cfg.seed + 1),
                            ("policy_init", cfg.policy_steps, cfg.seed + 2)):
    path = os.path.join(directory, name)
    paths[name] = path
    if name not in only:
      continue
    recipe_file = os.path.join(path, "mixpo_recipe.json")
    if os.path.exists(recipe_file) and open(recipe_file).read() == recipe:
      continue
    logging.info("building the built-in %s model in %s (%d SFT steps)", name, path, steps)
    hf = tiny_hf_config(tokenizer, cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads,
                        cfg.intermediate, cfg.max_positions)
    model = models.init_from_config(hf, rng=cfg.seed)  # same init for both: they differ by SFT.
    model = sft(model, tokenizer, tasks[name], steps=steps, batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate, seed=seed, log_every=max(steps // 5, 1),
                max_answer_tokens=cfg.get("max_answer_tokens", 5))
    models.save_pretrained(model, path, tokenizer=tokenizer)
    with open(recipe_file, "w") as f:  # written last: a crash before it means "rebuild".
      f.write(recipe)
    jax.clear_caches()
  return paths["guide"], paths["policy_init"]
