"""vLLM integration: serve compressed experts by name.

``CompeftResolver`` is a ``vllm.lora.resolver.LoRAResolver``: when a request names a LoRA adapter
vLLM has not loaded, vLLM asks it, and it answers with a ``LoRARequest`` pointing at a plain PEFT
folder materialised once from the :class:`~compeft_rs.ExpertStore` (keyed by the expert's content
hash, written atomically). Installed as a ``vllm.general_plugins`` entry point,
:func:`register` sets it up from the environment:

- ``COMPEFT_STORE``: the store's root (a folder or an fsspec URL), required;
- ``COMPEFT_CACHE_DIR``: where materialised folders go (default ``~/.cache/compeft-rs/peft``).

This module imports vllm; ``import compeft_rs`` never does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Union

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ._store import _NAME, ExpertStore

__all__ = ["CompeftResolver", "register", "RESOLVER_NAME", "ENV_STORE", "ENV_CACHE_DIR"]

RESOLVER_NAME = "compeft"
ENV_STORE = "COMPEFT_STORE"
ENV_CACHE_DIR = "COMPEFT_CACHE_DIR"

_log = logging.getLogger(__name__)


def _lora_int_id(name: str, folder: Path) -> int:
    """A positive id, the same in every process (vLLM runs several), and new when the expert's
    content changes (the folder is named by the content hash)."""
    digest = hashlib.sha256(f"{name}\0{folder.name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**62) + 1


class CompeftResolver(LoRAResolver):
    """Resolves LoRA names to experts of an :class:`~compeft_rs.ExpertStore`.

    ``resolve_lora(base_model_name, lora_name)`` returns None for a name the store does not hold,
    for an expert that is not a LoRA adapter, and for one made for another base model (its
    adapter config's ``base_model_name_or_path``); otherwise the expert's PEFT folder is
    materialised (decoding runs in a worker thread, off the event loop) and a ``LoRARequest`` for
    it returned.
    """

    def __init__(self, store: Union[ExpertStore, str, os.PathLike],
                 cache_dir: Union[str, os.PathLike, None] = None) -> None:
        self.store = store if isinstance(store, ExpertStore) else ExpertStore(store)
        self.cache_dir = cache_dir

    def __repr__(self) -> str:
        return f"CompeftResolver({self.store!r}, cache_dir={self.cache_dir!r})"

    def resolve(self, base_model_name: str, lora_name: str) -> Optional[LoRARequest]:
        """The blocking work of :meth:`resolve_lora`."""
        if not isinstance(lora_name, str) or not _NAME.fullmatch(lora_name) or lora_name not in self.store:
            return None
        expert = self.store.get(lora_name)
        config = expert.peft_config or {}
        if config.get("peft_type") != "LORA":
            return None
        if config.get("base_model_name_or_path") != base_model_name:
            return None
        folder = self.store.materialize(lora_name, self.cache_dir)
        return LoRARequest(lora_name=lora_name, lora_int_id=_lora_int_id(lora_name, folder), lora_path=str(folder))

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Optional[LoRARequest]:
        return await asyncio.to_thread(self.resolve, base_model_name, lora_name)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers a :class:`CompeftResolver` for the
    store in ``COMPEFT_STORE`` (cache folder ``COMPEFT_CACHE_DIR``). Without ``COMPEFT_STORE`` it
    registers nothing and logs why."""
    root = os.environ.get(ENV_STORE)
    if not root:
        _log.warning("compeft-rs vLLM plugin: %s is not set, so no compressed-expert resolver is registered",
                     ENV_STORE)
        return
    resolver = CompeftResolver(root, os.environ.get(ENV_CACHE_DIR) or None)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
