"""Chat-template rendering bounded in time, memory and output size (a helper process per tokenizer).

A checkpoint's chat template is a Jinja program. transformers renders it in Jinja's sandbox, which
keeps it from touching the system but not from looping for hours or building a string of
gigabytes (`{{ 'x' * 10**10 }}`, nested loops): a template that does so would hang or exhaust the
trainer while the dataset is read. No in-process check can interrupt one such C-level operation,
so `render` hands each conversation to a child process that renders it with the same tokenizer
(`apply_chat_template`, the same call as before), under an address-space limit; the parent waits
at most `RENDER_TIMEOUT_S` per row and refuses output longer than `MAX_RENDERED_CHARS`. A refusal
stops the read with one error naming the template file and the row (`TemplateLimitError`); an
exception the template raises for a row (`raise_exception(...)`) is that row's `DataError`.

The child (one per tokenizer contents, started on first use, about a second) gets the tokenizer
pickled over a pipe, keeps only locale / path variables of the environment, answers in JSON (a
template that escaped the sandbox still could not make the parent unpickle anything), and exits
when its pipe closes or after `_IDLE_EXIT_S` without work.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
import weakref

RENDER_TIMEOUT_S = 10.0  # Per row; a real template renders in milliseconds.
MAX_RENDERED_CHARS = 4 * 2**20  # A rendered prompt longer than this is refused.
MEMORY_BYTES = 2**30  # Address space the child may add while rendering.
_IDLE_EXIT_S = 120.0  # The child exits after this long without a request ...
_RESTART_IDLE_S = 60.0  # ... and the parent replaces one idle for this long, before it might.
_START_TIMEOUT_S = 120.0  # Importing transformers in the child on a loaded machine.

# The child: reads length-prefixed pickles (the tokenizer, then one conversation per request)
# from stdin and writes length-prefixed JSON answers to the original stdout, which nothing else
# may write to (sys.stdout goes to stderr).
_CHILD = r"""
import json, os, pickle, resource, select, struct, sys
proto = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
idle_s, max_chars, memory_bytes = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def read(n):  # Unbuffered: select() below must see every byte not yet consumed.
  out = bytearray()
  while len(out) < n:
    chunk = os.read(0, min(n - len(out), 1 << 20))
    if not chunk:
      sys.exit(0)
    out += chunk
  return bytes(out)
def recv():
  return pickle.loads(read(struct.unpack("<Q", read(8))[0]))
def send(obj):
  data = json.dumps(obj).encode()
  proto.write(struct.pack("<Q", len(data)) + data)
  proto.flush()
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
tokenizer = recv()
size = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE") \
    if os.path.exists("/proc/self/statm") else 0
if size:
  resource.setrlimit(resource.RLIMIT_AS, (size + memory_bytes, size + memory_bytes))
send(["ready", ""])
while True:
  if not select.select([0], [], [], idle_s)[0]:
    sys.exit(0)
  messages = recv()
  try:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
      send(["error", f"the template rendered a {type(text).__name__}, not text"])
    elif len(text) > max_chars:
      send(["too_long", len(text)])
    else:
      send(["ok", text])
  except MemoryError:
    send(["memory", ""])
  except Exception as e:
    send(["error", f"{type(e).__name__}: {e}"[:2000]])
"""


class TemplateLimitError(ValueError):
  """The chat template ran past its deadline, memory or output size while rendering a row."""


def template_source(tokenizer) -> str:
  """Where `tokenizer`'s chat template was read from, for error messages."""
  directory = getattr(tokenizer, "name_or_path", "") or ""
  for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
    if directory and os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return "the tokenizer's chat_template"


def _child_env() -> dict:
  from mixpo.rewards.sandbox import KEPT_ENV  # noqa: PLC0415 — the reward workers' allow-list
  env = {k: v for k, v in os.environ.items() if k in KEPT_ENV or k == "PYTHONPATH"}
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  return env


class _Renderer:
  """One child process rendering with one tokenizer; restarted after a kill or a long idle."""

  def __init__(self, tokenizer_bytes: bytes):
    self.tokenizer_bytes = tokenizer_bytes  # The pickled tokenizer, sent to every new child.
    self.proc: subprocess.Popen | None = None
    self.last_use = 0.0
    self.lock = threading.Lock()
    weakref.finalize(self, _Renderer._stop_proc, self.__dict__)

  @staticmethod
  def _stop_proc(state: dict) -> None:
    proc = state.get("proc")
    if proc is not None and proc.poll() is None:
      proc.kill()
      proc.wait()
    state["proc"] = None

  def stop(self) -> None:
    _Renderer._stop_proc(self.__dict__)

  def _start(self, timeout_s: float) -> None:
    self.proc = subprocess.Popen(
        # -P: the current directory is not on the child's import path.
        [sys.executable, "-P", "-c", _CHILD, str(_IDLE_EXIT_S), str(MAX_RENDERED_CHARS),
         str(MEMORY_BYTES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(),
        close_fds=True)
    self._send(self.tokenizer_bytes)
    status, _ = self._receive(max(timeout_s, _START_TIMEOUT_S))
    if status != "ready":
      raise RuntimeError(f"the chat-template renderer did not start ({status})")

  def _send(self, data: bytes) -> None:
    self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
    self.proc.stdin.flush()

  def _read(self, n: int, deadline: float) -> bytes | None:
    fd, out = self.proc.stdout.fileno(), bytearray()
    while len(out) < n:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        return None
      chunk = os.read(fd, min(n - len(out), 1 << 20))
      if not chunk:
        raise EOFError
      out += chunk
    return bytes(out)

  def _receive(self, timeout_s: float) -> tuple[str, object]:
    """(status, value) of the child's next answer; ("timeout", None) when it is late (killed),
    ("died", exit code) when it exited (e.g. killed by the memory limit)."""
    deadline = time.monotonic() + timeout_s
    try:
      head = self._read(8, deadline)
      body = None if head is None else self._read(
          min(struct.unpack("<Q", head)[0], 8 * MAX_RENDERED_CHARS), deadline)
    except EOFError:
      code = self.proc.wait()
      self.proc = None
      return "died", code
    if body is None:
      self.stop()
      return "timeout", None
    status, value = json.loads(body)
    return status, value

  def render(self, messages: list, timeout_s: float) -> tuple[str, object]:
    with self.lock:
      if self.proc is not None and time.monotonic() - self.last_use > _RESTART_IDLE_S:
        self.stop()  # It may be about to exit on its own idle deadline.
      if self.proc is None:
        self._start(timeout_s)
      try:
        self._send(pickle.dumps(messages))
      except (BrokenPipeError, OSError):
        code = self.proc.wait()
        self.proc = None
        return "died", code
      out = self._receive(timeout_s)
      self.last_use = time.monotonic()
      return out


# tokenizer object -> (signature, content key); content key -> renderer (the newest few kept:
# tokenizers with the same files, e.g. loaded twice, share one child).
_keys: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_renderers: "collections.OrderedDict[str, _Renderer]" = collections.OrderedDict()
_MAX_RENDERERS = 4
_lock = threading.Lock()


def _renderer(tokenizer) -> _Renderer:
  """The renderer for this tokenizer's contents (pickled once per object, and again only when
  its template or special tokens change)."""
  signature = (tokenizer.chat_template if isinstance(tokenizer.chat_template, str)
               else json.dumps(tokenizer.chat_template, sort_keys=True),
               repr(sorted(tokenizer.special_tokens_map.items())))
  with _lock:
    got, data = _keys.get(tokenizer), None
    if got is None or got[0] != signature:
      data = pickle.dumps(tokenizer)
      got = _keys[tokenizer] = (signature, hashlib.sha256(data).hexdigest())
    key = got[1]
    if key not in _renderers:
      _renderers[key] = _Renderer(data if data is not None else pickle.dumps(tokenizer))
      while len(_renderers) > _MAX_RENDERERS:
        _renderers.popitem(last=False)[1].stop()
    _renderers.move_to_end(key)
    return _renderers[key]


def render(tokenizer, messages: list, where: str, timeout_s: float | None = None) -> str:
  """`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`,
  bounded: raises TemplateLimitError (template file and `where`, the row) past `timeout_s`
  (default RENDER_TIMEOUT_S), the memory limit or MAX_RENDERED_CHARS, and the row's DataError
  ("template_error") when the template raises for it."""
  from mixpo.data.readers import DataError  # noqa: PLC0415 — readers imports this module
  timeout_s = RENDER_TIMEOUT_S if timeout_s is None else timeout_s
  status, value = _renderer(tokenizer).render(messages, timeout_s)
  if status == "ok":
    return value
  source = template_source(tokenizer)
  if status == "error":
    raise DataError(f"{where}: the chat template ({source}) refused this conversation: {value}",
                    "template_error")
  why = {"timeout": f"ran longer than {timeout_s:g} s",
         "too_long": f"rendered {value} characters, more than {MAX_RENDERED_CHARS}",
         "memory": f"needed more than {MEMORY_BYTES / 2**30:g} GiB",
         "died": f"killed its renderer (exit code {value}; likely the memory limit of "
                 f"{MEMORY_BYTES / 2**30:g} GiB)"}.get(status, status)
  raise TemplateLimitError(
      f"{where}: the chat template ({source}) {why} rendering this row. A chat template should "
      "render a prompt in milliseconds; use a tokenizer with a well-behaved template, or turn "
      "chat rendering off (chat_template=False / --config.guide.traces.chat_template=never).")
