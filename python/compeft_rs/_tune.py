"""Choosing k and alpha on a validation set, the way the paper says small models need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ._expert import CompressedExpert, _torch, compress_expert_densities, reconstruct

__all__ = ["tune", "TunePoint", "TuneResult"]


@dataclass(frozen=True)
class TunePoint:
    """One evaluated setting: density, scale multiplier, score (higher is better), file bytes."""

    k: float
    alpha: float
    score: float
    nbytes: int


@dataclass
class TuneResult:
    """Every point, the best one, its compressed expert, and the size/score Pareto front."""

    points: List[TunePoint]
    best: TunePoint
    expert: CompressedExpert
    pareto: List[TunePoint] = field(default_factory=list)

    def table(self) -> str:
        rows = [f"{'k':>6} {'alpha':>6} {'score':>9} {'bytes':>10}"]
        for p in self.points:
            mark = " *" if p == self.best else (" p" if p in self.pareto else "")
            rows.append(f"{p.k:>6g} {p.alpha:>6g} {p.score:>9.4f} {p.nbytes:>10,}{mark}")
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
    ks: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    alphas: Sequence[float] = (0.5, 1, 2, 3, 4, 5, 6, 8, 10),
    scope: str = "global",
    encoding: str = "golomb",
    progress: bool = True,
) -> TuneResult:
    """Grid search of (k, alpha) scored by ``evaluate`` (higher is better).

    ``expert`` is a dict of tensors (task vectors; (IA)3 vectors from 1) or a peft.PeftModel.
    For a dict, ``evaluate`` receives the reconstructed dict; for a PeftModel, the model itself
    with the reconstructed adapter swapped in (in memory; the original weights are put back
    afterwards, even if ``evaluate`` raises). One selection is made per k and reused for every
    alpha, since alpha only rescales.
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
    if not ks or not alphas:
        raise ValueError("ks and alphas must not be empty")

    if len(set(float(k) for k in ks)) != len(ks):
        raise ValueError("ks must not repeat a density")
    grid = [(k, a) for k in ks for a in alphas]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(grid), desc="tune", unit="point", leave=False, disable=None)
    points: List[TunePoint] = []
    # One magnitude histogram for all k, one selection per k reused for every alpha.
    per_k = compress_expert_densities(sd, ks, 1.0, scope=scope, encoding=encoding, peft_config=config)
    try:
        for k in ks:
            unit = per_k[float(k)]
            nbytes = unit.nbytes
            tau64 = unit.decode(unit.compressed_keys(), dtype="float64")
            for alpha in alphas:
                weights: Dict[str, Any] = {n: unit.lossless(n) for n in unit.lossless_keys()}
                for n, t in tau64.items():
                    # sign * (alpha * sigma) in f64, then the decoder's cast through float32.
                    v = (t * float(alpha)).to(torch.float32)
                    weights[n] = reconstruct(unit.init_of(n), v, None, unit.dtype_of(n))
                if model is not None:
                    set_peft_model_state_dict(model, weights, adapter_name=name)
                    score = float(evaluate(model))
                else:
                    score = float(evaluate(weights))
                points.append(TunePoint(float(k), float(alpha), score, nbytes))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if model is not None:
            set_peft_model_state_dict(model, sd, adapter_name=name)
    best = max(points, key=lambda p: (p.score, -p.nbytes))
    chosen = compress_expert_densities(sd, [best.k], best.alpha, scope=scope, encoding=encoding,
                                       peft_config=config)[best.k]
    return TuneResult(points=points, best=best, expert=chosen, pareto=pareto_front(points))
