"""Server configuration: one attrs class, filled from TOML, environment and flags."""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "ConfigError",
    "ServerConfig",
    "add_config_arguments",
    "load_config",
    "overrides_from_args",
]

ENV_PREFIX = "MSGNET_"


DEFAULT_INBOX_TOPIC = "msgnet.inbox"
"""The inbox topic's name unless configured otherwise."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "msgnet")


def _setting(default: Any, help: str, **kwargs: Any) -> Any:
    """An attrs field whose help text feeds ``msgnet serve --help`` and the docs."""
    return attrs.field(default=default, metadata={"help": help}, **kwargs)


def _positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name} must be positive, got {value!r}")


def _not_negative(
    instance: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name} must not be negative, got {value!r}")


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{attribute.name} must be a port 0..65535, got {value!r}")


def _choice(*choices: str) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ConfigError(
                f"{attribute.name} must be one of {', '.join(choices)}, got {value!r}"
            )

    return check


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Every setting of a messaging server, each with a documented default."""

    host: str = _setting("127.0.0.1", "address the TCP listener binds to")
    port: int = _setting(
        7400, "TCP port for clients (0 picks a free one)", validator=_port
    )
    advertised_host: str = _setting(
        "", "host clients are redirected to for this server (default: host)"
    )
    metrics_port: int = _setting(
        9400,
        "port of the Prometheus /metrics endpoint (0 picks a free one)",
        validator=_port,
    )
    metrics_enabled: bool = _setting(True, "serve Prometheus metrics over HTTP")
    ws_port: int = _setting(
        7480,
        "port for WebSocket clients and the web chat page (0 picks a free one)",
        validator=_port,
    )
    ws_enabled: bool = _setting(True, "serve WebSocket clients and the chat page")
    data_dir: str = _setting(
        _default_data_dir(), "directory for the secret, the embedded log and history"
    )
    secret: str = _setting(
        "", "HMAC secret for client tokens (default: read or create data_dir/secret)"
    )
    name: str = _setting(
        "", "this server's name in logs and Welcome (default host:port)"
    )

    backplane: str = _setting(
        "embedded",
        "message log: embedded (SQLite) or kafka",
        validator=_choice("embedded", "kafka"),
    )
    memory: bool = _setting(
        False, "keep the embedded log and history in memory only (tests, demos)"
    )
    partitions: int = _setting(
        16,
        "inbox partitions of the embedded log (Kafka: the topic's count)",
        validator=_positive,
    )
    kafka_bootstrap: str = _setting("127.0.0.1:9092", "Kafka bootstrap servers")
    kafka_topic: str = _setting(DEFAULT_INBOX_TOPIC, "Kafka inbox topic")
    kafka_linger_ms: int = _setting(
        20,
        "ms the inbox producer waits to fill a batch: kafka-python's cost is "
        "mostly per batch, so more saves CPU per message and costs latency",
        validator=_not_negative,
    )
    cluster_topic: str = _setting(
        "msgnet.cluster", "Kafka topic holding the cluster map and heartbeats"
    )
    slot: int = _setting(
        -1, "cluster slot this server owns on Kafka; -1 makes it a standby"
    )
    heartbeat_interval: float = _setting(
        1.0, "seconds between cluster heartbeats", validator=_positive
    )
    takeover_timeout: float = _setting(
        6.0,
        "seconds of silence after which a standby takes over a slot",
        validator=_positive,
    )

    history_store: str = _setting(
        "sqlite",
        "history store: sqlite (data_dir, one machine) or postgres (history_dsn)",
        validator=_choice("sqlite", "postgres"),
    )
    history_dsn: str = _setting(
        "", "PostgreSQL connection string when history_store is postgres"
    )
    history_writer: bool = _setting(
        True,
        "run this server's own history writers; false when msgnet history-writer "
        "processes fill the store",
    )

    max_connections: int = _setting(
        10000, "connections beyond this get error server_full", validator=_positive
    )
    max_frame_size: int = _setting(
        1024 * 1024, "largest accepted frame in bytes", validator=_positive
    )
    handshake_timeout: float = _setting(
        10.0, "seconds a new connection has to complete hello", validator=_positive
    )
    idle_timeout: float = _setting(
        60.0,
        "seconds of silence before a client is dropped; pings at a third",
        validator=_positive,
    )
    rate_limit: float = _setting(
        200.0, "sustained requests per second per connection", validator=_positive
    )
    rate_burst: int = _setting(
        400,
        "requests a connection may send at once above the rate",
        validator=_positive,
    )
    outbound_queue: int = _setting(
        2000,
        "frames queued for a slow reader before it is disconnected",
        validator=_positive,
    )
    max_group_members: int = _setting(1000, "members per group", validator=_positive)
    append_timeout: float = _setting(
        15.0,
        "seconds to wait for the log before refusing a send as unavailable",
        validator=_positive,
    )
    shutdown_grace: float = _setting(
        5.0, "seconds in-flight work may take after SIGTERM", validator=_positive
    )

    @property
    def public_host(self) -> str:
        return self.advertised_host or self.host


_FIELDS = {field.name: field for field in attrs.fields(ServerConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML, environment or flag value into the field's type."""
    field = _FIELDS[name]
    kind: Any = type(field.default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}")


def load_config(
    *,
    toml_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Build the configuration: defaults, then the TOML file, environment, flags.

    Environment variables are the upper-case field names prefixed ``MSGNET_``
    (``MSGNET_PORT=7401``). Unknown TOML keys are refused rather than ignored,
    so a typo never silently leaves a default in place.
    """
    values: dict[str, Any] = {}

    if toml_path is not None:
        path = Path(toml_path)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"unknown setting {key!r} in {str(path)!r}")
            values[name] = _coerce(name, value)

    env = os.environ if environ is None else environ
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)

    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)

    try:
        return ServerConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting, each defaulting to None (meaning: not given)."""
    for field in attrs.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} (default: {field.default!r})"
        if isinstance(field.default, bool):
            parser.add_argument(
                flag,
                dest=field.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=field.name,
                default=None,
                type=type(field.default),
                metavar=field.name.upper(),
                help=help_text,
            )


def overrides_from_args(
    args: argparse.Namespace, names: Sequence[str] = ()
) -> dict[str, Any]:
    """The settings given on the command line, as ``load_config`` overrides."""
    return {name: getattr(args, name, None) for name in names or _FIELDS}
