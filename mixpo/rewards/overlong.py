"""DAPO overlong reward shaping and the truncated-sample loss mask, measured in tokens.

DAPO (Yu et al., 2025, §3.4): a response of length L gets an extra reward
  0                            if L <= L_max − L_cache
  ((L_max − L_cache) − L)/L_cache  if L_max − L_cache < L <= L_max   (linear, reaching −1 at L_max)
  −1                           if L > L_max
DAPO trains with shaping on (L_max = 20480, L_cache = 4096) and, alternatively, "overlong
filtering": truncated samples (no EOS within the budget) are masked out of the loss. Both are
switches here; the default is DAPO's final recipe (shaping on, masking off).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class OverlongConfig:
  shaping: bool = True  # add overlong_penalty to the reward
  max_len: int = 20480  # L_max: the response-token budget (DAPO's value; tiny tasks set their own)
  cache_len: int = 4096  # L_cache: the soft-penalty window below max_len
  mask_truncated: bool = False  # drop samples without EOS within max_len from the loss

  def __post_init__(self):
    if not 0 < self.cache_len <= self.max_len:
      raise ValueError(f"OverlongConfig: need 0 < cache_len <= max_len, got cache_len="
                       f"{self.cache_len}, max_len={self.max_len}; lower cache_len")


def overlong_penalty(lengths, max_len: int, cache_len: int) -> np.ndarray:
  """DAPO soft overlong penalty in [−1, 0], float32 [B], for response lengths [B] in tokens."""
  if not 0 < cache_len <= max_len:
    raise ValueError(f"overlong_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, "
                     f"max_len={max_len}")
  lengths = np.asarray(lengths, np.float64)
  start = max_len - cache_len
  pen = (start - lengths) / cache_len
  return np.clip(np.where(lengths <= start, 0.0, pen), -1.0, 0.0).astype(np.float32)


def truncation_loss_mask(has_eos, mask_truncated: bool) -> np.ndarray:
  """float32 [B] per-sample loss weight: 0 for truncated samples (no EOS) when masking, else 1.

  has_eos: bool [B], whether the sample ended with EOS within its max_len budget.
  """
  has_eos = np.asarray(has_eos, bool)
  if not mask_truncated:
    return np.ones(has_eos.shape, np.float32)
  return has_eos.astype(np.float32)


def shape_rewards(rewards, lengths, has_eos, cfg: OverlongConfig) -> tuple[np.ndarray, np.ndarray]:
  """(rewards + penalty if cfg.shaping, loss mask [B]) for B samples; all arrays [B]."""
  r = np.asarray(rewards, np.float32)
  if cfg.shaping:
    r = r + overlong_penalty(lengths, cfg.max_len, cfg.cache_len)
  return r, truncation_loss_mask(has_eos, cfg.mask_truncated)
