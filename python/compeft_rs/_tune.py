"""Choosing k and alpha on a validation set, the way the paper says small models need.

A grid of 42 points scored on a few hundred validation examples always has a best point, and
most of the time that point is best by noise alone. So tune keeps the library's defaults unless
a candidate beats them by more than the validation noise: measured by a paired bootstrap when
the callback returns per-example scores, declared by the caller otherwise (``noise=``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._expert import (CompressedExpert, _torch, compress_expert_densities, default_scale, default_scope,
                      reconstruct)
from ._allocate import check_allocate
from ._gauge import check_gauge
from ._scale import SCALES, check_scale

# Default alpha grids: the data-free rules are calibrated (alpha 1 is their own choice), the
# paper's sigma rule needs alpha to be searched over a wide range.
DATA_FREE_ALPHAS = (1.0, 0.7, 1.4)
STD_ALPHAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

# The library's defaults (compress_expert, compress_peft, the CLI): the baseline tune must beat.
# The scope and scale rule depend on the expert's kind (``_expert.default_scope``,
# ``_expert.default_scale``).
DEFAULT_K = 0.1
DEFAULT_ALPHA = 1.0

# The bootstrap estimates a tail quantile at level q = (1 - confidence) / candidates; this many
# resamples below it keep that order statistic stable (at least 1,000 resamples in all).
_TAIL_RESAMPLES = 25
# Resample counts are built this many entries (resamples x examples) at a time.
_CHUNK = 1 << 22

__all__ = ["tune", "TunePoint", "TuneResult"]

Score = Union[float, Sequence[float], Any]


@dataclass(frozen=True)
class TunePoint:
    """One evaluated setting: density, scale multiplier, score (higher is better), file bytes.

    ``score`` is the callback's number, or the mean of its per-example scores. ``noise`` is the
    score gap over the defaults this point needed to replace them (its own bootstrap margin, or
    the declared ``noise=``); None for the defaults themselves and when there was no estimate.
    """

    k: float
    alpha: float
    score: float
    nbytes: int
    scope: str = "per_tensor"
    scale: str = "pair_proj"
    noise: Optional[float] = None


@dataclass
class TuneResult:
    """Every point, the chosen one, its compressed expert, the size/score Pareto front.

    ``best`` is the chosen point: ``default`` (the library's defaults, always evaluated) unless a
    candidate beat it by more than the noise. ``noise`` is the margin that decided: the chosen
    candidate's, or when the defaults were kept, that of the highest-scoring candidate (the one
    plain argmax would have taken); None when there was no noise estimate (plain argmax).
    ``rule`` says in words how ``best`` was chosen.
    """

    points: List[TunePoint]
    best: TunePoint
    expert: CompressedExpert
    pareto: List[TunePoint] = field(default_factory=list)
    default: Optional[TunePoint] = None
    noise: Optional[float] = None
    rule: str = "argmax"

    def table(self) -> str:
        noise = "none (plain argmax)" if self.noise is None else f"{self.noise:.4f}"
        rows = [f"rule: {self.rule}", f"noise: {noise}"]
        if self.default is not None:
            d = self.default
            kept = " (kept)" if self.best == d else ""
            rows.append(f"defaults: {d.scope}/{d.scale} k={d.k:g} alpha={d.alpha:g} score {d.score:.4f}{kept}")
        rows.append(f"{'scope':>10} {'scale':>5} {'k':>6} {'alpha':>6} {'score':>9} {'noise':>9} {'bytes':>10}")
        for p in self.points:
            mark = " *" if p == self.best else (" d" if p == self.default else (" p" if p in self.pareto else ""))
            pn = "-" if p.noise is None else f"{p.noise:.4f}"
            rows.append(f"{p.scope:>10} {p.scale:>5} {p.k:>6g} {p.alpha:>6g} {p.score:>9.4f} {pn:>9} "
                        f"{p.nbytes:>10,}{mark}")
        rows.append("* chosen, d defaults, p Pareto front (size/score)")
        return "\n".join(rows)


def pareto_front(points: Sequence[TunePoint]) -> List[TunePoint]:
    """Points that no other point beats on both size (smaller) and score (higher)."""
    front: List[TunePoint] = []
    for p in sorted(points, key=lambda p: (p.nbytes, -p.score)):
        if not front or p.score > front[-1].score:
            front.append(p)
    return front


def _is_peft_model(x: Any) -> bool:
    return hasattr(x, "peft_config") and hasattr(x, "base_model")


def _where(scope: str, scale: str, k: float, alpha: float) -> str:
    return f"{scope}/{scale} k={k:g} alpha={alpha:g}"


class _Scores:
    """Checks what ``evaluate`` returns: always a number, or always as many per-example scores."""

    def __init__(self) -> None:
        self.per_example: Optional[bool] = None
        self.n = 0

    def __call__(self, value: Any, where: str) -> Tuple[float, Optional[np.ndarray]]:
        if hasattr(value, "detach"):  # a torch tensor, without importing torch here
            value = value.detach().cpu().double().numpy()
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"evaluate returned a {type(value).__name__} at {where}; it must return a number "
                             "(higher is better) or a 1-d sequence of per-example scores") from None
        if arr.ndim > 1:
            raise ValueError(f"evaluate returned an array of shape {arr.shape} at {where}; per-example scores must "
                             "be 1-d, one score per validation example")
        per_example = arr.ndim == 1
        if per_example and arr.size == 0:
            raise ValueError(f"evaluate returned no per-example scores at {where}; score at least one example")
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ValueError(f"evaluate returned {bad} NaN or infinite score(s) at {where}; every score must be "
                             "finite (score a failed example as its worst value, e.g. 0 for accuracy)")
        if self.per_example is None:
            self.per_example, self.n = per_example, arr.size
        elif per_example != self.per_example:
            first = "per-example scores" if self.per_example else "a single number"
            now = "per-example scores" if per_example else "a single number"
            raise ValueError(f"evaluate returned {first} at the first point and {now} at {where}; return the same "
                             "kind every time")
        elif per_example and arr.size != self.n:
            raise ValueError(f"evaluate returned {self.n} per-example scores at the first point and {arr.size} at "
                             f"{where}; it must score the same validation examples, in the same order, every time")
        if per_example:
            return float(arr.mean()), arr
        return float(arr), None


def _bootstrap_lower(diffs: np.ndarray, q: float, seed: int) -> np.ndarray:
    """Lower q-quantile of the mean of each row of ``diffs`` over paired resamples of its columns.

    Every row (candidate) sees the same resamples of the validation examples, so the result is
    reproducible from ``seed`` and the candidates are compared on equal terms.
    """
    m, n = diffs.shape
    resamples = max(1000, math.ceil(_TAIL_RESAMPLES / q))
    rng = np.random.Generator(np.random.PCG64(seed))
    rows = max(1, _CHUNK // n)
    means = np.empty((resamples, m))
    for start in range(0, resamples, rows):
        b = min(rows, resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        # How often each example is drawn in each resample; the resampled mean is then a product.
        counts = np.bincount((idx + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        means[start:start + b] = counts @ diffs.T / n
    i = int(math.floor(q * (resamples - 1)))
    return np.partition(means, i, axis=0)[i]


def tune(
    expert: Any,
    evaluate: Callable[[Any], Score],
    *,
    ks: Sequence[float] = (DEFAULT_K,),
    alphas: Optional[Sequence[float]] = None,
    scopes: Sequence[str] = ("per_tensor", "global"),
    scales: Sequence[str] = SCALES,
    encoding: str = "golomb",
    progress: bool = True,
    confidence: Optional[float] = 0.95,
    noise: Optional[float] = None,
    seed: int = 0,
    gauge: str = "balanced",
    allocate: str = "uniform",
) -> TuneResult:
    """Grid search of (scope, scale rule, k, alpha) scored by ``evaluate`` (higher is better).

    ``expert`` is a dict of tensors (task vectors; (IA)3 vectors from 1) or a peft.PeftModel.
    For a dict, ``evaluate`` receives the reconstructed dict; for a PeftModel, the model itself
    with the reconstructed adapter swapped in (in memory; the original weights are put back
    afterwards, even if ``evaluate`` raises). ``alphas`` defaults to a grid per rule: around 1
    for the data-free rules, 1 to 32 for "std" (whose good alpha depends on the expert). One
    compression is made per (scope, scale, k), its first-level histogram shared by every k, and
    reused for every alpha, since alpha only multiplies every stored scale.

    ``evaluate`` returns either a number or per-example scores: a 1-d sequence, array or tensor
    with one score per validation example (1/0 correctness, or minus a loss), the same examples
    in the same order at every call. The point's score is then their mean, and tune can measure
    how much of a difference between two points is noise.

    The defaults (the expert's default scope and scale rule, gauge, k, alpha 1; see
    :func:`compeft_rs.compress_expert`) with k = 0.1 if ``ks`` has it, else the first of ``ks``,
    are always evaluated (added if the grid lacks them) and come first. They are kept
    unless a candidate beats them by more than the noise:

    - Per-example scores, ``confidence`` set (0.95 by default): a paired bootstrap over the
      validation examples. For each candidate the per-example differences (candidate minus
      defaults) are resampled with replacement (the same resamples for every candidate, from a
      numpy Generator seeded with ``seed``, so a run is reproducible); a candidate wins when the
      lower ``(1 - confidence) / m`` quantile of its resampled mean difference is above 0, where
      m is the number of candidates. That is Bonferroni's correction: with 41 candidates, the
      one-sided test of each at level 0.05 would let a candidate that is no better through far
      more than 5% of the time, and testing only the best-scoring one does not help, since it is
      the one most inflated by noise; dividing the level by m keeps the chance that any
      no-better candidate replaces the defaults within ``1 - confidence``. A point's ``noise`` is
      its mean difference minus that quantile: it wins when it beats the defaults by more.
    - ``noise=`` given (a score difference the caller knows to be noise, e.g. 1.3 points of
      accuracy on 1,000 examples, in the callback's units): a candidate wins when its score
      exceeds the defaults' by more than ``noise``. This is the only rule for a callback that
      returns a number, and it overrides the bootstrap when given. No correction is made: the
      margin is the caller's.
    - ``confidence=None`` with no ``noise``, or a callback that returns a number with no
      ``noise``: plain argmax, as before; ``TuneResult.noise`` is None (no estimate).

    Among the winners the highest score is chosen. Ties in score go to the smaller file, then
    to the earlier point of the grid (the defaults first). Raises ValueError if ``evaluate``
    returns NaN or infinite scores, more than 1-d, or a different kind or number of per-example
    scores than at the first call.
    ``gauge`` and ``allocate`` apply to every point (as in :func:`compeft_rs.compress_expert`;
    with ``allocate="error"`` the grid keeps only the per-tensor scope, since the global one has
    a single threshold); they are not searched.
    """
    torch = _torch()
    set_peft_model_state_dict: Any = None
    model: Optional[Any] = None
    config = None
    if _is_peft_model(expert):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: F811

        from ._peft import _config_dict, active_adapter

        model = expert
        name = active_adapter(model)
        sd = {n: t.detach().cpu().clone() for n, t in get_peft_model_state_dict(model, adapter_name=name).items()}
        config = _config_dict(model.peft_config[name])
    elif isinstance(expert, Mapping):
        sd = dict(expert)
    else:
        raise TypeError("expert must be a dict of tensors or a peft.PeftModel")
    if not ks or (alphas is not None and not alphas) or not scopes or not scales:
        raise ValueError("ks, alphas, scopes and scales must not be empty")
    if len(set(float(k) for k in ks)) != len(ks):
        raise ValueError("ks must not repeat a density")
    for sc in scales:
        check_scale(sc)
    if confidence is not None and not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), or None for plain argmax; got {confidence}")
    if noise is not None and not (math.isfinite(float(noise)) and float(noise) >= 0.0):
        raise ValueError(f"noise must be a finite score difference >= 0, or None; got {noise}")
    check_gauge(gauge)
    check_allocate(allocate, encoding=encoding)
    if allocate != "uniform":
        if "per_tensor" not in scopes:
            check_allocate(allocate, scopes[0], encoding)  # the error that says what to pass
        scopes = ["per_tensor"]

    def alphas_for(scale: str) -> Sequence[float]:
        if alphas is not None:
            return alphas
        return STD_ALPHAS if scale == "std" else DATA_FREE_ALPHAS

    # The grid as (scope, scale) -> k -> alphas, the defaults' combination first.
    default_k = DEFAULT_K if DEFAULT_K in {float(k) for k in ks} else float(ks[0])
    default_key = (default_scope(sd, allocate), default_scale(sd))
    plan: Dict[Tuple[str, str], Dict[float, List[float]]] = {default_key: {}}
    for scope in scopes:
        for scale in scales:
            plan.setdefault((scope, scale), {}).update({float(k): [float(a) for a in alphas_for(scale)] for k in ks})
    dk = plan[default_key].setdefault(default_k, [])
    if DEFAULT_ALPHA not in dk:
        dk.insert(0, DEFAULT_ALPHA)

    grid_size = sum(len(a) for per in plan.values() for a in per.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=grid_size, desc="tune", unit="point", leave=False, disable=None)
    check = _Scores()
    evaluated: List[Tuple[TunePoint, Optional[np.ndarray]]] = []
    try:
        for (scope, scale), per in plan.items():
            # One magnitude histogram for all k, one compression per k reused for every alpha.
            per_k = compress_expert_densities(sd, list(per), 1.0, scope=scope, scale=scale, encoding=encoding,
                                              peft_config=config, gauge=gauge, allocate=allocate)
            for k, k_alphas in per.items():
                unit = per_k[k]
                nbytes = unit.nbytes
                tau64 = unit.decode(unit.compressed_keys(), dtype="float64")
                for alpha in k_alphas:
                    weights: Dict[str, Any] = {n: unit.lossless(n) for n in unit.lossless_keys()}
                    for n, t in tau64.items():
                        # sign * (alpha * scale) in f64, then the decoder's cast through float32.
                        v = (t * alpha).to(torch.float32)
                        weights[n] = reconstruct(unit.init_of(n), v, None, unit.dtype_of(n))
                    if model is not None:
                        set_peft_model_state_dict(model, weights, adapter_name=name)
                        value = evaluate(model)
                    else:
                        value = evaluate(weights)
                    score, per_ex = check(value, _where(scope, scale, k, alpha))
                    evaluated.append((TunePoint(k, alpha, score, nbytes, scope, scale), per_ex))
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if model is not None:
            set_peft_model_state_dict(model, sd, adapter_name=name)

    # The defaults are first in the grid; move them to the very front if the plan put other
    # alphas of theirs before them.
    di = next(i for i, (p, _) in enumerate(evaluated)
              if (p.scope, p.scale, p.k, p.alpha) == (*default_key, default_k, DEFAULT_ALPHA))
    evaluated.insert(0, evaluated.pop(di))
    default, default_ex = evaluated[0]
    candidates = evaluated[1:]

    def rank(p: TunePoint) -> Tuple[float, int]:
        return (p.score, -p.nbytes)  # max() keeps the first of equals

    margins: Optional[List[float]] = None
    if noise is not None:
        margins = [float(noise)] * len(candidates)
        winners_mask = [p.score - default.score > float(noise) for p, _ in candidates]
        rule = f"a candidate must beat the defaults by more than the declared noise={float(noise):g}"
    elif confidence is not None and check.per_example and candidates:
        m = len(candidates)
        q = (1.0 - float(confidence)) / m
        diffs = np.stack([ex for _, ex in candidates]) - default_ex  # type: ignore[operator]
        lower = _bootstrap_lower(diffs, q, seed)
        # The margin each candidate needed: its mean difference minus the lower quantile, so
        # that "beats the defaults by more than the margin" is "the lower quantile is above 0".
        margins = [float(d) - float(lo) for d, lo in zip(diffs.mean(axis=1), lower)]
        winners_mask = [float(lo) > 0.0 for lo in lower]
        rule = (f"paired bootstrap over {check.n} validation examples, one-sided {float(confidence):g} "
                f"confidence, Bonferroni over {m} candidates (seed {seed})")
    else:
        winners_mask = []
        if not candidates:
            rule = "only the defaults were evaluated"
        elif confidence is not None and not check.per_example:
            rule = "argmax: evaluate returned one number per point, so there is no noise estimate (pass noise=)"
        else:
            rule = "argmax (confidence=None): no noise estimate"

    if margins is None:
        points = [p for p, _ in evaluated]
        best = max(points, key=rank)
        result_noise = None
    else:
        points = [default] + [replace(p, noise=mg) for (p, _), mg in zip(candidates, margins)]
        winners = [p for p, w in zip(points[1:], winners_mask) if w]
        if winners:
            best = max(winners, key=rank)
            result_noise = best.noise
        else:
            best = default
            # The gap the strongest candidate fell short of: the noise that kept the defaults.
            result_noise = max(points[1:], key=rank).noise if len(points) > 1 else None
    chosen = compress_expert_densities(sd, [best.k], best.alpha, scope=best.scope, scale=best.scale,
                                       encoding=encoding, peft_config=config, gauge=gauge, allocate=allocate)[best.k]
    return TuneResult(points=points, best=best, expert=chosen, pareto=pareto_front(points), default=points[0],
                      noise=result_noise, rule=rule)
