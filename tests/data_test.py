"""Tests for mixpo.data: tasks (determinism, disjoint splits), tokenizer, readers, traces."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from mixpo.data import (BOS_ID, EOS_ID, PAD_ID, DataError, Trace, char_tokenizer, get_task,
                        read_examples, read_traces, reward_columns, write_traces)

CHAT = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"


def write_jsonl(path, rows):
  with open(path, "wb") as f:
    for r in rows:
      f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
  return str(path)


@pytest.fixture(scope="module")
def add_task():
  return get_task("addition", digits=2, terms=2)


def test_addition_task_format_and_reward(add_task):
  e = add_task.example("train", 0, seed=0)
  a, b = e.metadata["operands"]
  assert e.prompt == f"{a}+{b}=" and e.answer == str(a + b) and len(e.prompt) <= 16
  assert add_task.reward_fn([e.prompt] * 4, [e.answer, f" {e.answer}\n", e.answer + "1", ""],
                            answer=[e.answer] * 4) == [1.0, 1.0, 0.0, 0.0]
  chain = get_task("addition", digits=3, terms=4).example("train", 5)
  assert chain.prompt.count("+") == 3 and len(chain.prompt) <= 16
  assert sum(chain.metadata["operands"]) == int(chain.answer)


def test_task_determinism_by_seed_and_index(add_task):
  again = get_task("addition", digits=2, terms=2)
  assert add_task.examples("train", 50, seed=3) == again.examples("train", 50, seed=3)
  # A resumed run continues from a data-position integer.
  assert add_task.examples("train", 10, seed=3, start=40) == add_task.examples("train", 50, seed=3)[40:]
  assert add_task.examples("train", 20, seed=3) != add_task.examples("train", 20, seed=4)
  assert add_task.eval_examples(30) == again.eval_examples(30)


def test_task_split_disjoint_by_construction(add_task):
  ev = add_task.eval_examples(300)
  assert len({e.prompt for e in ev}) == 300
  key = lambda e: tuple(sorted(e.metadata["operands"]))  # noqa: E731
  eval_keys = {key(e) for e in ev}
  for seed in range(3):
    train = add_task.examples("train", 2000, seed=seed)
    assert not eval_keys & {key(e) for e in train}


def test_task_eval_too_many_requested_raises():
  with pytest.raises(ValueError, match="distinct eval problems"):
    get_task("addition", digits=1, terms=2).eval_examples(100)


def test_task_unknown_and_bad_knobs():
  with pytest.raises(KeyError, match="unknown task 'nope'"):
    get_task("nope")
  with pytest.raises(ValueError, match="digits"):
    get_task("addition", digits=0)


def test_task_reasoning_gym_countdown_adapter():
  task = get_task("rg:countdown", min_numbers=3, max_numbers=3)
  ex = task.examples("train", 3, seed=1)
  assert ex == task.examples("train", 3, seed=1)
  cols = reward_columns(ex)
  assert task.reward_fn([e.prompt for e in ex], [e.answer for e in ex], **cols) == [1.0] * 3
  wrong = task.reward_fn([ex[0].prompt], ["<answer>1+1</answer>"], **reward_columns(ex[:1]))
  assert wrong[0] < 0.5
  ev = {e.prompt for e in task.eval_examples(5)}
  assert not ev & {e.prompt for e in task.examples("train", 50)}


def test_tokenizer_ids_and_save_load_round_trip_dataset(tmp_path):
  tok = char_tokenizer()
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
  ids = tok("37+45=")["input_ids"]
  assert ids[0] == BOS_ID and len(ids) == 7
  tok.save_pretrained(tmp_path)
  tok2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert tok2("37+45=")["input_ids"] == ids and tok2.eos_token_id == EOS_ID
  assert tok2.decode(ids + [EOS_ID], skip_special_tokens=True) == "37+45="
  assert tok2.pad_token_id == PAD_ID and len(tok2) == len(tok)


def test_dataset_jsonl_and_parquet_field_mapping(tmp_path):
  rows = [{"q": {"text": "What is 1+1?"}, "sol": 2}, {"q": {"text": "Half of 1?"}, "sol": "\\frac{1}{2}"}]
  for path in (write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "d.parquet")):
    if path.endswith(".parquet"):
      pq.write_table(pa.Table.from_pylist([{"q": r["q"], "sol": str(r["sol"])} for r in rows]), path)
    ex, summary = read_examples(path, prompt_field="q.text", answer_field="sol")
    assert [(e.prompt, e.answer) for e in ex] == [("What is 1+1?", "2"), ("Half of 1?", "\\frac{1}{2}")]
    assert summary.kept == summary.rows == 2


def test_dataset_chat_template_and_prompt_length_filter(tmp_path):
  tok = char_tokenizer(alphabet="0123456789+=[]abcdefghijklmnopqrstuvwxyz ")
  tok.chat_template = CHAT
  path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                            {"prompt": "1" * 40 + "=", "answer": "3"}])
  ex, summary = read_examples(path, tokenizer=tok, chat_template=True, max_prompt_tokens=20,
                              skip_bad_rows=True)
  assert [e.prompt for e in ex] == ["[user]1+1="] and summary.too_long == 1
  with pytest.raises(DataError, match=r"d.jsonl:line 2: field 'prompt' has \d+ tokens > max_prompt"):
    read_examples(path, tokenizer=tok, max_prompt_tokens=20)


@pytest.mark.parametrize("row,match", [
    ({"answer": "2"}, "line 2: field 'prompt' is missing"),
    ({"prompt": "  ", "answer": "2"}, "line 2: field 'prompt' is empty"),
    ({"prompt": "1+1=", "answer": "\\frac{"}, "line 2: field 'answer'.*does not parse"),
    (b'{"prompt": "\xff\xfe", "answer": "2"}\n', "line 2: not valid UTF-8"),
    (b"{not json\n", "line 2: invalid JSON"),
    ({"prompt": [{"role": "user", "content": "hi"}], "answer": "2"}, "chat_template=True"),
])
def test_dataset_bad_rows_raise_or_are_counted(tmp_path, row, match):
  path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}, row])
  with pytest.raises(DataError, match=match):
    read_examples(path)
  ex, summary = read_examples(path, skip_bad_rows=True)
  assert len(ex) == 1 and summary.rows == 2 and sum(summary.skipped.values()) == 1
  assert "line 2" in str(summary)


def test_dataset_trace_mixpo_round_trip(tmp_path):
  traces = [Trace("1+1=", "2", "2", [5, 2], [-0.1, -0.2]), Trace("2+2=", "4", "4")]
  path = str(tmp_path / "t.jsonl")
  write_traces(path, traces)
  got, summary = read_traces(path)
  assert [(t.prompt, t.answer, t.response, t.response_tokens, t.guide_logp) for t in got] == [
      ("1+1=", "2", "2", [5, 2], [-0.1, -0.2]), ("2+2=", "4", "4", None, None)]
  assert got[0].has_guide_logp and not got[1].has_guide_logp and summary.kept == 2


def test_dataset_trace_luffy_parquet(tmp_path):
  tok = char_tokenizer(alphabet="0123456789+=?[]abcdefghijklmnopqrstuvwxyz ")
  tok.chat_template = CHAT
  rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2=?"}],
           "reward_model": {"ground_truth": "3", "style": "rule"},
           "target": [{"role": "assistant", "content": "so \\boxed{3}"}]}]
  path = str(tmp_path / "luffy.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  got, _ = read_traces(path, fmt="luffy", tokenizer=tok, chat_template=True)
  assert got[0].prompt == "[system]be brief[user]1+2=?" and got[0].answer == "3"
  assert got[0].response == "so \\boxed{3}" and not got[0].has_guide_logp
  with pytest.raises(DataError, match="row 0: field 'prompt' is a list of chat messages"):
    read_traces(path, fmt="luffy")
  got, _ = read_traces(path, fmt="luffy", fields={"prompt": "prompt.1.content"})
  assert got[0].prompt == "1+2=?"


@pytest.mark.parametrize("extra,match", [
    ({"guide_logp": [-0.1]}, "without 'response_tokens'"),
    ({"response_tokens": [5, 2], "guide_logp": [-0.1]}, "has 1 entries but 'response_tokens' has 2"),
    ({"response_tokens": [5], "guide_logp": [0.5]}, "positive log-prob"),
    ({"response_tokens": ["a"]}, "token ids"),
])
def test_dataset_trace_bad_logp_rows(tmp_path, extra, match):
  path = write_jsonl(tmp_path / "t.jsonl", [dict({"prompt": "1+1=", "answer": "2", "response": "2"}, **extra)])
  with pytest.raises(DataError, match="line 1: .*" + match):
    read_traces(path)
  assert read_traces(path, skip_bad_rows=True)[1].kept == 0
