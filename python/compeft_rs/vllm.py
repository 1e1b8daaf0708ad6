"""vLLM integration: serve compressed experts by name.

``CompeftResolver`` is a ``vllm.lora.resolver.LoRAResolver``: when a request names a LoRA adapter
vLLM has not loaded, vLLM asks it, and it answers with a ``LoRARequest`` pointing at a plain PEFT
folder materialised from the :class:`~compeft_rs.ExpertStore` (keyed by the expert's content
hash, verified before reuse, the cache bounded in bytes), or None. It never raises: vLLM calls
resolvers outside its error handling, so a corrupt file would fail the request instead of
answering 404 and leaving the name to the next resolver; every refusal is logged (logger
``compeft_rs.vllm``) with the name and the reason. Installed as a ``vllm.general_plugins`` entry
point, :func:`register` sets it up from the environment:

- ``COMPEFT_STORE``: the store's root (a folder or an fsspec URL), required and must exist;
- ``COMPEFT_CACHE_DIR``: where materialised folders go (default ``~/.cache/compeft-rs/peft``,
  created readable by the owner only);
- ``COMPEFT_CACHE_MAX_BYTES``: the folder cache's bound (default 10 GiB), least recently used
  folders removed beyond it;
- ``COMPEFT_MAX_RANK``: the largest LoRA rank served (default 512, vLLM's largest
  ``--max-lora-rank``), checked in the adapter config and in every factor's shape;
- ``COMPEFT_MAX_ENTRIES``: the most tensor entries one expert may have (default 2^31, 8 GiB as
  float32);
- ``COMPEFT_MAX_EXPANSION``: the most bytes the folder may hold per byte of the expert's file
  (default 4096: fp16 LoRA factors at k = 0.001 expand about 1100x; a 1 KB file writes at most
  4 MB).

The limits are read from the expert's headers before anything is decoded, so a small file that
declares a huge adapter is refused without writing anything.

vLLM 0.33's OpenAI server replaces the returned ``lora_int_id`` with its own counter and keeps
the request under its name (``OpenAIServingModels.resolve_lora`` in
``vllm/entrypoints/openai/models/serving.py``): once a name is resolved, vLLM does not ask again,
so an expert updated in the store is served only after the adapter is unloaded
(``POST /v1/unload_lora_adapter``); the next request then resolves it anew, to a new folder.

This module imports vllm; ``import compeft_rs`` never does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Optional, Union

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ._expert import PathLike
from ._resolve import (
    ENV_CACHE_DIR,
    ENV_CACHE_MAX_BYTES,
    ENV_MAX_ENTRIES,
    ENV_MAX_EXPANSION,
    ENV_MAX_RANK,
    ENV_STORE,
    Limits,
    from_env,
    lora_int_id,
    open_store,
    resolve,
)
from ._store import ExpertStore

__all__ = ["CompeftResolver", "Limits", "register", "RESOLVER_NAME", "ENV_STORE", "ENV_CACHE_DIR",
           "ENV_CACHE_MAX_BYTES", "ENV_MAX_RANK", "ENV_MAX_ENTRIES", "ENV_MAX_EXPANSION"]

RESOLVER_NAME = "compeft"

_log = logging.getLogger(__name__)


class CompeftResolver(LoRAResolver):
    """Resolves LoRA names to experts of an :class:`~compeft_rs.ExpertStore`.

    ``store`` is an ExpertStore or the root of an existing one (FileNotFoundError if there is
    none). ``limits`` default to the environment's (:meth:`Limits.from_env`).

    ``resolve_lora(base_model_name, lora_name)`` returns None for a name the store does not hold,
    a file that is not a valid expert, an expert that is not a LoRA adapter, one made for another
    base model (its adapter config's ``base_model_name_or_path``), one over the limits, and on any
    error; otherwise the expert's PEFT folder is materialised (decoding runs in a worker thread,
    off the event loop) and a ``LoRARequest`` for it returned, with ``base_model_name`` set and
    an id that is the same in every process and new when the expert's content changes.
    """

    def __init__(self, store: Union[ExpertStore, str, os.PathLike], cache_dir: Union[str, PathLike, None] = None,
                 *, limits: Optional[Limits] = None) -> None:
        self.store = open_store(store)
        self.cache_dir = cache_dir
        self.limits = limits if limits is not None else Limits.from_env()

    def __repr__(self) -> str:
        return f"CompeftResolver({self.store!r}, cache_dir={self.cache_dir!r}, limits={self.limits!r})"

    def resolve(self, base_model_name: str, lora_name: str) -> Optional[LoRARequest]:
        """The blocking work of :meth:`resolve_lora`; never raises."""
        folder, _ = resolve(self.store, base_model_name, lora_name, cache_dir=self.cache_dir, limits=self.limits)
        if folder is None:
            return None
        try:
            return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id(lora_name, folder),
                               lora_path=str(folder), base_model_name=base_model_name)
        except Exception as e:  # vLLM's own checks; nothing may reach vLLM's request handling
            _log.warning("compeft-rs resolver: not serving %r: %s: %s", lora_name, type(e).__name__, e)
            return None

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Optional[LoRARequest]:
        try:
            return await asyncio.to_thread(self.resolve, base_model_name, lora_name)
        except Exception as e:  # e.g. no thread to run it on at shutdown
            _log.warning("compeft-rs resolver: not serving %r: %s: %s", lora_name, type(e).__name__, e)
            return None


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers a :class:`CompeftResolver` for the
    store in ``COMPEFT_STORE`` (see the module's documentation for the other variables).

    Without ``COMPEFT_STORE`` it registers nothing and logs a warning. With a store root that does
    not exist, or a limit that is not a positive whole number, it registers nothing and logs an
    error saying which variable is wrong; it does not raise, because vLLM calls general plugins in
    every one of its processes outside any error handling, and (as vLLM does for a plugin that
    fails to import) the server should still come up with its base model and static adapters.
    """
    try:
        store, cache_dir, limits = from_env()
    except LookupError:
        _log.warning("compeft-rs vLLM plugin: %s is not set, so no compressed-expert resolver is registered",
                     ENV_STORE)
        return
    except Exception as e:
        _log.error("compeft-rs vLLM plugin: no compressed-expert resolver registered: %s", e)
        return
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, CompeftResolver(store, cache_dir, limits=limits))
