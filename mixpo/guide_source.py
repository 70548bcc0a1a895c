"""Guide rows from a trace file: the offline guide (LUFFY's setting) next to the online one.

With `guide.source = "traces"` the trace file is the training dataset: a step draws its prompts
from it (`TraceSource.examples`, the same interface as a task's train stream, so the position in
the file is one resumable integer and every process draws the same rows), and each drawn
prompt's OFF rows are its stored guide responses (`TraceSource.guide_rows`), not samples of a
guide checkpoint.

An OFF row is the trace's text tokenised with the policy's tokenizer (no special tokens), EOS
appended, after the prompt encoded exactly as the policy's own rows are (`encode_prompts`). Up
to m responses of a prompt are used (the first m kept, in file order); a prompt with fewer has
padding rows (`real_B` False, mask 0). The guide's log-probs πϕ of those tokens, chosen
explicitly (`guide_logp`):
  "file"   the per-token log-probs stored in the trace. Refused unless the trace carries the
           fingerprint of the policy's tokenizer and its stored tokens are exactly the policy's
           tokenization (a mismatch names the row); a stored `logp_temperature` must be the run's.
  "model"  scored with a guide checkpoint: `model_guide_logp(guide, rows, temperature)`.
  "one"    πϕ ≡ 1 (log-prob 0), LUFFY's choice when the guide's probabilities are unknown.

Filtering, counted in `TraceSource.stats`: responses without the file's correctness mark are
dropped with only_correct=True; responses longer than max_new_tokens (EOS included) are dropped
(overlong="drop") or cut to max_new_tokens with their loss mask zeroed (overlong="truncate": the
row still joins its group's advantage pool with the full response's reward, but teaches no
tokens of an unfinished answer); a prompt left without responses is dropped.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixpo.data.readers import DataError
from mixpo.data.tasks import Example, check_split, derive_seed
from mixpo.data.traces import TracePrompt, read_trace_prompts, tokenizer_fingerprint
from mixpo.fields import FieldError

GUIDE_LOGP = ("file", "model", "one")
OVERLONG = ("drop", "truncate")


@dataclasses.dataclass(frozen=True)
class TraceOptions:
  """How to read a trace file and turn it into guide rows (the config's trace fields)."""
  path: str
  guide_logp: str = "one"  # "file" | "model" | "one" (module docstring).
  fmt: str = "auto"  # "mixpo" | "verl" (= "luffy") | "openr1" | "auto" (mixpo.data.traces).
  fields: dict | None = None  # overrides of the format's dotted field paths.
  chat_template: bool | None = None  # None: chat lists rendered, strings kept as they are.
  only_correct: bool = False  # keep only responses the file marks correct.
  overlong: str = "drop"  # "drop" | "truncate" responses longer than max_new_tokens.
  max_prompt_tokens: int | None = None  # longer prompts are bad rows.
  check_answers: bool = True  # reference answers must parse with math-verify.
  skip_bad_rows: bool = False  # count and skip bad rows instead of raising DataError.

  def validate(self) -> None:
    """FieldError naming the experiment config's field (`guide.*`) of a bad option."""
    if not self.path:
      raise FieldError("guide.traces_path", self.path, "empty with guide.source='traces': point "
                       "it at a trace file (.jsonl / .parquet) written by "
                       "experiments/make_traces.py or in the verl / openr1 format.")
    if self.guide_logp not in GUIDE_LOGP:
      raise FieldError("guide.logp", self.guide_logp, "with traces: use 'file' (stored "
                       "log-probs), 'model' (score with the guide checkpoint) or 'one' (πϕ ≡ 1).")
    if self.overlong not in OVERLONG:
      raise FieldError("guide.traces.overlong", self.overlong, "use 'drop' or 'truncate'.")


@dataclasses.dataclass
class GuideRows:
  """OFF rows of G prompts, m per prompt: B = G·m rows, group g owns rows [g·m, (g+1)·m).

  Host numpy arrays in the layout of `mixpo.rollout.Groups` (left-padded prompts, N =
  max_new_tokens response columns) plus `real_B`, False on padding rows.
  """
  prompts: list[str]  # [G]
  answers: list[str]  # [G]
  prompt_BxP: np.ndarray  # int32 left-padded prompt tokens.
  prompt_mask_BxP: np.ndarray  # int32 1 on real prompt tokens.
  tokens_BxN: np.ndarray  # int32 trace tokens (EOS included), pad id after.
  mask_BxN: np.ndarray  # float32 1 on tokens that enter the loss (0: padding, truncated rows).
  lengths_B: np.ndarray  # int32 tokens of the row (EOS included; N when truncated).
  truncated_B: np.ndarray  # bool the trace was longer than N and cut.
  real_B: np.ndarray  # bool a trace (False: padding of a prompt with fewer than m responses).
  completions: list[str]  # [B] the full response texts ("" on padding), what rewards score.
  guide_logp_BxN: np.ndarray | None  # float32 πϕ log-probs per token; None for "model".

  @property
  def m(self) -> int:
    return len(self.real_B) // max(len(self.prompts), 1)


@dataclasses.dataclass
class _Kept:
  tokens: np.ndarray  # int32, EOS included, at most max_new_tokens.
  logp: np.ndarray | None  # float32 aligned with tokens ("file" only).
  truncated: bool
  text: str


class TraceSource:
  """A trace file as a train stream of prompts plus their OFF rows (see module docstring).

  Args:
    prompts: prompt groups (`read_trace_prompts`); `from_options` reads them from a file.
    tokenizer: the policy's tokenizer (its EOS ends every OFF row).
    max_new_tokens: N, the response width of every row.
    guide_logp, only_correct, overlong, skip_bad_rows: as `TraceOptions`.
    temperature: the run's sampling / scoring temperature (checked against "file" log-probs).
    name: seeds the epoch permutations (keep it fixed: a resumed run must draw the same rows).
  """

  def __init__(self, prompts: list[TracePrompt], tokenizer, *, max_new_tokens: int,
               guide_logp: str = "one", temperature: float = 1.0, only_correct: bool = False,
               overlong: str = "drop", skip_bad_rows: bool = False, name: str = "traces",
               path: str = "", fmt: str = ""):
    TraceOptions(path or "<rows>", guide_logp=guide_logp, overlong=overlong).validate()
    self.name, self.path, self.fmt = name, path, fmt
    self.tokenizer, self.max_new_tokens, self.guide_logp = tokenizer, max_new_tokens, guide_logp
    self.overlong = overlong
    if tokenizer.eos_token_id is None:
      raise ValueError("the policy tokenizer has no eos_token_id: OFF rows end with EOS")
    self.stats = {"prompts_read": len(prompts), "responses_read": 0, "dropped_incorrect": 0,
                  "dropped_too_long": 0, "truncated": 0, "dropped_bad": 0,
                  "dropped_prompts_without_response": 0}
    self.skipped: dict[str, int] = {}
    fingerprint = tokenizer_fingerprint(tokenizer)
    self._prompts, self._rows = [], []
    for tp in prompts:
      kept = []
      for j, r in enumerate(tp.responses):
        self.stats["responses_read"] += 1
        if only_correct:
          if r.correct is None:
            raise ValueError(f"{r.source}: response {j} has no correctness mark, but only_correct="
                             "True filters on it; map the trace field 'correct' to the file's "
                             "correctness field or set only_correct=False")
          if not r.correct:
            self.stats["dropped_incorrect"] += 1
            continue
        try:
          row = self._tokenise(r, j, fingerprint, temperature)
        except DataError as e:
          if not skip_bad_rows:
            raise
          self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
          self.stats["dropped_bad"] += 1
          continue
        if row is not None:
          kept.append(row)
      if kept:
        self._prompts.append(tp)
        self._rows.append(kept)
      else:
        self.stats["dropped_prompts_without_response"] += 1
    self.stats["prompts"] = len(self._prompts)
    self.stats["responses"] = sum(len(k) for k in self._rows)
    if not self._prompts:
      raise ValueError(f"traces {path or ''}: no prompt has a usable response ({self.stats}); "
                       "check only_correct / overlong / max_new_tokens")
    self._index = {(tp.prompt, tp.answer): i for i, tp in enumerate(self._prompts)}

  @classmethod
  def from_options(cls, options: TraceOptions, tokenizer, *, max_new_tokens: int,
                   temperature: float = 1.0) -> "TraceSource":
    """Reads `options.path` (see `read_trace_prompts`) and builds the source; the read summary
    (rows, skips by reason) is kept as `.summary`."""
    options.validate()
    prompts, summary = read_trace_prompts(
        options.path, options.fmt, options.fields, tokenizer=tokenizer,
        chat_template=options.chat_template, max_prompt_tokens=options.max_prompt_tokens,
        check_answers=options.check_answers, skip_bad_rows=options.skip_bad_rows)
    src = cls(prompts, tokenizer, max_new_tokens=max_new_tokens, guide_logp=options.guide_logp,
              temperature=temperature, only_correct=options.only_correct,
              overlong=options.overlong, skip_bad_rows=options.skip_bad_rows,
              path=options.path, fmt=summary.fmt)
    src.summary = summary
    return src

  def _tokenise(self, r, j: int, fingerprint: str, temperature: float) -> _Kept | None:
    ids = response_tokens(self.tokenizer, r.text)
    logp = None
    if self.guide_logp == "file":
      logp = self._stored_logp(r, j, ids, fingerprint, temperature)
    n = self.max_new_tokens
    truncated = len(ids) > n
    if truncated:
      if self.overlong == "drop":
        self.stats["dropped_too_long"] += 1
        return None
      self.stats["truncated"] += 1
      ids, logp = ids[:n], None if logp is None else logp[:n]
    return _Kept(np.asarray(ids, np.int32), logp, truncated, r.text)

  def _stored_logp(self, r, j, ids, fingerprint, temperature) -> np.ndarray:
    where = f"{r.source}: response {j}"
    if r.logp is None:
      raise DataError(f"{where} has no stored log-probs, but guide.logp='file' reads them; write "
                      "them with experiments/make_traces.py, or use guide.logp='model' / 'one'",
                      "missing_logp")
    if r.tokenizer != fingerprint:
      # Not a bad row but a wrong file: never skipped.
      raise ValueError(
          f"{where}: its log-probs were made with tokenizer {r.tokenizer!r}, the policy's is "
          f"{fingerprint!r}; per-token log-probs only hold for the tokenizer that made them. "
          "Remake the traces with the policy's tokenizer, or use guide.logp='model' / 'one'")
    if r.logp_temperature is not None and not _same_temperature(r.logp_temperature, temperature):
      raise ValueError(f"{where}: log-probs scored at temperature {r.logp_temperature}, the run "
                       f"samples and scores at {temperature}; πθ/πϕ needs both at one "
                       "temperature: set config.rollout.temperature or remake the traces")
    if r.tokens != ids:
      if len(r.tokens) != len(ids):
        detail = (f"stores {len(r.tokens)} tokens, the policy tokenizer gives {len(ids)} "
                  "(text + EOS)")
      else:
        t = next(i for i, (a, b) in enumerate(zip(r.tokens, ids)) if a != b)
        detail = f"stored token {t} is {r.tokens[t]}, the policy tokenizer gives {ids[t]}"
      raise DataError(f"{where}: {detail}; stored log-probs only hold for the stored tokens. "
                      "Remake the traces with the policy's tokenizer or use guide.logp='model'",
                      "bad_logp")
    return np.asarray(r.logp, np.float32)

  # --- the train stream (the interface of a task's train split)

  def __len__(self) -> int:
    return len(self._prompts)

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    """Train example `index` of stream `seed`: prompt perm_{seed, epoch}[index mod P]."""
    check_split(split, f"{self.name}.example")
    if split != "train":
      raise ValueError(f"{self.name}: a trace file is a train set; evaluate on the task's eval "
                       "split (config.task) instead")
    epoch, i = divmod(index, len(self._prompts))
    perm = np.random.default_rng(derive_seed(self.name, seed, epoch)).permutation(len(self))
    k = int(perm[i])
    tp = self._prompts[k]
    meta = {"source": tp.source, "trace_index": k}
    if tp.data_source:
      meta["data_source"] = tp.data_source
    if tp.extra_info is not None:
      meta["extra_info"] = tp.extra_info
    return Example(prompt=tp.prompt, answer=tp.answer, metadata=meta)

  def examples(self, split: str, n: int, seed: int = 0, start: int = 0) -> list[Example]:
    return [self.example(split, i, seed) for i in range(start, start + n)]

  def index_of(self, prompt: str, answer: str) -> int:
    """The trace index of a drawn prompt (prompt groups are unique by prompt and answer)."""
    try:
      return self._index[(prompt, answer)]
    except KeyError:
      raise KeyError(f"prompt {prompt[:60]!r} (answer {answer!r}) is not in the trace file "
                     f"{self.path}") from None

  # --- OFF rows

  def guide_rows(self, indices, m: int) -> GuideRows:
    """OFF rows of trace prompts `indices` ([G] ints from `index_of` / metadata "trace_index"),
    m per prompt. guide_logp_BxN: stored ("file"), zeros ("one"), None ("model": score them with
    `model_guide_logp`)."""
    from mixpo.rollout import encode_prompts  # noqa: PLC0415 (rollout imports jax-side modules)
    if m < 1:
      raise ValueError(f"guide_rows(m={m}): need at least one OFF row per prompt")
    indices = [int(i) for i in indices]
    g, n = len(indices), self.max_new_tokens
    prompts = [self._prompts[i].prompt for i in indices]
    prompt_BxP, prompt_mask_BxP = encode_prompts(self.tokenizer, prompts, m)
    pad = self.tokenizer.pad_token_id or 0
    tokens = np.full((g * m, n), pad, np.int32)
    mask = np.zeros((g * m, n), np.float32)
    logp = np.zeros((g * m, n), np.float32)
    lengths = np.zeros(g * m, np.int32)
    truncated = np.zeros(g * m, bool)
    real = np.zeros(g * m, bool)
    completions = [""] * (g * m)
    for gi, i in enumerate(indices):
      for j, row in enumerate(self._rows[i][:m]):
        b, L = gi * m + j, len(row.tokens)
        tokens[b, :L], lengths[b], truncated[b], real[b] = row.tokens, L, row.truncated, True
        mask[b, :L] = 0.0 if row.truncated else 1.0
        if row.logp is not None:
          logp[b, :L] = row.logp
        completions[b] = row.text
    logp *= mask
    return GuideRows(prompts=prompts, answers=[self._prompts[i].answer for i in indices],
                     prompt_BxP=prompt_BxP, prompt_mask_BxP=prompt_mask_BxP, tokens_BxN=tokens,
                     mask_BxN=mask, lengths_B=lengths, truncated_B=truncated, real_B=real,
                     completions=completions,
                     guide_logp_BxN=None if self.guide_logp == "model" else logp)

  def report(self) -> dict:
    """What the run read and dropped, for summary.json and the log (flat, JSON-serialisable)."""
    out = {"traces/path": self.path, "traces/format": self.fmt,
           "traces/guide_logp": self.guide_logp}
    out.update({f"traces/{k}": v for k, v in self.stats.items()})
    summary = getattr(self, "summary", None)
    if summary is not None:
      out["traces/rows"] = summary.rows
      out.update({f"traces/skipped_rows_{k}": v for k, v in summary.skipped.items()})
    out.update({f"traces/skipped_responses_{k}": v for k, v in self.skipped.items()})
    return out


def response_tokens(tokenizer, text: str) -> list[int]:
  """An OFF row's response tokens: `text` under the policy tokenizer, no special tokens, + EOS
  (tokenised apart from the prompt, as the policy's own responses are sampled after it)."""
  return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def _same_temperature(a: float, b: float) -> bool:
  # Temperature 0 (greedy) scores under the unscaled distribution, i.e. temperature 1.
  norm = lambda t: 1.0 if t == 0 else float(t)
  return abs(norm(a) - norm(b)) <= 1e-6


def model_guide_logp(guide, rows: GuideRows, temperature: float = 1.0) -> np.ndarray:
  """πϕ log-probs [B, N] float32 of `rows`' responses under `guide` (an NNX model or its
  (graphdef, state)), scored like the trainer's batch (`sampling.score` at `temperature`);
  0 where mask_BxN is 0."""
  from mixpo import sampling  # noqa: PLC0415 (jax-side; the data path above stays numpy-only)
  from mixpo.batch import make_batch  # noqa: PLC0415
  batch = make_batch(rows.prompt_BxP, rows.prompt_mask_BxP, rows.tokens_BxN, rows.mask_BxN)
  logp_BxT = sampling.score(guide, batch.tokens_BxT, batch.mask_BxT, batch.positions_BxT,
                            temperature=temperature)
  p = rows.prompt_BxP.shape[1]
  return np.asarray(logp_BxT)[:, p:] * rows.mask_BxN


def reward_rows(rows: GuideRows, spec, reward_runner):
  """(rollout.Groups of `rows` with rewards, reward metrics): the OFF rows as the step's other
  rows are, each trace rewarded on its full text (`spec` a rollout.SampleSpec: overlong shaping
  applies as to sampled rows). Padding rows are rewarded "" and must be left out via real_B."""
  from mixpo.rollout import reward_groups  # noqa: PLC0415
  return reward_groups(rows.prompts, rows.answers, rows.m, rows.prompt_BxP, rows.prompt_mask_BxP,
                       rows.tokens_BxN, rows.mask_BxN, rows.lengths_B, rows.truncated_B,
                       rows.completions, spec, reward_runner, guide_logp=rows.guide_logp_BxN)
