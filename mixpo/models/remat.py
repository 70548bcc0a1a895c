"""Per-layer rematerialisation whose backward runs one layer at a time on every backend.

`layer_remat(fn)` wraps `fn(layer, x, *consts)` (an NNX module and activations) like `nnx.remat`:
only the layer's inputs are saved for the backward pass and the layer's forward is recomputed
there. Two ordering constraints are added as data dependencies (see `after`):

* the forward uses the weights only once the layer's input exists and the recomputation only
  once the cotangent of the layer's output does, so XLA cannot hoist work on every layer's
  weights (casts, concatenations, all-gathers: loop-invariant for a frozen LoRA base) or every
  layer's recomputed forward to the start of the step or of the backward pass, and
* the cotangent of the layer's input is released only together with the gradients of the
  layer's trained parameters, so the weight / adapter gradient matmuls cannot be deferred to the
  end of the backward pass, keeping each layer's recomputed activations alive until then.

Without them XLA did all of it (`jax.checkpoint` bars CSE, not early scheduling): the LoRA step
held every layer's MLP activations at once and per-layer remat saved nothing (figures in
BUILD_NOTES.md, LoRA section).

Only the inputs JAX actually differentiates (`symbolic_zeros`: the trained parameters and the
activations) get cotangents, so a frozen LoRA base costs no weight-gradient work or memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero


def layer_remat(fn):
  """`call(layer, x, *consts) -> y` computing `fn(layer, x, *consts)` with per-layer remat.

  consts: further arrays (e.g. RoPE tables, masks); differentiated like any input if JAX asks.
  The layer must not write to its variables (true of a training forward without a KV cache).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def apply(graphdef, leaves):
    return _call(graphdef, leaves)

  def _call(graphdef, leaves):
    state, args = leaves
    return fn(nnx.merge(graphdef, state), *args)

  def fwd(graphdef, leaves):
    flat, treedef = jax.tree.flatten(leaves, is_leaf=_is_primal)
    values = [p.value for p in flat]
    # Which inputs JAX differentiates, carried to bwd in the residuals' tree structure (a
    # perturbed input is marked (), another None): bwd must know it statically.
    marks = tuple(() if p.perturbed else None for p in flat)
    leaves = jax.tree.unflatten(treedef, values)
    state, args = leaves
    # The weights enter the computation only once the layer's input exists: otherwise work on
    # them alone (a dtype cast, the fused-projection concatenation, an fsdp all-gather) is
    # loop-invariant for a frozen base, and XLA hoists it out of the train step's scans for every
    # layer at once.
    y = _call(graphdef, (after(state, args[:1]), args))
    return y, (leaves, marks)  # the inputs themselves are the residuals: no copies saved.

  def bwd(graphdef, res, g):
    leaves, marks = res
    values, treedef = jax.tree.flatten(leaves)
    if isinstance(g, SymbolicZero):
      g = jnp.zeros(g.shape, g.dtype)
    diff = [i for i, m in enumerate(marks) if m is not None]
    values = after(values, [g])  # recompute only once this layer's output cotangent exists.

    def f(*diff_values):
      full = list(values)
      for i, v in zip(diff, diff_values):
        full[i] = v
      return _call(graphdef, jax.tree.unflatten(treedef, full))

    _, vjp = jax.vjp(f, *[values[i] for i in diff])
    cots = vjp(g)
    # Release the cotangents (of x among them) only with all of this layer's gradients.
    cots = after(cots, cots)
    out = [None] * len(values)
    for i, c in zip(diff, cots):
      out[i] = c
    return (jax.tree.unflatten(treedef, out),)

  apply.defvjp(fwd, bwd, symbolic_zeros=True)

  def call(layer, *args):
    graphdef, state = nnx.split(layer)
    return apply(graphdef, (state, args))

  return call


def _is_primal(x) -> bool:
  return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def after(tree, deps):
  """`tree`'s arrays, equal in value, made to depend on every array in `deps`.

  Each floating leaf gets 0·(one element of each dep) added: a real data dependency, which no
  scheduler may reorder (an `optimization_barrier` is removed by XLA:CPU before scheduling).
  Costs one elementwise pass over `tree`; a non-finite dep turns the result non-finite (a
  non-finite cotangent already makes the step's gradient so).
  """
  picks = [d[(0,) * d.ndim].astype(jnp.float32) for d in jax.tree.leaves(deps)
           if d.size and jnp.issubdtype(d.dtype, jnp.inexact)]
  if not picks:
    return tree
  zero = finite_zero(picks)
  return jax.tree.map(
      lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def finite_zero(scalars) -> jax.Array:
  """0 if every scalar in `scalars` is finite, else NaN: one scalar XLA computes once.

  Ends the chain of adds in a sqrt, an op XLA deems expensive and so never duplicates into
  consumer fusions. A bare chain of cheap ops was copied by XLA:CPU's fusion into the fusion of
  every consumer: O(consumers · len(scalars)) instructions, and minutes of compile time for a
  train step (remat's ties over a layer's cotangents; the NaN guard over every parameter leaf).
  """
  return jnp.sqrt(jnp.abs(sum(scalars))) * 0.0
