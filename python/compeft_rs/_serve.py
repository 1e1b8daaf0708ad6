"""Serving many experts: decode a compressed expert in place into a live PeftModel's adapter."""

from __future__ import annotations

import functools
import json
import math
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ._arrays import tensor_view
from ._core import decode_streams as _decode_streams
from ._expert import CompressedExpert, PathLike, _dtype_str, _torch, load_expert
from ._lora import describe, lora_factor, module_scaling
from ._peft import _config_dict, active_adapter

__all__ = ["load_into"]

# Entries expanded per step on a device: the extra device memory is a few bytes per entry of
# one chunk (the 2-bit form and two boolean masks), whatever the adapter's size.
DEVICE_CHUNK = 1 << 22

_FLOATS = ("float16", "bfloat16", "float32", "float64")


_LAYER_SEGMENTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                             "ia3_l"})


def _adapter_slot(model: Any, name: str) -> Tuple[Dict[str, Any], List[Tuple[Optional[str], Any]]]:
    """The adapter's tensors under the names a PEFT state dict (and so an expert) uses, each
    sharing storage with the parameter it comes from; and its tuner layers (modules holding
    ``scaling`` and ``merged_adapters``), once each, with the LoRA module name of each (None for
    other layers).

    peft's ``get_peft_model_state_dict`` walks every module of the model (about 25 ms for a
    7B-shaped model, three times the decode itself), so the slot is kept per model and adapter
    (:class:`_Slot`) and checked on every call: the adapter's config the same object with the same
    fields and targets, every parameter still the one the module at its path holds."""
    if not isinstance(getattr(model, "peft_config", None), dict):
        raise TypeError(f"load_into takes a peft PeftModel (with the adapter slot to fill), not a {type(model).__name__}")
    if name not in model.peft_config:
        known = sorted(getattr(model, "peft_config", {}))
        raise ValueError(f"the model has no adapter {name!r} (it has {known}); load one first, e.g. "
                         "with peft's add_adapter or load_adapter, then swap experts into it")
    key = _slot_key(model, name)
    slots = _SLOTS.setdefault(model, {})
    cached = slots.get(name)
    if cached is not None and cached.key[0] is key[0] and cached.key[1:] == key[1:]:
        found = cached.resolve(model)
        if found is not None:
            return found
    slot = _Slot.of(model, name, key)
    slots[name] = slot
    found = slot.resolve(model)
    if found is None:
        raise RuntimeError(f"adapter {name!r} changed while it was being looked up; try again")
    return found


class _Slot:
    """An adapter slot as paths in the model's module tree: every module on the way to its
    parameters and layers once (``edges``: parent's index and the name it holds the module under;
    index 0 is the model, parents come first), each parameter as (module index, name, is a buffer, weak
    reference), each tuner layer as (module index, LoRA module name or None). Resolving it walks
    the live tree, each module once (a 7B-shaped slot has some 700), not once per parameter, and
    finds every parameter still the one recorded."""

    def __init__(self, key: Tuple[Any, ...]) -> None:
        self.key = key
        self.edges: List[Tuple[int, str]] = []
        self.params: Dict[str, Tuple[int, str, bool, Any]] = {}
        self.layers: List[Tuple[int, Optional[str]]] = []
        self._index: Dict[Tuple[str, ...], int] = {(): 0}

    def _node(self, path: Tuple[str, ...]) -> int:
        i = self._index.get(path)
        if i is None:
            self.edges.append((self._node(path[:-1]), path[-1]))
            i = self._index[path] = len(self.edges)
        return i

    @classmethod
    def of(cls, model: Any, name: str, key: Tuple[Any, ...]) -> "_Slot":
        """From peft's own state dict, whose tensors must share storage with the model's."""
        from peft.utils import get_peft_model_state_dict

        slot = cls(key)
        sd = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
        storage = {p.data_ptr(): (n, p, False) for n, p in model.named_parameters()}
        storage.update({b.data_ptr(): (n, b, True) for n, b in model.named_buffers()})
        layers: Dict[Tuple[str, ...], Optional[str]] = {}
        for n, t in sd.items():
            full, p, is_buffer = storage.get(t.data_ptr(), (None, None, False))
            if p is None or p.shape != t.shape or p.dtype != t.dtype:
                raise RuntimeError(f"peft returned a copy of {n!r}, not the parameter itself; load_into cannot write "
                                   "it in place (use compeft_rs.load_peft or peft's set_peft_model_state_dict)")
            path = tuple(full.split("."))
            slot.params[n] = (slot._node(path[:-1]), path[-1], is_buffer, weakref.ref(p))
            i = next((i for i, atom in enumerate(path) if atom in _LAYER_SEGMENTS), None)
            if i is not None and layers.get(path[:i]) is None:
                # A layer's LoRA module name from any of its factors (a DoRA magnitude may come first).
                f = lora_factor(n)
                layers[path[:i]] = f[0] if f is not None else None
        slot.layers = [(slot._node(path), module) for path, module in layers.items()]
        del slot._index
        return slot

    def resolve(self, model: Any) -> Optional[Tuple[Dict[str, Any], List[Tuple[Optional[str], Any]]]]:
        """The slot's tensors and layers, or None if a path is gone or holds another parameter
        (replaced, or the adapter deleted and added again: look the slot up anew)."""
        mods = [model]
        for parent, atom in self.edges:
            m = mods[parent]._modules.get(atom)
            if m is None:
                return None
            mods.append(m)
        tensors = {}
        for n, (i, leaf, is_buffer, ref) in self.params.items():
            m = mods[i]
            p = (m._buffers if is_buffer else m._parameters).get(leaf)
            if p is None or p is not ref():
                return None
            tensors[n] = p.detach()
        return tensors, [(module, mods[i]) for i, module in self.layers]


# Per model (weakly, so a model is never kept alive by it): adapter name -> its _Slot.
_SLOTS: "weakref.WeakKeyDictionary[Any, Dict[str, _Slot]]" = weakref.WeakKeyDictionary()


def _slot_key(model: Any, name: str) -> Tuple[Any, ...]:
    """What changes when peft adds, removes, re-targets or reconfigures an adapter (its config is
    replaced or changed); parameters replaced in place are caught by the slot's own check."""
    cfg = model.peft_config[name]
    targeted = getattr(getattr(model, "base_model", None), "targeted_module_names", None)
    # The config object itself (held, so that its id cannot be reused by a new one) and its
    # fields (a config changed in place: use_dora, lora_bias, targets).
    return (cfg, repr(cfg), len(targeted) if targeted is not None else None)


def _rank_hint(name: str, a: Tuple[int, ...], b: Tuple[int, ...]) -> str:
    seg = name.split(".")
    if len(a) == 2 and len(b) == 2:
        if "lora_A" in seg or "lora_embedding_A" in seg:
            return f" (rank {a[0]} in the expert, {b[0]} in the adapter)"
        if "lora_B" in seg or "lora_embedding_B" in seg:
            return f" (rank {a[1]} in the expert, {b[1]} in the adapter)"
    return ""


def _check(expert: CompressedExpert, targets: Dict[str, Any], adapter: str, peft_type: Optional[str],
           streams: Dict[str, Any]) -> None:
    """Every difference between the expert and the adapter slot, before anything is written."""
    cfg = expert.peft_config or {}
    if peft_type is not None and cfg.get("peft_type") not in (None, peft_type):
        raise ValueError(f"the expert is a {cfg.get('peft_type')} adapter, adapter {adapter!r} is {peft_type}")
    missing = sorted(set(targets) - set(expert.keys()))
    extra = sorted(set(expert.keys()) - set(targets))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors of the adapter are not in the expert (first: {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} tensors of the expert are not in the adapter (first: {extra[0]!r})")
        raise ValueError(f"the expert does not fit adapter {adapter!r}: " + "; ".join(parts)
                         + ". Was it made from an adapter with the same target modules?")
    for n, t in targets.items():
        init = expert.init_of(n)
        if init == "base":
            raise ValueError(f"{n!r} is stored as a residual of a base model, not as adapter weights; "
                             "this expert is a full fine-tune: use compeft_rs.apply_checkpoint")
        s = streams.get(n)
        shape = tuple(s.shape) if s is not None else tuple(expert._entries[expert._keys[n]][1])
        if shape != tuple(t.shape):
            raise ValueError(f"{n!r} has shape {shape} in the expert but {tuple(t.shape)} in adapter {adapter!r}"
                             + _rank_hint(n, shape, tuple(t.shape)))
        # The parsed stream's dtype: dtype_of would parse the stream again.
        have, want = (expert._orig_dtype(n, s) if s is not None else expert.dtype_of(n)), _dtype_str(t)
        if have != want and not (have in _FLOATS and want in _FLOATS):
            raise ValueError(f"{n!r} is {have} in the expert but {want} in adapter {adapter!r}; "
                             "only floating-point tensors are converted")


@functools.lru_cache(maxsize=64)
def _expert_scalings(config_key: str, modules: Tuple[str, ...]) -> Tuple[float, ...]:
    config = json.loads(config_key)
    return tuple(module_scaling(config, m) for m in modules)


def _check_slot(model: Any, expert: CompressedExpert, name: str, layers: List[Tuple[Optional[str], Any]]) -> None:
    """Refuses a slot whose adapter is merged into the base weights, and a LoRA expert whose
    scaling (lora_alpha, r, use_rslora, alpha_pattern, rank_pattern) differs from what the slot's
    layers apply: peft would apply the slot's, silently changing the expert's outputs. An expert
    without an adapter config cannot say its scaling: it takes the slot's."""
    for _, layer in layers:
        if name in (getattr(layer, "merged_adapters", None) or ()):
            raise ValueError(f"adapter {name!r} is merged into the base weights: swapping it now would change "
                             "nothing until unmerge_adapter(), which would then subtract the new expert from "
                             "weights that hold the old one. Call model.unmerge_adapter() first, then merge "
                             "again after the swap if you want it merged")
    ecfg = expert.peft_config
    if ecfg is None or str(ecfg.get("peft_type", "LORA")).upper() != "LORA":
        return
    lora = [(m, layer) for m, layer in layers if m is not None]
    key = json.dumps({f: ecfg.get(f) for f in ("lora_alpha", "r", "use_rslora", "alpha_pattern", "rank_pattern")},
                     sort_keys=True)
    wants = _expert_scalings(key, tuple(m for m, _ in lora))
    for (module, layer), want in zip(lora, wants):
        scaling = getattr(layer, "scaling", None)
        have = scaling.get(name) if isinstance(scaling, dict) else None
        if have is None or math.isclose(float(have), want, rel_tol=1e-9, abs_tol=0.0):
            continue
        scfg = _config_dict(model.peft_config[name])
        raise ValueError(
            f"the expert's LoRA scaling for {module!r} is {want:g} ({describe(ecfg, module)}) but adapter "
            f"{name!r} applies {float(have):g} ({describe(scfg, module)}), which would scale the expert's "
            "update by {:g}. Make the slot with the expert's config (compeft_rs.load_peft, or peft's "
            "add_adapter with LoraConfig(**expert.peft_config)) or swap in experts trained with the "
            "slot's. (Inside peft's rescale_adapter_scale context the slot's scaling is changed on "
            "purpose: swap outside it.)".format(float(have) / want if want else float("inf")))


def _expand_into(stream: Any, out: Any) -> None:
    """Writes a stream's values into a device tensor in place, DEVICE_CHUNK entries at a time."""
    torch = _torch()
    flat = out.view(-1)
    pos, neg = stream.masks()
    pos8, neg8 = pos.view(np.uint8), neg.view(np.uint8)
    dt = out.dtype
    # Same rounding as the CPU decoder: exact for float64, else f64 -> f32 -> dtype.
    s = stream.scale if dt == torch.float64 else torch.tensor(stream.scale, dtype=torch.float32).to(dt).item()
    shifts = torch.arange(8, dtype=torch.uint8, device=out.device)
    numel = stream.numel
    for a in range(0, numel, DEVICE_CHUNK):
        b = min(numel, a + DEVICE_CHUNK)  # a is a multiple of 8: whole bytes
        lo, hi = a // 8, (b + 7) // 8
        p = torch.from_numpy(pos8[lo:hi].copy()).to(out.device, non_blocking=True)
        n = torch.from_numpy(neg8[lo:hi].copy()).to(out.device, non_blocking=True)
        pm = ((p.unsqueeze(1) >> shifts) & 1).reshape(-1)[: b - a].bool()
        nm = ((n.unsqueeze(1) >> shifts) & 1).reshape(-1)[: b - a].bool()
        part = flat[a:b]
        part.zero_()
        part.masked_fill_(pm, s)
        part.masked_fill_(nm, -s)


def load_into(model: Any, expert: Union[CompressedExpert, PathLike], adapter_name: Optional[str] = None) -> str:
    """Decodes a compressed PEFT expert straight into the parameters of a live ``PeftModel``'s
    adapter (the active one by default), in place: no new parameters, no dense state dict, other
    adapters untouched. Returns the adapter's name.

    Names, shapes (so the rank), dtypes and the adapter type are checked first, and every stream
    is parsed and checked; on any mismatch nothing is written and the ``ValueError`` says what
    differs. The slot must apply the expert's own LoRA scaling (``lora_alpha``, ``r``,
    ``use_rslora``, ``alpha_pattern``, ``rank_pattern``, compared module by module with the
    layers' ``scaling``), else the swap is refused (peft would scale the expert's update by the
    slot's factor); an expert without an adapter config takes the slot's scaling. A slot whose
    adapter is merged into the base weights is refused too (unmerge first). CPU parameters are written by the Rust decoder directly, in one parallel call; CUDA
    parameters get the stream's 2-bit form uploaded and expanded on the device in chunks of
    ``DEVICE_CHUNK`` entries. Tensors kept exactly (heads, DoRA magnitudes) are copied in, and
    floating-point values are converted to the parameter's dtype, as ``set_peft_model_state_dict``
    does. Which parameters make up the adapter is worked out once per model and adapter and
    rechecked on every call (cheaply), so repeated swaps into one slot skip peft's walk over the
    whole model; replacing parameters, moving or casting the model, or deleting and re-adding the
    adapter are all seen by the next call.
    """
    torch = _torch()
    exp = expert if isinstance(expert, CompressedExpert) else load_expert(expert)
    name = adapter_name or active_adapter(model)
    targets, layers = _adapter_slot(model, name)
    cfg = model.peft_config[name]
    peft_type = getattr(getattr(cfg, "peft_type", None), "value", None)
    compressed = exp.compressed_keys()
    streams = dict(zip(compressed, exp._parse(compressed)))
    _check(exp, targets, name, peft_type, streams)
    _check_slot(model, exp, name, layers)
    exact = {n: exp.lossless(n) for n in exp.lossless_keys()}

    direct: List[str] = []
    with torch.no_grad():
        for n in compressed:
            t, init = targets[n], exp.init_of(n)
            if init == "zero" and t.is_cpu and t.is_contiguous():
                direct.append(n)
            elif init == "zero":
                if t.is_cpu:  # not contiguous: decode beside, then copy
                    tmp = torch.empty(t.shape, dtype=t.dtype)
                    _decode_streams([streams[n]], [n], [tensor_view(tmp)], [_dtype_str(t)])
                    t.copy_(tmp)
                else:
                    _expand_into(streams[n], t)
            else:  # (IA)3: 1 + tau, summed in float32 as apply() does
                tau = torch.empty(t.shape, dtype=torch.float32)
                _decode_streams([streams[n]], [n], [tau.numpy()], ["float32"])
                t.copy_((tau + 1.0).to(t.dtype))
        if direct:
            _decode_streams([streams[n] for n in direct], direct, [tensor_view(targets[n]) for n in direct],
                            [_dtype_str(targets[n]) for n in direct])
        for n, v in exact.items():
            targets[n].copy_(v)
    return name
