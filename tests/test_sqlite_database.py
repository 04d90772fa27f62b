"""Where a Database runs its calls: worker threads for a file, inline in memory."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio

from msgnet._sqlite import open_database


def _thread_of_call(connection: sqlite3.Connection) -> threading.Thread:
    connection.execute("SELECT 1")
    return threading.current_thread()


async def test_an_in_memory_database_runs_calls_on_the_trio_thread() -> None:
    async with open_database(None) as database:
        assert await database.run(_thread_of_call) is threading.current_thread()


async def test_a_file_database_runs_calls_in_a_worker_thread(tmp_path: Path) -> None:
    async with open_database(tmp_path / "db.sqlite3") as database:
        assert await database.run(_thread_of_call) is not threading.current_thread()


async def test_a_closed_in_memory_database_refuses_calls() -> None:
    async with open_database(None) as database:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await database.run(_thread_of_call)
