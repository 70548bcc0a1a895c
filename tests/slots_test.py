"""mixpo/slots.py: continuous batching returns exactly what the static batch returns."""

import jax
import numpy as np
import pytest

from mixpo import models, sampling, slots

VOCAB = 96
# Wide init (0.2): greedy argmaxes are not near-ties that float rounding could flip between the
# static batch and the slots (different batch shapes, different summation orders).
CONFIG = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model():
  return models.init_from_config(CONFIG, 0)


def _ragged(rows, width, max_budget, seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, width + 1, rows)
  tokens = np.zeros((rows, width), np.int32)
  mask = np.zeros((rows, width), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, width - n:] = rng.integers(1, VOCAB, n)
    mask[i, width - n:] = 1
  return tokens, mask, rng.integers(1, max_budget + 1, rows).astype(np.int32)


def _rows(tokens, mask, budgets):
  return slots.RowList([slots.Request(i, tokens[i][mask[i] == 1], int(budgets[i]))
                        for i in range(len(tokens))])


def _assert_same(got, want):
  for field in ("tokens_BxN", "mask_BxN", "lengths_B", "truncated_B"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                  np.asarray(getattr(want, field)), err_msg=field)
  np.testing.assert_allclose(np.asarray(got.logp_BxN), np.asarray(want.logp_BxN), atol=1e-5)


def test_slots_return_the_static_batch_under_greedy_decoding(model):
  """Ragged prompts, per-row budgets, an EOS id: `generate` (every row at once, ended rows
  gathered out) and slot refill with 3 slots (rows start as others end, the cache window
  shifts) return the static batch's tokens, and log-probs within 1e-5."""
  n = 40
  tokens, mask, budgets = _ragged(24, 20, n, seed=0)
  free = sampling.static_generate(model, tokens, mask, jax.random.key(0), n, temperature=0.0)
  eos = int(np.asarray(free.tokens_BxN)[0, 3])  # a token greedy decoding produces early on
  want = sampling.static_generate(model, tokens, mask, jax.random.key(0), n, temperature=0.0,
                                  eos_id=eos, row_budgets=budgets)
  lengths = np.asarray(want.lengths_B)
  assert (lengths < budgets).any() and (lengths == budgets).any() and lengths.max() > 16
  # (min_bucket: no compaction in this call; the slots run below compacts, with fewer programs)
  got = sampling.generate(model, tokens, mask, jax.random.key(0), n, temperature=0.0,
                          eos_id=eos, row_budgets=budgets, min_bucket=32)
  _assert_same(got, want)
  work = _rows(tokens, mask, budgets)
  cfg = slots.SlotConfig(slots=3, prompt_width=32, max_new_tokens=n, refill_at=1, min_bucket=2,
                         compact_min_steps=1)
  stats = slots.SlotSampler(model, cfg, slots.SampleOptions(temperature=0.0, eos_E=(eos,)),
                            jax.random.key(0)).run(work)
  assert stats.shifts > 0 and stats.compactions > 0 and stats.prefills > 1
  assert stats.tokens == lengths.sum() and stats.slot_steps < 3 * n * 24 / 3
  _assert_same(sampling.rollout_from_rows(work.results, 24, n, 0), want)


def test_rows_of_one_prompt_share_a_prefill_and_sample_the_same(model):
  """Runs of k rows with one prompt (a group's samples): with group_rows=k each prefill computes
  at most ceil(R / k) + 1 prompts, and every row's tokens are those of the unshared prefill (the
  same logits, the row's own noise); log-probs within 1e-5."""
  k, groups, n = 4, 6, 12
  tokens, mask, budgets = _ragged(groups, 10, n, seed=1)
  tokens, mask, budgets = (np.repeat(x, k, axis=0) for x in (tokens, mask, budgets))
  results, stats = [], []
  for share in (1, k):
    work = _rows(tokens, mask, budgets)
    cfg = slots.SlotConfig(slots=8, prompt_width=16, max_new_tokens=n, refill_at=3, min_steps=1,
                           group_rows=share)
    stats.append(slots.SlotSampler(model, cfg, slots.SampleOptions(temperature=1.0),
                                   jax.random.key(3)).run(work))
    results.append(sampling.rollout_from_rows(work.results, groups * k, n, 0))
  _assert_same(results[1], results[0])
  assert stats[1].prefills == stats[0].prefills > 2
  assert stats[1].prefill_rows < stats[0].prefill_rows / 2
  # generate finds the runs itself: the same rows as the static batch (greedy).
  want = sampling.static_generate(model, tokens, mask, jax.random.key(0), n, temperature=0.0)
  _assert_same(sampling.generate(model, tokens, mask, jax.random.key(0), n, temperature=0.0,
                                 min_bucket=32), want)
  assert sampling._prompt_runs(tokens, mask) == k  # pylint: disable=protected-access
  assert sampling._prompt_runs(tokens[1:], mask[1:]) == 1  # pylint: disable=protected-access
  assert slots.SlotConfig(8, 16, n, group_rows=4).prefill_prompts(8) == 3


def test_short_budgets_refill_as_rows_end_instead_of_in_waves(model):
  """With max_new_tokens <= min_steps no row could take min_steps steps: the run returns (and
  refills) once refill_at rows ended, as with min_steps=1, instead of running waves as long as
  their longest row."""
  n = 6
  tokens, mask, budgets = _ragged(48, 8, n, seed=2)
  stats = {}
  for wait in (1, 8):
    cfg = slots.SlotConfig(slots=16, prompt_width=8, max_new_tokens=n, refill_at=4,
                           min_steps=wait)
    stats[wait] = slots.SlotSampler(model, cfg, slots.SampleOptions(temperature=1.0),
                                    jax.random.key(0)).run(_rows(tokens, mask, budgets))
  assert stats[8] == stats[1]
  waves = 0  # row-steps of waves of 16 rows, each as long as its longest row
  for i in range(0, 48, 16):
    waves += 16 * (budgets[i:i + 16].max() - 1)
  assert stats[8].slot_steps < waves and stats[8].tokens == budgets.sum()
