"""Orbax checkpoints with exact resume, a run fingerprint and per-step checksum manifests.

Layout of `directory`:
```
fingerprint.json           the run config that wrote these checkpoints (a different run is refused)
base.json                  LoRA runs: path + checksum of the frozen base the adapters belong to
<step>/                    one orbax step directory; orbax only renames it into place once complete
  state/                   the TrainState pytree (ocp.args.StandardSave)
  extra/                   JSON dict: data position, run config, counters (ocp.args.JsonSave)
  mixpo_manifest.json      size + sha256 of every other file, written after orbax has finalised
```
Orbax's atomic rename guards against a crash mid-save; the manifest guards against what happens
to the files afterwards (truncation, bit flips, a half-copied directory, a file added later): a
step is valid only when its manifest lists exactly the files the step holds and each matches.
`restore_latest` walks steps newest first, skips (with a warning naming the step and reason) any
that fail verification, and raises rather than start from scratch when step directories exist
but none is valid.

Rotation (`keep`) is done here, not by orbax: an older step is deleted only after the newer one
has its manifest written and read back, so a crash at any point leaves at least one valid step
(orbax's own policy deletes before the manifest exists). A deleted step is first renamed to
`<step>.mixpo-deleting`, so a crash mid-delete leaves no half step directory.

Only process 0 writes the fingerprint and manifests; every process verifies before restoring.
Paths are local or mounted (FUSE) filesystems: the checks use `os`, not `epath`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

FINGERPRINT_FILE = "fingerprint.json"
BASE_FILE = "base.json"
MANIFEST_FILE = "mixpo_manifest.json"
DEFAULT_MIN_FREE_BYTES = 256 * 2**20  # Refuse to start below this much free disk.

_STEP_DIR = re.compile(r"^\d+$")
_TMP_DIR = re.compile(r"^\d+\.orbax-checkpoint-tmp")
_DELETING = ".mixpo-deleting"  # Suffix of a step directory being deleted by rotation.


class CheckpointDirectoryError(OSError):
  """The checkpoint directory cannot be created, written or has too little free space."""


class FingerprintMismatchError(ValueError):
  """The directory holds checkpoints of a run with a different config."""


class BaseMismatchError(FingerprintMismatchError):
  """The directory holds LoRA adapters trained on a different frozen base model."""


class NoValidCheckpointError(RuntimeError):
  """Step directories exist but none passes verification."""


class DtypeMismatchError(ValueError):
  """A stored array's dtype differs from its restore target's (orbax would cast silently)."""


def _is_primary() -> bool:
  return jax.process_index() == 0


def _canonical(obj: Any, what: str) -> Any:
  """`obj` as it reads back from JSON (tuples become lists, keys strings)."""
  try:
    return json.loads(json.dumps(obj, sort_keys=True))
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must be JSON-serialisable (dicts, lists, str, numbers, bools): {e}. "
                    "Convert arrays and numpy scalars with .tolist() / int() / float().") from e


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix or "<root>": d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def fingerprint_diff(old: Any, new: Any) -> list[str]:
  """Dotted keys whose values differ between two JSON dicts, e.g. ['optim.lr: 1e-06 -> 2e-06']."""
  fo, fn = _flatten(old), _flatten(new)
  out = []
  for k in sorted(set(fo) | set(fn)):
    a, b = fo.get(k, "<missing>"), fn.get(k, "<missing>")
    if a != b:
      out.append(f"{k}: {a!r} -> {b!r}")
  return out


def check_directory(directory: str, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> None:
  """Creates `directory`, proves it writable with a probe file and checks free space.

  Raises:
    CheckpointDirectoryError: naming the directory, the failing operation and what to change.
  """
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write_probe.{jax.process_index()}.{os.getpid()}")
    with open(probe, "wb") as f:
      f.write(b"mixpo")
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise CheckpointDirectoryError(
        f"checkpoint directory {directory!r} is not writable ({type(e).__name__}: {e}). "
        "Pass a directory you can write to (check permissions, that no parent is a file, "
        "and that the filesystem is mounted read-write).") from e
  free = shutil.disk_usage(directory).free
  if free < min_free_bytes:
    raise CheckpointDirectoryError(
        f"checkpoint directory {directory!r} has {free / 2**20:.1f} MiB free, below the minimum "
        f"{min_free_bytes / 2**20:.1f} MiB. Free space, pick another directory, or lower "
        "min_free_bytes.")


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST_FILE:
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str, step: int) -> None:
  """Writes MANIFEST_FILE (size and sha256 of every file) into a finalised step directory."""
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _sha256(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"version": 1, "step": step, "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST_FILE))  # Atomic: no half-written manifest.


def verify_manifest(step_dir: str, step: int, checksums: bool = True) -> str | None:
  """Checks a step directory against its manifest; returns None if intact, else the reason.

  The manifest must list every file of the step (a file it does not list could hold anything),
  and every listed file must exist with its size and, when `checksums`, its sha256.
  """
  path = os.path.join(step_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    return (f"no checksum manifest {MANIFEST_FILE} (the run likely stopped between orbax "
            "finalising the step and the manifest write)")
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest["files"]
    if manifest["step"] != step:
      return f"manifest is for step {manifest['step']}, not {step}"
    if not isinstance(files, dict) or not all(
        isinstance(w, dict) and isinstance(w.get("size"), int)
        and isinstance(w.get("sha256"), str) for w in files.values()):
      raise TypeError("'files' must map each file to its size and sha256")
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable manifest {MANIFEST_FILE} ({type(e).__name__}: {e})"
  unlisted = sorted(set(_files(step_dir)) - set(files))
  if unlisted:
    more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
    return (f"file {unlisted[0]}{more} is not in the manifest (a partial or edited manifest: "
            "its contents are unverified)")
  for rel, want in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"file {rel} is missing"
    size = os.path.getsize(full)
    if size != want["size"]:
      return f"file {rel} has {size} bytes, manifest says {want['size']} (truncated or replaced)"
    if checksums and _sha256(full) != want["sha256"]:
      return f"file {rel} fails its sha256 check (corrupted: bit flip or partial overwrite)"
  return None


def _abstract(leaf):
  """Restore target for one leaf: keep shape/dtype/sharding of arrays; other leaves as they are."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


def _key_path(path) -> str:
  """"params/layers/0/attn/q_proj/kernel/value" from a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _nbytes(tree) -> int:
  return sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))


class Checkpointer:
  """Saves `TrainState` pytree + JSON `extra` every `save_every` steps, keeps the newest `keep`.

  Usage:
  ```
  with Checkpointer(workdir + "/ckpt", save_every=100, keep=3, fingerprint=cfg) as ckpt:
    if (got := ckpt.restore_latest(state)) is not None:
      step, state, extra = got
    for step in range(step + 1, total + 1):
      state, metrics = train_step(state, batch)
      ckpt.save(step, state, {"data_pos": pos})   # no-op unless should_save(step)
  ```
  Saves are asynchronous when `async_save`: `save` returns once arrays are copied to host, so the
  caller may donate `state` to the next jitted step straight away.
  """

  def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True,
               fingerprint: dict | None = None, overwrite: bool = False,
               min_free_bytes: int = DEFAULT_MIN_FREE_BYTES):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: path of the checkpoint directory (created if missing).
      save_every: `should_save(step)` is true for positive multiples of this (steps).
      keep: number of newest checkpoints kept on disk; older ones are deleted after each save.
      async_save: write in a background thread (orbax AsyncCheckpointer).
      fingerprint: the run config as a JSON-able dict, stored in `fingerprint.json`. Opening a
        directory whose checkpoints were written under a different (or no) fingerprint raises
        FingerprintMismatchError. None: no check, nothing stored.
      overwrite: on a fingerprint mismatch delete the old checkpoints instead of raising.
        Checkpoints of the *same* run are always kept and resumed, so a preempted job relaunched
        with the same command line (overwrite included) resumes rather than restarts.
      min_free_bytes: refuse to open when the filesystem has less free space than this.
    """
    if save_every < 1 or keep < 1:
      raise ValueError(f"Checkpointer({directory!r}): save_every={save_every} and keep={keep} "
                       "must both be >= 1.")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = int(save_every)
    self.keep = int(keep)
    self.async_save = bool(async_save)
    self.min_free_bytes = int(min_free_bytes)
    check_directory(self.directory, self.min_free_bytes)
    self._check_fingerprint(fingerprint, overwrite)
    tmp = [n for n in os.listdir(self.directory) if _TMP_DIR.match(n)]
    if tmp and _is_primary():
      logging.warning("Checkpoint directory %s: removing incomplete (never finalised) saves %s.",
                      self.directory, sorted(tmp))
    if _is_primary():  # Rotation that a crash cut short: the rename already took the step away.
      for name in os.listdir(self.directory):
        if name.endswith(_DELETING):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    # No preservation policy: orbax would delete the older steps before the new one has its
    # manifest (`_rotate` does it after). Handlers named up front: without them orbax cannot
    # read a step's metadata before the first restore (warnings, and no dtype check).
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=self.async_save,
            cleanup_tmp_directories=True,
            create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "extra": ocp.JsonCheckpointHandler()})
    self._pending: threading.Thread | None = None  # Waits for a save, then writes its manifest.
    self._pending_error: BaseException | None = None
    self._closed = False

  # -- fingerprint ---------------------------------------------------------------------------

  def _step_entries(self) -> list[str]:
    """Names of step directories (finalised or not) and orbax temporary save directories."""
    return sorted((n for n in os.listdir(self.directory)
                   if (_STEP_DIR.match(n) or _TMP_DIR.match(n))
                   and os.path.isdir(os.path.join(self.directory, n))),
                  key=lambda n: (int(re.match(r"\d+", n).group()), n))

  def check_base(self, base: dict, overwrite: bool = False) -> None:
    """Refuses (BaseMismatchError) a directory whose checkpoints hold LoRA adapters of another
    frozen base; `base` identifies this run's (path, `lora.fingerprint`). Checkpoints of an
    adapter run hold adapters + optimizer only, so they are meaningless on any other base.
    overwrite: delete those checkpoints instead, as for a different config."""
    self._check_fingerprint(base, overwrite, BASE_FILE, BaseMismatchError,
                            "LoRA adapters trained on a different base model",
                            "Resume onto the original base weights")
    self._mngr.reload()

  def _check_fingerprint(self, fingerprint, overwrite: bool, file: str = FINGERPRINT_FILE,
                         error=FingerprintMismatchError, what="a run with a different config",
                         hint="Resume with the original config") -> None:
    if fingerprint is None:
      return
    new = _canonical(fingerprint, f"Checkpointer({self.directory!r}) fingerprint")
    path = os.path.join(self.directory, file)
    entries = self._step_entries()
    old = None
    if os.path.exists(path):
      try:
        with open(path) as f:
          old = json.load(f)
      except (OSError, ValueError) as e:
        old = f"<unreadable {file}: {e}>"
    if old == new:
      return
    if entries:  # A fingerprint without checkpoints protects nothing: just replace it.
      if old is None:
        why = f"checkpoints {entries} but no {file} (written by an unknown run)"
      else:
        why = f"checkpoints of {what}; differing keys: " + "; ".join(fingerprint_diff(old, new))
      if not overwrite:
        raise error(
            f"checkpoint directory {self.directory!r} holds {why}. {hint}, use another "
            "directory, or pass overwrite=True to delete them.")
      if _is_primary():
        logging.warning("Checkpoint directory %s: overwrite=True, deleting %s (it held %s).",
                        self.directory, entries, why)
        for name in entries:
          shutil.rmtree(os.path.join(self.directory, name))
    if _is_primary():
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(new, f, indent=1, sort_keys=True)
      os.replace(tmp, path)

  # -- saving --------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Finalised steps on disk, ascending (verified or not)."""
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    """True for positive multiples of `save_every` not yet saved (e.g. the step resumed from)."""
    step = int(step)
    latest = self._mngr.latest_step()
    return step > 0 and step % self.save_every == 0 and (latest is None or step > latest)

  def save(self, step: int, state, extra: dict | None = None, force: bool = False) -> bool:
    """Saves `state` (any pytree of arrays) and `extra` (JSON-able dict) as `step`.

    Returns:
      True if a save was started; False when skipped (`should_save` false and not `force`, or
      `step` already on disk).
    Raises:
      CheckpointDirectoryError: free space is below the state's size (bytes, all hosts' arrays).
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    self._check_open()
    extra = _canonical({} if extra is None else extra, f"Checkpointer.save(step={step}) extra")
    self._finish_pending()
    self._mngr.reload()  # Steps the last rotation deleted.
    if step in self._mngr.all_steps():
      logging.info("Checkpoint step %d already in %s; not saving it again.", step, self.directory)
      return False
    need, free = _nbytes(state), shutil.disk_usage(self.directory).free
    if free < need:
      raise CheckpointDirectoryError(
          f"checkpoint directory {self.directory!r}: step {step} needs about {need / 2**20:.1f} "
          f"MiB but only {free / 2**20:.1f} MiB is free. Free space or lower keep={self.keep}.")
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  extra=ocp.args.JsonSave(extra)), force=True)
    if self.async_save:
      self._pending = threading.Thread(target=self._finalise, args=(step,),
                                       name=f"mixpo-manifest-{step}", daemon=True)
      self._pending.start()
    else:
      self._finalise(step, raise_errors=True)
    return True

  def _finalise(self, step: int, raise_errors: bool = False) -> None:
    """Waits for orbax to finish `step`, writes its manifest, then rotates (process 0)."""
    try:
      self._mngr.wait_until_finished()
      if _is_primary():
        step_dir = os.path.join(self.directory, str(step))
        write_manifest(step_dir, step)
        self._rotate(step, step_dir)
    except BaseException as e:  # Re-raised on the caller's thread by _finish_pending.
      e.add_note(f"while finishing checkpoint step {step} in {self.directory}")
      if raise_errors:
        raise
      self._pending_error = e

  def _rotate(self, step: int, step_dir: str) -> None:
    """Deletes the steps older than the newest `keep`, once `step` reads back as complete.

    Process 0 only (a plain delete, no collective: this may run on the save thread); the
    other processes see the deletion when orbax next lists the directory.
    """
    reason = verify_manifest(step_dir, step, checksums=False)  # The hashes were just computed.
    if reason is not None:
      raise RuntimeError(f"checkpoint step {step} in {step_dir} does not read back after its save "
                         f"({reason}); older steps are kept.")
    steps = sorted(int(n) for n in os.listdir(self.directory)
                   if _STEP_DIR.match(n) and int(n) <= step)
    for old in steps[:-self.keep]:
      src = os.path.join(self.directory, str(old))
      gone = src + _DELETING
      shutil.rmtree(gone, ignore_errors=True)  # Left by a delete of this step number that failed.
      os.rename(src, gone)  # Atomic: the step is whole or absent, never half deleted.
      shutil.rmtree(gone, ignore_errors=True)

  def _finish_pending(self) -> None:
    if self._pending is not None:
      self._pending.join()
      self._pending = None
    else:
      self._mngr.wait_until_finished()
    if self._pending_error is not None:
      e, self._pending_error = self._pending_error, None
      raise e

  def wait(self) -> None:
    """Blocks until the last save is on disk with its manifest; raises its error, if any."""
    if not self._closed:
      self._finish_pending()

  def close(self) -> None:
    """`wait()`, then releases orbax's threads. Idempotent."""
    if self._closed:
      return
    try:
      self._finish_pending()
    finally:
      self._mngr.close()
      self._closed = True

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"Checkpointer({self.directory!r}) is closed.")

  # -- restoring -----------------------------------------------------------------------------

  def _set_aside(self, steps: list[int]) -> None:
    """Renames skipped step directories to `<step>.mixpo-invalid[.k]` (process 0).

    The resumed run then saves those steps afresh instead of finding them "already on disk",
    and the files stay for inspection (delete them by hand).
    """
    if _is_primary():
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, k = src + ".mixpo-invalid", 0
        while os.path.exists(dst):
          k += 1
          dst = f"{src}.mixpo-invalid.{k}"
        os.rename(src, dst)
        logging.warning("Checkpoint %s: moved skipped step %d to %s.", self.directory, step, dst)
    self._mngr.reload()

  def _check_dtypes(self, step: int, step_dir: str, abstract) -> None:
    """Raises DtypeMismatchError if a stored array's dtype differs from its target's."""
    try:
      stored = self._mngr.item_metadata(step).state.tree
    except Exception as e:  # An older layout without metadata: orbax's restore still checks.
      logging.warning("Checkpoint %s: cannot read array metadata of step %d (%s: %s); restoring "
                      "without the dtype check.", self.directory, step, type(e).__name__, e)
      return
    stored = {_key_path(p): getattr(m, "dtype", None)
              for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    wrong = []
    for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
      want, have = getattr(leaf, "dtype", None), stored.get(_key_path(p))
      if (want is None or have is None or jax.dtypes.issubdtype(want, jax.dtypes.extended)
          or jax.dtypes.issubdtype(have, jax.dtypes.extended)):
        continue  # Not an array, or a typed PRNG key (stored as its raw data).
      if jax.numpy.dtype(want) != jax.numpy.dtype(have):
        wrong.append(f"{_key_path(p)}: stored {jax.numpy.dtype(have).name}, target "
                     f"{jax.numpy.dtype(want).name}")
    if wrong:
      raise DtypeMismatchError(
          f"checkpoint step {step} in {step_dir} stores arrays in other dtypes than the restore "
          f"target's ({len(wrong)}): " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else "")
          + ". Restoring would cast them, and the resume would not be bit-exact. Resume with the "
          "dtypes of the run that saved it (config.model.param_dtype, the parameter and optimizer "
          "state storage dtype), or start a new workdir to change dtypes.")

  def restore_latest(self, target_state) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that passes verification.

    Args:
      target_state: a pytree with the structure of the saved state; its array leaves (concrete
        or `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`/`nnx.eval_shape` with shardings)
        give the dtype and sharding each array is restored into, bit-exactly.
    Returns:
      (step, state, extra), or None when the directory holds no step directories at all.
    Raises:
      NoValidCheckpointError: step directories exist but every one is corrupt or incomplete.
      DtypeMismatchError: an array was stored in another dtype than its target leaf's (orbax
        would cast it, and the resume would not be bit-exact); names the path and both dtypes.
      RuntimeError: a verified checkpoint does not fit `target_state` (changed model/optimizer).
    """
    self._check_open()
    self._finish_pending()
    self._mngr.reload()
    finalised = set(self._mngr.all_steps())
    names = [n for n in self._step_entries() if _STEP_DIR.match(n)]
    steps = sorted(finalised | {int(n) for n in names}, reverse=True)
    if not steps:
      return None
    skipped, interrupted = [], []
    for step in steps:
      step_dir = os.path.join(self.directory, str(step))
      reason = (verify_manifest(step_dir, step) if step in finalised
                else "not finalised by orbax (no commit marker)")
      if reason is not None:
        logging.warning("Checkpoint %s: skipping step %d: %s; falling back to an earlier step.",
                        self.directory, step, reason)
        skipped.append(f"step {step}: {reason}")
        # Only the newest save can be cut short by a crash (a save waits for the previous
        # manifest), so a newest step without its manifest is an interrupted save, not damage.
        if step == steps[0] and (step not in finalised or not os.path.exists(
            os.path.join(step_dir, MANIFEST_FILE))):
          interrupted.append(step)
        continue
      abstract = jax.tree.map(_abstract, target_state)
      self._check_dtypes(step, step_dir, abstract)
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
      except Exception as e:
        raise RuntimeError(
            f"restoring checkpoint step {step} from {step_dir} into target_state failed: "
            f"{type(e).__name__}: {e}. Its checksums verify, so the files are intact; the target's "
            "tree structure, shapes or dtypes likely differ from the run that saved it.") from e
      if skipped:
        logging.warning("Checkpoint %s: restored step %d after skipping %d newer step(s).",
                        self.directory, step, len(skipped))
        self._set_aside(steps[:len(skipped)])
      return step, out.state, out.extra
    if len(steps) == 1 and interrupted:  # The run crashed while writing its first checkpoint.
      logging.warning("Checkpoint %s: the only step (%d) is an interrupted save; starting from "
                      "scratch.", self.directory, steps[0])
      self._set_aside(steps)
      return None
    raise NoValidCheckpointError(
        f"checkpoint directory {self.directory!r} has step directories but none is valid:\n  "
        + "\n  ".join(skipped)
        + "\nRefusing to start from scratch over them: restore the files from a copy, or move or "
        "delete the step directories to start the run over.")
