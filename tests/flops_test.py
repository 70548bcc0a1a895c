"""mixpo/flops.py against hand counts on a tiny model, and a logged RL / SFT step's FLOPs."""

import pytest

from experiments import bench_common
from mixpo import flops

# hidden 8, 2 query heads of 4 (one kv head), MLP 16, vocab 10, one layer.
TINY = {"hidden_size": 8, "intermediate_size": 16, "vocab_size": 10, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_hidden_layers": 1}
# Multiply-adds per token, by hand: q 8·8, k 8·4, v 8·4, o 8·8, gate / up / down 3·8·16, head 8·10.
WEIGHTS = 2 * (64 + 32 + 32 + 64 + 384 + 80)  # 1312
ATTENTION = 4 * 2 * 4  # q·k and p·v per key: 2 FLOPs × 2 matmuls × heads × head_dim = 32


def test_forward_matches_a_hand_count():
  assert flops.forward_flops_per_token(TINY, 0) == WEIGHTS == 1312
  assert flops.forward_flops_per_token(TINY, 5) == WEIGHTS + 5 * ATTENTION
  assert flops.forward_flops_per_token({**TINY, "num_hidden_layers": 3}, 2) == (
      3 * (WEIGHTS - 2 * 80) + 2 * 80 + 3 * 2 * ATTENTION)  # the head once, layers thrice.
  assert bench_common.forward_flops_per_token is flops.forward_flops_per_token  # one count.


def test_causal_pass_sums_every_tokens_context():
  # Token t of a causal pass sees t keys: Σ_t (W + a·t) for T = 7.
  by_hand = sum(WEIGHTS + ATTENTION * t for t in range(1, 8))
  assert flops.sequence_flops(TINY, 7) == pytest.approx(by_hand)
  # Generating 3 tokens after a 4-token prompt feeds 4 + 3 − 1 tokens through the model.
  assert flops.generate_flops(TINY, 4, 3) == pytest.approx(
      sum(WEIGHTS + ATTENTION * t for t in range(1, 7)))
  assert flops.generate_flops(TINY, 4, 0) == 0.0


def test_training_costs_three_forwards_or_lora_two_plus_adapters():
  assert flops.train_flops(TINY, 7) == pytest.approx(3 * flops.sequence_flops(TINY, 7))
  # Rank 2 adapters on q, k, v, o, gate, up, down: 2·r·(in + out) per token each.
  adapters = 2 * 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8) + (8 + 16) + (8 + 16) + (16 + 8))
  assert flops.lora_flops_per_token(TINY, 2) == adapters
  assert flops.train_flops(TINY, 7, lora_rank=2) == pytest.approx(
      2 * flops.sequence_flops(TINY, 7) + 3 * 7 * adapters)


def test_rl_step_counts_every_phase():
  """A logged step: 2 draws of 2 groups × 2 samples (8 rows, 24 tokens), 3 ON + 1 ZERO policy
  rows of mean length 4 and 2 OFF rows with 10 guide tokens; prompts of 5 tokens."""
  metrics = {"dynamic/gen_batches": 2, "step_policy_tokens": 24, "step_guide_tokens": 10,
             "train/rows_on": 3, "train/rows_zero": 1, "train/rows_off": 2,
             "train/response_length": 4.0}
  seq = lambda t: flops.sequence_flops(TINY, t)
  gen = lambda p, n: flops.generate_flops(TINY, p, n)
  unguided = flops.StepCost(policy=TINY, prompt_tokens=5)
  got = flops.rl_step_flops(metrics, unguided, groups=2, n=2)
  assert got["flops_policy_gen"] == pytest.approx(8 * gen(5, 3))
  # θ_old scores the 4 policy rows (5 + 4 tokens) and the 2 guide rows (5 + 5), once each.
  assert got["flops_score"] == pytest.approx(4 * seq(9) + 2 * seq(10))
  assert got["flops_update"] == pytest.approx(3 * (4 * seq(9) + 2 * seq(10)))
  assert got["flops_guide_gen"] == got["flops_sft"] == 0.0
  guide = {**TINY, "num_hidden_layers": 2}  # a deeper guide: its passes cost more.
  online = flops.StepCost(policy=TINY, prompt_tokens=5, guide=guide, guide_online=True,
                          guide_scores=True, reference=True, epochs=2)
  got = flops.rl_step_flops(metrics, online, groups=2, n=2)
  assert got["flops_guide_gen"] == pytest.approx(2 * flops.generate_flops(guide, 5, 5))
  rows = lambda f: 4 * f(9) + 2 * f(10)
  assert got["flops_score"] == pytest.approx(
      2 * rows(seq) + rows(lambda t: flops.sequence_flops(guide, t)))  # θ_old, π_ref; πϕ.
  assert got["flops_update"] == pytest.approx(2 * 3 * rows(seq))
  # Without dynamic-sampling stats a step is one draw; without rows it trains nothing.
  assert flops.rl_step_flops({"step_policy_tokens": 24}, unguided, 2, 2) == {
      **{p: 0.0 for p in flops.PARTS}, "flops_policy_gen": pytest.approx(4 * gen(5, 6))}


def test_sft_and_trace_files():
  assert flops.sft_step_flops(TINY, rows=4, prompt_tokens=5, trained_tokens=12) == pytest.approx(
      4 * 3 * flops.sequence_flops(TINY, 8))
  assert flops.traces_flops(TINY, 5, samples=4, sampled_tokens=20, scored=2,
                            scored_tokens=6) == pytest.approx(
      4 * flops.generate_flops(TINY, 5, 5) + 2 * flops.sequence_flops(TINY, 8))
