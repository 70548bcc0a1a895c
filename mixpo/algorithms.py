"""The algorithm table: one frozen entry per algorithm, the only place an algorithm is named.

An algorithm is what the rest of the code would otherwise infer from its name:
  guided      draws m guide samples per prompt (OFF set) and needs a guide policy;
  zero_set    keeps Z zero-variance groups per batch as the ZERO set (Mix-2);
  zero_to_on  the partition fix-up: every on-policy sample the scheme calls ZERO is trained as ON
              (LUFFY trains on all on-policy samples);
  pools       the sets its advantages are normalised over, per prompt group; a sample's advantage
              is the sum over the pools it is in (LUFFY's joint on/off normalisation is one pool);
  terms       its objective J, as `objectives.Term`s over the ON / ZERO / OFF sets (LUFFY's joint
              token mean is two terms sharing the normaliser ON ∪ OFF);
  symmetric_clip  clip range [1 − eps_low, 1 + eps_low] (GRPO's; the others use clip-higher);
  loss_agg    its own aggregation, used when config.objective.loss_agg = "default";
  grid_scheme the partition scheme it always runs under in the comparison grids (the baselines use
              the one their papers' losses use), None = the config's;
  grids       the comparison grids (experiments/grid.py) that hold it.
The CLI's --algo choices, config validation, the comparison grids and the tests all read TABLE.

Adding an algorithm with a new per-token form (worked example, executed by
tests/algorithms_test.py): CHORD-φ (arXiv 2508.11408) weighs each expert token's log π by
sg(φ(p)), φ(p) = p·(1 − p) with p = πθ(token), so tokens the policy is already sure of, or finds
near-impossible, teach little. One function, its registry entry, a table row, a reference test:

  import jax
  import jax.numpy as jnp
  from mixpo import algorithms, objectives
  from mixpo.objectives import OFF, ON, ZERO, Term

  def sft_phi(x, cfg):  # x: objectives.FormInputs; returns (obj_BxT, {stat: x_BxT})
    logp = jnp.where(x.mask_BxT > 0, x.logp_BxT, 0.0)
    phi = jnp.exp(logp) * (1.0 - jnp.exp(logp))  # log p <= 0: no overflow
    return jax.lax.stop_gradient(phi) * logp, {"phi": phi}

  objectives.register_form("sft-phi", sft_phi)
  algorithms.register(algorithms.Algorithm(
      name="chord_phi", summary="CHORD-φ: (1 − μ)·J_on + μ·token mean of sg(φ)·log π on OFF",
      guided=True, zero_set=False, zero_to_on=False, pools=((ON, ZERO),),
      terms=(Term(sets=(ON,), weight="rl", name="j_on"),
             Term(sets=(OFF,), weight="sft", form="sft-phi", name="j_sft"))))

Put the form in mixpo/objectives.py's `FORMS` and the entry in `TABLE` below to make them
permanent (then `--algo=chord_phi` exists; μ is --config.objective.sft_coef), and add the entry's
branch to tests/objectives_test.py's numpy reference (`ref_objective`; a test fails until it
exists). tests/algorithms_test.py also runs a registered entry end to end at smoke size.
"""

from __future__ import annotations

import contextlib
import dataclasses

from mixpo import advantages
from mixpo.objectives import LOSS_AGGS, OFF, ON, ZERO, ObjectiveConfig, Term, ratio_form


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One algorithm (field meanings in the module docstring); hashable, a jit static argument."""

  name: str
  summary: str
  guided: bool
  zero_set: bool
  zero_to_on: bool
  pools: tuple[tuple[int, ...], ...]
  terms: tuple[Term, ...]
  symmetric_clip: bool = False
  loss_agg: str = "token-mean"
  grid_scheme: str | None = None
  grids: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
      raise ValueError(f"Algorithm.name={self.name!r}: a short identifier (it names run dirs).")
    if self.loss_agg not in LOSS_AGGS:
      raise ValueError(f"Algorithm {self.name}: loss_agg={self.loss_agg!r} not in {LOSS_AGGS}.")
    used = {k for t in self.terms for k in t.sets}
    if OFF in used and not self.guided:
      raise ValueError(f"Algorithm {self.name}: a term trains OFF but guided=False.")
    if ZERO in used and self.zero_to_on:
      raise ValueError(f"Algorithm {self.name}: a term trains ZERO but zero_to_on empties it.")
    if self.grid_scheme not in (None,) + advantages.SCHEMES:
      raise ValueError(f"Algorithm {self.name}: grid_scheme={self.grid_scheme!r}.")

  def objective_config(self, loss_agg: str = "default", ratio_level: str = "token",
                       cispo: bool = False,
                       dual_clip: float | None = ObjectiveConfig.__dataclass_fields__["dual_clip"]
                       .default, **fields) -> ObjectiveConfig:
    """This algorithm's ObjectiveConfig from the fields of `config.objective` (rl.resolve passes
    the group as it is): its terms, its clip symmetry, `loss_agg` ("default" = the entry's own),
    the ON / ZERO form that `ratio_level` ("token" / "sequence") and `cispo` name
    (`objectives.ratio_form`; a `ratio_form` field overrides them), `dual_clip` (0 or None: off)
    and any other ObjectiveConfig `fields` (eps_low, gamma, switches...)."""
    fields.setdefault("ratio_form", ratio_form(ratio_level, bool(cispo)))
    if self.symmetric_clip:
      fields["eps_high"] = fields.get("eps_low", ObjectiveConfig.__dataclass_fields__["eps_low"]
                                      .default)
    return ObjectiveConfig(terms=self.terms, dual_clip=dual_clip or None,
                           loss_agg=self.loss_agg if loss_agg == "default" else loss_agg, **fields)


_ON = Term(sets=(ON,))
_BASELINE_GRIDS = ("main",)

TABLE: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm(
        name="grpo", summary="GRPO (arXiv 2402.03300): symmetric clip, mean of sequence means",
        guided=False, zero_set=False, zero_to_on=False, pools=((ON, ZERO),), terms=(_ON,),
        symmetric_clip=True, loss_agg="seq-mean-token-mean", grid_scheme="dapo",
        grids=_BASELINE_GRIDS),
    Algorithm(
        name="dapo", summary="DAPO (arXiv 2503.14476): clip-higher, token mean",
        guided=False, zero_set=False, zero_to_on=False, pools=((ON, ZERO),), terms=(_ON,),
        grid_scheme="dapo", grids=_BASELINE_GRIDS),
    Algorithm(
        name="luffy", summary="LUFFY (arXiv 2504.14945): on- and off-policy in one token mean",
        guided=True, zero_set=False, zero_to_on=True, pools=((ON, ZERO, OFF),),
        terms=(Term(sets=(ON,), norm=(ON, OFF)), Term(sets=(OFF,), norm=(ON, OFF))),
        grid_scheme="dapo", grids=_BASELINE_GRIDS),
    Algorithm(
        name="mix1", summary="Mix-1 (arXiv 2507.12931, Method 1): w·J_on + (1 − w)·J_off",
        guided=True, zero_set=False, zero_to_on=False, pools=((ON,), (OFF,)),
        terms=(Term(sets=(ON,), weight="on", name="j_on"),
               Term(sets=(OFF,), weight="other", name="j_off")),
        grids=("main", "scheme")),
    Algorithm(
        name="mix2", summary="Mix-2 (arXiv 2507.12931, Method 2): w·J_on + (1 − w)·J_mix",
        guided=True, zero_set=True, zero_to_on=False, pools=((ON,), (OFF, ZERO)),
        terms=(Term(sets=(ON,), weight="on", name="j_on"),
               Term(sets=(OFF, ZERO), weight="other", name="j_mix")),
        grids=("main", "gamma", "scheme")),
    Algorithm(
        name="chord",
        summary="CHORD (arXiv 2508.11408), constant μ: (1 − μ)·J_on + μ·J_sft (log π on OFF)",
        guided=True, zero_set=False, zero_to_on=False, pools=((ON, ZERO),),
        terms=(Term(sets=(ON,), weight="rl", name="j_on"),
               Term(sets=(OFF,), weight="sft", form="sft", name="j_sft"))),
)}


def names() -> tuple[str, ...]:
  """Every algorithm's name, in table order (the CLI's --algo choices)."""
  return tuple(TABLE)


def get(name: str) -> Algorithm:
  """The entry of `name`; a ValueError naming config.algo and the choices otherwise."""
  try:
    return TABLE[name]
  except KeyError:
    raise ValueError(f"config.algo={name!r}: expected one of {names()} (mixpo/algorithms.py "
                     "holds the table; `algorithms.register` adds an entry).") from None


def grids() -> dict[str, tuple[str, ...]]:
  """{grid: algorithm names in table order} of every comparison grid some entry belongs to."""
  out: dict[str, list[str]] = {}
  for a in TABLE.values():
    for g in a.grids:
      out.setdefault(g, []).append(a.name)
  return {g: tuple(v) for g, v in out.items()}


def register(algo: Algorithm, replace: bool = False) -> Algorithm:
  """Adds `algo` to TABLE (a notebook's or test's algorithm); refuses to shadow an entry."""
  if algo.name in TABLE and not replace:
    raise ValueError(f"algorithms.register: {algo.name!r} is already in the table; pick another "
                     "name or pass replace=True.")
  TABLE[algo.name] = algo
  return algo


@contextlib.contextmanager
def registered(algo: Algorithm):
  """`with registered(entry):` the entry is in TABLE inside the block only (tests)."""
  previous = TABLE.get(algo.name)
  register(algo, replace=True)
  try:
    yield algo
  finally:
    if previous is None:
      del TABLE[algo.name]
    else:
      TABLE[algo.name] = previous
