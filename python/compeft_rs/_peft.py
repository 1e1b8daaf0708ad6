"""PEFT adapters: compress a folder or a PeftModel, rebuild a folder, load straight into a model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from ._core import CompeftError
from ._expert import CompressedExpert, PathLike, _torch, compress_expert, load_expert
from ._allocate import check_allocate
from ._gauge import check_gauge
from ._io import atomic_dir

__all__ = ["compress_peft", "save_peft", "load_peft", "is_peft_folder", "read_peft_folder"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"


def is_peft_folder(path: PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_peft_folder(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(state dict, adapter config) of a PEFT adapter folder."""
    p = Path(path)
    if not is_peft_folder(p):
        raise ValueError(f"{p} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = json.loads((p / ADAPTER_CONFIG).read_text())
    except ValueError as e:
        raise ValueError(f"{p / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{p / ADAPTER_CONFIG} does not hold a JSON object")
    if (p / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p / ADAPTER_WEIGHTS))
        except Exception as e:  # safetensors raises its own error types for bad files
            raise CompeftError(f"{p / ADAPTER_WEIGHTS} is not a readable safetensors file: {e}") from None
    elif (p / ADAPTER_WEIGHTS_BIN).is_file():
        sd = _torch().load(str(p / ADAPTER_WEIGHTS_BIN), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{p} has {ADAPTER_CONFIG} but neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}")
    return sd, config


def _config_dict(config: Any) -> Dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Sets (target_modules) and enums become JSON-friendly values.
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def compress_peft(
    adapter: Union[PathLike, Any],
    k: float,
    alpha: float = 1.0,
    *,
    scope: Optional[str] = None,
    scale: Optional[str] = None,
    encoding: str = "golomb",
    adapter_name: Optional[str] = None,
    gauge: str = "balanced",
    allocate: str = "uniform",
) -> CompressedExpert:
    """Compresses a PEFT adapter: a folder (adapter_config.json + weights) or a PeftModel in memory.

    LoRA factors are compressed themselves (theta_init = 0), (IA)3 vectors from 1; DoRA
    magnitudes, modules_to_save copies, heads and non-float tensors are kept exactly; other PEFT
    types and LoRA initialisations that change the base (PiSSA, OLoRA, CorDA, LoftQ) are refused.
    The adapter config travels in the file. For a PeftModel, ``adapter_name`` defaults to the
    active adapter. ``scope``, ``scale``, ``gauge`` (``"balanced"``, the default, compresses each
    LoRA pair in the gauge of its product's SVD; ``"as_trained"`` the factors as given) and ``allocate`` (``"error"``: a density per
    LoRA pair within the bytes of density k) as in :func:`compeft_rs.compress_expert`.
    """
    if isinstance(adapter, (str, os.PathLike)):
        sd, config = read_peft_folder(adapter)
    else:
        from peft import get_peft_model_state_dict

        name = adapter_name or active_adapter(adapter)
        if not hasattr(adapter, "peft_config") or name not in adapter.peft_config:
            raise TypeError("expected a PEFT adapter folder or a peft.PeftModel")
        sd = {k_: v.detach().cpu() for k_, v in get_peft_model_state_dict(adapter, adapter_name=name).items()}
        config = _config_dict(adapter.peft_config[name])
    check_gauge(gauge)  # before the adapter is read
    check_allocate(allocate, scope or "per_tensor", encoding)
    return compress_expert(sd, k, alpha, scope=scope, scale=scale, encoding=encoding, peft_config=config,
                           gauge=gauge, allocate=allocate)


def adapter_state_dict(expert: CompressedExpert) -> Dict[str, Any]:
    """The reconstructed adapter weights (LoRA factors; 1 + tau for (IA)3), original dtypes."""
    return expert.apply()


def save_peft(expert: Union[CompressedExpert, PathLike], out_dir: PathLike, *, overwrite: bool = False) -> Path:
    """Writes a folder that ``peft.PeftModel.from_pretrained`` loads (adapter_config.json and
    adapter_model.safetensors). Built beside ``out_dir`` and renamed into place; with
    ``overwrite`` an existing folder is replaced only if it holds nothing but those two files."""
    if not isinstance(expert, CompressedExpert):
        expert = load_expert(expert)
    if expert.peft_config is None:
        raise ValueError("this expert was not made from a PEFT adapter (no adapter config in it)")
    return write_peft_folder(adapter_state_dict(expert), expert.peft_config, out_dir, overwrite=overwrite)


def write_peft_folder(state: Dict[str, Any], config: Dict[str, Any], out_dir: PathLike, *,
                      overwrite: bool = False) -> Path:
    """adapter_config.json and adapter_model.safetensors, built beside ``out_dir`` and renamed in."""

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return atomic_dir(out_dir, build, (ADAPTER_CONFIG, ADAPTER_WEIGHTS), overwrite=overwrite)


def active_adapter(model: Any) -> str:
    """The name of a PeftModel's active adapter."""
    name = getattr(model, "active_adapter", "default")
    if isinstance(name, (list, tuple)):  # several active adapters: the first one
        name = name[0]
    return str(name)


def load_peft(model: Any, source: Union[CompressedExpert, PathLike], adapter_name: str = "default") -> Any:
    """Wraps a base transformers model in a PeftModel with the decompressed adapter, in memory
    (no folder is written)."""
    import peft
    from peft.config import PeftConfig

    expert = source if isinstance(source, CompressedExpert) else load_expert(source)
    if expert.peft_config is None:
        raise ValueError("this expert was not made from a PEFT adapter (no adapter config in it)")
    cfg = dict(expert.peft_config)
    config = PeftConfig.from_peft_type(**cfg)
    config.inference_mode = True
    pm = peft.get_peft_model(model, config, adapter_name=adapter_name)
    result = peft.set_peft_model_state_dict(pm, adapter_state_dict(expert), adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if adapter_name in k or "lora" in k]
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: unexpected keys {unexpected[:3]}")
    pm.eval()
    return pm
