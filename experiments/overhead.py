r"""Per-phase share of the RL step time of a finished run (from its metrics.jsonl).

  python experiments/overhead.py --workdir=workdir/default

Model compute = generate_policy + generate_guide + score + update; the rest of the step
(rewards, batch assembly, dynamic-sampling bookkeeping, logging) is the RL overhead. Steps that
evaluate or checkpoint are excluded (those phases are reported separately), as is step 1 (compiles).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")
MODEL = ("generate_policy", "generate_guide", "score", "update")


def main(argv):
  del argv
  from mixpo.logging import read_metrics
  rows = [r for r in read_metrics(_WORKDIR.value)
          if r.get("step", 0) > 1 and "time/step" in r and "time/eval" not in r
          and r.get("time/checkpoint", 0.0) < 0.05]
  if not rows:
    raise SystemExit(f"{_WORKDIR.value}: no plain training steps in metrics.jsonl")
  total = sum(r["time/step"] for r in rows)
  phases = sorted({k[5:] for r in rows for k in r if k.startswith("time/") and k != "time/step"})
  print(f"{len(rows)} steps, mean step {total / len(rows):.3f} s")
  for p in phases:
    share = sum(r.get(f"time/{p}", 0.0) for r in rows) / total
    print(f"  {p:16s} {100 * share:5.1f} %")
  model = sum(r.get(f"time/{p}", 0.0) for r in rows for p in MODEL) / total
  print(f"outside model compute (generate / score / update): {100 * (1 - model):.1f} %")


if __name__ == "__main__":
  app.run(main)
