"""The group directory: group membership in SQLite, served from memory."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import trio

from ._sqlite import Database, open_database, transaction

DEFAULT_MAX_GROUP_MEMBERS = 1000
"""The size limit a directory enforces unless told otherwise (the protocol's too)."""


class GroupNotFound(LookupError):
    """No group has that name."""


class GroupExists(ValueError):
    """A group with that name already exists."""


class GroupFull(ValueError):
    """The change would take a group over the directory's size limit."""


def _created_ms() -> int:
    return time.time_ns() // 1_000_000


class GroupDirectory:
    """Groups and their members, written through to SQLite and read from memory.

    ``members`` runs on every group send, so it is a dict lookup; changes wait
    for the database and then update the cache. Every group is loaded at open,
    which suits tens of thousands of groups, not millions. The cache only sees
    this directory's own changes: another process writing the same file is
    picked up by ``reload``.

    A group whose last member leaves stays, with no members: its name stays
    taken and anyone may join it again.

    Open it with ``open_group_directory``.
    """

    def __init__(
        self,
        database: Database,
        groups: dict[str, tuple[str, ...]],
        *,
        max_members: int = DEFAULT_MAX_GROUP_MEMBERS,
    ) -> None:
        if max_members < 1:
            raise ValueError(f"max_members must be at least 1, got {max_members!r}")
        self._database = database
        self._members = dict(groups)
        self._max_members = max_members

        # Changes take turns: each checks the cache, writes the database, then
        # updates the cache, and must not interleave with another change.
        self._change_lock = trio.Lock()

    @property
    def max_members(self) -> int:
        """The most members a group may have."""
        return self._max_members

    def members(self, group: str) -> tuple[str, ...]:
        """The group's members, sorted; raises ``GroupNotFound``."""
        try:
            return self._members[group]
        except KeyError:
            raise GroupNotFound(f"no group named {group!r}") from None

    def is_member(self, group: str, user: str) -> bool:
        """Whether ``user`` is in ``group``; False for a group that does not exist."""
        return user in self._members.get(group, ())

    async def create(
        self, group: str, owner: str, members: Iterable[str]
    ) -> tuple[str, ...]:
        """Create a group of ``owner`` and ``members`` (repeats are ignored).

        Returns the members, sorted; raises ``GroupExists`` or ``GroupFull``.
        """
        new_members = tuple(sorted({owner, *members}))

        async with self._change_lock:
            if group in self._members:
                raise GroupExists(f"a group named {group!r} already exists")
            self._check_size(group, new_members)

            def insert(connection: sqlite3.Connection) -> None:
                with transaction(connection):
                    connection.execute(
                        "INSERT INTO groups (name, owner, created_ts) VALUES (?, ?, ?)",
                        (group, owner, _created_ms()),
                    )
                    connection.executemany(
                        "INSERT INTO group_members (name, user) VALUES (?, ?)",
                        [(group, user) for user in new_members],
                    )

            await self._apply(group, new_members, insert)
        return new_members

    async def join(self, group: str, user: str) -> tuple[str, ...]:
        """Add ``user`` to ``group`` and return the members; a member is a no-op.

        Raises ``GroupNotFound`` or ``GroupFull``.
        """
        async with self._change_lock:
            current = self.members(group)
            if user in current:
                return current
            new_members = tuple(sorted((*current, user)))
            self._check_size(group, new_members)

            def insert(connection: sqlite3.Connection) -> None:
                with transaction(connection):
                    connection.execute(
                        "INSERT INTO group_members (name, user) VALUES (?, ?)",
                        (group, user),
                    )

            await self._apply(group, new_members, insert)
        return new_members

    async def leave(self, group: str, user: str) -> tuple[str, ...]:
        """Remove ``user`` from ``group``, return the members; a non-member is a no-op.

        Raises ``GroupNotFound``.
        """
        async with self._change_lock:
            current = self.members(group)
            if user not in current:
                return current
            new_members = tuple(member for member in current if member != user)

            def delete(connection: sqlite3.Connection) -> None:
                with transaction(connection):
                    connection.execute(
                        "DELETE FROM group_members WHERE name = ? AND user = ?",
                        (group, user),
                    )

            await self._apply(group, new_members, delete)
        return new_members

    def __contains__(self, group: object) -> bool:
        return group in self._members

    async def sync(self) -> None:
        """Catch up with changes made elsewhere: here, only ``reload`` does that.

        On a single server every change goes through this directory, so its
        cache is already current; a cluster's directory waits for its log.
        """

    async def reload(self) -> None:
        """Replace the cache with the database's contents (another writer's changes)."""
        async with self._change_lock:
            self._members = await self._database.run(_load)

    async def aclose(self) -> None:
        """Close the database after the calls already queued; idempotent."""
        await self._database.aclose()

    def _check_size(self, group: str, new_members: tuple[str, ...]) -> None:
        if len(new_members) > self._max_members:
            raise GroupFull(
                f"group {group!r} would have {len(new_members)} members, more than"
                f" the limit of {self._max_members}"
            )

    async def _apply(
        self,
        group: str,
        new_members: tuple[str, ...],
        write: Callable[[sqlite3.Connection], None],
    ) -> None:
        # Shielded: a cancelled caller still waits for the write to finish, and
        # the cache must then learn of it, or the two would disagree until the
        # next open.
        with trio.CancelScope(shield=True):
            await self._database.run(write)
            self._members[group] = new_members


def _load(connection: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    groups: dict[str, list[str]] = {
        name: [] for (name,) in connection.execute("SELECT name FROM groups")
    }
    for name, user in connection.execute(
        "SELECT name, user FROM group_members ORDER BY name, user"
    ):
        groups[name].append(user)
    return {name: tuple(users) for name, users in groups.items()}


@asynccontextmanager
async def open_group_directory(
    path: str | os.PathLike[str] | None,
    *,
    max_members: int = DEFAULT_MAX_GROUP_MEMBERS,
) -> AsyncIterator[GroupDirectory]:
    """Open the directory in the database at ``path`` (None: in memory) and load it.

    ``path`` may be the history store's file: the directory has its own tables
    and its own connection.
    """
    async with open_database(path) as database:
        groups = await database.run(_load)
        yield GroupDirectory(database, groups, max_members=max_members)
