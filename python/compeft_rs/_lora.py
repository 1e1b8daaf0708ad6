"""LoRA scaling as peft computes it, for the paths that must give what peft gives: swapping an
expert into a live adapter slot and merging LoRA experts.

A LoRA layer adds ``scaling * B @ A`` to its base output, ``scaling = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with ``use_rslora``), where ``alpha_pattern`` and ``rank_pattern`` override
``lora_alpha`` and ``r`` for the modules whose name ends with a pattern (peft's
``get_pattern_key``: the pattern is a regular expression matched against the whole module name,
after an optional dotted prefix).
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["lora_factor", "module_scaling", "expert_scalings", "merged_lora_config"]

# Factor segment -> which side it is; peft puts a negative merge weight's sign on the A side.
_FACTORS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
_PREFIX = "base_model.model."


def lora_factor(name: str) -> Optional[Tuple[str, str]]:
    """(module name in the base model, side) for a LoRA tensor's state-dict name, else None; side
    is "A" or "B" for the factors and "bias" for lora_B's bias (``lora_bias=True``), which the
    layer adds as ``scaling * bias``: it is not one of a product's two factors.
    ``base_model.model.enc.q.lora_A.weight`` -> ("enc.q", "A")."""
    segs = name.split(".")
    for i, seg in enumerate(segs):
        if seg in _FACTORS:
            module = ".".join(segs[:i])
            if module.startswith(_PREFIX):
                module = module[len(_PREFIX):]
            side = "bias" if segs[-1] == "bias" and _FACTORS[seg] == "B" else _FACTORS[seg]
            return module, side
    return None


def _pattern(patterns: Mapping[str, Any], module: str) -> Optional[str]:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_scaling(config: Mapping[str, Any], module: str) -> float:
    """The scaling peft gives ``module``'s LoRA layer under an adapter config (a dict as in
    adapter_config.json)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk, ak = _pattern(rank_pattern, module), _pattern(alpha_pattern, module)
    r = rank_pattern[rk] if rk is not None else config.get("r", 8)
    alpha = alpha_pattern[ak] if ak is not None else config.get("lora_alpha", 8)
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora", False) else float(r))


def expert_scalings(config: Optional[Mapping[str, Any]], names: Any) -> Dict[str, float]:
    """Module name -> scaling for every LoRA module among the tensor ``names``."""
    if config is None:
        return {}
    out: Dict[str, float] = {}
    for n in names:
        f = lora_factor(n)
        if f is not None and f[0] not in out:
            out[f[0]] = module_scaling(config, f[0])
    return out


def describe(config: Mapping[str, Any], module: str) -> str:
    """The config fields behind a module's scaling, for error messages."""
    parts = [f"lora_alpha={config.get('lora_alpha', 8)}", f"r={config.get('r', 8)}"]
    if config.get("use_rslora"):
        parts.append("use_rslora=True")
    for field in ("alpha_pattern", "rank_pattern"):
        pat = config.get(field) or {}
        key = _pattern(pat, module)
        if key is not None:
            parts.append(f"{field}[{key!r}]={pat[key]}")
    return ", ".join(parts)


def merged_lora_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` with every module's scaling set to 1 (lora_alpha = r per module, no rsLoRA), for
    factors that carry their experts' scalings themselves, as peft's ``add_weighted_adapter``
    makes them. Ranks (``r``, ``rank_pattern``) are kept."""
    out = dict(config)
    rank_pattern = dict(config.get("rank_pattern") or {})
    out["lora_alpha"] = config.get("r", 8)
    out["alpha_pattern"] = rank_pattern
    out["use_rslora"] = False
    return out
