"""Merging and comparing whole experts on their compressed form (task arithmetic, TIES, cosine).

The work runs in Rust over each stream's bitmasks (2 bits per entry, never a dense float tensor
per expert), all tensors in one parallel call with the GIL released; the merged float32 tensors
are the only dense allocation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ._core import merge_streams as _merge_streams
from ._core import similarity as _similarity
from ._expert import (CompressedExpert, _torch, build_expert, default_scale, default_scope, encode_deltas, expert_info,
                      load_expert)
from ._lora import describe, expert_scalings, lora_factor, merged_lora_config
from ._plan import TensorPlan
from ._tensor import check_k_alpha

__all__ = ["merge", "merge_peft", "similarity"]

PathLike = Union[str, "os.PathLike[str]"]
ExpertLike = Union[CompressedExpert, PathLike]

METHODS = ("ties", "task_arithmetic")
MAJORITY = ("total", "frequency")
CONVENTIONS = ("peft", "mergekit")


def _open(experts: Sequence[ExpertLike]) -> List[CompressedExpert]:
    if isinstance(experts, (str, os.PathLike, CompressedExpert)):
        raise TypeError("experts must be a sequence of CompressedExpert objects or paths, not one")
    out = [e if isinstance(e, CompressedExpert) else load_expert(e) for e in experts]
    if not out:
        raise ValueError("no experts given")
    return out


def _label(i: int, e: CompressedExpert) -> str:
    return f"expert {i} ({e._path})" if e._path is not None else f"expert {i}"


def _check_alike(experts: List[CompressedExpert]) -> List[List[Any]]:
    """Same names, the same tensors compressed and kept exactly, the same kinds of delta and
    shapes; the error names the first difference. Returns each expert's parsed streams, in
    the order of the first expert's compressed_keys()."""
    first = experts[0]
    names = first.keys()
    comp = first.compressed_keys()
    for i, e in enumerate(experts[1:], 1):
        if e.keys() != names:
            missing = sorted(set(names) - set(e.keys()))
            extra = sorted(set(e.keys()) - set(names))
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which expert 0 lacks"
            raise ValueError(f"{_label(i, e)} {what}; experts to merge must have the same tensors")
        for n in names:
            if first.init_of(n) != e.init_of(n):
                how = lambda x: "kept exactly" if x is None else f"a delta from theta_init {x!r}"  # noqa: E731
                raise ValueError(f"tensor {n!r} is {how(first.init_of(n))} in expert 0 but "
                                 f"{how(e.init_of(n))} in {_label(i, e)}")
    parsed = [e._parse(comp) for e in experts]

    def shapes(e: CompressedExpert, streams: List[Any]) -> Dict[str, tuple]:
        out = {n: tuple(s.shape) for n, s in zip(comp, streams)}
        out.update({n: tuple(e._entries[e._keys[n]][1]) for n in e.lossless_keys()})
        return out

    want = shapes(first, parsed[0])
    for i, e in enumerate(experts[1:], 1):
        got = shapes(e, parsed[i])
        for n in names:
            if got[n] != want[n]:
                raise ValueError(f"tensor {n!r} has shape {got[n]} in {_label(i, e)} but {want[n]} in expert 0")
    return parsed


def _weights(weights: Optional[Sequence[float]], n: int) -> List[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} experts; give one weight per expert")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite, got {w}")
    return w


def _exact_mean(experts: List[CompressedExpert], name: str, w: List[float]) -> Any:
    """A tensor kept exactly (a head, a DoRA magnitude): copied when every expert has the same
    values, else averaged with the weights, sum(w_i x_i) / sum(w_i), in float32."""
    torch = _torch()
    ts = [e.lossless(name) for e in experts]
    if all(torch.equal(ts[0], t) for t in ts[1:]):
        return ts[0].to(torch.float32)
    total = sum(w)
    if total == 0:
        raise ValueError(f"tensor {name!r} is kept exactly and differs between the experts, and the "
                         "weights sum to 0, so it cannot be averaged; give weights with a nonzero sum")
    acc = torch.zeros(ts[0].shape, dtype=torch.float64)
    for wi, t in zip(w, ts):
        acc += wi * t.to(torch.float64)
    return (acc / total).to(torch.float32)


def _factor_weights(experts: List[CompressedExpert], names: List[str], w: List[float], lam: float,
                    rescale: bool) -> Dict[str, tuple]:
    """Per compressed tensor: (weights, lam) to merge it with. LoRA factors get peft's
    ``add_weighted_adapter`` split: a weight c (times the expert's scaling of that module when
    rescaling) becomes sqrt(|c|) on both factors and its sign goes on lora_A, so the product B @ A
    the model applies scales by c, not c**2; lam is split the same way."""
    configs = [e.peft_config for e in experts]
    lora = {n: f for n in names if experts[0].init_of(n) == "zero" and (f := lora_factor(n)) is not None}
    scalings = [expert_scalings(c, lora) for c in configs]
    if lora and any(c is None for c in configs) and not all(c is None for c in configs):
        i = next(i for i, c in enumerate(configs) if (c is None) != (configs[0] is None))
        raise ValueError(f"{_label(i, experts[i])} {'has no' if configs[i] is None else 'has an'} adapter config "
                         f"and expert 0 {'has one' if configs[i] is None else 'has none'}: their LoRA scalings "
                         "cannot be compared; merge experts that all come from PEFT adapters (or all not)")
    if rescale and lora and configs[0] is None:
        raise ValueError("rescale=True needs the experts' adapter configs (they give each module's scaling); "
                         "these experts were not made from PEFT adapters")
    if not rescale:
        for i in range(1, len(experts)):
            for m, s in scalings[i].items():
                if not math.isclose(s, scalings[0][m], rel_tol=1e-9):
                    raise ValueError(
                        f"module {m!r} has LoRA scaling {s:g} in {_label(i, experts[i])} "
                        f"({describe(configs[i], m)}) but {scalings[0][m]:g} in {_label(0, experts[0])} "
                        f"({describe(configs[0], m)}): merged factors would apply one scaling to both. "
                        "Pass rescale=True (CLI: --rescale) to fold each expert's scaling into its factors, as "
                        "peft's add_weighted_adapter does (the result then has scaling 1: lora_alpha = r)")

    def split(c: float, side: str) -> float:
        if side == "bias":  # added as scaling * bias: the whole weight
            return c
        root = math.sqrt(abs(c))
        return math.copysign(root, c) if side == "A" else root

    out = {}
    for n in names:
        f = lora.get(n)
        if f is None:
            out[n] = (tuple(w), float(lam))
            continue
        module, side = f
        c = [wi * (scalings[i][module] if rescale and scalings[i] else 1.0) for i, wi in enumerate(w)]
        out[n] = (tuple(split(ci, side) for ci in c), split(float(lam), side))
    return out


def merge(
    experts: Sequence[ExpertLike],
    method: str = "ties",
    *,
    weights: Optional[Sequence[float]] = None,
    majority_sign: str = "total",
    density: Optional[float] = None,
    lam: float = 1.0,
    convention: str = "peft",
    compress: Optional[float] = None,
    rescale: bool = False,
) -> Union[Dict[str, Any], CompressedExpert]:
    """Merges experts on their compressed form; returns the merged task vector per tensor name
    (float32 torch tensors), or with ``compress=k`` a new CompressedExpert at density k.

    Args:
        experts: CompressedExpert objects or paths, with the same tensor names and shapes.
        method: "ties" (trim, elect a sign per entry, disjoint mean) or "task_arithmetic"
            (lam * sum of weight * tau).
        weights: one per expert (default: 1.0 each).
        majority_sign: what the TIES election sums: "total" (the values) or "frequency" (the
            signs). A tally of exactly 0 elects +.
        density: trims each tensor first to its first ``int(density * numel)`` kept entries in
            row-major order (as peft's ``magnitude_based_pruning``; with convention "mergekit",
            ``max(1, int(density * numel))`` for a density > 0, as mergekit's magnitude
            sparsification, so a density under 1 / numel keeps one entry): every kept entry of a
            ComPEFT tensor has the same magnitude, so ties go to the lower index, as in
            selection. Above an expert's own density it changes nothing. Default: no trim.
        lam: multiplies the result.
        convention: "peft" equals ``peft.utils.merge_utils.task_arithmetic`` / ``ties`` on the
            decoded experts (sign elected on the unweighted tensors, the sum of the agreeing
            weighted entries divided by how many agree); "mergekit" follows mergekit's generalized
            task arithmetic (sign elected on the weighted tensors, divided by the sum of the
            agreeing weights, 1 where that is 0).
        compress: a density k: the result compressed with the library's default scope and scale
            rule for its kind (LoRA factors as merged: no gauge rewrite), keeping the first
            expert's tensor kinds, dtypes and PEFT config.
        rescale: for LoRA experts whose scalings (lora_alpha / r, rsLoRA, patterns) differ:
            fold each expert's scaling into its factors and give the result scaling 1
            (``lora_alpha = r``), as peft's ``add_weighted_adapter`` does. Without it such experts
            are refused. Needs the experts' adapter configs (experts made from PEFT adapters).

    LoRA factors are weighted as peft's ``add_weighted_adapter`` weights them: a weight w (and
    lam) becomes sqrt(|w|) on lora_A and lora_B with the sign on lora_A, so the update B @ A
    scales by w; TIES then runs on each factor separately, as ``add_weighted_adapter(...,
    combination_type="ties")`` does. Other tensors take w and lam as they are. Tensors kept exactly
    (heads, DoRA magnitudes) are copied when they are equal in every expert and otherwise averaged
    with the weights, sum(w_i x_i) / sum(w_i).
    """
    merged, config, exps = _merge(experts, method, weights, majority_sign, density, lam, convention, compress,
                                  rescale)
    if compress is None:
        return merged
    return _recompress(exps[0], merged, float(compress), config)


def merge_peft(
    experts: Sequence[ExpertLike],
    out_dir: PathLike,
    method: str = "ties",
    *,
    weights: Optional[Sequence[float]] = None,
    majority_sign: str = "total",
    density: Optional[float] = None,
    lam: float = 1.0,
    convention: str = "peft",
    rescale: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merges PEFT experts as :func:`merge` does and writes the result as a PEFT adapter folder
    (``adapter_config.json``, ``adapter_model.safetensors``) that peft's
    ``PeftModel.from_pretrained`` loads, tensors in their original dtypes. The config is the first
    expert's (the experts' scalings agree, or the merge refuses; fields that do not change the
    outputs, such as ``base_model_name_or_path``, are taken from it), or with ``rescale=True`` the
    first expert's with every module at scaling 1 (``lora_alpha = r``). Written beside ``out_dir``
    and renamed in; an existing folder needs ``overwrite=True`` (checked before merging).
    Returns the folder."""
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    exps = _open(experts)
    missing = [i for i, e in enumerate(exps) if e.peft_config is None]
    if missing:
        raise ValueError(f"{_label(missing[0], exps[missing[0]])} was not made from a PEFT adapter (no adapter "
                         "config in it); a PEFT folder needs PEFT experts (use merge() for plain task vectors)")
    merged, config, exps = _merge(exps, method, weights, majority_sign, density, lam, convention, None, rescale)
    return write_merged(merged, exps[0], out_dir, config=config, overwrite=overwrite)


def _merge(experts: Sequence[ExpertLike], method: str, weights: Optional[Sequence[float]], majority_sign: str,
           density: Optional[float], lam: float, convention: str, compress: Optional[float],
           rescale: bool) -> tuple:
    """merge()'s work: (merged tensors, the result's PEFT config or None, the opened experts)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if majority_sign not in MAJORITY:
        raise ValueError(f"majority_sign must be one of {MAJORITY}, got {majority_sign!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if density is not None and not (0.0 <= float(density) <= 1.0):
        raise ValueError(f"density must be in [0, 1], got {density}")
    if not math.isfinite(float(lam)):
        raise ValueError(f"lam must be finite, got {lam}")
    if compress is not None:
        check_k_alpha(compress, 1.0)
    exps = _open(experts)
    parsed = _check_alike(exps)
    w = _weights(weights, len(exps))
    torch = _torch()
    names = exps[0].compressed_keys()
    per_tensor = _factor_weights(exps, names, w, float(lam), bool(rescale))
    groups: Dict[tuple, List[int]] = {}
    for j, n in enumerate(names):
        groups.setdefault(per_tensor[n], []).append(j)
    streams = [list(g) for g in zip(*parsed)]
    outs = [torch.empty(tuple(g[0].shape), dtype=torch.float32) for g in streams]
    for (gw, glam), idx in groups.items():
        _merge_streams([streams[j] for j in idx], [names[j] for j in idx], list(gw), [outs[j].numpy() for j in idx],
                       method, majority_sign, convention, None if density is None else float(density), glam)
    merged: Dict[str, Any] = dict(zip(names, outs))
    for n in exps[0].lossless_keys():
        merged[n] = _exact_mean(exps, n, w)
    merged = {n: merged[n] for n in sorted(merged)}
    config = exps[0].peft_config
    if config is not None and rescale and any(lora_factor(n) for n in names):
        config = merged_lora_config(config)
    return merged, config, exps


def _recompress(like: CompressedExpert, merged: Dict[str, Any], k: float,
                config: Optional[Dict[str, Any]]) -> CompressedExpert:
    """The merged task vectors compressed as ``like`` was made: same theta_init per tensor, same
    original dtypes, same tensors kept exactly (cast back to their dtype), with the merge's PEFT
    config."""
    torch = _torch()
    comp = like.compressed_keys()
    plans = {n: TensorPlan(like.init_of(n), "merged") for n in merged}
    scope, scale = default_scope(comp), default_scale(comp)
    per_k = encode_deltas(comp, merged.__getitem__, [k], 1.0, scope, "golomb", scale=scale)
    exact = {n: merged[n].to(getattr(torch, like.dtype_of(n))) for n in like.lossless_keys()}
    dtypes = {n: like.dtype_of(n) for n in comp}
    info = expert_info(k, 1.0, scope, "golomb", plans, per_k[k], dtypes, scale)
    return build_expert(per_k[k], exact, info, config)


def similarity(experts: Sequence[ExpertLike]) -> Any:
    """The N x N cosine similarity (float64 torch tensor) of whole experts, each taken as one
    vector of all its compressed tensors (tensors kept exactly are left out). Exact, by popcounts
    over the bitmasks; nothing is decoded. An expert that decodes to zeros has cosine 0."""
    exps = _open(experts)
    m = _similarity(_check_alike(exps))
    return _torch().from_numpy(np.asarray(m).reshape(len(exps), len(exps)))


def write_merged(result: Union[Dict[str, Any], CompressedExpert], like: CompressedExpert, out: PathLike, *,
                 config: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> Path:
    """For the CLI: a CompressedExpert is saved as a file; merged task vectors of PEFT experts
    become a PEFT folder (``config``, by default the first expert's adapter config; tensors in
    their original dtypes)."""
    if isinstance(result, CompressedExpert):
        return result.save(out)
    config = config if config is not None else like.peft_config
    if config is None:
        raise ValueError("the experts were not made from PEFT adapters; give -k to write a compressed expert")
    from ._expert import reconstruct
    from ._peft import write_peft_folder

    state = {}
    for n, t in result.items():
        init = like.init_of(n)
        if init == "base":
            raise ValueError(f"tensor {n!r} is a full fine-tune's residual; a PEFT folder cannot hold it")
        state[n] = reconstruct(init, t, None, like.dtype_of(n))
    return write_peft_folder(state, config, out, overwrite=overwrite)
