"""docs/metrics.md as patterns: the tests that run the trainer check every key it wrote against
them (`assert_documented`), so a new metric without its row in the table fails a test."""

import functools
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Placeholders of the table's keys and what each may stand for.
PLACEHOLDERS = {"<set>": "(on|zero|off)", "<fn>": "[A-Za-z0-9_.-]+",
                "<source>": "(policy|guide|traces)", "<key>": "[A-Za-z0-9_.-]+",
                "<phase>": "(weight_sync|generate_policy|generate_guide|reward|score|update|eval|"
                           "checkpoint)"}


@functools.cache
def documented() -> tuple[re.Pattern, ...]:
  """One pattern per key written in the first column of docs/metrics.md's tables."""
  patterns = []
  for line in open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8"):
    if not line.startswith("| `"):
      continue
    for key in re.findall(r"`([^`]+)`", line.split("|")[1]):
      regex = re.escape(key)
      for name, part in PLACEHOLDERS.items():
        regex = regex.replace(re.escape(name), part)
      patterns.append(re.compile(regex + "$"))
  return tuple(patterns)


def undocumented(keys) -> list[str]:
  return sorted(k for k in keys if not any(p.match(k) for p in documented()))


def assert_documented(keys) -> None:
  missing = undocumented(keys)
  assert not missing, f"metrics without a row in docs/metrics.md: {missing}"
