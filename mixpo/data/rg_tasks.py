"""reasoning-gym adapter: any `reasoning_gym.create_dataset(name, ...)` as a mixpo Task.

Registered as "rg:<name>" (e.g. get_task("rg:countdown", min_numbers=3, max_numbers=4)); knobs
are passed to reasoning-gym's dataset config. Each example is item 0 of a size-1 dataset whose seed
is derived from (seed, index, attempt), so access by index is O(1) and deterministic; the split is
decided by the hash of the question text, as for the built-in tasks. Scoring is reasoning-gym's own
`score_answer` (it may give partial credit, e.g. 0.05 for a well-formed wrong countdown answer).

Safety: the text scored is model output. Several reasoning-gym scorers hand the answer to Python's
`eval` or sympy's `parse_expr` (which keeps `__import__`), so a completion could run code in the
reward worker. Only datasets in `SAFE_SCORERS` (scorers that never evaluate the answer, reviewed
for the pinned reasoning-gym version) and `PREPARSED` (scorers that do, reached only by answers that
match a strict grammar of what the task needs: digits and + - * / ( ) for countdown) are accepted;
every other dataset is refused with the reason. Scoring also runs under
`mixpo.rewards.sandbox.guarded()`, which refuses to run code built from text, so a scorer wrongly
listed still cannot execute a completion; for the same reason reasoning-gym is imported and the
dataset's scorer built in `ReasoningGymReward.prepare()`, before the guard is armed (its import
builds dataclasses from text). A scorer that raises on a completion's answer ("None" for
prime_factorization, "{}" for game_of_life) gives a wrong answer: `ScorerError`, which the
RewardRunner scores 0 and counts as `reward/scorer_errors`, never a run error.
"""

from __future__ import annotations

import decimal
import functools
import re

from mixpo.data.tasks import Example, GeneratedTask, check_split, derive_seed, split_of
from mixpo.rewards import sandbox
from mixpo.rewards.runner import ScorerError

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# Scorers that compare, count or parse the answer without evaluating it (reasoning-gym 0.1.25).
# Four of their modules call eval/exec on text of their own, never on the answer:
# basic_arithmetic and bitwise_arithmetic evaluate the generated problem (the answer goes through
# int(x, 0)); codeio executes its bundled generator code while building problems; number_sorting
# evaluates its own reference answer and reads the answer with json.loads.
SAFE_SCORERS = frozenset("""
ab acre advanced_geometry aiw arc_1d arc_agi base_conversion basic_arithmetic bf
binary_alternation bitwise_arithmetic boxnet caesar_cipher calendar_arithmetic chain_sum
circuit_logic codeio coin_flip color_cube_rotation complex_arithmetic count_bits count_primes
course_schedule cryptarithm decimal_arithmetic decimal_chain_sum dice emoji_mystery
family_relationships figlet_font fraction_simplification futoshiki game_of_life
game_of_life_halting gcd graph_color group_anagrams gsm_symbolic isomorphic_strings jugs
kakurasu knight_swap knights_knaves largest_island lcm leg_counting letter_counting
letter_jumble list_functions mahjong_puzzle manipulate_matrix maze mini_sudoku modulo_grid
needle_haystack number_filtering number_format number_sequence number_sorting
palindrome_generation palindrome_partitioning path_star polynomial_equations pool_matrix
power_function prime_factorization products propositional_logic quantum_lock ransom_note rearc
rectangle_count rotate_matrix rotten_oranges rubiks_cube rush_hour self_reference
sentence_reordering shortest_path simple_equations simple_geometry sokoban spell_backward
string_manipulation string_splitting string_synthesis sudoku survo syllogism time_intervals
tower_of_hanoi tsumego word_ladder word_sequence_reversal word_sorting zebra_puzzles
""".split())
MODULES_EVALUATING_OWN_TEXT = frozenset({"basic_arithmetic", "bitwise_arithmetic", "codeio",
                                         "number_sorting"})

# Longest answer handed to any scorer; answers are short, and a 1 MB string only costs time.
MAX_ANSWER_CHARS = 20_000


def _arithmetic(ans: str) -> bool:
  """Integers, + - * / and parentheses (no ** : a power tower would hang the evaluation)."""
  if len(ans) > 200 or "**" in ans or not re.fullmatch(r"[\d\s+\-*/()]+", ans):
    return False
  if any(len(d) > 9 for d in re.findall(r"\d+", ans)):
    return False
  depth = 0
  for ch in ans:
    depth += (ch == "(") - (ch == ")")
    if depth < 0 or depth > 32:
      return False
  return depth == 0


def _polynomial(ans: str) -> bool:
  """Single-letter variables, integers, + - * and small integer powers (x**3, x^3)."""
  if len(ans) > 1000 or re.search(r"[A-Za-z]{2}", ans):
    return False
  if re.search(r"(\*\*|\^)\s*(?!\d{1,3}(?!\d))", ans):  # an exponent must be an integer < 1000
    return False
  return bool(re.fullmatch(r"[\dA-Za-z\s+\-*^()]+", ans)) and ans.count("(") == ans.count(")")


def _literal(chars: str, max_len: int):
  """Text made only of `chars`: a grid, or a Python list literal of such cells."""
  pattern = re.compile(f"[{chars}\\s\\[\\],'\"]+")
  return lambda ans: len(ans) <= max_len and bool(pattern.fullmatch(ans))


# Scorers that eval / parse_expr the answer, reached only by answers of the task's grammar.
PREPARSED = {
    "countdown": _arithmetic,
    "puzzle24": _arithmetic,
    "polynomial_multiplication": _polynomial,
    "n_queens": _literal("_Q", 2000),
    "string_insertion": _literal("A-Za-z", 2000),
    "spiral_matrix": _literal("\\d\\-", 20_000),
    # Its answer is each cell's distance to the nearest 0, not a 0/1 grid: any digits.
    "binary_matrix": _literal("\\d", 20_000),
}


def check_dataset(name: str):
  """Raises ValueError naming why `rg:<name>` is refused (its scorer evaluates model text)."""
  if name not in SAFE_SCORERS and name not in PREPARSED:
    raise ValueError(
        f"rg:{name}: refused. Its scorer is not known to be safe on model output (it may pass the "
        "answer to eval or sympy's parse_expr, which can run code) and mixpo has no strict answer "
        f"grammar for it. Accepted: the {len(SAFE_SCORERS) + len(PREPARSED)} datasets in "
        "mixpo.data.rg_tasks.SAFE_SCORERS and PREPARSED; to add one, review its score_answer and "
        "add it there with a test in tests/security_test.py.")


@functools.lru_cache(maxsize=64)
def _scorer(name: str, knobs: tuple):
  import reasoning_gym  # deferred: ~1 s import, only for rg tasks
  return reasoning_gym.create_dataset(name, seed=0, size=1, **dict(knobs))


def _entry(dataset, index: int = 0) -> dict:
  """dataset[index] in a decimal context of its own: decimal_arithmetic sets the precision of
  the calling thread's context while generating, which would change every later Decimal
  computation of the trainer (the readers' exactness checks among them)."""
  with decimal.localcontext():
    return dataset[index]


def rg_answer(completion: str) -> str:
  """The answer part of a completion: the last <answer>...</answer> if any, else the last line."""
  tags = _ANSWER_TAG.findall(completion)
  if tags:
    return tags[-1].strip()
  lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
  return lines[-1].strip() if lines else ""


class ReasoningGymReward:
  """TRL-style reward: reasoning-gym's score_answer(answer, entry) with entry from `metadata`.

  name: the dataset whose scorer to use, with its config `knobs`; None scores each item with the
    scorer of the dataset named in its entry (`metadata.source_dataset`), default knobs (a mix of
    reasoning-gym tasks in one run).
  An answer longer than MAX_ANSWER_CHARS, or outside the grammar of a PREPARSED dataset, scores 0
  without reaching the scorer; one the scorer raises on raises `ScorerError` (RewardRunner: 0,
  counted as `reward/scorer_errors`).
  """

  def __init__(self, name: str | None, knobs: dict | None = None):
    self.name, self.knobs = name, tuple(sorted((knobs or {}).items()))
    self.__name__ = f"rg_{name or 'any'}"
    if name is not None:
      check_dataset(name)

  def prepare(self) -> None:
    """Imports reasoning-gym, builds the dataset's scorer and scores its own first reference
    once, so that what they import happens here, before RewardRunner arms its guard (mixpo.
    rewards.runner). With name=None only the import: the scorers are built on first use."""
    import reasoning_gym  # noqa: F401,PLC0415 — the import itself is the point
    if self.name is None:
      return
    ds = _scorer(self.name, self.knobs)
    entry = _entry(ds)
    try:
      ds.score_answer(answer=str(entry["answer"]), entry=entry)
    except Exception:  # noqa: BLE001,S110 — a reference that does not score still warmed up
      pass

  def __call__(self, prompts, completions, metadata, **_) -> list[float]:
    out = []
    for c, m in zip(completions, metadata, strict=True):
      if "rg_entry" not in m:
        raise KeyError(f"{self.__name__}: metadata lacks 'rg_entry'; build the columns with "
                       "mixpo.data.reward_columns(examples) from this task's examples")
      entry = m["rg_entry"]
      name = self.name or entry["metadata"]["source_dataset"]
      check_dataset(name)
      ds = _scorer(name, self.knobs if self.name else ())
      grammar = PREPARSED.get(name)
      ans = rg_answer(c) if isinstance(c, str) else ""
      if not ans or len(ans) > MAX_ANSWER_CHARS or (grammar is not None and not grammar(ans)):
        out.append(0.0)
        continue
      try:
        with sandbox.guarded():
          out.append(float(ds.score_answer(answer=ans, entry=entry) or 0.0))
      except Exception as e:  # noqa: BLE001 — the answer made the scorer fail: a wrong answer
        raise ScorerError(f"rg:{name}: score_answer raised {type(e).__name__} ({str(e)[:80]}) on "
                          f"the answer {ans[:60]!r}; scored 0") from None
    return out


class ReasoningGymTask(GeneratedTask):
  """A reasoning-gym dataset with hash-disjoint train/eval splits; knobs go to its config."""

  def __init__(self, dataset: str, eval_fraction: float = 0.1, **knobs):
    import reasoning_gym
    if dataset not in reasoning_gym.factory.DATASETS:
      raise KeyError(f"rg:{dataset}: not a reasoning-gym dataset; known: "
                     f"{sorted(reasoning_gym.factory.DATASETS)[:20]}...")
    check_dataset(dataset)
    self.dataset, self.knobs, self.eval_fraction = dataset, knobs, eval_fraction
    self.name = f"rg:{dataset}"
    self.reward_fn = ReasoningGymReward(dataset, knobs)

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    import reasoning_gym
    check_split(split, f"{self.name}.example")
    for attempt in range(1000):
      s = derive_seed(self.name, seed, index, attempt)
      entry = _entry(reasoning_gym.create_dataset(self.dataset, seed=s, size=1, **self.knobs))
      if split_of(f"{self.name}:{entry['question']}", self.eval_fraction) == split:
        return Example(prompt=entry["question"], answer=str(entry["answer"]),
                       metadata={"rg_entry": entry})
    raise RuntimeError(f"{self.name}: no {split} problem in 1000 draws; raise eval_fraction")
