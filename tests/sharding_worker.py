"""Subprocess body of sharding_test.py (needs several simulated devices; prints one JSON line).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py layouts DIR
  python tests/sharding_worker.py multihost DIR PROCESS_ID PORT   (2 processes, 2 devices each)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

MODE = sys.argv[1]
if MODE == "multihost":
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[4]}", num_processes=2,
                             process_id=int(sys.argv[3]), initialization_timeout=120)
jax.config.update("jax_numpy_rank_promotion", "raise")

import optax  # noqa: E402

from mixpo import algorithms, checkpoint, models, sampling, sharding, train  # noqa: E402
from mixpo.batch import make_batch  # noqa: E402

TINY = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 64,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
OPT = optax.adam(1e-2)
CFG = train.StepConfig(objective=algorithms.get("mix2").objective_config(), num_minibatches=2)


def rl_batch(seed=0, b=8, p=4, n=6):
  rng = np.random.default_rng(seed)
  pmask = np.ones((b, p), np.int32)
  pmask[0, :2] = 0
  rmask = (np.arange(n)[None] < rng.integers(2, n + 1, b)[:, None]).astype(np.float32)
  logp = -rng.uniform(1.0, 4.0, (b, n)).astype(np.float32)
  return make_batch(rng.integers(4, 64, (b, p)), pmask, rng.integers(4, 64, (b, n)), rmask,
                    old_logp_BxN=logp, guide_logp_BxN=logp - 0.5,
                    adv_B=rng.standard_normal(b).astype(np.float32),
                    kind_B=np.array([0, 0, 1, 1, 2, 2, 0, 1], np.int32), group_B=np.arange(b) // 2)


def two_steps(policy, mesh):
  """Loss of each of two train steps and the final state (host numpy)."""
  batch = rl_batch()
  state = jax.tree.map(lambda x: x.copy(), train.init_state(policy, OPT, 0))  # step donates it
  if mesh is None:
    step = train.make_train_step(policy, OPT, CFG)
  else:
    state_sh = sharding.train_state_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    step = train.make_train_step(policy, OPT, CFG,
                                 shardings=(state_sh, sharding.batch_sharding(mesh)))
    batch = sharding.shard_rows(jax.device_get(batch), mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss/loss"]))  # replicated: readable on every process
  return losses, state


def host(tree):
  """Leaves as numpy on every process (gathering shards other processes hold)."""
  return jax.tree.leaves(sharding.to_host(tree))


def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def layouts(workdir):
  out = {"devices": jax.device_count()}
  policy = train.Policy(models.init_from_config(TINY, rng=0))
  ref_losses, ref_state = two_steps(policy, None)
  ref_params, ref_opt = host(ref_state.params), host(ref_state.opt_state)
  prompts = np.random.default_rng(1).integers(4, 64, (8, 5))
  pmask = np.ones_like(prompts)
  pmask[1, :2] = 0
  greedy = lambda pair: np.asarray(sampling.generate(pair, prompts, pmask, jax.random.key(0), 6,
                                                     temperature=0.0).tokens_BxN)
  ref_tokens = greedy(policy.pair(policy.params))
  ref_score = np.asarray(sampling.score(policy.pair(policy.params), prompts, pmask))
  states = {}
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(shape)
    with jax.set_mesh(mesh):
      losses, state = two_steps(policy, mesh)
      pair = policy.pair(jax.device_put(policy.params, sharding.tree_shardings(policy.params, mesh)))
      tokens, score = greedy(pair), np.asarray(sampling.score(pair, prompts, pmask))
    states[shape] = state
    out[str(shape)] = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "param_diff": max_diff(host(state.params), ref_params),
        "opt_diff": max_diff(host(state.opt_state), ref_opt),
        "params_specs": sharding.describe(state.params),
        "opt_specs": sharding.describe(state.opt_state),
        "generate_equal": bool(np.array_equal(tokens, ref_tokens)),
        "score_diff": float(np.max(np.abs(score - ref_score))),
    }
  # Save under fsdp×tensor, restore under pure data into a sharded abstract target.
  state_a, mesh_b = states[(2, 2, 2)], sharding.make_mesh((1, 8, 1))
  with checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), save_every=1, keep=1,
                               async_save=False) as ckpt:
    ckpt.save(2, state_a, {"data_pos": 3}, force=True)
  target = sharding.abstract(state_a, sharding.train_state_shardings(state_a, mesh_b))
  with checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), save_every=1, keep=1) as ckpt:
    step, restored, extra = ckpt.restore_latest(target)
  out["restore"] = {
      "step": step, "extra": extra,
      "diff": max_diff(host(restored), host(state_a)),
      "specs_ok": all(r.sharding == t.sharding for r, t in
                      zip(jax.tree.leaves(restored), jax.tree.leaves(target))),
      "embed_spec": str(restored.params["embed"]["embedding"][...].sharding.spec),
  }
  # Loading an HF checkpoint straight onto the shards.
  models.save_pretrained(policy.merge(policy.params), os.path.join(workdir, "hf"))
  jax.block_until_ready(policy.params)
  mesh = sharding.make_mesh((2, 2, 2))
  loaded = models.from_pretrained(os.path.join(workdir, "hf"),
                                  shardings=sharding.path_shardings(mesh))
  lp = train.Policy(loaded).params
  out["hf_load"] = {"diff": max_diff(host(lp), host(policy.params)),
                    "specs": sharding.describe(lp)}
  return out


def multihost(workdir):
  mesh = sharding.make_mesh((-1, 1, 1))  # 2 processes × 2 devices: all on data
  policy = train.Policy(models.init_from_config(TINY, rng=0))
  with jax.set_mesh(mesh):
    losses, state = two_steps(policy, mesh)
  params = host(state.params)
  with checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), save_every=1, keep=1,
                               async_save=False) as ckpt:
    ckpt.save(2, state, {"data_pos": 1}, force=True)
  return {"process": jax.process_index(), "processes": jax.process_count(),
          "devices": jax.device_count(), "local_devices": jax.local_device_count(),
          "losses": losses, "param_sum": float(sum(np.sum(p.astype(np.float64)) for p in params)),
          "saved": sorted(os.listdir(os.path.join(workdir, "ckpt")))}


if __name__ == "__main__":
  result = layouts(sys.argv[2]) if MODE == "layouts" else multihost(sys.argv[2])
  print("RESULT " + json.dumps(result))
