"""Multi-step arithmetic word problems in plain English, answered in \\boxed{}: the real-model task.

The built-in tasks are written for char-level models ("37+45="); a pretrained chat model needs a
question it can read. A problem is a starting amount and `steps` events, each one operation:
  "Mia has 12 stickers. She buys 7 more stickers. Then she gives 5 stickers to Leo. After that,
   the number of stickers she has triples. How many stickers does Mia have now? Put the final
   answer in \\boxed{}."
with a worked solution (`metadata["solution"]`, the SFT target of the guide):
  "Mia starts with 12 stickers. She buys 7 more: 12 + 7 = 19. She gives 5 away: 19 - 5 = 14.
   They triple: 14 * 3 = 42. The answer is \\boxed{42}."
Given a tokenizer with a chat template (`make_task` passes the policy's), the prompt is the
question rendered as one user turn with the generation prompt; without one it is the question.
Knobs: steps (1-4 events; min_steps < steps: a uniform count in [min_steps, steps]), max_value (amounts and operands in [2, max_value]), ops ("+-" or
"+-*": multiplication by 2 or 3 while the amount stays <= 10 * max_value), eval_fraction,
reward, format_weight. The split is decided by the hash of the arithmetic alone (start,
operations, operands), so an eval problem never reaches training under another name or wording.
Reward: math-verify on the final answer (`WordProblemTask`'s `reward`). The converted
SmolLM2-135M-Instruct often ends "The final answer is 18." or with an empty "\\boxed{}": the
default "answer" reward scores the first as it scores a box, the second as no answer.
"""

from __future__ import annotations

import numpy as np

from mixpo.data.cot import BoxedAnswerReward
from mixpo.data.tasks import (Example, GeneratedTask, check_split, derive_seed,
                              register_task, split_of)
from mixpo.rewards.math_answer import math_answer_reward

NAMES = (("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"),
         ("Sam", "he"), ("Ella", "she"), ("Omar", "he"), ("Lily", "she"), ("Ben", "he"))
ITEMS = ("stickers", "apples", "marbles", "coins", "books", "pencils", "cards", "shells",
         "cookies", "stamps")
# Event wordings: (question sentence, solution clause); {k} the operand, {x} the item, {p} the
# pronoun ({P} capitalised, {q} its object form), {o} another person. Solutions continue with
# ": a op k = b.".
ADD = (("{P} buys {k} more {x}.", "{P} buys {k} more"),
       ("{P} finds {k} {x}.", "{P} finds {k}"),
       ("{o} gives {q} {k} {x}.", "{o} gives {q} {k}"))
SUB = (("{P} gives {k} {x} to {o}.", "{P} gives {k} away"),
       ("{P} loses {k} {x}.", "{P} loses {k}"),
       ("{P} uses {k} {x}.", "{P} uses {k}"))
MUL = {2: ("The number of {x} {p} has doubles.", "They double"),
       3: ("The number of {x} {p} has triples.", "They triple")}
LINKS = ("", "Then ", "After that, ")
INSTRUCTION = "Put the final answer in \\boxed{}."
REWARDS = ("answer", "boxed")


class WordProblemTask(GeneratedTask):
  """Word problems of `steps` events on a starting amount (module docstring).

  tokenizer: renders the prompt with its chat template (one user turn + generation prompt);
    None or a tokenizer without a template: the prompt is the plain question.
  reward: "answer" (`math_answer_reward`: the last \\boxed{}, else what follows "The answer is",
    else the last number, verified by math-verify; an empty box scores 0) or "boxed" (only a
    boxed answer counts).
  format_weight: reward="boxed" only: weight of a format reward (a non-empty, balanced
    \\boxed{}) added to the answer reward; < 1 so that only a right answer counts as solved.
  """

  def __init__(self, steps: int = 2, max_value: int = 20, ops: str = "+-", min_steps: int = 0,
               eval_fraction: float = 0.1, reward: str = "answer", format_weight: float = 0.0,
               tokenizer=None):
    min_steps = min_steps or steps
    if not 1 <= min_steps <= steps <= 4 or not 5 <= max_value <= 1000 or ops not in ("+-",
                                                                                     "+-*"):
      raise ValueError(f"WordProblemTask(steps={steps}, min_steps={min_steps}, max_value="
                       f"{max_value}, ops={ops!r}): need 1 <= min_steps <= steps <= 4, "
                       "5 <= max_value <= 1000, ops '+-' or '+-*'")
    if not 0 <= format_weight < 1 or not 0 < eval_fraction < 1:
      raise ValueError(f"WordProblemTask(format_weight={format_weight}, eval_fraction="
                       f"{eval_fraction}): need 0 <= format_weight < 1, 0 < eval_fraction < 1")
    self.steps, self.min_steps, self.max_value, self.ops = steps, min_steps, max_value, ops
    self.eval_fraction = eval_fraction
    span = f"{min_steps}-{steps}" if min_steps < steps else f"{steps}"
    self.name = f"word_s{span}_v{max_value}_{'addsub' if ops == '+-' else 'addsubmul'}"
    if reward not in REWARDS:
      raise ValueError(f"WordProblemTask(reward={reward!r}): use one of {REWARDS}")
    if reward == "boxed":
      self.reward_fn = BoxedAnswerReward(format_weight, name="word_answer")
    elif format_weight:
      raise ValueError(f"WordProblemTask(format_weight={format_weight}): a format reward needs "
                       "reward='boxed'")
    else:
      self.reward_fn = math_answer_reward
    self.tokenizer = tokenizer if getattr(tokenizer, "chat_template", None) else None

  def _arithmetic(self, rng) -> tuple[int, list[tuple[str, int]]]:
    """(start, [(op, operand)]) with every operand >= 2 and every intermediate amount >= 1."""
    start = int(rng.integers(2, self.max_value + 1))
    amount, events = start, []
    for _ in range(int(rng.integers(self.min_steps, self.steps + 1))):
      ops = ["+"] + (["-"] if amount >= 3 else [])  # operands >= 2: "1 books" never appears
      if "*" in self.ops and 2 * amount <= 10 * self.max_value:
        ops.append("*")
      op = ops[int(rng.integers(len(ops)))]
      if op == "+":
        k = int(rng.integers(2, self.max_value + 1))
        amount += k
      elif op == "-":
        k = int(rng.integers(2, min(amount - 1, self.max_value) + 1))
        amount -= k
      else:
        k = 2 if 3 * amount > 10 * self.max_value else int(rng.integers(2, 4))
        amount *= k
      events.append((op, k))
    return start, events

  def _words(self, rng, start: int, events) -> tuple[str, str, int]:
    """(question, worked solution, answer) of the arithmetic in a wording drawn from `rng`."""
    who = NAMES[int(rng.integers(len(NAMES)))]
    other = NAMES[(NAMES.index(who) + 1 + int(rng.integers(len(NAMES) - 1))) % len(NAMES)][0]
    name, pronoun = who
    item = ITEMS[int(rng.integers(len(ITEMS)))]
    question = [f"{name} has {start} {item}."]
    solution = [f"{name} starts with {start} {item}."]
    amount = start
    for i, (op, k) in enumerate(events):
      fill = dict(P=pronoun.capitalize(), p=pronoun, q="him" if pronoun == "he" else "her",
                  k=k, x=item, o=other)
      if op == "*":
        said, step = MUL[k]
        new = amount * k
      else:
        said, step = (ADD if op == "+" else SUB)[int(rng.integers(3))]
        new = amount + k if op == "+" else amount - k
      sentence = said.format(**fill)
      link = LINKS[min(i, len(LINKS) - 1)]
      if link and not sentence.startswith(other):  # "Then she buys", "Then Leo gives"
        sentence = sentence[0].lower() + sentence[1:]
      question.append(link + sentence)
      solution.append(f"{step.format(**fill)}: {amount} {op} {k} = {new}.")
      amount = new
    question.append(f"How many {item} does {name} have now? {INSTRUCTION}")
    solution.append(f"The answer is \\boxed{{{amount}}}.")
    return " ".join(question), " ".join(solution), amount

  def render(self, question: str) -> str:
    """The prompt the model reads: the chat template's user turn, or the question itself."""
    if self.tokenizer is None:
      return question
    return self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                              tokenize=False, add_generation_prompt=True)

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    """The index-th example of `split` in the stream of `seed` (pure function of its arguments)."""
    check_split(split, f"{self.name}.example")
    for attempt in range(10_000):
      rng = np.random.default_rng(derive_seed(self.name, seed, index, attempt))
      start, events = self._arithmetic(rng)
      key = f"word:{start}" + "".join(f"{op}{k}" for op, k in events)
      if split_of(key, self.eval_fraction) == split:
        question, solution, answer = self._words(rng, start, events)
        return Example(prompt=self.render(question), answer=str(answer),
                       metadata={"question": question, "solution": solution,
                                 "arithmetic": key[5:]})
    raise RuntimeError(f"{self.name}: no {split} problem in 10000 draws; raise eval_fraction")


register_task("word_problems", WordProblemTask)
