"""Analytic model FLOPs: forward, generation, scoring, training, and what an RL or SFT step spent.

Convention (the one MFU figures use): 2 FLOPs per multiply-add of every weight matmul (q, k, v,
o, gate, up, down and the LM head; the embedding lookup is a gather, 0) plus attention's q·k and
p·v over the keys each query sees. Not counted: norms, activations, softmax, RoPE, biases, the
optimizer (O(parameters) a step, not O(tokens)), and padding (a padded row's masked tokens are
not model work). A causal pass over T tokens: Σ_t (W + a·t) = T·(W + a·(T + 1) / 2), so
`sequence_flops` is exact with the mean context (T + 1) / 2.
Work, in units of that forward:
  generate P prompt + N new tokens   forward over P + N − 1 tokens (prefill + N − 1 decode steps:
                                      the last sampled token is not fed back)
  score a row (θ_old, πϕ, π_ref)     forward over P + N tokens
  train a row (full fine-tuning)     3 × forward (activation gradients and weight gradients each
                                      cost about one forward)
  train a row (LoRA rank r)          2 × forward of the frozen base (no weight gradients) +
                                      3 × forward of the adapters (2·r·(in + out) per adapted
                                      matmul and token; the default targets: every projection)
Configs are Hugging Face config.json dicts (hidden_size, num_attention_heads, ...).
"""

from __future__ import annotations

import dataclasses
import math


def _dims(config: dict) -> tuple[int, int, int, int, int, int, int]:
  """(d, f, v, n, k, h, layers): hidden, intermediate, vocab, heads, kv heads, head dim, layers."""
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  n, k = config["num_attention_heads"], config["num_key_value_heads"]
  h = config.get("head_dim") or d // n
  return d, f, v, n, k, h, config["num_hidden_layers"]


def _projections(config: dict) -> tuple[tuple[int, int], ...]:
  """[in, out] of a decoder block's weight matmuls: q, k, v, o, gate, up, down."""
  d, f, _, n, k, h, _ = _dims(config)
  return ((d, n * h), (d, k * h), (d, k * h), (n * h, d), (d, f), (d, f), (f, d))


def forward_flops_per_token(config: dict, context: float) -> float:
  """Model FLOPs of one token's forward pass: 2 per multiply-add of every weight matmul (the
  LM head included) plus attention's q·k and p·v over `context` keys (the mean number of keys a
  query sees: (T + 1) / 2 for a causal pass over T tokens)."""
  d, _, v, n, _, h, layers = _dims(config)
  layer = sum(i * o for i, o in _projections(config))
  return 2.0 * (layers * layer + d * v) + 4.0 * layers * n * h * context


def lora_flops_per_token(config: dict, rank: int) -> float:
  """Forward FLOPs of rank-`rank` adapters on every decoder projection: x·A·B costs
  2·r·(in + out) per adapted [in, out] kernel and token."""
  layers = config["num_hidden_layers"]
  return 2.0 * rank * layers * sum(i + o for i, o in _projections(config))


def forward_parts(config: dict, tokens: float, context: float, lora_rank: int = 0,
                  head_tokens: float | None = None) -> dict[str, float]:
  """A forward pass over `tokens` tokens attending to `context` keys on average, by part, for
  callers that weigh the parts differently (a backward pass, recomputation under remat): the
  block projections ("layers"), rank-`lora_rank` adapters on them ("adapters"), attention's q·k
  and p·v ("attention") and the LM head over `head_tokens` (default: every token; a prefill
  computes the last position's logits only)."""
  d, _, v, n, _, h, layers = _dims(config)
  projections = _projections(config)
  layer = sum(2 * i * o for i, o in projections)
  adapters = sum(2 * lora_rank * (i + o) for i, o in projections)
  head_tokens = tokens if head_tokens is None else head_tokens
  return {"layers": layers * layer * tokens, "adapters": layers * adapters * tokens,
          "attention": layers * 4 * n * h * tokens * context, "head": 2 * d * v * head_tokens}


def sequence_flops(config: dict, tokens: float) -> float:
  """Forward FLOPs of a causal pass over `tokens` tokens (exact: mean context (T + 1) / 2)."""
  if tokens <= 0:
    return 0.0
  return tokens * forward_flops_per_token(config, (tokens + 1) / 2)


def generate_flops(config: dict, prompt_tokens: float, new_tokens: float) -> float:
  """FLOPs of sampling `new_tokens` after a `prompt_tokens` prompt (one row)."""
  if new_tokens <= 0:
    return 0.0
  return sequence_flops(config, prompt_tokens + new_tokens - 1)


def train_flops(config: dict, tokens: float, lora_rank: int = 0) -> float:
  """FLOPs of one forward + backward over a row of `tokens` tokens (full or LoRA)."""
  if not lora_rank:
    return 3.0 * sequence_flops(config, tokens)
  return 2.0 * sequence_flops(config, tokens) + 3.0 * tokens * lora_flops_per_token(config,
                                                                                   lora_rank)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """What a run's steps cost, read from its config: the models and who scores what.

  policy / guide: config.json dicts of the policy and the guide (None when unguided);
  prompt_tokens: mean prompt length in tokens (chat template included);
  guide_online: OFF rows sampled from the guide every step (config.guide.source == "model");
  guide_scores: πϕ of every row by a guide forward (config.guide.logp == "model");
  reference: a frozen π_ref scores every row (config.objective.kl_coef > 0).
  """

  policy: dict
  prompt_tokens: float
  guide: dict | None = None
  guide_online: bool = False
  guide_scores: bool = False
  reference: bool = False
  epochs: int = 1
  lora_rank: int = 0


# Per-step FLOP parts a grid row reports (cumulative), in this order; "flops" is their sum.
PARTS = ("flops_policy_gen", "flops_guide_gen", "flops_score", "flops_update", "flops_sft")


def _per_row(rows: float, tokens: float, fn) -> float:
  """`rows` rows of mean response length tokens / rows, each costing fn(length) FLOPs."""
  if rows <= 0 or tokens <= 0:
    return 0.0
  return rows * fn(tokens / rows)


def rl_step_flops(metrics: dict, cost: StepCost, groups: int, n: int) -> dict[str, float]:
  """{part: FLOPs} of one logged RL step (a metrics.jsonl row of `mixpo.loop.run`).

  Reads: dynamic/gen_batches (draws of `groups` × `n` rows; 1 when absent), step_policy_tokens
  (response tokens generated over every draw), step_guide_tokens (the guide rows' response
  tokens), train/rows_on, rows_zero, rows_off (the batch's real rows: ON and ZERO are policy
  rows, OFF the guide's) and train/response_length (mean length of the batch's policy rows).
  Response lengths enter as per-row means: exact for the weight matmuls, off by Jensen's gap
  only in the attention term (a few % of the total at these lengths).
  """
  p = cost.prompt_tokens
  out = {part: 0.0 for part in PARTS}
  gen_rows = (metrics.get("dynamic/gen_batches") or 1) * groups * n
  out["flops_policy_gen"] = _per_row(gen_rows, metrics.get("step_policy_tokens", 0),
                                     lambda nt: generate_flops(cost.policy, p, nt))
  policy_rows = metrics.get("train/rows_on", 0) + metrics.get("train/rows_zero", 0)
  guide_rows = metrics.get("train/rows_off", 0)
  guide_tokens = metrics.get("step_guide_tokens", 0)
  length = metrics.get("train/response_length", 0.0)
  length = 0.0 if length is None or math.isnan(length) else length
  if cost.guide_online and cost.guide is not None:
    out["flops_guide_gen"] = _per_row(guide_rows, guide_tokens,
                                      lambda nt: generate_flops(cost.guide, p, nt))
  for rows, tokens in ((policy_rows, policy_rows * length), (guide_rows, guide_tokens)):
    # One forward over every row per scorer: θ_old always, πϕ and π_ref when the run loads them.
    scorers = [cost.policy] + ([cost.guide] if cost.guide_scores and cost.guide else []) + (
        [cost.policy] if cost.reference else [])
    for model in scorers:
      out["flops_score"] += _per_row(rows, tokens, lambda nt, c=model: sequence_flops(c, p + nt))
    out["flops_update"] += cost.epochs * _per_row(
        rows, tokens, lambda nt: train_flops(cost.policy, p + nt, cost.lora_rank))
  return out


def sft_step_flops(config: dict, rows: int, prompt_tokens: float, trained_tokens: float,
                   lora_rank: int = 0) -> float:
  """FLOPs of one SFT step: `rows` rows, `trained_tokens` target tokens (EOS included) in all."""
  return _per_row(rows, trained_tokens,
                  lambda nt: train_flops(config, prompt_tokens + nt, lora_rank))


def traces_flops(config: dict, prompt_tokens: float, samples: int, sampled_tokens: float,
                 scored: int = 0, scored_tokens: float = 0) -> float:
  """FLOPs of writing a trace file: `samples` samples of `sampled_tokens` new tokens in all, then
  one log-prob forward over each of the `scored` kept responses (`scored_tokens` in all)."""
  return (_per_row(samples, sampled_tokens, lambda nt: generate_flops(config, prompt_tokens, nt))
          + _per_row(scored, scored_tokens, lambda nt: sequence_flops(config, prompt_tokens + nt)))
