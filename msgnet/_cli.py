"""The ``msgnet`` command: serve, mint tokens, chat, send and listen."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import NoReturn

import trio

import protocol

from ._auth import AuthError, load_or_create_secret, mint_token
from ._backplane import BackplaneUnavailable
from ._client import Client, ConnectionLost, RequestFailed, ServerRefused, open_client
from ._config import (
    ConfigError,
    ServerConfig,
    add_config_arguments,
    load_config,
    overrides_from_args,
)
from ._devkafka import main as dev_kafka_main
from ._history_service import add_history_commands
from ._server import RunningServer, serve

__all__ = ["main"]

logger = logging.getLogger(__name__)

DEFAULTS = ServerConfig()

GC_THRESHOLDS = (50_000, 20, 20)
"""Python's collector thresholds for a serving process (the defaults: 700, 10, 10).

Almost everything a server makes per message (frames, records, deliveries)
holds no reference cycle and is freed by reference counting the moment it is
done with, so the cyclic collector finds next to nothing; yet with the
defaults it ran over a hundred young and one full collection a second under
load, about 15% of the server's CPU at 12,000 msg/s. Each collection visits
only the objects alive at that moment, so fewer of them cost no longer each.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dev-kafka"]:
        # Its own parser: argparse cannot pass options through a subcommand.
        return dev_kafka_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # kafka-python narrates every connection at INFO; its warnings still show.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        result: int = args.run(args)
    except (ConfigError, AuthError) as exc:
        print(f"msgnet: {exc}", file=sys.stderr)
        return 2
    except ServerRefused as exc:
        print(f"msgnet: the server refused the connection: {exc}", file=sys.stderr)
        return 1
    except (OSError, ConnectionLost, BackplaneUnavailable, ValueError) as exc:
        print(f"msgnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line, not under the whole usage text.

    ``serve`` has a flag per setting, so the usage alone would fill a screen
    and hide the one line that says what was wrong.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="msgnet",
        description="A chat messaging server with Kafka as its pub/sub backplane.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve_cmd = commands.add_parser(
        "serve",
        help="run a messaging server",
        description="Run a messaging server. Settings come from the TOML file, then "
        "MSGNET_<SETTING> environment variables, then these flags.",
    )
    serve_cmd.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve_cmd.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    add_config_arguments(serve_cmd)
    serve_cmd.set_defaults(run=_serve)

    token_cmd = commands.add_parser(
        "token", help="mint a client token for a user from the server's secret"
    )
    token_cmd.add_argument("user")
    token_cmd.add_argument("--ttl", type=float, default=7 * 24 * 3600, help="seconds")
    _add_secret_arguments(token_cmd)
    token_cmd.set_defaults(run=_token)

    chat_cmd = commands.add_parser(
        "chat",
        help="interactive terminal chat",
        description=CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_client_arguments(chat_cmd)
    chat_cmd.set_defaults(run=_chat)

    send_cmd = commands.add_parser("send", help="send one message and wait for its ack")
    _add_client_arguments(send_cmd)
    target = send_cmd.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="recipient user")
    target.add_argument("--group", help="recipient group")
    send_cmd.add_argument("text")
    send_cmd.set_defaults(run=_send)

    listen_cmd = commands.add_parser(
        "listen", help="print messages as they arrive, one line each"
    )
    _add_client_arguments(listen_cmd)
    listen_cmd.add_argument(
        "--count", type=int, default=0, help="exit after this many (0: never)"
    )
    listen_cmd.set_defaults(run=_listen)

    cluster_cmd = commands.add_parser(
        "cluster", help="create and inspect a Kafka cluster of messaging servers"
    )
    cluster_actions = cluster_cmd.add_subparsers(dest="action", required=True)
    init_cmd = cluster_actions.add_parser(
        "init",
        help="create the inbox and cluster topics and write the slot layout",
    )
    _add_kafka_arguments(init_cmd)
    init_cmd.add_argument("--partitions", type=int, required=True)
    init_cmd.add_argument("--slots", type=int, required=True, help="server slots")
    init_cmd.add_argument("--replication-factor", type=int, default=1)
    init_cmd.add_argument("--min-insync-replicas", type=int, default=1)
    init_cmd.set_defaults(run=_cluster_init)
    status_cmd = cluster_actions.add_parser(
        "status", help="print the cluster map: slots, owners, epochs, standbys"
    )
    _add_kafka_arguments(status_cmd)
    status_cmd.add_argument("--json", action="store_true", help="machine-readable")
    status_cmd.set_defaults(run=_cluster_status)
    add_history_commands(commands)

    kafka_cmd = commands.add_parser(
        "dev-kafka",
        help="run a single-node Apache Kafka on 127.0.0.1 for development",
        add_help=False,
    )
    kafka_cmd.add_argument("options", nargs="*", help="see msgnet dev-kafka --help")
    return parser


def _add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kafka-bootstrap",
        default=os.environ.get("MSGNET_KAFKA_BOOTSTRAP", DEFAULTS.kafka_bootstrap),
        help="Kafka bootstrap servers (default: %(default)s)",
    )
    parser.add_argument("--kafka-topic", default=DEFAULTS.kafka_topic)
    parser.add_argument("--cluster-topic", default=DEFAULTS.cluster_topic)


def _add_secret_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MSGNET_DATA_DIR", DEFAULTS.data_dir),
        help="server data directory holding the secret (default: %(default)s)",
    )
    parser.add_argument(
        "--secret",
        default=os.environ.get("MSGNET_SECRET", ""),
        help="the token secret itself, instead of reading it from --data-dir",
    )


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="your user id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULTS.port)
    parser.add_argument("--device", default="cli", help="device name (default: cli)")
    parser.add_argument(
        "--token",
        default=os.environ.get("MSGNET_TOKEN", ""),
        help="client token (default: mint one from the local server's secret)",
    )
    _add_secret_arguments(parser)


def _secret(args: argparse.Namespace) -> str:
    if args.secret:
        return str(args.secret)
    if not os.path.exists(os.path.join(args.data_dir, "secret")):
        raise ConfigError(
            f"no secret in {args.data_dir!r}: start `msgnet serve` there first, "
            "or pass --secret or --token"
        )
    return load_or_create_secret(args.data_dir)[0]


def _token(args: argparse.Namespace) -> int:
    print(mint_token(_secret(args), args.user, ttl=args.ttl))
    return 0


def _client_options(args: argparse.Namespace) -> dict[str, object]:
    token = args.token or mint_token(_secret(args), args.user, ttl=3600)
    return {"user": args.user, "token": token, "device": args.device}


# --- serve ----------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    config = load_config(toml_path=args.config, overrides=overrides_from_args(args))
    trio.run(_serve_until_signalled, config)
    return 0


async def _serve_until_signalled(config: ServerConfig) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningServer = await nursery.start(serve, config)
            _settle_garbage_collector()
            async for signum in signals:
                logger.info("received %s; shutting down", signal.Signals(signum).name)
                running.shutdown()
                break


def _settle_garbage_collector() -> None:
    """Collect less often, and never again look at what startup made.

    Once the server listens, its modules, classes and functions stay for the
    life of the process: freezing them takes tens of thousands of objects out
    of every later full collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# --- clients ---------------------------------------------------------------------


def _send(args: argparse.Namespace) -> int:
    async def send() -> None:
        async with open_client(args.host, args.port, **_client_options(args)) as client:
            if args.to is not None:
                ack = await client.send(args.to, args.text)
            else:
                ack = await client.send_group(args.group, args.text)
            print(f"sent {ack.id} at {_positions(ack)}")

    try:
        trio.run(send)
    except RequestFailed as exc:
        print(f"msgnet: not sent: {exc}", file=sys.stderr)
        return 1
    return 0


def _listen(args: argparse.Namespace) -> int:
    async def listen() -> None:
        async with open_client(
            args.host, args.port, reconnect=True, **_client_options(args)
        ) as client:
            received = 0
            async for delivery in client:
                print(_format(delivery), flush=True)
                await client.ack()
                received += 1
                if received == args.count:
                    return

    trio.run(listen)
    return 0


CHAT_HELP = """\
Interactive chat. Type a line to send it to the current peer, or:
  /to USER            talk to USER from now on
  /group GROUP        talk to GROUP from now on
  /create GROUP [USER ...]   create a group
  /join GROUP, /leave GROUP, /members GROUP
  /history [N]        the last N messages with the current peer or group
  /quit
"""


def _chat(args: argparse.Namespace) -> int:
    trio.run(_chat_session, args)
    return 0


async def _chat_session(args: argparse.Namespace) -> None:
    async with open_client(
        args.host, args.port, reconnect=True, **_client_options(args)
    ) as client:
        print(f"connected as {args.user}; /quit to leave, see --help for commands")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_print_incoming, client)
            await _chat_commands(client)
            nursery.cancel_scope.cancel()


async def _print_incoming(client: Client) -> None:
    async for delivery in client:
        print(_format(delivery), flush=True)
        await client.ack()


async def _chat_commands(client: Client) -> None:
    peer: str | None = None
    group: str | None = None
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        words = rest.split()
        try:
            if command == "/quit":
                return
            if command == "/to" and len(words) == 1:
                peer, group = words[0], None
            elif command == "/group" and len(words) == 1:
                peer, group = None, words[0]
            elif command == "/create" and words:
                members = await client.create_group(words[0], words[1:])
                print(f"created {words[0]}: {', '.join(members)}")
            elif command in ("/join", "/leave", "/members") and len(words) == 1:
                action = {
                    "/join": client.join_group,
                    "/leave": client.leave_group,
                    "/members": client.group_members,
                }[command]
                print(f"{words[0]}: {', '.join(await action(words[0]))}")
            elif command == "/history" and (peer or group):
                limit = int(words[0]) if words else 20
                page = await client.history(peer=peer, group=group, limit=limit)
                for entry in page.messages:
                    print(_format_entry(entry))
            elif command.startswith("/"):
                print(f"unknown or incomplete command {line!r}; see msgnet chat --help")
            elif peer is not None:
                await client.send(peer, line)
            elif group is not None:
                await client.send_group(group, line)
            else:
                print("choose someone first: /to USER or /group GROUP")
        except RequestFailed as exc:
            print(f"refused: {exc}")
        except (protocol.ProtocolError, ValueError) as exc:
            print(f"invalid: {exc}")


def _positions(ack: protocol.SendAck) -> str:
    return ", ".join(f"{partition}:{offset}" for partition, offset in ack.positions)


def _clock(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1000).strftime("%H:%M:%S")


def _format(delivery: protocol.Deliver) -> str:
    where = f"#{delivery.group}" if delivery.group else f"@{delivery.to}"
    return f"{_clock(delivery.ts)} {delivery.sender} -> {where}: {delivery.body}"


def _format_entry(entry: protocol.HistoryEntry) -> str:
    where = f"#{entry.group}" if entry.group else f"@{entry.to}"
    return f"{_clock(entry.ts)} {entry.sender} -> {where}: {entry.body}"


def _cluster_init(args: argparse.Namespace) -> int:
    from ._admin import init_cluster

    layout = trio.run(
        functools.partial(
            init_cluster,
            args.kafka_bootstrap,
            partitions=args.partitions,
            slots=args.slots,
            replication_factor=args.replication_factor,
            min_insync_replicas=args.min_insync_replicas,
            inbox_topic=args.kafka_topic,
            cluster_topic=args.cluster_topic,
        )
    )
    print(f"cluster ready: {layout.partitions} partitions over {layout.slots} slots")
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    from ._admin import cluster_status

    status = trio.run(
        functools.partial(
            cluster_status, args.kafka_bootstrap, cluster_topic=args.cluster_topic
        )
    )
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    layout = status["layout"]
    if layout is None:
        print("no cluster here yet: run msgnet cluster init")
        return 1
    print(f"{layout['partitions']} partitions over {layout['slots']} slots")
    print("slot  epoch  owner                 address              partitions")
    for slot in range(layout["slots"]):
        claim = status["slots"].get(slot)
        if claim is None:
            print(f"{slot:<5} {'-':<6} {'(vacant)':<21}")
            continue
        address = f"{claim['host']}:{claim['port']}"
        partitions = ",".join(str(p) for p in claim["partitions"])
        print(
            f"{slot:<5} {claim['epoch']:<6} {claim['server']:<21} {address:<20} "
            f"{partitions}"
        )
    print("servers:")
    for name, server in status["servers"].items():
        print(
            f"  {name:<24} {server['role']:<8} "
            f"last heartbeat {server['heartbeat_age_s']}s ago"
        )
    return 0
