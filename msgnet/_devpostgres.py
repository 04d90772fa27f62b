"""A throwaway PostgreSQL cluster on loopback, for tests and benchmarks."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["DevPostgres", "DevPostgresError", "PostgresToolsMissing", "postgres_bin"]

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_START_TIMEOUT_S = 60
_OS_USER = "postgres"
"""The account that owns the cluster when we run as root: initdb refuses root."""


class DevPostgresError(Exception):
    """The development cluster could not be created, started or stopped."""


class PostgresToolsMissing(DevPostgresError):
    """PostgreSQL's server programs are not installed here."""


def postgres_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``, newest version first."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda path: int(Path(path).parent.parent.name.split(".")[0]),
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        return Path(on_path).resolve().parent
    raise PostgresToolsMissing(
        "no pg_ctl in /usr/lib/postgresql/*/bin or on PATH "
        "(on Debian: apt-get install postgresql, or run scripts/install-test-deps.sh)"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((_HOST, 0))
        port: int = probe.getsockname()[1]
    return port


class DevPostgres:
    """One PostgreSQL cluster in a temporary folder, on a free loopback port.

    ``durable=False`` turns fsync off, which is right for tests and wrong for
    anything measuring what a real deployment would commit per second.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self._durable = durable
        self._folder: Path | None = None
        self._port = 0
        self._started = False

    @property
    def dsn(self) -> str:
        """A libpq connection string for the cluster's ``postgres`` database."""
        if not self._started:
            raise DevPostgresError("the development cluster is not running")
        return f"host={_HOST} port={self._port} user=postgres dbname=postgres"

    def start(self) -> None:
        """Create the cluster and start the server; raises if it cannot."""
        bin_dir = postgres_bin()
        self._folder = Path(tempfile.mkdtemp(prefix="msgnet-postgres-"))
        data = self._folder / "data"
        log = self._folder / "server.log"
        as_owner: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root; the cluster belongs to postgres.
            shutil.chown(self._folder, user=_OS_USER, group=_OS_USER)
            as_owner = ["runuser", "-u", _OS_USER, "--"]

        self._port = _free_port()
        options = (
            f"-p {self._port} -c listen_addresses={_HOST} -k {self._folder}"
            f" -c fsync={'on' if self._durable else 'off'} -c max_connections=200"
        )
        self._run(
            [
                *as_owner,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            what="initdb",
        )
        self._run(
            [
                *as_owner,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "start",
            ],
            what="pg_ctl start",
            log=log,
        )
        self._started = True
        logger.info("development PostgreSQL listening on %s:%d", _HOST, self._port)

    def close(self) -> None:
        """Stop the server at once and delete the cluster; idempotent."""
        folder, self._folder = self._folder, None
        if folder is None:
            return
        if self._started:
            self._started = False
            as_owner = ["runuser", "-u", _OS_USER, "--"] if os.geteuid() == 0 else []
            subprocess.run(
                [
                    *as_owner,
                    str(postgres_bin() / "pg_ctl"),
                    "-D",
                    str(folder / "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                check=False,
                capture_output=True,
            )
        shutil.rmtree(folder, ignore_errors=True)

    def _run(self, command: list[str], *, what: str, log: Path | None = None) -> None:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            server_log = ""
            if log is not None and log.exists():
                server_log = log.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise DevPostgresError(
                f"{what} failed with exit code {result.returncode}: "
                f"{result.stderr.strip()}\n{server_log}"
            )

    def __enter__(self) -> DevPostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
