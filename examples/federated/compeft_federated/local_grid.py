"""An in-process Flower Grid: every node a ClientApp called in this process, in turn.

The study and the tests run Flower's own strategy loop (``Strategy.start``) through it, without
Ray or network processes: deterministic and fast on a small machine. Messages are copied both
ways, as the wire would; each node keeps its Context (and so its mods' state) across rounds; an
exception in a ClientApp becomes an error reply, as in Flower's runtimes.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any, Dict, Iterable, List, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """``nodes`` node ids, each running ``client_app``; ``node_config(i)`` gives node i's config
    (its partition, for instance); ``run_config`` is every node's run config."""

    def __init__(self, client_app: Any, nodes: int, node_config: Any = None, run_config: Optional[dict] = None,
                 run_id: int = 1) -> None:
        # Flower's runtimes set the process's task identity, which every new Message reads.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
        self.client_app = client_app
        self.ids = list(range(1, nodes + 1))
        self.contexts: Dict[int, Context] = {
            nid: Context(run_id=run_id, node_id=nid, node_config=dict(node_config(i) if node_config else {}),
                         state=RecordDict(), run_config=dict(run_config or {}))
            for i, nid in enumerate(self.ids)
        }
        self._run: Any = None
        self._replies: Dict[str, Message] = {}
        self.errors: List[str] = []

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: Optional[float] = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            delivered = copy.deepcopy(msg)
            nid = msg.metadata.dst_node_id
            try:
                reply = self.client_app(delivered, self.contexts[nid])
            except Exception as e:  # noqa: BLE001 - Flower's runtimes turn these into error replies
                self.errors.append(f"node {nid}: {type(e).__name__}: {e}")
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=delivered)
            self._replies[mid] = copy.deepcopy(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
