"""mixpo/preflight.py, as loop.setup runs it, on a researcher's own files: every mistake in a dataset, a tokenizer, a
trace file or a guide is refused before any model is built, as one message naming the flag, the
file, the row and the field (mixpo.cli prints it, exit 2); built-in models are built only when the
run uses them; settings the run ignores are warned about."""

import json
import logging
import os

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from experiments import byo_example
from experiments.configs import smoke
from mixpo import builtin, cli, loop, preflight
from mixpo.data.traces import TracePrompt, TraceResponse, write_trace_prompts
from rl_test import set_fields


def _forbidden(*args, **kwargs):
  raise AssertionError("a model was built before the files were checked")


@pytest.fixture(scope="module")
def own(tmp_path_factory):
  """A tiny BPE policy, a guide of the same vocabulary size with two ids swapped, the JSONL
  files (train with an answerless row; an eval file with other field names), a trace file made
  under another tokenizer."""
  d = str(tmp_path_factory.mktemp("own"))
  paths = byo_example.make_files(d, n_train=24, n_test=8, hidden=32, layers=1)
  tok = byo_example.make_tokenizer(byo_example.problems(24, 0) + byo_example.problems(8, 1))
  spec = json.loads(tok.backend_tokenizer.to_str())
  vocab = spec["model"]["vocab"]
  a, b = sorted(vocab, key=vocab.get)[-2:]  # two merged tokens trade ids: same size, other map
  vocab[a], vocab[b] = vocab[b], vocab[a]
  swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                    eos_token="<|im_end|>", pad_token="<|endoftext|>")
  assert len(swapped) == len(tok)
  paths["guide"] = byo_example.make_checkpoint(os.path.join(d, "guide"), swapped, hidden=32,
                                               layers=1)
  with open(paths["train"], "a") as f:
    f.write(json.dumps({"question": "Ana has 2 cards. How many?", "solution": "\\boxed{2}"}) + "\n")
  rows = [{"problem": r["question"], "solution": r["answer"]} for r in byo_example.problems(6, 2)]
  paths["renamed"] = byo_example.write_jsonl(os.path.join(d, "renamed.jsonl"), rows)
  paths["traces"] = os.path.join(d, "traces.jsonl")
  write_trace_prompts(paths["traces"], [TracePrompt("1+2=", "3", [TraceResponse(
      "3", tokens=[5, 2], logp=[-0.1, -0.2], tokenizer="0123456789abcdef",
      logp_temperature=1.0)])])
  return paths


def _config(own, **overrides):
  c = smoke.get_config()
  c.policy, c.guide.path, c.algo, c.task = own["init"], "", "dapo", "file"
  c.task_kwargs.train_path, c.task_kwargs.prompt_field = own["train"], "question"
  c.task_kwargs.chat_template = True
  return set_fields(c, overrides)


def _refused(config, workdir, monkeypatch) -> str:
  """The one-line message the binaries print for `loop.setup(config)`'s refusal."""
  monkeypatch.setattr(loop, "resolve_models", _forbidden)
  monkeypatch.setattr(builtin, "ensure_builtin_models", _forbidden)
  with pytest.raises(Exception) as e:  # noqa: PT011  (what it is: next line)
    loop.setup(config, str(workdir))
  message = cli.user_error_message(e.value)  # None: a bug's traceback, not a user error
  assert message is not None and "\n" not in message, repr(e.value)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  return message


def test_own_policy_with_the_builtin_guide_names_config_guide(own, tmp_path, monkeypatch):
  # Before: the built-in guide was trained (1,200 SFT steps on `default`), then a traceback.
  message = _refused(_config(own, algo="mix2", **{"guide.path": "builtin"}), tmp_path, monkeypatch)
  assert message.startswith("--config.guide.path=builtin with --config.policy="), message
  assert "set --config.guide.path to a checkpoint that shares the policy's tokenizer" in message


def test_a_guide_of_the_same_vocabulary_size_with_other_ids_is_refused(own, tmp_path,
                                                                       monkeypatch):
  message = _refused(_config(own, algo="mix1", **{"guide.path": own["guide"]}), tmp_path,
                     monkeypatch)
  assert message.startswith(f"--config.guide.path={own['guide']}: the guide's tokenizer"), message
  assert "differs from the policy's" in message


@pytest.mark.parametrize("overrides,starts,contains", [
    ({"task_kwargs.prompt_field": "qestion"}, "--config.task_kwargs.prompt_field=qestion:",
     ["train.jsonl", "line 1", "field 'qestion' is missing", "'question'"]),
    ({"task_kwargs.skip_bad_rows": False}, "--config.task_kwargs.answer_field=answer:",
     ["train.jsonl:line 25: field 'answer' is missing",
      "--config.task_kwargs.skip_bad_rows=True skips"]),
    # An eval file with other field names: named by the eval option that would map them.
    ({"task_kwargs.eval_path": "RENAMED"}, "--config.task_kwargs.eval_prompt_field=question:",
     ["renamed.jsonl", "field 'question' is missing", "'problem'"]),
    ({"algo": "dapo", "guide.source": "traces", "guide.traces_path": "TRAIN"},
     "--config.guide.traces_path=", ["train.jsonl:line 1", "field 'prompt' is missing",
                                     "--config.guide.traces.format",
                                     "--config.guide.traces.fields"]),
    ({"algo": "mix1", "guide.path": "", "guide.source": "traces", "guide.logp": "file",
      "guide.traces_path": "TRACES"}, "--config.guide.traces_path=",
     ["traces.jsonl", "made with tokenizer '0123456789abcdef'", "Remake the traces"]),
])
def test_data_and_trace_errors_name_the_flag_file_row_and_field(own, tmp_path, monkeypatch,
                                                                 overrides, starts, contains):
  paths = {"RENAMED": own["renamed"], "TRAIN": own["train"], "TRACES": own["traces"]}
  overrides = {k: paths.get(v, v) for k, v in overrides.items()}
  message = _refused(_config(own, **overrides), tmp_path, monkeypatch)
  assert message.startswith(starts), message
  for text in contains:
    assert text in message, (text, message)


def test_an_eval_file_with_its_own_field_names_is_read(own, tmp_path, monkeypatch):
  config = _config(own, **{"task_kwargs.eval_path": own["renamed"],
                           "task_kwargs.eval_prompt_field": "problem",
                           "task_kwargs.eval_answer_field": "solution"})
  task, examples = preflight.make_task(config, preflight.tokenizer_of(config, "policy"))
  assert len(examples) == 6 and "has" in examples[0].prompt and examples[0].answer.isdigit()


def test_builtin_models_are_built_only_when_the_run_uses_them(own, tmp_path, monkeypatch):
  built = []
  monkeypatch.setattr(builtin, "ensure_builtin_models",
                      lambda d, cfg, only=("guide", "policy_init"): built.append(only) or (f"{d}/guide", f"{d}/policy_init"))
  for algo, policy, guide, want in (
      ("dapo", own["init"], "builtin", None),  # before: both built-in models, never used
      ("dapo", "builtin", "builtin", ("policy_init",)),
      ("mix2", "builtin", "builtin", ("policy_init", "guide")),
      ("mix2", own["init"], own["init"], None)):
    built.clear()
    config = smoke.get_config()
    config.algo, config.policy, config.guide.path = algo, policy, guide
    policy_path, guide_path = loop.resolve_models(config, str(tmp_path))
    assert built == ([want] if want else []), (algo, policy, guide, built)
    assert (guide_path is None) == (algo == "dapo")


def test_settings_the_run_ignores_are_warned_about(own, caplog):
  config = _config(own, algo="dapo", **{"guide.source": "traces",
                                        "guide.traces_path": own["traces"],
                                        "guide.path": own["guide"]})
  with caplog.at_level(logging.WARNING):
    preflight.warn_unused(config, loop.rl.resolve(config))
  text = caplog.text
  assert "config.algo=dapo is unguided: config.guide.source='traces' makes" in text, text
  assert "prompt stream only" in text and f"config.guide.path={own['guide']} is not loaded" in text
  # The guided algorithms it points to are the table's (a hand-written list missed chord).
  from mixpo import algorithms  # noqa: PLC0415
  guided = [n for n in algorithms.names() if algorithms.get(n).guided]
  assert f"trains on them: {', '.join(guided)})" in text, text


def test_new_task_options_at_their_defaults_leave_old_fingerprints_unchanged():
  """Runs fingerprinted before eval_prompt_field / eval_answer_field / schema existed resume."""
  config = smoke.get_config()
  assert not {"eval_prompt_field", "eval_answer_field", "schema"} & set(
      loop.fingerprint(config)["task_kwargs"])
  config.task_kwargs.eval_prompt_field = "problem"
  assert loop.fingerprint(config)["task_kwargs"]["eval_prompt_field"] == "problem"
