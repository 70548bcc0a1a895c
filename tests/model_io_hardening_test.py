"""Hardening of model files and run directories: atomic HF export, index containment, validated
config.json, exact-dtype checkpoint restore, compare.py's work root, the coordinator bind address.

Tiny random models are built with mixpo / transformers in tmp dirs (no downloads).
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file

from mixpo import checkpoint as ckpt_lib
from mixpo import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
            tie_word_embeddings=False)


def _tokens():
  rs = np.random.RandomState(0)
  tokens = rs.randint(0, TINY["vocab_size"], (2, 7)).astype(np.int32)
  mask = np.ones_like(tokens)
  return tokens, np.cumsum(mask, 1).astype(np.int32) - 1, mask


def _logits(model):
  return np.asarray(model(*_tokens()), np.float32)


def _torch_logits(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  tokens, positions, mask = _tokens()
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


def _weight_files(path):
  return sorted(n for n in os.listdir(path) if "safetensors" in n)


# -- atomic export ---------------------------------------------------------------------------


@pytest.mark.parametrize("first,second", [(600, None), (None, 600)])
def test_export_over_an_older_export_gives_the_new_weights_to_both_loaders(tmp_path, first,
                                                                           second):
  """Sharded then unsharded (and the reverse) into one directory: no stale file survives."""
  old, new = models.init_from_config(TINY, rng=0), models.init_from_config(TINY, rng=1)
  path = str(tmp_path / "export")
  models.save_pretrained(old, path, max_shard_bytes=first)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    f.write("{}")  # A file the user put next to the weights: kept.
  models.save_pretrained(new, path, max_shard_bytes=second)
  want = _logits(new)
  assert np.abs(want - _logits(old)).max() > 1e-2  # the two exports really differ.
  np.testing.assert_allclose(_logits(models.from_pretrained(path)), want, atol=1e-5)
  np.testing.assert_allclose(_torch_logits(path), want, atol=1e-4)
  files = _weight_files(path)
  if second is None:
    assert files == ["model.safetensors"]
  else:
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
      listed = set(json.load(f)["weight_map"].values())
    assert listed == set(files) - {"model.safetensors.index.json"}
  assert os.path.isfile(os.path.join(path, "tokenizer_config.json"))
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary directory left behind.


def test_export_failure_leaves_the_previous_export_intact(tmp_path, monkeypatch):
  old = models.init_from_config(TINY, rng=0)
  path = str(tmp_path / "export")
  models.save_pretrained(old, path)
  before = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(models.hf_io, "save_file", fail)
  with pytest.raises(OSError, match="disk full"):
    # Another config too: a config.json written before the weights would show.
    models.save_pretrained(models.init_from_config({**TINY, "intermediate_size": 32}, rng=1),
                           path, max_shard_bytes=600)
  assert {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)} == before
  assert sorted(os.listdir(tmp_path)) == ["export"]


class _Killed(BaseException):
  """Stands for SIGKILL at that line: nothing after it runs."""


def _chat_tokenizer(template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"):
  from mixpo.data import char_tokenizer
  tokenizer = char_tokenizer("0123456789+-*/=() abcdefghijklmnopqrstuvwxyz<>")
  tokenizer.chat_template = template
  return tokenizer


def test_export_swaps_weights_config_and_tokenizer_in_as_one_directory(tmp_path, monkeypatch):
  """main: the tokenizer was written after the weights' swap; a kill between left an export whose
  load_tokenizer returned an empty one-token tokenizer."""
  path = str(tmp_path / "export")
  old, new = models.init_from_config(TINY, rng=0), models.init_from_config(TINY, rng=1)
  tokenizer = _chat_tokenizer()
  models.save_pretrained(old, path, tokenizer=tokenizer)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    f.write("{}")  # A file of an earlier tokenizer: replaced along with the tokenizer.
  before = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}

  def killed(self, *args, **kwargs):
    raise _Killed

  with monkeypatch.context() as m:
    m.setattr(type(tokenizer), "save_pretrained", killed)
    with pytest.raises(_Killed):
      models.save_pretrained(new, path, tokenizer=tokenizer)
  assert {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)} == before
  models.save_pretrained(new, path, tokenizer=tokenizer)
  assert "vocab.json" not in os.listdir(path)
  got = models.from_pretrained(path).embed.embedding.get_value()
  assert np.array_equal(np.asarray(got), np.asarray(new.embed.embedding.get_value()))
  loaded = models.load_tokenizer(path)
  assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.chat_template == tokenizer.chat_template


def test_load_tokenizer_refuses_a_directory_without_tokenizer_files(tmp_path):
  path = str(tmp_path / "weights_only")
  models.save_pretrained(models.init_from_config(TINY, rng=0), path)
  with pytest.raises(FileNotFoundError, match=re.escape(repr(path)) + ".*no tokenizer files|"
                     "no tokenizer files in " + re.escape(repr(path))):
    models.load_tokenizer(path)


def test_tokenizer_files_symlinked_outside_the_checkpoint_are_refused(tmp_path):
  """main: a chat_template.jinja linked to a credentials file was rendered into every prompt."""
  secret = tmp_path / "credentials"
  secret.write_text("aws_secret_access_key = hunter2")
  path = tmp_path / "ckpt"
  _chat_tokenizer().save_pretrained(str(path))
  os.remove(path / "chat_template.jinja")
  os.symlink(str(secret), str(path / "chat_template.jinja"))
  with pytest.raises(ValueError, match=re.escape(str(path / "chat_template.jinja")) + ".*outside"):
    models.load_tokenizer(str(path))
  # huggingface_hub's layout (snapshots/<rev>/<file> -> ../../blobs/<hash>) still loads.
  repo = tmp_path / "models--org--tiny"
  snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
  snapshot.mkdir(parents=True)
  blobs.mkdir()
  os.remove(path / "chat_template.jinja")
  _chat_tokenizer().save_pretrained(str(path))
  for i, name in enumerate(sorted(os.listdir(path))):
    os.rename(str(path / name), str(blobs / f"blob{i}"))
    os.symlink(f"../../blobs/blob{i}", str(snapshot / name))
  assert models.load_tokenizer(str(snapshot)).chat_template == _chat_tokenizer().chat_template


# -- index containment -----------------------------------------------------------------------


def _index_checkpoint(tmp_path, entry_for):
  """ckpt/ with config.json and an index whose every entry is entry_for(tmp_path) -> str."""
  model = models.init_from_config(TINY, rng=0)
  other = str(tmp_path / "other")
  models.save_pretrained(model, other)
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text(open(os.path.join(other, "config.json")).read())
  with safe_open(os.path.join(other, "model.safetensors"), framework="numpy") as f:
    names = list(f.keys())
  entry = entry_for(tmp_path)
  (ckpt / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": {n: entry for n in names}}))
  return str(ckpt), entry


def _symlink_out(tmp_path):
  os.symlink(str(tmp_path / "other" / "model.safetensors"),
             str(tmp_path / "ckpt" / "model-00001-of-00001.safetensors"))
  return "model-00001-of-00001.safetensors"


@pytest.mark.parametrize("entry_for", [
    lambda tmp: "../other/model.safetensors",
    lambda tmp: str(tmp / "other" / "model.safetensors"),
    _symlink_out,
], ids=["dotdot", "absolute", "symlink"])
def test_index_naming_files_outside_the_checkpoint_is_refused(tmp_path, entry_for):
  path, entry = _index_checkpoint(tmp_path, entry_for)
  index = os.path.join(path, "model.safetensors.index.json")
  with pytest.raises(ValueError, match=re.escape(index) + ".*" + re.escape(repr(entry))):
    models.from_pretrained(path)


def test_single_weight_file_symlinked_outside_is_refused(tmp_path):
  models.save_pretrained(models.init_from_config(TINY, rng=0), str(tmp_path / "other"))
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
  os.symlink(str(tmp_path / "other" / "model.safetensors"), str(ckpt / "model.safetensors"))
  with pytest.raises(ValueError, match=re.escape(str(ckpt / "model.safetensors")) + ".*outside"):
    models.from_pretrained(str(ckpt))


def test_hub_cache_symlinks_into_blobs_still_load(tmp_path):
  """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>; that is not escaping."""
  model = models.init_from_config(TINY, rng=0)
  src = str(tmp_path / "src")
  models.save_pretrained(model, src, max_shard_bytes=600)
  repo = tmp_path / "models--org--tiny"
  snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
  snapshot.mkdir(parents=True)
  blobs.mkdir()
  for i, name in enumerate(sorted(os.listdir(src))):
    os.rename(os.path.join(src, name), str(blobs / f"blob{i}"))
    os.symlink(f"../../blobs/blob{i}", str(snapshot / name))
  np.testing.assert_allclose(_logits(models.from_pretrained(str(snapshot))), _logits(model),
                             atol=1e-6)


# -- validated config.json -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny"))
  models.save_pretrained(models.init_from_config(TINY, rng=0), path)
  return path


def _copy_with_config(src, dst, **changes):
  os.makedirs(dst)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  config.update(changes)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  with safe_open(os.path.join(src, "model.safetensors"), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  np_save_file(tensors, os.path.join(dst, "model.safetensors"))
  return dst


@pytest.mark.parametrize("field,value", [
    ("num_attention_heads", 0),
    ("num_key_value_heads", -2),
    ("hidden_size", 0),
    ("intermediate_size", 64.5),
    ("vocab_size", 0),
    ("rope_theta", 0),
    ("rope_theta", float("nan")),
    ("rms_norm_eps", -1),
    ("rms_norm_eps", 0.0),
    ("num_hidden_layers", 3),
    ("num_hidden_layers", 1),
    ("num_hidden_layers", True),
    ("hidden_size", 30),  # 30 % 4 heads != 0 and no explicit head_dim.
    ("head_dim", 7),  # RoPE rotates pairs: an odd head_dim cannot be.
    # Wrong JSON types; main read the quoted "false" as True (bool("false")).
    ("tie_word_embeddings", "false"),
    ("attention_bias", "true"),
    ("use_sliding_window", "false"),
    ("mlp_bias", 0),
    ("architectures", "Qwen2ForCausalLM"),
    ("rope_scaling", "linear"),
    ("model_type", ["qwen2"]),
])
def test_invalid_config_json_is_refused_naming_field_value_and_file(tiny_checkpoint, tmp_path,
                                                                    field, value):
  path = _copy_with_config(tiny_checkpoint, str(tmp_path / "c"), **{field: value})
  config_file = os.path.join(path, "config.json")
  shown = json.loads(json.dumps(value))
  with pytest.raises(ValueError) as info:
    models.from_pretrained(path)
  message = str(info.value)
  assert config_file in message and f"{field}={shown!r}" in message, message


def test_huge_layer_count_is_refused_before_building_the_model(tiny_checkpoint, tmp_path):
  """main hung > 60 s (uninterruptibly) building 100000 abstract layers: a subprocess, timed."""
  path = _copy_with_config(tiny_checkpoint, str(tmp_path / "c"), num_hidden_layers=100000)
  code = f"from mixpo import models; models.from_pretrained({path!r})"
  try:  # The refusal costs an import (seconds); 180 s leaves a 3x slower machine room.
    out = _run(["-c", code], timeout_s=180)
  except subprocess.TimeoutExpired:
    pytest.fail("from_pretrained with num_hidden_layers=100000 did not answer within 180 s")
  assert out.returncode != 0
  assert os.path.join(path, "config.json") in out.stderr, out.stderr[-2000:]
  assert "num_hidden_layers=100000" in out.stderr, out.stderr[-2000:]


def test_config_validation_without_a_file_names_the_field():
  with pytest.raises(ValueError, match="num_attention_heads=0"):
    models.init_from_config({**TINY, "num_attention_heads": 0})
  with pytest.raises(ValueError, match="rope_theta=-1"):
    models.from_hf_config({**TINY, "rope_theta": -1})
  with pytest.raises(ValueError, match="missing field vocab_size"):
    models.from_hf_config({k: v for k, v in TINY.items() if k != "vocab_size"})
  # An explicit head_dim need not divide hidden_size (Qwen3 style).
  config = models.from_hf_config({**TINY, "hidden_size": 30, "head_dim": 8})
  assert (config.hidden_size, config.head_dim) == (30, 8)


# -- checkpoint dtype ------------------------------------------------------------------------


def test_restore_into_a_different_dtype_is_refused_naming_the_path(tmp_path):
  state = {"params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7},
           "step": jnp.int32(3)}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ck:
    ck.save(1, state, {})
    target = {"params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)},
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(ValueError) as info:
      ck.restore_latest(target)
    message = str(info.value)
    assert "params/w" in message and "float32" in message and "bfloat16" in message, message
    assert "param_dtype" in message, message
    _, restored, _ = ck.restore_latest(jax.tree.map(jnp.zeros_like, state))  # same dtypes: fine.
  assert np.asarray(restored["params"]["w"]).tobytes() == np.asarray(state["params"]["w"]).tobytes()


# -- compare.py work root --------------------------------------------------------------------


def _run(args, timeout_s=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout_s)


def test_compare_default_workroot_is_not_shared_temp():
  code = ("import sys; sys.argv = ['x']\n"
          "from experiments.compare import default_workroot\n"
          "print(default_workroot(False)); print(default_workroot(True))")
  out = _run(["-c", code])
  assert out.returncode == 0, out.stderr[-2000:]
  roots = out.stdout.split()
  assert len(roots) == 2 and roots[0] != roots[1]
  for root in roots:
    # Under the directory the user runs from (here the checkout, wherever that lies), never a
    # fixed path in the shared temp directory.
    assert os.path.dirname(root) == REPO and os.path.basename(root).startswith(
        "workdir_compare"), root
    assert tempfile.gettempdir() != os.path.dirname(root), root


@pytest.mark.parametrize("kind", ["world_writable", "other_owner"])
def test_compare_refuses_a_workroot_others_can_write(tmp_path, kind):
  root = tmp_path / "work"
  root.mkdir()
  if kind == "world_writable":
    os.chmod(root, 0o777)
    why = "writable by every user"
  elif os.getuid() == 0:
    os.chown(root, 65534, 65534)
    why = "owned by uid 65534"
  else:
    root, why = "/", "owned by uid 0"
  # --regimes=bogus: without the work-root check the run stops later, on the regime name.
  out = _run(["experiments/compare.py", "--small", f"--workroot={root}", "--regimes=bogus",
              f"--out_dir={tmp_path / 'out'}"])
  assert out.returncode != 0
  assert f"--workroot={root}" in out.stderr and why in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["world_writable", "other_owner"])
def test_builtin_dir_others_could_fill_is_refused_before_its_models_are_reused(tmp_path, kind):
  """main: a builtin_dir whose recipe files matched was reused with no owner / mode check."""
  from experiments.configs import smoke
  from mixpo import builtin, cli
  cfg = smoke.get_config().builtin
  root = tmp_path / "models"
  for name in ("guide", "policy_init"):  # A recipe match: main reused these without building.
    (root / name).mkdir(parents=True)
    (root / name / "mixpo_recipe.json").write_text(json.dumps(cfg.to_dict(), sort_keys=True))
  if kind == "world_writable":
    os.chmod(root / "guide", 0o777)
    bad, why = root / "guide", "writable by every user"
  elif os.getuid() == 0:
    os.chown(root, 65534, 65534)
    bad, why = root, "owned by uid 65534"
  else:
    root = bad = "/"
    why = "owned by uid 0"
  with pytest.raises(ValueError) as info:  # main: returned the reused paths.
    builtin.ensure_builtin_models(str(root), cfg)
  message = cli.user_error_message(info.value)  # What the binaries print (exit 2).
  assert f"{bad} is {why}" in message and "--config.builtin_dir" in message, message


# -- coordinator bind address ----------------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("explicit", [False, True])
def test_coordinator_binds_to_its_own_address_not_all_interfaces(explicit):
  """The real binary, one process: jax logs the address its coordinator service binds."""
  port = _free_port()
  # --verbosity=0: jax logs the bind address at INFO, which the binaries hide by default.
  args = ["experiments/train.py", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=1", "--process_id=0", "--verbosity=0"]
  if explicit:
    args.append(f"--coordinator_bind_address=localhost:{port}")
  out = _run(args)  # No --config: after initialize() the binary stops with a usage error.
  assert "--config and --workdir are required" in out.stderr, out.stderr[-3000:]
  bound = re.findall(r"Starting JAX distributed service on (\S+)", out.stderr)
  assert bound == [f"localhost:{port}" if explicit else f"127.0.0.1:{port}"], out.stderr[-3000:]
