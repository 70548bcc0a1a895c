"""mixpo/data/word_problems.py: deterministic streams, the hashed split, worked solutions that are
right, chat rendering, and the verifier's cases."""

import re

import pytest

from mixpo.data import get_task, task_options
from mixpo.data.word_problems import WordProblemTask


def _evaluate(arithmetic: str) -> int:
  """Value of "12+7-5*3" applied left to right (the task's events, in order)."""
  tokens = re.findall(r"\d+|[+\-*]", arithmetic)
  value = int(tokens[0])
  for op, k in zip(tokens[1::2], tokens[2::2]):
    value = value + int(k) if op == "+" else value - int(k) if op == "-" else value * int(k)
  return value


def test_streams_are_pure_functions_of_their_arguments():
  t = get_task("word_problems", steps=3, ops="+-*")
  a = t.examples("train", 20, seed=3)
  assert [(e.prompt, e.answer, e.metadata) for e in a] == [
      (e.prompt, e.answer, e.metadata) for e in get_task("word_problems", steps=3, ops="+-*")
      .examples("train", 20, seed=3)]
  assert t.examples("train", 5, seed=3, start=10) == a[10:15]
  assert [e.prompt for e in t.examples("train", 20, seed=4)] != [e.prompt for e in a]
  assert t.eval_examples(30) == t.eval_examples(30)
  assert len({e.prompt for e in t.eval_examples(30)}) == 30


def test_split_is_by_the_arithmetic_and_disjoint():
  t = get_task("word_problems", steps=1, max_value=12)
  train = {e.metadata["arithmetic"] for s in range(3) for e in t.examples("train", 200, seed=s)}
  evals = {e.metadata["arithmetic"] for e in t.examples("eval", 60)}
  assert train and evals and not train & evals  # no eval problem under another name or wording.


@pytest.mark.parametrize("kwargs", [dict(steps=1), dict(steps=2, min_steps=1),
                                    dict(steps=4, ops="+-*", max_value=50)])
def test_solutions_are_right_and_score_one(kwargs):
  t = get_task("word_problems", **kwargs)
  examples = t.examples("train", 40)
  counts = set()
  for e in examples:
    arithmetic = e.metadata["arithmetic"]
    counts.add(len(re.findall(r"[+\-*]", arithmetic)))
    assert int(e.answer) == _evaluate(arithmetic) >= 1
    assert e.metadata["solution"].endswith(f"The answer is \\boxed{{{e.answer}}}.")
    assert e.prompt == e.metadata["question"]  # no tokenizer: the plain question.
    assert e.prompt.endswith("Put the final answer in \\boxed{}.")
    assert not re.search(r"\b1 [a-z]+s\b", e.prompt)  # operands >= 2: "1 books" never appears.
  assert counts == set(range(kwargs.get("min_steps", kwargs["steps"]), kwargs["steps"] + 1))
  solutions = [e.metadata["solution"] for e in examples]
  assert t.reward_fn([e.prompt for e in examples], solutions,
                     answer=[e.answer for e in examples]) == [1.0] * len(examples)


def test_verifier_cases():
  answer = get_task("word_problems").reward_fn
  boxed = get_task("word_problems", reward="boxed").reward_fn
  cases = [("So she has 18 now. The answer is \\boxed{18}.", 1.0, 1.0),
           ("18 + 0 = 18. The final answer is 18.", 1.0, 0.0),  # unboxed: "answer" only.
           ("Mia has 7 + 11 = 18 coins", 1.0, 0.0),  # the last number.
           ("The answer is \\boxed{}.", 0.0, 0.0),  # an empty box is no answer.
           ("The answer is \\boxed{17}. Oh wait, 18", 0.0, 0.0),  # the box wins.
           ("The answer is \\boxed{18.0}.", 1.0, 1.0),  # math-verify: equal values.
           ("", 0.0, 0.0)]
  texts, want_answer, want_boxed = zip(*cases)
  gold = ["18"] * len(cases)
  assert answer([""] * len(cases), list(texts), answer=gold) == list(want_answer)
  assert boxed([""] * len(cases), list(texts), answer=gold) == list(want_boxed)


class _ChatTokenizer:
  chat_template = "template"

  def apply_chat_template(self, messages, tokenize, add_generation_prompt):
    assert not tokenize and add_generation_prompt and len(messages) == 1
    return f"<user>{messages[0]['content']}</user><assistant>"


def test_prompt_is_rendered_with_the_chat_template_given_through_make_task():
  t = task_options.make_task("word_problems", {"steps": 2}, tokenizer=_ChatTokenizer())
  e = t.examples("train", 1)[0]
  assert e.prompt == f"<user>{e.metadata['question']}</user><assistant>"
  # The same problems as without a template: rendering changes nothing else.
  plain = WordProblemTask(steps=2).examples("train", 1)[0]
  assert (plain.answer, plain.metadata) == (e.answer, e.metadata)


def test_bad_knobs_are_refused():
  for kwargs in (dict(steps=5), dict(steps=2, min_steps=3), dict(max_value=4), dict(ops="*"),
                 dict(reward="digits"), dict(format_weight=0.5)):
    with pytest.raises(ValueError, match="WordProblemTask"):
      WordProblemTask(**kwargs)
