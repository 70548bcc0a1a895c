"""Train-step time and peak memory against sequence length at a fixed B·T: mixpo vs transformers.

For each T in --lengths (B = --tokens / T) and each framework, one fresh subprocess builds the
--shape model (random weights), warms up, times --steps train steps (forward + backward + AdamW,
the loss of bench_model.py; transformers with its sdpa attention) and reports the median step and
the process's peak RSS (ru_maxrss: weights, optimizer state, activations, compiled programs).

  python experiments/bench_scaling.py                        # mid shape, T = 256 .. 8192
  python experiments/bench_scaling.py --lengths=256,1024 --tokens=2048 --steps=1
"""

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_common  # noqa: E402
from experiments import bench_model  # noqa: E402  (its flags: --shape, --dtype, --steps, ...)

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["256", "1024", "4096", "8192"], "Sequence lengths T.")
flags.DEFINE_integer("tokens", 8192, "B·T per step (B = tokens / T).")
flags.DEFINE_list("frameworks", ["mixpo", "transformers"], "Which sides to run.")
flags.DEFINE_string("child", None, "Internal: run one framework at --seq and print JSON.")
flags.DEFINE_integer("timeout", 3600, "Seconds per child run.")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child():
  tokens_BxT = np.random.RandomState(0).randint(
      0, bench_model.hf_config_dict()["vocab_size"], (FLAGS.batch, FLAGS.seq + 1)).astype(np.int32)
  base = _peak_rss_mb()
  step = (bench_model.mixpo_stepper if FLAGS.child == "mixpo" else bench_model.torch_stepper)(
      tokens_BxT)
  for _ in range(FLAGS.warmup):
    step()
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  print(json.dumps({"step_s": bench_common.median(times), "peak_rss_mb": _peak_rss_mb(),
                    "base_rss_mb": base}))


def main(argv):
  from mixpo import hostmem  # first: XLA:CPU allocator settings precede any jax computation
  hostmem.keep_freed_memory()
  del argv
  if FLAGS.child:
    return _child()
  print(f"shape {FLAGS.shape} ({bench_common.describe(bench_model.hf_config_dict())}), "
        f"{FLAGS.dtype}, B·T = {FLAGS.tokens}, median of {FLAGS.steps} steps after "
        f"{FLAGS.warmup} warm-up; load {os.getloadavg()[0]:.1f}")
  print("| T | B | framework | step s | tokens/s | peak RSS MB |")
  print("|---|---|---|---|---|---|")
  for t in map(int, FLAGS.lengths):
    b = max(1, FLAGS.tokens // t)
    for name in FLAGS.frameworks:
      cmd = [sys.executable, os.path.abspath(__file__), f"--child={name}", f"--seq={t}",
             f"--batch={b}", f"--shape={FLAGS.shape}", f"--dtype={FLAGS.dtype}",
             f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
             f"--attention_impl={FLAGS.attention_impl}", f"--remat={FLAGS.remat}"]
      try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.timeout,
                             check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"| {t} | {b} | {name} | {r['step_s']:.3f} | {b * t / r['step_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |", flush=True)
      except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        tail = (getattr(e, "stderr", "") or "").strip().splitlines()[-1:]
        print(f"| {t} | {b} | {name} | failed: {type(e).__name__} {tail} | | |", flush=True)


if __name__ == "__main__":
  flags.FLAGS.set_default("shape", "mid")
  flags.FLAGS.set_default("steps", 2)
  flags.FLAGS.set_default("warmup", 1)
  app.run(main)
