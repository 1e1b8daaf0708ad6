"""The vLLM resolver's work, without vllm: find an expert by name, check it against the served
model and the limits (from its headers, before anything is decoded), materialise its folder.
:mod:`compeft_rs.vllm` wraps this in vLLM's classes; the tests run it wherever the package runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

from ._expert import CompressedExpert, PathLike
from ._store import DEFAULT_CACHE_MAX_BYTES, ExpertStore, _valid_name

ENV_STORE = "COMPEFT_STORE"
ENV_CACHE_DIR = "COMPEFT_CACHE_DIR"
ENV_CACHE_MAX_BYTES = "COMPEFT_CACHE_MAX_BYTES"
ENV_MAX_RANK = "COMPEFT_MAX_RANK"
ENV_MAX_ENTRIES = "COMPEFT_MAX_ENTRIES"
ENV_MAX_EXPANSION = "COMPEFT_MAX_EXPANSION"

# vLLM 0.33 serves LoRA ranks up to 512 (its --max-lora-rank choices end there), so nothing it
# could load is refused.
DEFAULT_MAX_RANK = 512
# 2^31 entries: 8 GiB as float32 (peft's adapter dtype), under the folder cache's 10 GiB. A rank-128
# adapter on every linear layer of a 70B Llama has 1.66e9; a rank-16 one 0.21e9.
DEFAULT_MAX_ENTRIES = 1 << 31
# Bytes of the folder per byte of the expert file. A sparse expert's file is small by design, so
# a size limit alone lets a 1 KB file declare hundreds of MB of zeros. fp16 LoRA factors at
# k = 0.001 expand about 1100x (1062x for rank-16 q and v pairs on 32 layers 4096 wide), float32
# ones twice that; at 4096x a 1 KB file writes at most 4 MB.
DEFAULT_MAX_EXPANSION = 4096
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

_log = logging.getLogger("compeft_rs.vllm")
# Which dimension of a LoRA factor is the rank: A is (r, in, ...), B is (out, r, ...).
_LORA_A = re.compile(r"(?:^|\.)lora_(?:embedding_)?A(?:\.|$)")
_LORA_B = re.compile(r"(?:^|\.)lora_(?:embedding_)?B(?:\.|$)")


def _env_int(environ: Mapping[str, str], name: str, default: Optional[int]) -> Optional[int]:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise ValueError(f"{name}={raw!r} is not a positive whole number; unset it for the default ({default})")
    return value


@dataclass(frozen=True)
class Limits:
    """What the resolver serves: LoRA ranks up to ``max_rank`` (the config's ``r`` and
    ``rank_pattern`` and every factor's shape), experts of at most ``max_entries`` tensor entries
    in all whose folder (entries times their dtype's size) is at most ``max_expansion`` bytes per
    byte of their file, and a folder cache of at most ``cache_max_bytes`` (None: unbounded)."""

    max_rank: int = DEFAULT_MAX_RANK
    max_entries: int = DEFAULT_MAX_ENTRIES
    cache_max_bytes: Optional[int] = DEFAULT_CACHE_MAX_BYTES
    max_expansion: int = DEFAULT_MAX_EXPANSION

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Limits":
        """From ``COMPEFT_MAX_RANK``, ``COMPEFT_MAX_ENTRIES``, ``COMPEFT_MAX_EXPANSION`` and
        ``COMPEFT_CACHE_MAX_BYTES`` (defaults where unset); ValueError naming the variable for a
        value that is not a positive whole number."""
        env = os.environ if environ is None else environ
        return cls(
            max_rank=int(_env_int(env, ENV_MAX_RANK, DEFAULT_MAX_RANK)),  # type: ignore[arg-type]
            max_entries=int(_env_int(env, ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES)),  # type: ignore[arg-type]
            cache_max_bytes=_env_int(env, ENV_CACHE_MAX_BYTES, DEFAULT_CACHE_MAX_BYTES),
            max_expansion=int(_env_int(env, ENV_MAX_EXPANSION, DEFAULT_MAX_EXPANSION)),  # type: ignore[arg-type]
        )


def check_limits(expert: CompressedExpert, limits: Limits) -> Optional[str]:
    """Why ``expert`` exceeds ``limits``, or None if it fits. Reads the adapter config and the
    tensors' shapes from the streams' headers; decodes nothing."""
    config = expert.peft_config or {}
    ranks = [("r", config.get("r"))]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks += [(f"rank_pattern[{k!r}]", v) for k, v in pattern.items()]
    for field, r in ranks:
        if isinstance(r, int) and r > limits.max_rank:
            return f"its adapter config declares {field} = {r}, above the limit of {limits.max_rank} ({ENV_MAX_RANK})"
    comp = expert.compressed_keys()
    shapes, dense = {}, 0  # dense: bytes of the decoded tensors, as the folder holds them
    for n, s in zip(comp, expert._parse(comp)):
        shapes[n] = tuple(s.shape)
        dense += math.prod(shapes[n]) * _ITEMSIZE.get(expert._orig_dtype(n, s), 8)
    for n in expert.lossless_keys():
        _, shape, nbytes = expert._entries[expert._keys[n]]
        shapes[n] = tuple(shape)
        dense += int(nbytes)
    total = 0
    for n, shape in shapes.items():
        total += math.prod(shape)
        dim = 0 if _LORA_A.search(n) else 1 if _LORA_B.search(n) else None
        if dim is not None and len(shape) > dim and shape[dim] > limits.max_rank:
            return (f"tensor {n!r} of shape {list(shape)} has rank {shape[dim]}, above the limit of "
                    f"{limits.max_rank} ({ENV_MAX_RANK})")
    if total > limits.max_entries:
        return f"it has {total:,} entries, above the limit of {limits.max_entries:,} ({ENV_MAX_ENTRIES})"
    if dense > limits.max_expansion * expert.nbytes:
        return (f"its folder would hold {dense:,} bytes, {dense / expert.nbytes:,.0f} times its {expert.nbytes:,}-byte "
                f"file, above the limit of {limits.max_expansion:,} times ({ENV_MAX_EXPANSION})")
    return None


def resolve(store: ExpertStore, base_model_name: str, lora_name: str, *,
            cache_dir: Union[str, PathLike, None] = None, limits: Optional[Limits] = None) -> Tuple[Optional[Path], str]:
    """(folder, "") for a LoRA expert of ``store`` named ``lora_name`` made for
    ``base_model_name`` and within ``limits``, its PEFT folder materialised; otherwise (None,
    why). Never raises: a missing, corrupt or foreign file, an expert over the limits, a failed
    write all answer None, logged (a missing name at DEBUG, the rest as warnings)."""
    limits = limits or Limits()
    try:
        if not _valid_name(lora_name):
            why = "not a valid expert name"
            _log.debug("compeft-rs resolver: %r: %s", lora_name, why)
            return None, why
        expert = store.get(lora_name)
        if expert is None:
            why = f"no expert of that name in {store.root}"
            _log.debug("compeft-rs resolver: %r: %s", lora_name, why)
            return None, why
        why = _refusal(expert, base_model_name, limits)
        if why is None:
            # The expert checked, not the file read again: it may have been replaced meanwhile.
            return store._materialize(lora_name, expert, cache_dir, limits.cache_max_bytes), ""
    except Exception as e:  # anything raised here would reach the client as a server error
        why = f"{type(e).__name__}: {e}"
        _log.debug("compeft-rs resolver: %r failed", lora_name, exc_info=True)
    _log.warning("compeft-rs resolver: not serving %r from %s: %s", lora_name, store.root, why)
    return None, why


def _refusal(expert: CompressedExpert, base_model_name: str, limits: Limits) -> Optional[str]:
    config = expert.peft_config
    if config is None:
        return "the expert was not made from a PEFT adapter (no adapter config in it)"
    if config.get("peft_type") != "LORA":
        return f"it is a {config.get('peft_type')} adapter; vLLM serves LoRA adapters only"
    if config.get("base_model_name_or_path") != base_model_name:
        return (f"its adapter config names base model {config.get('base_model_name_or_path')!r}, not the served "
                f"{base_model_name!r}")
    return check_limits(expert, limits)


def lora_int_id(name: str, folder: Path) -> int:
    """A positive id, the same in every process (vLLM runs several), and new when the expert's
    content changes (the folder is named by the content hash). vLLM 0.33's OpenAI server replaces
    it with its own counter."""
    digest = hashlib.sha256(f"{name}\0{folder.name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**62) + 1


def open_store(store: Union[ExpertStore, str, os.PathLike]) -> ExpertStore:
    """``store`` itself, or the existing store at that root (FileNotFoundError if there is none:
    a mistyped path must not serve an empty store)."""
    return store if isinstance(store, ExpertStore) else ExpertStore(store, create=False)


def from_env(environ: Optional[Mapping[str, str]] = None) -> Tuple[ExpertStore, Optional[str], Limits]:
    """(store, cache folder, limits) from ``COMPEFT_STORE``, ``COMPEFT_CACHE_DIR`` and the limit
    variables. LookupError if ``COMPEFT_STORE`` is unset, FileNotFoundError if its folder does
    not exist, ValueError for a limit that is not a positive whole number."""
    env = os.environ if environ is None else environ
    root = env.get(ENV_STORE, "").strip()
    if not root:
        raise LookupError(f"{ENV_STORE} is not set")
    limits = Limits.from_env(env)
    try:
        store = open_store(root)
    except FileNotFoundError:
        raise FileNotFoundError(f"{ENV_STORE}={root!r}: there is no expert store (no folder) at that path; "
                                "check the variable") from None
    return store, env.get(ENV_CACHE_DIR) or None, limits
