"""mixpo/eval_metrics.py: the unbiased pass@k estimator, maj@k, bootstrap intervals."""

import itertools
import math

import numpy as np
import pytest

from mixpo import eval_metrics


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (5, 2, 2), (6, 3, 4), (8, 7, 2), (3, 3, 3)])
def test_pass_at_k_equals_the_combinatorial_definition(n, c, k):
  # P(one of k samples drawn without replacement from n is correct), enumerated.
  subsets = list(itertools.combinations(range(n), k))
  exact = sum(any(i < c for i in s) for s in subsets) / len(subsets)
  assert math.isclose(eval_metrics.pass_at_k(n, c, k), exact, rel_tol=1e-12)
  assert math.isclose(exact, 1 - math.comb(n - c, k) / math.comb(n, k))


def test_summary_of_a_known_matrix():
  correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  answers = np.array([["5", "6", "6", "7"], ["1", "1", None, "2"], ["3"] * 4], object)
  s = eval_metrics.summarize(correct, answers, k=4, resamples=500)
  assert s["num_examples"] == 3
  assert s["mean@4"]["value"] == pytest.approx(5 / 12)
  assert s["pass@4"]["value"] == pytest.approx(2 / 3)
  assert s["maj@4"]["value"] == pytest.approx(1 / 3)  # "6" wins problem 0 and is wrong.
  for m in ("mean@4", "pass@4", "maj@4"):
    lo, hi = s[m]["ci95"]
    assert 0 <= lo <= s[m]["value"] <= hi <= 1


def test_majority_tie_goes_to_the_first_answer_and_none_never_wins():
  assert eval_metrics.majority_correct(["a", "b"], [True, False])
  assert not eval_metrics.majority_correct(["b", "a"], [False, True])
  assert eval_metrics.majority_correct([None, None, "x"], [False, False, True])


def test_bootstrap_interval_narrows_with_more_problems():
  rng = np.random.default_rng(0)
  small = eval_metrics.bootstrap_ci(rng.random(20) < 0.5)
  large = eval_metrics.bootstrap_ci(rng.random(2000) < 0.5)
  assert (large[2] - large[1]) < (small[2] - small[1]) / 4
  with pytest.raises(ValueError, match="k=5 > n=4"):
    eval_metrics.pass_at_k(4, 1, 5)


def test_strict_boxed_scores_only_boxed_answers():
  """evaluate.py --strict_boxed: "The answer is 7" or a last number no longer counts."""
  from mixpo.eval_metrics import BoxedOnly, boxed_answer
  assert boxed_answer("so \\boxed{7}.") == "7" and boxed_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
  assert boxed_answer("The answer is 7") is None and boxed_answer("\\boxed{7") is None
  full = lambda prompts, completions, **columns: [1.0] * len(completions)
  strict = BoxedOnly(full)
  assert strict(["p"] * 3, ["\\boxed{7}", "The answer is 7", "7"], answer=["7"] * 3) == [1.0, 0.0, 0.0]
  import pickle
  assert pickle.loads(pickle.dumps(BoxedOnly(eval_metrics.pass_at_k))).fn is eval_metrics.pass_at_k
