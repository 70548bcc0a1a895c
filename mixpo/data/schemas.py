"""Field defaults of the dataset and trace schemas users already have, as data (no reading here).

A schema names the dotted field paths (see `mixpo.data.readers.get_field`) of one file layout:

  plain   {"prompt": str, "answer": str} — mixpo's own datasets.
  verl    verl's RL parquet, also LUFFY's: "data_source", "prompt" (a chat list, a system message
          allowed), "reward_model": {"ground_truth": str, "style": "rule"}, "extra_info" (a dict);
          LUFFY adds the guide's response as "target" = [{"role": "assistant", "content": str}]
          and several as "target_lst".
  openr1  OpenR1-Math: "problem", "answer", "generations" [str] (several guide responses) and
          "correctness_math_verify" [bool] (one per generation).

`dataset_fields` resolves a training dataset's prompt / answer fields and chat rendering
(`task="file"`); `mixpo.data.traces` holds the trace formats built on the same names.
"""

from __future__ import annotations

# Training datasets: (prompt field, answer field, render prompts with the chat template).
DATASET_SCHEMAS = {
    "plain": ("prompt", "answer", False),
    "verl": ("prompt", "reward_model.ground_truth", True),
    "openr1": ("problem", "answer", False),
}


def dataset_fields(schema: str, prompt_field: str | None = None, answer_field: str | None = None,
                   chat_template: bool | None = None) -> tuple[str, str, bool]:
  """(prompt_field, answer_field, chat_template): the schema's defaults, explicit values winning.

  None means "the schema's default"; e.g. dataset_fields("verl") ==
  ("prompt", "reward_model.ground_truth", True), so a verl parquet trains without conversion.
  """
  if schema not in DATASET_SCHEMAS:
    raise ValueError(f"schema={schema!r}: use one of {sorted(DATASET_SCHEMAS)} (or map the fields "
                     "yourself with prompt_field / answer_field)")
  p, a, chat = DATASET_SCHEMAS[schema]
  return (p if prompt_field is None else prompt_field, a if answer_field is None else answer_field,
          chat if chat_template is None else bool(chat_template))
