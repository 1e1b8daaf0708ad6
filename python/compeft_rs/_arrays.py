"""Adapters between torch tensors / numpy arrays and the flat buffers the Rust core reads and writes.

Half-precision values cross the boundary as their uint16 bit patterns, so bfloat16 works although
numpy has no such type. Contiguous CPU inputs are viewed, never copied.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import numpy as np

SUPPORTED = ("float16", "bfloat16", "float32", "float64")

_NP_BY_NAME = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def _torch() -> Any:
    """The torch module if the caller already uses it (imported), without importing it ourselves."""
    return sys.modules.get("torch")


def is_torch_tensor(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def _ml_bfloat16() -> Any:
    try:
        import ml_dtypes  # type: ignore[import-not-found]
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def dtype_name(dtype: Any) -> str:
    """Normalises a torch dtype, numpy dtype or string to one of SUPPORTED, or raises TypeError."""
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        name = {"half": "float16", "float": "float32", "double": "float64", "bf16": "bfloat16"}.get(name, name)
    else:
        t = _torch()
        if t is not None and isinstance(dtype, t.dtype):
            name = str(dtype).replace("torch.", "")
        else:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = str(dtype)
    if name not in SUPPORTED:
        raise TypeError(
            f"unsupported dtype {dtype!r}; compeft-rs handles float16, bfloat16, float32 and float64 "
            "(convert integer or complex tensors to a float type first)"
        )
    return name


def flat_input(x: Any) -> Tuple[np.ndarray, str, Tuple[int, ...], str, Any]:
    """(flat array for Rust, dtype name, shape, kind, keepalive) for a torch tensor or array-like.

    kind is "torch" or "numpy". keepalive must outlive the Rust call (it owns the memory).
    """
    if is_torch_tensor(x):
        torch = _torch()
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        name = dtype_name(t.dtype)
        t = t.contiguous()
        shape = tuple(t.shape)
        flat = t.reshape(-1)
        if name in ("float16", "bfloat16"):
            arr = flat.view(torch.int16).numpy().view(np.uint16)
        else:
            arr = flat.numpy()
        return arr, name, shape, "torch", t
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
        if x.dtype.kind in "iub":
            raise TypeError(
                f"unsupported dtype {x.dtype}; compeft-rs handles float16, bfloat16, float32 and float64 "
                "(convert integer or complex tensors to a float type first)"
            )
    bf = _ml_bfloat16()
    if bf is not None and x.dtype == bf:
        name = "bfloat16"
    else:
        name = dtype_name(x.dtype)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    shape = tuple(x.shape)
    # np.ascontiguousarray turns 0-d into 1-d, so only copy when needed.
    a = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    flat = a.reshape(-1)
    if name in ("float16", "bfloat16"):
        flat = flat.view(np.uint16)
    return flat, name, shape, "numpy", a


def float64_of(x: Any) -> np.ndarray:
    """A tensor or array as a float64 numpy array on the CPU (half types included), converted
    by numpy: a torch conversion runs on torch's thread pool, which on a busy machine costs
    milliseconds per small tensor."""
    if is_torch_tensor(x) and x.device.type != "cpu":
        x = x.detach().cpu()
    arr, name, shape, _, _ = flat_input(x)
    if name == "float16":
        out = arr.view(np.float16).astype(np.float64)
    elif name == "bfloat16":
        out = (arr.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        out = arr.astype(np.float64)
    return out.reshape(shape)


def kind_of(framework: Any) -> str:
    """"torch" or "numpy" for a framework name ("pt" or "np", as in safetensors)."""
    kinds = {"pt": "torch", "torch": "torch", "np": "numpy", "numpy": "numpy"}
    if framework not in kinds:
        raise ValueError(f"framework must be 'pt' (torch) or 'np' (numpy), got {framework!r}")
    return kinds[framework]


def empty_output(kind: str, name: str, shape: Tuple[int, ...]) -> Tuple[Any, np.ndarray]:
    """(result object, flat writable numpy view of it) for a decode of `name` into `shape`."""
    if kind == "torch":
        torch = _torch()
        if torch is None:
            try:
                import torch  # noqa: F811
            except ImportError as e:
                raise ImportError("decoding to torch tensors needs torch (pip install torch); "
                                  "pass framework='np' for numpy arrays") from e
        out = torch.empty(shape, dtype=getattr(torch, name))
        return out, tensor_view(out.reshape(-1))
    if name == "bfloat16":
        bf = _ml_bfloat16()
        if bf is None:
            raise TypeError(
                "numpy has no bfloat16; decode with dtype='float32', or pass a torch dtype / install ml_dtypes"
            )
        out = np.empty(shape, dtype=bf)
        return out, out.reshape(-1).view(np.uint16)
    out = np.empty(shape, dtype=_NP_BY_NAME[name])
    flat = out.reshape(-1)
    return out, flat.view(np.uint16) if name == "float16" else flat


def tensor_view(t: Any) -> np.ndarray:
    """A numpy array over a contiguous CPU tensor's own memory (uint16 for half types), for the
    Rust decoder to write into in place."""
    torch = _torch()
    dt = t.dtype
    if dt is torch.float16:
        return t.numpy().view(np.uint16)
    if dt is torch.bfloat16:  # numpy has none: its bits through int16
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def torch_device(device: Any) -> Optional[Any]:
    """None for the CPU (or no device), else a torch.device."""
    if device is None:
        return None
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("decoding onto a device needs torch: pip install torch") from e
    dev = torch.device(device)
    return None if dev.type == "cpu" else dev
