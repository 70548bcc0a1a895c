"""mixpo's GRPO update against tunix's (the JAX peer), same checkpoint, one process.

Both load one random Qwen2 checkpoint in transformers' format (the Qwen2.5-0.5B width: hidden 896,
14 / 2 heads, F 4864, vocab 151936, tied; --layers deep) and take one GRPO update on the same rows
(B prompts of P tokens + N response tokens, θ_old = the weights, no KL, AdamW after a global-norm
clip of 1): mixpo's `train.make_train_step` (GRPO's objective) and tunix's own `PeftTrainer` train step
around its `grpo_loss_fn` (sequence-mean-token-mean, ε = 0.2), each jitted as its library does,
state donated. The first update's loss and gradient norm are printed for both (the programs compute
the same thing: they must agree). Steps are timed in alternating rounds after an alternating
warm-up (median round reported); --cost prints XLA's cost analysis (bytes accessed, flops) of both
compiled steps.

  python experiments/bench_peers.py
  python experiments/bench_peers.py --layers=6 --cost --rounds=1

Needs tunix next to the lock (not a mixpo dependency):
  pip install --no-deps google-tunix==0.1.7
  pip install google-metrax qwix jaxtyping sentencepiece perfetto -c constraints.txt
(tunix declares safetensors<0.8; it runs with the lock's 0.8.0).
"""

import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import bench_common  # noqa: E402
from mixpo import models, objectives, sampling, train  # noqa: E402
from mixpo.batch import make_batch  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 2, "num_hidden_layers of the Qwen2.5-0.5B-width model.")
flags.DEFINE_integer("batch", 4, "B, rows per update.")
flags.DEFINE_integer("prompt_len", 64, "P, prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 64, "N, response tokens per row (all in the loss).")
flags.DEFINE_integer("steps", 2, "Timed updates per round.")
flags.DEFINE_integer("rounds", 3, "Alternating timed rounds per library (median reported).")
flags.DEFINE_integer("warmup", 1, "Untimed updates per library before timing (alternating).")
flags.DEFINE_list("libs", ["mixpo", "tunix"], "Which updates to build and time (memory: each "
                  "holds its model, AdamW state and compiled step).")
flags.DEFINE_bool("cost", False, "Print XLA's cost analysis of both compiled updates.")
flags.DEFINE_bool("unguarded", False, "mixpo: apply every update unconditionally (no skip of "
                  "non-finite updates), to compare the guard's cost (--cost).")
flags.DEFINE_bool("response_only", True, "mixpo: the loss over the N response columns only "
                  "(StepConfig.response_tokens, as rl.resolve sets it); False: every column.")

LEARNING_RATE, EPS, PAD, EOS = 1e-6, 0.2, 0, 1


def write_checkpoint(path):
  """A random checkpoint of the geometry in transformers' format, written by mixpo's exporter
  (tests/models_test.py checks it against transformers) in a child process: the init model and
  the serialisation buffers would stay in this process' heap (hostmem keeps freed memory)."""
  hf = dict(bench_common.hf_config("qwen2.5-0.5b", 2 * (FLAGS.prompt_len + FLAGS.new_tokens)),
            num_hidden_layers=FLAGS.layers)
  code = ("import sys; sys.path.insert(0, sys.argv[1]); from mixpo import models; "
          "models.save_pretrained(models.init_from_config(eval(sys.argv[2]), 0), sys.argv[3])")
  subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), repr(hf), path], check=True)
  return hf


def rows(vocab):
  rng = np.random.default_rng(0)
  b, p, n = FLAGS.batch, FLAGS.prompt_len, FLAGS.new_tokens
  prompt = rng.integers(2, vocab, (b, p)).astype(np.int32)  # no pad / eos id inside
  response = rng.integers(2, vocab, (b, n)).astype(np.int32)
  adv = rng.standard_normal(b).astype(np.float32)
  return prompt, response, adv


def mixpo_step(path, prompt, response, adv):
  """(step(), first metrics, compiled, θ_old's response log-probs) of mixpo's GRPO update."""
  model = models.from_pretrained(path)
  b, n = response.shape
  batch = make_batch(prompt, np.ones_like(prompt), response, np.ones((b, n), np.float32),
                     adv_B=adv, kind_B=np.full(b, objectives.ON, np.int32))
  old = sampling.score(model, batch.tokens_BxT, batch.mask_BxT, batch.positions_BxT)
  batch = dataclasses.replace(batch, old_logp_BxT=old)
  policy = train.Policy(model)
  optimizer = train.make_optimizer(train.OptimConfig(learning_rate=LEARNING_RATE, grad_clip=1.0))
  # tunix's grpo_loss_fn: PPO clip [1 − ε, 1 + ε], no dual clip, sequence-mean-token-mean.
  objective = objectives.ObjectiveConfig(eps_low=EPS, eps_high=EPS, dual_clip=None,
                                         loss_agg="seq-mean-token-mean")
  cfg = train.StepConfig(objective=objective,
                         response_tokens=FLAGS.new_tokens if FLAGS.response_only else 0)
  if FLAGS.unguarded:
    def apply(optimizer, params, opt_state, grads, loss, grad_norm):
      del grad_norm
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, jnp.isfinite(loss)
    train._guarded_update = apply  # pylint: disable=protected-access
  step_fn = train.make_train_step(policy, optimizer, cfg, donate=True)
  state = train.init_state(policy, optimizer, 0)
  compiled = step_fn.lower(state, batch).compile() if FLAGS.cost else None
  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch)
    return jax.block_until_ready(metrics)

  first = step()
  return (step, {"loss": float(first["loss/loss"]), "grad_norm": float(first["loss/grad_norm"])},
          compiled, old[:, -n:])


def tunix_step(path, hf, prompt, response, adv, old):
  """(step(), first metrics, compiled) of tunix's PeftTrainer step around its grpo_loss_fn."""
  from tunix.models.qwen2 import model as qwen2_model  # noqa: PLC0415
  from tunix.models.qwen2 import params as qwen2_params  # noqa: PLC0415
  from tunix.rl import algo_core, common  # noqa: PLC0415
  from tunix.rl.grpo import grpo_learner  # noqa: PLC0415
  from tunix.sft import peft_trainer  # noqa: PLC0415
  config = qwen2_model.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], head_dim=hf["hidden_size"] // hf["num_attention_heads"],
      num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]),
      norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"])
  model = qwen2_params.create_model_from_safe_tensors(path, config)
  b, n = response.shape
  algo = grpo_learner.GRPOConfig(num_generations=2, beta=0.0, epsilon=EPS,
                                 loss_agg_mode="sequence-mean-token-mean")
  algo.temperature = 1.0  # GRPOLearner sets it from the rollout config the same way.
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LEARNING_RATE))
  trainer = peft_trainer.PeftTrainer(model, optimizer,
                                     peft_trainer.TrainingConfig(eval_every_n_steps=1 << 30))
  # As GRPOLearner wires its actor trainer (its loss lambda, its model-input function).
  trainer.with_loss_fn(lambda model, train_example, algo_config: algo_core.grpo_loss_fn(
      model, train_example, algo_config=algo, pad_id=PAD, eos_id=EOS), has_aux=True)
  trainer.with_gen_model_input_fn(lambda example: {"train_example": example,
                                                   "algo_config": algo})
  train_step, _ = trainer.jit_train_and_eval_step()
  prompt_j, response_j = jnp.asarray(prompt), jnp.asarray(response)
  example = common.TrainExample(
      prompt_ids=prompt_j, prompt_mask=jnp.ones_like(prompt_j), completion_ids=response_j,
      completion_mask=jnp.ones((b, n), jnp.int32), advantages=jnp.asarray(adv),
      ref_per_token_logps=None, old_per_token_logps=old)
  # tunix binds (model, optimizer) to its nnx.jit-ted step with functools.partial.
  compiled = (train_step.func.lower(*train_step.args, example).compile() if FLAGS.cost else None)

  def step():
    return jax.block_until_ready(train_step(example))

  loss, _, grad_norm = step()
  return step, {"loss": float(loss), "grad_norm": float(grad_norm)}, compiled


def main(_):
  from mixpo import hostmem  # noqa: PLC0415 — first: XLA:CPU allocator settings
  hostmem.keep_freed_memory()
  with tempfile.TemporaryDirectory() as tmp:
    hf = write_checkpoint(tmp)
    prompt, response, adv = rows(hf["vocab_size"])
    steps, first, compiled = {}, {}, {}
    steps["mixpo"], first["mixpo"], compiled["mixpo"], old = mixpo_step(tmp, prompt, response,
                                                                         adv)
    if "mixpo" not in FLAGS.libs:  # θ_old's log-probs were all it was built for
      del steps["mixpo"], first["mixpo"], compiled["mixpo"]
    if "tunix" in FLAGS.libs:  # θ_old's response log-probs scored once (the loaders agree)
      steps["tunix"], first["tunix"], compiled["tunix"] = tunix_step(tmp, hf, prompt, response,
                                                                     adv, old)
  tokens = FLAGS.batch * (FLAGS.prompt_len + FLAGS.new_tokens)
  print(f"Qwen2.5-0.5B width, {FLAGS.layers} layers ({bench_common.describe(hf)}), B={FLAGS.batch} "
        f"P={FLAGS.prompt_len} N={FLAGS.new_tokens}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  for name, m in first.items():
    print(f"first update {name:>5}: loss {m['loss']:.6f}  grad norm {m['grad_norm']:.6f}")
  if FLAGS.cost:
    for name, c in compiled.items():
      cost = c.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      print(f"cost {name:>5}: {cost['bytes accessed'] / 1e9:.2f} GB accessed, "
            f"{cost['flops'] / 1e9:.1f} GFLOP")
  for _ in range(FLAGS.warmup):
    for step in steps.values():
      step()
  rates = {name: [] for name in steps}
  for _ in range(FLAGS.rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      for _ in range(FLAGS.steps):
        step()
      rates[name].append(FLAGS.steps * tokens / (time.perf_counter() - start))
  for name, r in rates.items():
    print(f"{name:>5}: {statistics.median(r):8.1f} tokens/s per update (rounds: "
          f"{', '.join(f'{x:.1f}' for x in r)})")
  if len(rates) == 2:
    ratio = statistics.median(rates["mixpo"]) / statistics.median(rates["tunix"])
    print(f"ratio mixpo / tunix: {ratio:.2f}x")


if __name__ == "__main__":
  app.run(main)
