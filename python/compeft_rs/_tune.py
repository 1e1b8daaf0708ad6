"""Choosing k and alpha on a validation set, the way the paper says small models need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ._expert import CompressedExpert, _torch, compress_expert_densities, reconstruct
from ._gauge import check_gauge
from ._scale import SCALES, check_scale

# Default alpha grids: the data-free rules are calibrated (alpha 1 is their own choice), the
# paper's sigma rule needs alpha to be searched over a wide range.
DATA_FREE_ALPHAS = (1.0, 0.7, 1.4)
STD_ALPHAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

__all__ = ["tune", "TunePoint", "TuneResult"]


@dataclass(frozen=True)
class TunePoint:
    """One evaluated setting: density, scale multiplier, score (higher is better), file bytes."""

    k: float
    alpha: float
    score: float
    nbytes: int
    scope: str = "per_tensor"
    scale: str = "pair"


@dataclass
class TuneResult:
    """Every point, the best one, its compressed expert, and the size/score Pareto front."""

    points: List[TunePoint]
    best: TunePoint
    expert: CompressedExpert
    pareto: List[TunePoint] = field(default_factory=list)

    def table(self) -> str:
        rows = [f"{'scope':>10} {'scale':>5} {'k':>6} {'alpha':>6} {'score':>9} {'bytes':>10}"]
        for p in self.points:
            mark = " *" if p == self.best else (" p" if p in self.pareto else "")
            rows.append(f"{p.scope:>10} {p.scale:>5} {p.k:>6g} {p.alpha:>6g} {p.score:>9.4f} {p.nbytes:>10,}{mark}")
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


def tune(
    expert: Any,
    evaluate: Callable[[Any], float],
    *,
    ks: Sequence[float] = (0.1,),
    alphas: Optional[Sequence[float]] = None,
    scopes: Sequence[str] = ("per_tensor", "global"),
    scales: Sequence[str] = SCALES,
    encoding: str = "golomb",
    progress: bool = True,
    gauge: str = "as_trained",
) -> TuneResult:
    """Grid search of (scope, scale rule, k, alpha) scored by ``evaluate`` (higher is better).

    ``expert`` is a dict of tensors (task vectors; (IA)3 vectors from 1) or a peft.PeftModel.
    For a dict, ``evaluate`` receives the reconstructed dict; for a PeftModel, the model itself
    with the reconstructed adapter swapped in (in memory; the original weights are put back
    afterwards, even if ``evaluate`` raises). ``alphas`` defaults to a grid per rule: around 1
    for the data-free rules, 1 to 32 for "std" (whose good alpha depends on the expert). One
    compression is made per (scope, scale, k), its first-level histogram shared by every k, and
    reused for every alpha, since alpha only multiplies every stored scale. Ties in score go to
    the smaller file, then to the earlier point of the grid (the defaults come first).
    ``gauge`` applies to every point (as in :func:`compeft_rs.compress_expert`); it is not
    searched.
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
    check_gauge(gauge)

    def alphas_for(scale: str) -> Sequence[float]:
        if alphas is not None:
            return alphas
        return STD_ALPHAS if scale == "std" else DATA_FREE_ALPHAS

    combos = [(scope, scale) for scope in scopes for scale in scales]
    grid_size = sum(len(ks) * len(alphas_for(sc)) for _, sc in combos)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=grid_size, desc="tune", unit="point", leave=False, disable=None)
    points: List[TunePoint] = []
    try:
        for scope, scale in combos:
            # One magnitude histogram for all k, one compression per k reused for every alpha.
            per_k = compress_expert_densities(sd, ks, 1.0, scope=scope, scale=scale, encoding=encoding,
                                              peft_config=config, gauge=gauge)
            for k in ks:
                unit = per_k[float(k)]
                nbytes = unit.nbytes
                tau64 = unit.decode(unit.compressed_keys(), dtype="float64")
                for alpha in alphas_for(scale):
                    weights: Dict[str, Any] = {n: unit.lossless(n) for n in unit.lossless_keys()}
                    for n, t in tau64.items():
                        # sign * (alpha * scale) in f64, then the decoder's cast through float32.
                        v = (t * float(alpha)).to(torch.float32)
                        weights[n] = reconstruct(unit.init_of(n), v, None, unit.dtype_of(n))
                    if model is not None:
                        set_peft_model_state_dict(model, weights, adapter_name=name)
                        score = float(evaluate(model))
                    else:
                        score = float(evaluate(weights))
                    points.append(TunePoint(float(k), float(alpha), score, nbytes, scope, scale))
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if model is not None:
            set_peft_model_state_dict(model, sd, adapter_name=name)
    best = max(points, key=lambda p: (p.score, -p.nbytes))  # max keeps the first of equals
    chosen = compress_expert_densities(sd, [best.k], best.alpha, scope=best.scope, scale=best.scale,
                                       encoding=encoding, peft_config=config, gauge=gauge)[best.k]
    return TuneResult(points=points, best=best, expert=chosen, pareto=pareto_front(points))
