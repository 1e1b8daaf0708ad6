"""Serving many experts: decode a compressed expert in place into a live PeftModel's adapter."""

from __future__ import annotations

import functools
import json
import math
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ._core import decode_streams as _decode_streams
from ._expert import CompressedExpert, PathLike, _dtype_str, _torch, load_expert
from ._lora import describe, lora_factor, module_scaling
from ._peft import _config_dict, active_adapter

__all__ = ["load_into"]

# Entries expanded per step on a device: the extra device memory is a few bytes per entry of
# one chunk (the 2-bit form and two boolean masks), whatever the adapter's size.
DEVICE_CHUNK = 1 << 22

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _numpy_view(t: Any) -> np.ndarray:
    """A numpy array over a contiguous CPU tensor's own memory (uint16 for half types)."""
    torch = _torch()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return t.numpy().view(np.uint16)
    return t.numpy()


def _adapter_tensors(model: Any, name: str) -> Dict[str, Any]:
    """The adapter's tensors under the names a PEFT state dict (and so an expert) uses, each
    sharing storage with the parameter it comes from.

    peft's ``get_peft_model_state_dict`` walks every module of the model (about 25 ms for a
    7B-shaped model, three times the decode itself), so the map from names to parameters is kept
    per model and adapter and checked on every call: the adapter's config the same object with the
    same targets, and every parameter still the one its module holds under its name."""
    if not isinstance(getattr(model, "peft_config", None), dict):
        raise TypeError(f"load_into takes a peft PeftModel (with the adapter slot to fill), not a {type(model).__name__}")
    if name not in model.peft_config:
        known = sorted(getattr(model, "peft_config", {}))
        raise ValueError(f"the model has no adapter {name!r} (it has {known}); load one first, e.g. "
                         "with peft's add_adapter or load_adapter, then swap experts into it")
    key = _slot_key(model, name)
    slots = _SLOTS.setdefault(model, {})
    cached = slots.get(name)
    if cached is not None and cached[0] == key:
        out = {}
        for sd_name, (path, ref, is_buffer) in cached[1].items():
            p = ref()
            if p is None or _held(model, path, is_buffer) is not p:
                break
            out[sd_name] = p.detach()
        else:
            return out
    entries = _slot_entries(model, name)
    slots[name] = (key, entries)
    return {n: ref().detach() for n, (_, ref, _) in entries.items()}


# Per model (weakly, so a model is never kept alive by it): adapter name -> (config key, entries).
_SLOTS: "weakref.WeakKeyDictionary[Any, Dict[str, Any]]" = weakref.WeakKeyDictionary()


def _slot_key(model: Any, name: str) -> Tuple[Any, ...]:
    """What changes when peft adds, removes or re-targets an adapter (its config is replaced or its
    target lists change); parameters replaced in place are caught by the per-tensor check."""
    cfg = model.peft_config[name]
    targeted = getattr(getattr(model, "base_model", None), "targeted_module_names", None)
    return (id(cfg), repr(getattr(cfg, "target_modules", None)), repr(getattr(cfg, "modules_to_save", None)),
            len(targeted) if targeted is not None else None)


def _held(model: Any, path: Tuple[str, ...], is_buffer: bool) -> Any:
    """The parameter (or buffer) a module of the model holds under the dotted path, or None; by
    the modules' own dicts, as named_parameters names them (module __getattr__ is slow)."""
    mod = model
    for atom in path[:-1]:
        mod = mod._modules.get(atom)
        if mod is None:
            return None
    return (mod._buffers if is_buffer else mod._parameters).get(path[-1])


def _slot_entries(model: Any, name: str) -> Dict[str, Tuple[Tuple[str, ...], Any, bool]]:
    """State-dict name -> (path of the parameter or buffer, weak reference to it, is a buffer), from
    peft's own state dict, whose tensors must share storage with the model's."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    storage = {p.data_ptr(): (n, p, False) for n, p in model.named_parameters()}
    storage.update({b.data_ptr(): (n, b, True) for n, b in model.named_buffers()})
    entries = {}
    for n, t in sd.items():
        full, p, is_buffer = storage.get(t.data_ptr(), (None, None, False))
        if p is None or p.shape != t.shape or p.dtype != t.dtype:
            raise RuntimeError(f"peft returned a copy of {n!r}, not the parameter itself; load_into cannot write "
                               "it in place (use compeft_rs.load_peft or peft's set_peft_model_state_dict)")
        entries[n] = (tuple(full.split(".")), weakref.ref(p), is_buffer)
    return entries


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
        shape = tuple(streams[n].shape) if n in streams else tuple(expert._entries[expert._keys[n]][1])
        if shape != tuple(t.shape):
            raise ValueError(f"{n!r} has shape {shape} in the expert but {tuple(t.shape)} in adapter {adapter!r}"
                             + _rank_hint(n, shape, tuple(t.shape)))
        have, want = expert.dtype_of(n), _dtype_str(t)
        if have != want and not (have in _FLOATS and want in _FLOATS):
            raise ValueError(f"{n!r} is {have} in the expert but {want} in adapter {adapter!r}; "
                             "only floating-point tensors are converted")


_LAYER_SEGMENTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                             "ia3_l"})
# Per model (weakly): adapter name -> (the slot's entries object, [(path, module name or None,
# weak reference to the layer)]).
_LAYERS: "weakref.WeakKeyDictionary[Any, Dict[str, Any]]" = weakref.WeakKeyDictionary()


def _slot_layers(model: Any, name: str) -> List[Tuple[Optional[str], Any]]:
    """The tuner layers (modules holding ``scaling`` and ``merged_adapters``) of the adapter slot,
    once each, with the LoRA module name of each (None for other layers). The list is kept with
    the slot's parameter map and each layer rechecked on every call, as parameters are: still the
    module the model holds at its path."""
    entries = _SLOTS[model][name][1]
    cached = _LAYERS.setdefault(model, {}).get(name)
    if cached is not None and cached[0] is entries:
        out = []
        for path, module, ref in cached[1]:
            layer = ref()
            if layer is None or _held_module(model, path) is not layer:
                break
            out.append((module, layer))
        else:
            return out
    found: Dict[Tuple[str, ...], Optional[str]] = {}
    for sd_name, (path, _, _) in entries.items():
        i = next((i for i, atom in enumerate(path) if atom in _LAYER_SEGMENTS), None)
        if i is None:
            continue
        f = lora_factor(sd_name)
        # A layer's LoRA module name from any of its factors (a DoRA magnitude may come first).
        if found.get(path[:i]) is None:
            found[path[:i]] = f[0] if f is not None else None
    layers = [(path, module, _held_module(model, path)) for path, module in found.items()]
    layers = [(path, module, layer) for path, module, layer in layers if layer is not None]
    _LAYERS[model][name] = (entries, [(path, module, weakref.ref(layer)) for path, module, layer in layers])
    return [(module, layer) for _, module, layer in layers]


def _held_module(model: Any, path: Tuple[str, ...]) -> Any:
    mod = model
    for atom in path:
        mod = mod._modules.get(atom)
        if mod is None:
            return None
    return mod


@functools.lru_cache(maxsize=64)
def _expert_scalings(config_key: str, modules: Tuple[str, ...]) -> Tuple[float, ...]:
    config = json.loads(config_key)
    return tuple(module_scaling(config, m) for m in modules)


def _check_slot(model: Any, expert: CompressedExpert, name: str) -> None:
    """Refuses a slot whose adapter is merged into the base weights, and a LoRA expert whose
    scaling (lora_alpha, r, use_rslora, alpha_pattern, rank_pattern) differs from what the slot's
    layers apply: peft would apply the slot's, silently changing the expert's outputs. An expert
    without an adapter config cannot say its scaling: it takes the slot's."""
    layers = _slot_layers(model, name)
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
    targets = _adapter_tensors(model, name)
    cfg = model.peft_config[name]
    peft_type = getattr(getattr(cfg, "peft_type", None), "value", None)
    compressed = exp.compressed_keys()
    streams = dict(zip(compressed, exp._parse(compressed)))
    _check(exp, targets, name, peft_type, streams)
    _check_slot(model, exp, name)
    exact = {n: exp.lossless(n) for n in exp.lossless_keys()}

    direct: List[str] = []
    with torch.no_grad():
        for n in compressed:
            t = targets[n]
            if exp.init_of(n) == "zero" and t.device.type == "cpu" and t.is_contiguous():
                direct.append(n)
            elif exp.init_of(n) == "zero":
                if t.device.type == "cpu":  # not contiguous: decode beside, then copy
                    tmp = torch.empty(t.shape, dtype=t.dtype)
                    _decode_streams([streams[n]], [n], [_numpy_view(tmp)], [_dtype_str(t)])
                    t.copy_(tmp)
                else:
                    _expand_into(streams[n], t)
            else:  # (IA)3: 1 + tau, summed in float32 as apply() does
                tau = torch.empty(t.shape, dtype=torch.float32)
                _decode_streams([streams[n]], [n], [tau.numpy()], ["float32"])
                t.copy_((tau + 1.0).to(t.dtype))
        if direct:
            _decode_streams([streams[n] for n in direct], direct, [_numpy_view(targets[n]) for n in direct],
                            [_dtype_str(targets[n]) for n in direct])
        for n, v in exact.items():
            targets[n].copy_(v)
    return name
