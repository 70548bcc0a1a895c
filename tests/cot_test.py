"""The chain-of-thought built-in task: determinism, disjoint splits, the verifier, SFT targets."""

import numpy as np
import pytest

from mixpo.builtin import sft_batch
from mixpo.data import char_tokenizer, get_task
from mixpo.data.cot import COT_ALPHABET, STYLES, solution


@pytest.mark.parametrize("ops", ["+", "-", "+-"])
def test_deterministic_disjoint_and_solutions_correct(ops):
  t = get_task("cot_arithmetic", digits=3, ops=ops)
  a, b = t.examples("train", 50, seed=3), t.examples("train", 50, seed=3)
  assert [e.prompt for e in a] == [e.prompt for e in b]
  assert [e.prompt for e in t.examples("train", 50, seed=4)] != [e.prompt for e in a]
  train = {e.prompt for e in t.examples("train", 2000)}
  evals = {e.prompt for e in t.eval_examples(100)}
  assert len(evals) == 100 and not train & evals
  for e in a:
    x, y = e.metadata["operands"]
    assert int(e.answer) == (x + y if e.metadata["op"] == "+" else x - y) >= 0
    assert e.metadata["solution"].endswith(f"\\boxed{{{e.answer}}}")
    assert t.reward_fn([e.prompt], [e.metadata["solution"]], answer=[e.answer]) == [1.0]


def test_each_style_states_every_column_and_carry():
  assert solution(472, 389, "+", "columns") == "2+9=11 c1\n7+8+1=16 c1\n4+3+1=8 c0\n\\boxed{861}"
  assert solution(472, 389, "-", "columns") == "12-9=3 b1\n17-8-1=8 b1\n4-3-1=0 b0\n\\boxed{83}"
  words = solution(472, 389, "+", "words")
  assert words.startswith("units 9 and 2 make 11, carry 1. tens 8 and 7 and 1 make 16")
  assert words.endswith("so \\boxed{861}")
  rng = np.random.default_rng(0)
  for a, b in rng.integers(0, 100_000, size=(200, 2)):
    for style in STYLES:
      assert solution(int(a), int(b), "+", style).endswith(f"\\boxed{{{a + b}}}")
      hi, lo = max(a, b), min(a, b)
      assert solution(int(hi), int(lo), "-", style).endswith(f"\\boxed{{{hi - lo}}}")
      assert set(solution(int(a), int(b), "+", style)) <= set(COT_ALPHABET)


def test_verifier_boxed_answers():
  t = get_task("cot_arithmetic", digits=3)
  cases = {
      "12 c1\n\\boxed{861}": 1.0,
      "steps\n\\boxed{861.0}": 1.0,  # equivalent
      "steps\n\\boxed{ 861 }": 1.0,
      "steps\n\\boxed{862}": 0.0,  # not equivalent
      "steps ending in 861": 0.0,  # a chain must end in its box
      "\\boxed{861} then \\boxed{7}": 0.0,  # two boxes: the last one counts
      "\\boxed{7} then \\boxed{861}": 1.0,
      "2+9=11 c1\n7+8+1=16 c1\n4+3+1=8 c0\n\\boxed{86": 0.0,  # truncated (overlong)
      "": 0.0,
      "steps\n\\boxed{\\frac{1722}{2}}": 1.0,  # equivalent, another form
      "steps\n\\boxed{0861}": 1.0,
      "steps\n\\boxed{860+1}": 1.0,
      "steps\n\\boxed{-861}": 0.0,
      "steps\n\\boxed{}": 0.0,  # an empty box is no answer
  }
  got = t.reward_fn(["p"] * len(cases), list(cases), answer=["861"] * len(cases))
  assert dict(zip(cases, got)) == cases
  with_format = get_task("cot_arithmetic", digits=3, format_weight=0.1)
  assert with_format.reward_fn(["p"] * 2, ["\\boxed{5}", "\\boxed{861}"], answer=["861"] * 2) == \
      pytest.approx([0.1, 1.1])


def test_truncated_chain_is_penalised_by_overlong_shaping_and_solutions_are_not():
  """The reward path of the reasoning config: a chain cut off at max_new_tokens (no EOS, no
  closed box) scores 0 and takes the full overlong penalty; the longest correct solution ends
  before the overlong window and keeps its reward 1."""
  from experiments.configs import reasoning
  from mixpo.rewards.overlong import OverlongConfig, shape_rewards
  c = reasoning.get_config()
  t = get_task(c.task, **c.task_kwargs)
  tok = char_tokenizer(COT_ALPHABET)
  longest = solution(999, 999, "+", "columns")
  cut = ("2+9=11 c1\n" * 40)[:c.rollout.max_new_tokens]  # rambles until the budget runs out.
  texts = [longest, cut]
  lengths = [len(tok(x, add_special_tokens=False)["input_ids"]) + 1 for x in texts[:1]]
  lengths.append(c.rollout.max_new_tokens)
  rewards = t.reward_fn(["999+999=?"] * 2, texts, answer=["1998"] * 2)
  shaped, _ = shape_rewards(rewards, lengths, [True, False], OverlongConfig(
      shaping=c.rollout.overlong_shaping, max_len=c.rollout.max_new_tokens,
      cache_len=c.rollout.overlong_cache))
  assert rewards == [1.0, 0.0] and shaped.tolist() == [1.0, -1.0]


def test_saved_char_tokenizer_keeps_spaces_and_newlines(tmp_path):
  """A built-in model directory (Qwen2 config.json + the char tokenizer) reloads a tokenizer that
  encodes a chain like the one it was trained with: trace responses and SFT targets are text
  re-encoded by the loaded tokenizer, and chains hold spaces and newlines."""
  import json

  from mixpo import builtin, models
  tok = char_tokenizer(COT_ALPHABET)
  tok.save_pretrained(tmp_path)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(builtin.tiny_hf_config(tok), f)
  loaded = models.load_tokenizer(str(tmp_path))
  text = solution(472, 389, "+", "words") + "\n" + solution(472, 389, "+", "columns")
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert loaded(text, add_special_tokens=False)["input_ids"] == ids
  assert loaded.decode(ids) == text and loaded.eos_token_id == tok.eos_token_id


def test_sft_targets_are_the_worked_solutions():
  tok = char_tokenizer(COT_ALPHABET)
  t = get_task("cot_arithmetic", digits=3, style="words")
  exs = t.examples("train", 4)
  batch = sft_batch(tok, exs, max_answer_tokens=176)
  row = np.asarray(batch.tokens_BxT)[0][np.asarray(batch.loss_mask_BxT)[0] > 0]
  text = tok.decode(row)
  assert text.startswith("units ") and text.endswith(f"\\boxed{{{exs[0].answer}}}<eos>")
  with pytest.raises(ValueError, match="max_answer_tokens=20"):
    sft_batch(tok, exs, max_answer_tokens=20)


@pytest.mark.slow
def test_reasoning_recipe_guide_solves_and_weak_start_rarely_does(tmp_path):
  """The built-in models of experiments/configs/reasoning.py: the guide solves >= 90 % of held-out
  problems greedily, the weak start few (the regime the RL methods are compared in)."""
  from experiments.configs import reasoning
  from mixpo import builtin, models, rl
  from mixpo.rewards import RewardRunner
  c = reasoning.get_config()
  guide, policy = builtin.ensure_builtin_models(str(tmp_path), c.builtin)
  task = get_task(c.task, **c.task_kwargs)
  examples = task.eval_examples(100)
  acc = {}
  with RewardRunner([(task.reward_fn, 1.0)], timeout_s=60) as r:
    for name, path in (("guide", guide), ("policy", policy)):
      out = rl.evaluate(models.from_pretrained(path), models.load_tokenizer(path), examples, r,
                        c.rollout.max_new_tokens, batch_size=100)
      acc[name] = out["accuracy"]
  assert acc["guide"] >= 0.9 and acc["policy"] <= 0.2, acc
