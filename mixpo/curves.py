"""Per-token objective curves and a sample partition, for colabs/objectives.ipynb.

Every gradient here is taken with jax.grad through the library's own objectives (no re-derived
formulas), with respect to logp = log πθ(token): that is the quantity the optimiser moves, and
d ratio / d logp = ratio. Ratios are dimensionless; advantages are in reward-std units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mixpo import advantages, objectives


def shaping_curve(r_hat, gamma: float):
  """f(r̂) = r̂/(r̂+γ) and its gradient d f / d logp (A = 1) via jax.grad on shaped_offpolicy.

  r_hat: [N] positive ratios πθ/πϕ. Returns numpy (f_N, dfdlogp_N); analytically
  d f / d logp = r̂·f'(r̂) = γ r̂/(r̂+γ)², which → 0 as r̂ → 0 and peaks (1/4) at r̂ = γ.
  """
  def f(log_r):
    obj, _ = objectives.shaped_offpolicy(log_r.reshape(1, 1), jnp.ones((1,)), gamma)
    return obj[0, 0]

  log_r = jnp.log(jnp.asarray(r_hat, jnp.float32))
  value, grad = jax.vmap(jax.value_and_grad(f))(log_r)
  return np.asarray(value), np.asarray(grad)


def shaping_weight(r_hat, gamma: float):
  """Closed form γ r̂/(r̂+γ)² of d f / d logp (to check `shaping_curve` against)."""
  r = np.asarray(r_hat, np.float64)
  return gamma * r / (r + gamma) ** 2


def paper_fprime(r_hat, gamma: float):
  """f'(r̂) = γ/(r̂+γ)² w.r.t. the ratio itself: the paper's "≈ 1/γ for small r̂"."""
  r = np.asarray(r_hat, np.float64)
  return gamma / (r + gamma) ** 2


def clip_curve(ratio, adv: float, eps_low: float = 0.2, eps_high: float = 0.28):
  """CLIP(r, A) and d CLIP / d logp per ratio via jax.grad on clip_objective; numpy [N] each.

  The gradient is r·A inside the trust region and 0 where the clipped branch is active.
  """
  def f(log_r):
    obj, _ = objectives.clip_objective(log_r.reshape(1, 1), jnp.full((1,), adv, jnp.float32),
                                       eps_low, eps_high)
    return obj[0, 0]

  log_r = jnp.log(jnp.asarray(ratio, jnp.float32))
  value, grad = jax.vmap(jax.value_and_grad(f))(log_r)
  return np.asarray(value), np.asarray(grad)


def partition_example(rewards, group_ids, is_guide, algos=None,
                      schemes=advantages.SCHEMES) -> list[dict]:
  """Rows {sample, group, guide, reward, kind/<scheme>, adv/<algo>/<scheme>} of a sample batch.

  rewards, group_ids, is_guide: [B] sequences; kind is the set name (ON / ZERO / OFF). algos:
  names in mixpo/algorithms.py's table (default: those of the partition-scheme grid).
  """
  from mixpo import algorithms  # noqa: PLC0415
  algos = algorithms.grids()["scheme"] if algos is None else algos
  names = {objectives.ON: "ON", objectives.ZERO: "ZERO", objectives.OFF: "OFF"}
  r = jnp.asarray(rewards, jnp.float32)
  g = jnp.asarray(group_ids, jnp.int32)
  guide = jnp.asarray(is_guide, bool)
  rows = [{"sample": i, "group": int(g[i]), "guide": bool(guide[i]), "reward": float(r[i])}
          for i in range(len(r))]
  for scheme in schemes:
    kind = advantages.partition(r, g, guide, scheme)
    for i, k in enumerate(np.asarray(kind)):
      rows[i][f"kind/{scheme}"] = names[int(k)]
    for algo in algos:
      adv = np.asarray(advantages.pooled_advantages(r, g, kind, algorithms.get(algo).pools))
      for i, a in enumerate(adv):
        rows[i][f"adv/{algo}/{scheme}"] = round(float(a), 3)
  return rows


def markdown_table(rows: list[dict]) -> str:
  """A markdown table of dict rows (columns of the first row)."""
  cols = list(rows[0])
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"
