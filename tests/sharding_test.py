"""sharding.py: mesh layouts match one device, shardings land where the rules say, checkpoints
move between meshes, a 2-process run agrees, memory_plan needs no weights.

Multi-device checks run in subprocesses (tests/sharding_worker.py) with simulated CPU devices;
this process keeps its single device.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from mixpo import algorithms, models, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
LAYOUTS = ("(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)")


def _env(devices=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _result(proc_out: str) -> dict:
  lines = [l for l in proc_out.splitlines() if l.startswith("RESULT ")]
  assert lines, proc_out[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  d = tmp_path_factory.mktemp("layouts")
  p = subprocess.run([sys.executable, WORKER, "layouts", str(d)], env=_env(8), capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return _result(p.stdout)


def test_mesh_layouts_match_one_device_for_two_train_steps(layouts):
  assert layouts["devices"] == 8
  for shape in LAYOUTS:
    r = layouts[shape]
    assert r["loss_diff"] < 1e-5, (shape, r["loss_diff"])
    assert r["param_diff"] < 3e-5, (shape, r["param_diff"])  # Adam: lr 1e-2, two steps
    assert r["opt_diff"] < 1e-5, (shape, r["opt_diff"])


def test_shard_params_and_opt_state_carry_rule_specs(layouts):
  specs = layouts["(2, 2, 2)"]["params_specs"]
  assert specs["layers/1/attn/q_proj/kernel"] == "P('fsdp', 'tensor')"
  assert specs["layers/0/attn/o_proj/kernel"] == "P('tensor', 'fsdp')"
  assert specs["layers/0/mlp/down_proj/kernel"] == "P('tensor', 'fsdp')"
  assert specs["layers/0/mlp/up_proj/kernel"] == "P('fsdp', 'tensor')"
  assert specs["embed/embedding"] == "P(None, ('fsdp', 'tensor'))"
  assert specs["lm_head/kernel"] == "P('fsdp', 'tensor')"
  assert specs["final_norm/scale"] == "P(None,)"
  opt = layouts["(2, 2, 2)"]["opt_specs"]
  for path, spec in specs.items():  # Adam's moments mirror the params; its count is replicated
    assert opt[f"0/mu/{path}"] == spec and opt[f"0/nu/{path}"] == spec, path
  assert opt["0/count"] == "P()"


def test_sharded_generate_and_score_equal_unsharded(layouts):
  for shape in LAYOUTS:
    assert layouts[shape]["generate_equal"], shape
    assert layouts[shape]["score_diff"] < 1e-5, shape


def test_checkpoint_saved_under_one_mesh_restores_into_another_sharding(layouts):
  r = layouts["restore"]
  assert r["step"] == 2 and r["extra"] == {"data_pos": 3}
  assert r["diff"] == 0.0 and r["specs_ok"]
  assert r["embed_spec"] == "P(None, ('fsdp', 'tensor'))"


def test_from_pretrained_places_each_tensor_on_its_shards(layouts):
  r = layouts["hf_load"]
  assert r["diff"] == 0.0
  assert r["specs"]["layers/0/attn/k_proj/kernel"] == "P('fsdp', 'tensor')"


def test_one_device_mesh_is_bit_identical_to_no_mesh():
  cfg = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "max_position_embeddings": 32, "tie_word_embeddings": True}
  policy = train.Policy(models.init_from_config(cfg, rng=0))
  opt = optax.adam(1e-2)
  step_cfg = train.StepConfig(objective=algorithms.get("grpo").objective_config())
  rng = np.random.default_rng(0)
  from mixpo.batch import make_batch  # noqa: PLC0415
  batch = make_batch(rng.integers(1, 32, (4, 3)), np.ones((4, 3)), rng.integers(1, 32, (4, 4)),
                     np.ones((4, 4)), old_logp_BxN=-np.ones((4, 4)),
                     adv_B=np.array([1.0, -1.0, 0.5, -0.5]))
  results = []
  for use_mesh in (False, True):
    state = jax.tree.map(lambda x: x.copy(), train.init_state(policy, opt, 0))
    if use_mesh:
      mesh = sharding.make_mesh((-1, 1, 1))
      state_sh = sharding.train_state_shardings(state, mesh)
      step = train.make_train_step(policy, opt, step_cfg,
                                   shardings=(state_sh, sharding.batch_sharding(mesh)))
      with jax.set_mesh(mesh):
        for _ in range(2):
          state, m = step(jax.device_put(state, state_sh), batch)
    else:
      step = train.make_train_step(policy, opt, step_cfg)
      for _ in range(2):
        state, m = step(state, batch)
    results.append((float(m["loss/loss"]), [np.asarray(x) for x in jax.tree.leaves(state.params)]))
  assert results[0][0] == results[1][0]
  for a, b in zip(results[0][1], results[1][1]):
    np.testing.assert_array_equal(a, b)


def test_mesh_shape_resolution_and_errors():
  assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.resolve_mesh_shape((2, -1, 2), 16) == (2, 4, 2)
  with pytest.raises(ValueError, match="config.mesh_shape"):
    sharding.resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="config.mesh_shape"):
    sharding.resolve_mesh_shape((2, 2, 1), 8)
  mesh = sharding.make_mesh((-1, 1, 1))
  # Axes that do not divide a dimension are dropped rather than failing at jit time.
  assert sharding.fit_spec(sharding.P("fsdp", "tensor"), (3, 5), mesh) == sharding.P("fsdp",
                                                                                        "tensor")
  with pytest.raises(ValueError, match="PARAM_RULES"):
    sharding.spec_for("layers/0/new_thing/kernel", (4, 4), mesh)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_multihost_two_processes_train_and_agree(tmp_path):
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, WORKER, "multihost", str(tmp_path), str(i), port],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-3000:]
    outs.append(_result(out))
  a, b = outs
  assert {a["process"], b["process"]} == {0, 1}
  assert a["processes"] == 2 and a["devices"] == 4 and a["local_devices"] == 2
  assert a["losses"] == b["losses"] and a["param_sum"] == b["param_sum"]
  assert "2" in a["saved"]  # orbax wrote the step with both processes taking part


RL_CONFIG = """
from experiments.configs import smoke


def get_config():
  c = smoke.get_config()
  c.task_kwargs = {"digits": 2, "terms": 2, "reward": "digits"}  # partial credit: a gradient
  c.num_steps = 2
  return c
"""


def _train(args, env):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "train.py")] + args,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout=600) -> list[dict]:
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert "run summary:" in lines, out[-2000:]
    # The printed summary without its last line (the workdir's files).
    outs.append("\n".join(lines[lines.index("run summary:"):-1]))
  return outs


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  drop = ("time/", "wall_s", "compile/")
  return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


def test_multihost_rl_loop_two_processes_equal_one_process(tmp_path):
  # The real binary, 2 processes × 2 CPU devices (gloo collectives), against one process with 4
  # devices: same mesh (data=4), so the whole RL loop must give the same numbers.
  from safetensors.numpy import load_file
  cfg = tmp_path / "cfg.py"
  cfg.write_text(RL_CONFIG)
  multi, single, models_dir = tmp_path / "multi", tmp_path / "single", tmp_path / "models"
  env = dict(_env(), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_NUM_CPU_DEVICES="2")
  port = str(_free_port())
  common = [f"--config={cfg}", f"--config.builtin_dir={models_dir}"]
  # Process 0 builds the built-in models while process 1 waits at the barrier.
  summaries = _finish([_train(common + [f"--workdir={multi}", "--distributed",
                                        f"--coordinator_address=localhost:{port}",
                                        "--num_processes=2", f"--process_id={i}"], env)
                       for i in range(2)])
  assert summaries[0] == summaries[1]
  env1 = dict(_env(), JAX_NUM_CPU_DEVICES="4")
  (single_summary,) = _finish([_train(common + [f"--workdir={single}"], env1)])
  assert single_summary == summaries[0]

  rows_m, rows_s = _rows(multi), _rows(single)
  assert [r["step"] for r in rows_m] == [0, 1, 2]  # process 1 logged nothing
  # Equal up to float32 reduction order (gloo's cross-process sums vs one process's).
  assert [sorted(r) for r in rows_m] == [sorted(r) for r in rows_s]
  for rm, rs in zip(rows_m, rows_s):
    for k, v in rm.items():
      assert v == pytest.approx(rs[k], rel=1e-5, abs=1e-6), (rm["step"], k)
  assert any(abs(r.get("loss/loss", 0.0)) > 1e-4 for r in rows_m)  # a real update happened
  assert os.path.isdir(multi / "checkpoints" / "2")
  w_m = load_file(str(multi / "export" / "model.safetensors"))
  w_s = load_file(str(single / "export" / "model.safetensors"))
  w_0 = load_file(str(models_dir / "policy_init" / "model.safetensors"))
  assert w_m.keys() == w_s.keys()
  for k in w_m:
    np.testing.assert_allclose(w_m[k], w_s[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert any(not np.array_equal(w_m[k], w_0[k]) for k in w_m)


def test_memory_plan_runs_from_config_json_without_weights(tmp_path):
  """Qwen2.5-1.5B's per-device plan from its config.json alone (its fp32 weights, 6.2 GB, are
  never made), and a 4-layer cut of it with the train step compiled at full depth."""
  hf = os.path.join(ROOT, "experiments", "configs", "hf", "qwen2.5-1.5b.json")
  cut = tmp_path / "config.json"
  cut.write_text(json.dumps({**json.load(open(hf)), "num_hidden_layers": 4}))

  def plan(config, *flags):
    out = tmp_path / "plan.json"
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "memory_plan.py"), f"--config={config}",
         "--mesh=1,2,2", "--device_memory_gib=16", "--train_rows=8", "--seq_len=64",
         "--rollout_rows=8", "--json_out=" + str(out), *flags],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())

  full = plan(hf, "--nocompile")
  n_params = full["num_params"]
  assert 1.5e9 < n_params < 1.6e9  # Qwen2.5-1.5B (tied embeddings)
  # fp32 params over fsdp×tensor = 4 shards (norms and biases replicated: a little more).
  assert 4 * n_params / 4 <= full["per_device"]["params"] < 1.01 * 4 * n_params / 4
  assert full["peak_rss_bytes"] < 4 * n_params / 4  # not even one device's shard was made
  assert plan(str(cut))["per_device"]["step_temp"] > 0