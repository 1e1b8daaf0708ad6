"""What each tensor of an expert is: the one rule every path asks (DESIGN.md section 7).

A tensor is compressed as a delta from theta_init, where theta_init is

- ``"zero"``: LoRA factors (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``),
  and every float tensor of a plain dict or file that holds no adapter tensor at all (it is then
  taken as a task vector, as :func:`compeft_rs.encode` takes a tensor);
- ``"one"``: (IA)3 scaling vectors (``ia3_l``);
- ``"base"``: a full fine-tune's tensor that the base checkpoint has, with the same shape;

or kept exactly (stored as itself): non-float tensors, DoRA magnitudes (``lora_magnitude_vector``),
``modules_to_save`` copies, tensors the base lacks, and in an adapter anything that is not a known
delta (classifier heads, biases). Adapters whose factors are not deltas from 0 (PiSSA, OLoRA,
CorDA, LoftQ initialisations) and PEFT types other than LoRA and (IA)3 are refused with an error
that says why. Names are matched on their dot-separated segments, never on substrings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["TensorPlan", "plan_expert", "FLOAT_NAMES"]

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")

LORA_FACTORS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})
IA3_VECTORS = frozenset({"ia3_l"})
DORA_MAGNITUDES = frozenset({"lora_magnitude_vector"})
SAVED_MODULES = frozenset({"modules_to_save"})
# Segments of PEFT methods whose tensors are not deltas from 0 or 1 that we know how to restore.
FOREIGN_SEGMENTS = {
    "lora_E": "AdaLoRA",
    "ranknum": "AdaLoRA",
}
FOREIGN_PREFIXES = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "vera_": "VeRA",
    "oft_": "OFT",
    "boft_": "BOFT",
    "fourierft_": "FourierFT",
    "bone_": "Bone",
    "hra_": "HRA",
    "vblora_": "VB-LoRA",
    "randlora_": "RandLora",
    "shira_": "SHiRA",
    "ln_tuning_": "LN tuning",
}
SUPPORTED_PEFT_TYPES = ("LORA", "IA3")
# init_lora_weights values after which lora_A/lora_B are not deltas from 0 (the base weight was
# changed to make room for them).
NONZERO_LORA_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is stored: ``init`` is "zero", "one" or "base" for a compressed delta, or
    None for a tensor kept exactly; ``reason`` says why, in words."""

    init: Optional[str]
    reason: str

    @property
    def exact(self) -> bool:
        return self.init is None


Meta = Tuple[str, Tuple[int, ...]]  # (dtype name, shape)


def _segments(name: str) -> Sequence[str]:
    return name.split(".")


_PREFIXES = tuple(FOREIGN_PREFIXES)


def _foreign(name: str) -> Optional[str]:
    for seg in _segments(name):
        if seg in FOREIGN_SEGMENTS:
            return FOREIGN_SEGMENTS[seg]
        if seg.startswith(_PREFIXES):
            return next(m for p, m in FOREIGN_PREFIXES.items() if seg.startswith(p))
    return None


def is_ia3_vector(name: str) -> bool:
    """Whether a tensor name is an (IA)3 scaling vector."""
    return bool(set(_segments(name)) & IA3_VECTORS)


def is_adapter_tensor(name: str) -> bool:
    """Whether a tensor name is a LoRA factor, an (IA)3 vector or a DoRA magnitude."""
    segs = set(_segments(name))
    return bool(segs & (LORA_FACTORS | IA3_VECTORS | DORA_MAGNITUDES))


def check_peft_config(config: Optional[Mapping[str, Any]]) -> None:
    """Refuses adapter configs whose tensors we cannot compress as deltas from 0 or 1."""
    if config is None:
        return
    ptype = str(config.get("peft_type", "")).split(".")[-1].upper()
    if ptype and ptype not in SUPPORTED_PEFT_TYPES:
        raise ValueError(
            f"PEFT type {ptype} is not supported: compeft-rs compresses LoRA (DoRA included) and (IA)3 "
            "adapters, whose tensors are deltas from 0 or 1; other methods' tensors are not"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(NONZERO_LORA_INITS):
        raise ValueError(
            f"init_lora_weights={init!r}: these LoRA factors do not start from 0 (the base weights were "
            "changed for them), so they are not deltas ComPEFT can compress. Convert the adapter to a plain "
            "LoRA first: model.save_pretrained(out, path_initial_model_for_weight_conversion=<initial adapter>)"
        )


def plan_expert(
    tensors: Mapping[str, Meta],
    *,
    peft_config: Optional[Mapping[str, Any]] = None,
    base: Optional[Mapping[str, Meta]] = None,
) -> Dict[str, TensorPlan]:
    """The plan of every tensor, from names, dtypes and shapes only (nothing is read).

    Raises ValueError for an unsupported adapter (naming the tensor or config field) and for a
    tensor whose shape differs from the base's.
    """
    check_peft_config(peft_config)
    adapter = peft_config is not None or any(is_adapter_tensor(n) for n in tensors)
    plans: Dict[str, TensorPlan] = {}
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        method = _foreign(name)
        if method is not None:
            raise ValueError(
                f"tensor {name!r} belongs to a {method} adapter, which is not supported: compeft-rs "
                "compresses LoRA (DoRA included) and (IA)3 adapters"
            )
        segs = set(_segments(name))
        if dtype not in FLOAT_NAMES:
            plans[name] = TensorPlan(None, f"{dtype} is not a float type")
        elif base is not None:
            if name not in base:
                plans[name] = TensorPlan(None, "not in the base checkpoint")
                continue
            bshape = tuple(base[name][1])
            if bshape != tuple(shape):
                raise ValueError(
                    f"tensor {name!r}: shape {tuple(shape)} in the fine-tune but {bshape} in the base"
                )
            if base[name][0] not in FLOAT_NAMES:
                plans[name] = TensorPlan(None, f"{base[name][0]} in the base, not a float type")
            else:
                plans[name] = TensorPlan("base", "fine-tuned weight, delta from the base")
        elif segs & LORA_FACTORS:
            plans[name] = TensorPlan("zero", "LoRA factor, delta from 0")
        elif segs & IA3_VECTORS:
            plans[name] = TensorPlan("one", "(IA)3 vector, delta from 1")
        elif segs & DORA_MAGNITUDES:
            plans[name] = TensorPlan(None, "DoRA magnitude, not a delta")
        elif segs & SAVED_MODULES:
            plans[name] = TensorPlan(None, "modules_to_save copy, not a delta")
        elif adapter:
            plans[name] = TensorPlan(None, "not a LoRA factor or (IA)3 vector")
        else:
            plans[name] = TensorPlan("zero", "task vector, delta from 0")
    return plans
