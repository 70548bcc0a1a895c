"""Trace formats (mixpo / verl-LUFFY / OpenR1), the guide-row source, and bad trace input."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixpo import builtin, guide_source, models
from mixpo.data import DataError, char_tokenizer, get_task
from mixpo.data.traces import (TracePrompt, TraceResponse, read_trace_prompts, read_traces,
                               tokenizer_fingerprint, write_trace_prompts)
from mixpo.guide_source import TraceOptions, TraceSource, model_guide_logp, response_tokens
from mixpo.rollout import encode_prompts

CHAT = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
ALPHABET = "0123456789+-*/=()[]?\\{} abcdefghijklmnopqrstuvwxyz"


def chat_tokenizer():
  tok = char_tokenizer(alphabet=ALPHABET)
  tok.chat_template = CHAT
  return tok


def write_jsonl(path, rows):
  with open(path, "wb") as f:
    for r in rows:
      f.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")
  return str(path)


def write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


# --- formats


def test_mixpo_rows_merge_into_prompt_groups_and_fields_map(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", [
      {"prompt": "1+1=", "answer": "2", "responses": ["2", "3"], "correct": [True, False]},
      {"prompt": "2+2=", "answer": "4", "response": "4"},
      {"prompt": "1+1=", "answer": "2", "response": "11", "correct": False},  # legacy line form
  ])
  groups, summary = read_trace_prompts(path)
  assert summary.fmt == "mixpo" and summary.rows == summary.kept == 3
  assert [(g.prompt, [r.text for r in g.responses]) for g in groups] == [
      ("1+1=", ["2", "3", "11"]), ("2+2=", ["4"])]
  assert [r.correct for r in groups[0].responses] == [True, False, False]
  assert summary.prompts == 2 and summary.responses == 4
  flat, flat_summary = read_traces(path)  # one Trace per response, in file order
  assert [t.response for t in flat] == ["2", "3", "4", "11"] and flat_summary.kept == 4
  # Field mapping: a user's own names.
  path2 = write_jsonl(tmp_path / "own.jsonl", [{"q": {"text": "3+4="}, "gold": 7, "outs": ["7"]}])
  groups, _ = read_trace_prompts(path2, fmt="mixpo",
                                 fields={"prompt": "q.text", "answer": "gold", "responses": "outs"})
  assert (groups[0].prompt, groups[0].answer, groups[0].responses[0].text) == ("3+4=", "7", "7")
  with pytest.raises(ValueError, match="unknown keys"):
    read_trace_prompts(path2, fields={"question": "q"})


def test_verl_luffy_parquet_renders_chat_with_system_and_reads_target_lst(tmp_path):
  tok = chat_tokenizer()
  system = {"role": "system", "content": "be brief"}
  rows = [
      {"data_source": "openr1", "prompt": [system, {"role": "user", "content": "1+2=?"}],
       "reward_model": {"ground_truth": "3", "style": "rule"}, "extra_info": {"index": 0},
       "target": [{"role": "assistant", "content": "so \\boxed{3}"}], "target_lst": None},
      {"data_source": "openr1", "prompt": [{"role": "user", "content": "2+2=?"}],
       "reward_model": {"ground_truth": "4", "style": "rule"}, "extra_info": {"index": 1},
       "target": [{"role": "assistant", "content": "\\boxed{4}"}],
       "target_lst": [[{"role": "assistant", "content": "\\boxed{4}"}],
                      [{"role": "assistant", "content": "\\boxed{5}"}]]},
  ]
  path = write_parquet(tmp_path / "luffy.parquet", rows)
  groups, summary = read_trace_prompts(path, tokenizer=tok)  # format detected, chat rendered
  assert summary.fmt == "verl"
  assert groups[0].prompt == "[system]be brief[user]1+2=?" and groups[0].answer == "3"
  assert [r.text for r in groups[0].responses] == ["so \\boxed{3}"]
  assert [r.text for r in groups[1].responses] == ["\\boxed{4}", "\\boxed{5}"]  # target_lst wins
  src = TraceSource(groups, tok, max_new_tokens=32)
  ex = src.examples("train", 2, seed=0)
  by_prompt = {e.prompt: e.metadata for e in ex}
  assert by_prompt["[system]be brief[user]1+2=?"]["data_source"] == "openr1"
  assert by_prompt["[system]be brief[user]1+2=?"]["extra_info"] == {"index": 0}
  assert "row 0" in by_prompt["[system]be brief[user]1+2=?"]["source"]


def test_openr1_correctness_filter_counts_drops(tmp_path):
  tok = char_tokenizer(alphabet=ALPHABET)
  rows = [
      {"problem": "1+2=?", "answer": "3", "generations": ["3", "4", "3"],
       "correctness_math_verify": [True, False, True]},
      {"problem": "2+2=?", "answer": "4", "generations": ["5"], "correctness_math_verify": [False]},
  ]
  path = write_parquet(tmp_path / "openr1.parquet", rows)
  opts = TraceOptions(path, fmt="openr1", only_correct=True)
  src = TraceSource.from_options(opts, tok, max_new_tokens=8)
  assert len(src) == 1 and src.stats["responses_read"] == 4 and src.stats["responses"] == 2
  assert src.stats["dropped_incorrect"] == 2
  assert src.stats["dropped_prompts_without_response"] == 1
  assert src.report()["traces/format"] == "openr1"
  unfiltered = TraceSource.from_options(TraceOptions(path), tok, max_new_tokens=8)
  assert len(unfiltered) == 2 and unfiltered.stats["responses"] == 4
  no_marks = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "1+2=", "answer": "3", "response": "3"}])
  with pytest.raises(ValueError, match="no correctness mark.*only_correct"):
    TraceSource.from_options(TraceOptions(no_marks, only_correct=True), tok, max_new_tokens=8)


# --- the guide-row source


def test_guide_rows_are_policy_tokens_after_the_policy_prompt(tmp_path):
  tok = char_tokenizer()
  groups = [TracePrompt("1+1=", "2", [TraceResponse("2"), TraceResponse("11"),
                                      TraceResponse("3")]),
            TracePrompt("12+3=", "15", [TraceResponse("15")])]
  src = TraceSource(groups, tok, max_new_tokens=4)
  rows = src.guide_rows([1, 0], m=2)
  assert rows.prompts == ["12+3=", "1+1="] and rows.m == 2
  prompt_BxP, mask_BxP = encode_prompts(tok, ["12+3=", "1+1="], 2)  # as the policy's rows
  np.testing.assert_array_equal(rows.prompt_BxP, prompt_BxP)
  np.testing.assert_array_equal(rows.prompt_mask_BxP, mask_BxP)
  eos = tok.eos_token_id
  want = [tok("15", add_special_tokens=False)["input_ids"] + [eos], None,
          tok("2", add_special_tokens=False)["input_ids"] + [eos],
          tok("11", add_special_tokens=False)["input_ids"] + [eos]]
  assert list(rows.real_B) == [True, False, True, True]  # prompt 1 has one response: a pad row
  for b, ids in enumerate(want):
    n = 0 if ids is None else len(ids)
    assert rows.lengths_B[b] == n and rows.mask_BxN[b].sum() == n
    if ids is not None:
      assert rows.tokens_BxN[b, :n].tolist() == ids and rows.tokens_BxN[b, n - 1] == eos
  assert rows.completions == ["15", "", "2", "11"]  # the first m of a prompt's responses
  np.testing.assert_array_equal(rows.guide_logp_BxN, 0.0)  # "one": πϕ ≡ 1


def test_trace_stream_is_deterministic_and_covers_each_epoch(tmp_path):
  tok = char_tokenizer()
  groups = [TracePrompt(f"{i}+1=", str(i + 1), [TraceResponse(str(i + 1))]) for i in range(7)]
  a, b = TraceSource(groups, tok, max_new_tokens=4), TraceSource(groups, tok, max_new_tokens=4)
  full = [e.prompt for e in a.examples("train", 14, seed=3)]
  resumed = [e.prompt for e in b.examples("train", 9, seed=3, start=5)]
  assert full[5:] == resumed  # one integer resumes the stream
  assert sorted(full[:7]) == sorted(g.prompt for g in groups) == sorted(full[7:])
  assert full[:7] != full[7:] or full[:7] != [e.prompt for e in a.examples("train", 7, seed=4)]
  ex = a.example("train", 2, seed=3)
  assert a.index_of(ex.prompt, ex.answer) == ex.metadata["trace_index"]
  with pytest.raises(ValueError, match="train set"):
    a.example("eval", 0)


def test_overlong_traces_dropped_or_truncated_and_masked(tmp_path):
  tok = char_tokenizer()
  groups = [TracePrompt("1+1=", "2", [TraceResponse("2"), TraceResponse("22222")])]
  drop = TraceSource(groups, tok, max_new_tokens=4)
  assert drop.stats["dropped_too_long"] == 1 and drop.stats["responses"] == 1
  cut = TraceSource(groups, tok, max_new_tokens=4, overlong="truncate")
  assert cut.stats["truncated"] == 1 and cut.stats["responses"] == 2
  rows = cut.guide_rows([0], m=2)
  assert list(rows.truncated_B) == [False, True] and rows.lengths_B[1] == 4
  assert rows.tokens_BxN[1].tolist() == tok("2222", add_special_tokens=False)["input_ids"]
  assert rows.mask_BxN[1].sum() == 0 and rows.mask_BxN[0].sum() == 2  # masked: no loss
  assert rows.completions[1] == "22222"  # rewarded as the full response


# --- stored log-probs: "file" against the guide model


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory):
  tok = char_tokenizer()
  d = str(tmp_path_factory.mktemp("guide"))
  model = models.init_from_config(builtin.tiny_hf_config(tok, hidden=32, layers=1, heads=2,
                                                         kv_heads=1, intermediate=64), rng=0)
  models.save_pretrained(model, d)
  tok.save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def trace_file(guide_dir, tmp_path_factory):
  from experiments.make_traces import make_traces
  exs = get_task("addition", digits=1, terms=2).examples("train", 6, seed=0)
  prompts, counts = make_traces(guide_dir, exs, n_per_prompt=4, max_new_tokens=12,
                                temperature=1.0, batch_size=4, seed=0)
  assert counts["samples"] == 24 and len(prompts) >= 3
  path = str(tmp_path_factory.mktemp("traces") / "traces.jsonl")
  write_trace_prompts(path, prompts)
  return path


def test_file_logp_equal_guide_scores_and_one_is_zero(guide_dir, trace_file):
  tok = models.load_tokenizer(guide_dir)
  guide = models.from_pretrained(guide_dir)
  file_src = TraceSource.from_options(TraceOptions(trace_file, guide_logp="file"), tok,
                                      max_new_tokens=12)
  idx = list(range(len(file_src)))
  rows = file_src.guide_rows(idx, m=4)
  scores = model_guide_logp(guide, rows, temperature=1.0)
  assert rows.real_B.sum() >= 3 and np.all(rows.guide_logp_BxN[rows.mask_BxN > 0] < 0)
  np.testing.assert_allclose(rows.guide_logp_BxN, scores, atol=1e-4)
  model_src = TraceSource.from_options(TraceOptions(trace_file, guide_logp="model"), tok,
                                       max_new_tokens=12)
  model_rows = model_src.guide_rows(idx, m=4)
  assert model_rows.guide_logp_BxN is None
  np.testing.assert_array_equal(model_rows.tokens_BxN, rows.tokens_BxN)
  one = TraceSource.from_options(TraceOptions(trace_file, guide_logp="one"), tok,
                                 max_new_tokens=12).guide_rows(idx, m=4)
  np.testing.assert_array_equal(one.guide_logp_BxN, 0.0)
  np.testing.assert_array_equal(one.tokens_BxN, rows.tokens_BxN)


def test_file_logp_refused_for_another_tokenizer_or_temperature(trace_file, guide_dir):
  other = char_tokenizer(alphabet="0123456789+=")
  assert tokenizer_fingerprint(other) != tokenizer_fingerprint(char_tokenizer())
  loaded = models.load_tokenizer(guide_dir)
  fp = tokenizer_fingerprint(loaded)
  loaded(["1", "111"], padding=True, truncation=True, max_length=8)  # settings calls may change
  assert tokenizer_fingerprint(loaded) == fp == tokenizer_fingerprint(
      models.load_tokenizer(guide_dir))
  with pytest.raises(ValueError, match="made with tokenizer .* the policy's is"):
    TraceSource.from_options(TraceOptions(trace_file, guide_logp="file"), other, max_new_tokens=12)
  with pytest.raises(ValueError, match="made with tokenizer"):  # never a skippable row
    TraceSource.from_options(TraceOptions(trace_file, guide_logp="file", skip_bad_rows=True),
                             other, max_new_tokens=12)
  TraceSource.from_options(TraceOptions(trace_file, guide_logp="one"), other, max_new_tokens=12)
  with pytest.raises(ValueError, match="temperature 1.0, the run samples and scores at 0.6"):
    TraceSource.from_options(TraceOptions(trace_file, guide_logp="file"), loaded,
                             max_new_tokens=12, temperature=0.6)


# --- bad input: DataError naming file, row and field, or a counted skip

GOOD = {"prompt": "1+1=", "answer": "2", "responses": ["2"]}
FP = tokenizer_fingerprint(char_tokenizer())
EOS2 = [5, 2]  # "1" + EOS under char_tokenizer()


@pytest.mark.parametrize("row,match", [
    ({"prompt": "1+1=", "answer": "2"}, r"line 2: no response: field 'responses' or 'response'"),
    ({"prompt": "1+1=", "answer": "2", "responses": ["  "]},
     r"line 2: field 'responses.0' is an empty"),
    ({"prompt": "1+1=", "answer": "2", "response": ""}, r"line 2: field 'response' is an empty"),
    ({"prompt": "1+1=", "answer": "2", "responses": ["2", 5]},
     r"line 2: field 'responses.1' must be text"),
    ({"prompt": [{"role": "bot", "content": "1+1="}], "answer": "2", "response": "2"},
     r"line 2: field 'prompt' message 0 has role 'bot'"),
    ({"prompt": "1+1=", "answer": "2", "response": [{"role": "user", "content": "2"}]},
     r"line 2: field 'response' message 0 has role 'user'"),
    (b'{"prompt": "1+1=", "answer": "2", "response": "\xff"}\n', r"line 2: not valid UTF-8"),
    ({"prompt": "1+1=", "answer": "2", "response": "\ud800"},
     r"line 2: field 'response' is not valid UTF-8"),
    ({"prompt": "1+1=", "answer": "2", "responses": ["1"], "response_tokens": [EOS2],
      "guide_logp": [[-0.1]]},
     r"line 2: field 'guide_logp.0' has 1 entries but 'response_tokens.0' has 2"),
    ({"prompt": "1+1=", "answer": "2", "responses": ["1"], "response_tokens": [EOS2],
      "guide_logp": [[-0.1, float("nan")]]}, r"line 2: field 'guide_logp.0' holds a non-finite"),
    ({"prompt": "1+1=", "answer": "2", "responses": ["1"], "response_tokens": [EOS2],
      "guide_logp": [[-0.1, 0.5]]},
     r"line 2: field 'guide_logp.0' holds a non-finite or positive"),
    # Finite in float64, -inf in the float32 the trainer computes in (main: accepted, NaN ratios).
    ({"prompt": "1+1=", "answer": "2", "responses": ["1"], "response_tokens": [EOS2],
      "guide_logp": [[-0.1, -3.5e38]]},
     r"line 2: field 'guide_logp.0' holds a non-finite or positive log-prob at entry 1 "
     r"\(-3\.5e\+38\).*finite in float32"),
    ({"prompt": "1+1=", "answer": "2", "responses": ["1", "2"], "correct": [True]},
     r"line 2: field 'correct' must hold one entry per response \(2\), got 1"),
    ({"prompt": "1+1=" * 20, "answer": "2", "response": "2"},
     r"line 2: field 'prompt' has 81 tokens"),
])
def test_bad_trace_rows_raise_naming_file_row_field_or_are_counted(tmp_path, row, match):
  path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
  tok = char_tokenizer()
  opts = TraceOptions(path, max_prompt_tokens=40)
  with pytest.raises(DataError, match=r"bad\.jsonl:" + match):
    TraceSource.from_options(opts, tok, max_new_tokens=8)
  src = TraceSource.from_options(
      TraceOptions(path, max_prompt_tokens=40, skip_bad_rows=True), tok, max_new_tokens=8)
  assert len(src) == 1 and src.summary.rows == 2 and sum(src.summary.skipped.values()) == 1
  assert sum(v for k, v in src.report().items() if k.startswith("traces/skipped_rows_")) == 1


@pytest.mark.parametrize("tokens,logp,match", [
    ([5, 6, 2], [-0.1, -0.2, -0.3], "stores 3 tokens, the policy tokenizer gives 2"),
    ([6, 2], [-0.1, -0.2], "stored token 0 is 6, the policy tokenizer gives 5"),
    (None, None, "no stored log-probs, but guide.logp='file'"),
])
def test_file_logp_of_another_tokenization_name_the_row(tmp_path, tokens, logp, match):
  bad = {"prompt": "1+1=", "answer": "2", "responses": ["1"], "tokenizer": FP}
  if tokens is not None:
    bad.update(response_tokens=[tokens], guide_logp=[logp])
  good = dict(GOOD, responses=["1"], response_tokens=[EOS2], guide_logp=[[-0.1, -0.2]],
              tokenizer=FP, prompt="2+2=", answer="4")
  path = write_jsonl(tmp_path / "t.jsonl", [good, bad])
  tok = char_tokenizer()
  assert response_tokens(tok, "1") == EOS2
  with pytest.raises(DataError, match=r"t\.jsonl:line 2: response 0.*" + match):
    TraceSource.from_options(TraceOptions(path, guide_logp="file"), tok, max_new_tokens=8)
  src = TraceSource.from_options(TraceOptions(path, guide_logp="file", skip_bad_rows=True), tok,
                                 max_new_tokens=8)
  assert len(src) == 1 and src.stats["dropped_bad"] == 1
  rows = src.guide_rows([0], m=1)
  np.testing.assert_allclose(rows.guide_logp_BxN[0, :2], [-0.1, -0.2])


def test_nan_log_probs_in_parquet_are_refused(tmp_path):
  path = write_parquet(tmp_path / "t.parquet", [dict(
      GOOD, response_tokens=[EOS2], guide_logp=[[-0.5, math.nan]], tokenizer=FP)])
  with pytest.raises(DataError, match=r"t\.parquet:row 0: field 'guide_logp.0' holds a non-finite"):
    read_trace_prompts(path)


# --- the verl schema for plain training datasets (task="file")


def test_file_task_reads_a_verl_parquet_without_conversion(tmp_path):
  tok = chat_tokenizer()
  rows = [{"data_source": "x", "prompt": [{"role": "system", "content": "sys"},
                                           {"role": "user", "content": f"{i}+1=?"}],
           "reward_model": {"ground_truth": str(i + 1), "style": "rule"},
           "extra_info": {"index": i}} for i in range(6)]
  path = write_parquet(tmp_path / "train.parquet", rows)
  task = get_task("file", train_path=path, eval_path=path, schema="verl", tokenizer=tok)
  ex = task.example("train", 0)
  assert ex.prompt.startswith("[system]sys[user]") and ex.prompt.endswith("+1=?")
  assert int(ex.answer) == int(ex.prompt.split("]")[-1].split("+")[0]) + 1
  with pytest.raises(ValueError, match="schema='nope'"):
    get_task("file", train_path=path, schema="nope", tokenizer=tok)
