"""mixpo/data/chat_render.py: a checkpoint's chat template is rendered bounded in time, memory and
output size, and a runaway one stops the read naming the template file and the row."""

import json

import pytest

from mixpo import models
from mixpo.data import char_tokenizer, chat_render
from mixpo.data.readers import DataError, read_examples
from mixpo.rewards.deadline import deadline

ALPHABET = "0123456789+-*/=() abcdefghijklmnopqrstuvwxyz<>"
CHATML = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
          "{% if add_generation_prompt %}<assistant>{% endif %}")


def _checkpoint_tokenizer(tmp_path, template):
  """A tokenizer loaded from a directory whose chat_template.jinja is `template`."""
  tokenizer = char_tokenizer(ALPHABET)
  tokenizer.chat_template = template
  path = tmp_path / "ckpt"
  tokenizer.save_pretrained(str(path))
  return models.load_tokenizer(str(path)), str(path / "chat_template.jinja")


def _dataset(tmp_path, n=2):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1="}],
                                      "answer": str(i + 1)}) + "\n" for i in range(n)))
  return str(path)


@pytest.mark.parametrize("template,why", [
    # 10^10 loop iterations: main read the dataset for hours.
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "ran longer than 1 s"),
    # Past the output cap (main: a 5-million-character prompt, logged and trained on).
    ("{{ 'x' * 5000000 }}", "rendered 5000000 characters, more than"),
    # Past the memory limit (lowered here; main: 600 MB in the trainer, more on request).
    ("{{ 'x' * 600000000 }}", "GiB"),
], ids=["deadline", "output_cap", "memory"])
def test_runaway_chat_template_stops_the_read_naming_template_file_and_row(tmp_path, monkeypatch,
                                                                        template, why):
  monkeypatch.setattr(chat_render, "RENDER_TIMEOUT_S", 1.0)
  monkeypatch.setattr(chat_render, "MEMORY_BYTES", 256 * 2**20)
  tokenizer, template_file = _checkpoint_tokenizer(tmp_path, template)
  path = _dataset(tmp_path)
  with deadline(120):  # main has no bound: fail rather than hang the suite.
    with pytest.raises(chat_render.TemplateLimitError) as info:
      read_examples(path, tokenizer=tokenizer, chat_template=True, skip_bad_rows=True)
  message = str(info.value)
  assert f"{path}:line 1" in message and template_file in message and why in message, message


def test_a_template_that_raises_for_a_row_is_that_rows_data_error(tmp_path):
  """main: the template's raise_exception escaped as a jinja2 TemplateError traceback."""
  tokenizer, template_file = _checkpoint_tokenizer(
      tmp_path, "{% if messages[0]['content'] == '1+1=' %}{{ raise_exception('no 1+1') }}"
      "{% endif %}" + CHATML)
  path = _dataset(tmp_path)
  with pytest.raises(DataError, match=f"{path}:line 2: the chat template .*{template_file}.*no 1"):
    read_examples(path, tokenizer=tokenizer, chat_template=True)
  examples, summary = read_examples(path, tokenizer=tokenizer, chat_template=True,
                                    skip_bad_rows=True)
  assert len(examples) == 1 and summary.skipped == {"template_error": 1}


def test_a_runaway_template_is_a_setup_error_naming_the_flag(tmp_path, monkeypatch):
  """The binaries turn SetupError into one line, exit 2; before, a runaway template in the
  policy's checkpoint escaped the front door as a TemplateLimitError traceback (exit 1)."""
  from experiments.configs import smoke  # noqa: PLC0415
  from mixpo import preflight  # noqa: PLC0415
  monkeypatch.setattr(chat_render, "RENDER_TIMEOUT_S", 1.0)
  tokenizer, template_file = _checkpoint_tokenizer(tmp_path, "{{ 'x' * 5000000 }}")
  config = smoke.get_config()
  config.task = "file"
  config.task_kwargs.train_path = _dataset(tmp_path)
  config.task_kwargs.chat_template = True
  with pytest.raises(preflight.SetupError, match=f"--config.task_kwargs|config.task_kwargs.*"
                     f"{template_file}"):
    preflight.make_task(config, tokenizer)
