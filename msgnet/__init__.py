"""msgnet: a horizontally scalable chat server with Kafka as its pub/sub backplane."""

from __future__ import annotations

from ._auth import AuthError, mint_token, verify_token
from ._backplane import Backplane, BackplaneUnavailable, LogRecord
from ._client import Client, ConnectionLost, RequestFailed, ServerRefused, open_client
from ._config import ConfigError, ServerConfig, load_config
from ._records import InboxRecord
from ._routing import assign_partitions, partition_for, slot_for_partition
from ._server import RunningServer, serve

__all__ = [
    "AuthError",
    "Backplane",
    "BackplaneUnavailable",
    "Client",
    "ConfigError",
    "ConnectionLost",
    "InboxRecord",
    "LogRecord",
    "RequestFailed",
    "RunningServer",
    "ServerConfig",
    "ServerRefused",
    "assign_partitions",
    "load_config",
    "mint_token",
    "open_client",
    "partition_for",
    "serve",
    "slot_for_partition",
    "verify_token",
]

__version__ = "0.1.0"
