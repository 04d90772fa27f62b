"""What every connection of one server shares: stores, owners, limits, metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from ._backplane import Backplane
from ._cluster_groups import ClusterGroups
from ._config import ServerConfig
from ._groups import GroupDirectory
from ._history_store import HistoryStore
from ._metrics import ServerMetrics
from ._partition import PartitionOwner
from ._routing import partition_for

if TYPE_CHECKING:
    from ._cluster import ClusterMember
    from ._session import Session

__all__ = ["OwnerAddress", "ServerContext"]

OwnerAddress = tuple[str, int, int | None]
"""Where a partition's owner listens: host, TCP port, WebSocket port if any."""


def _nobody(partition: int) -> OwnerAddress | None:
    return None


@attrs.define(eq=False, kw_only=True)
class ServerContext:
    """The state of one running server, handed to each of its sessions."""

    config: ServerConfig
    name: str
    secret: str
    backplane: Backplane
    history: HistoryStore | None
    history_group: str
    groups: GroupDirectory | ClusterGroups
    """Group membership: SQLite on one server, the cluster log in a cluster."""
    metrics: ServerMetrics
    owners: dict[int, PartitionOwner] = attrs.field(factory=dict)
    """The partitions this server serves now, by number."""
    sessions: set[Session] = attrs.field(factory=set)
    owner_address: Callable[[int], OwnerAddress | None] = _nobody
    """Where to redirect a client whose partition another server owns."""
    cluster: ClusterMember | None = None
    """This server's cluster membership, on Kafka."""

    def partition_for(self, user: str) -> int:
        return partition_for(user, self.backplane.partitions)
