"""Tests for the group directory: membership changes, limits, cache and database."""

from __future__ import annotations

import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from msgnet._groups import (
    GroupDirectory,
    GroupExists,
    GroupFull,
    GroupNotFound,
    open_group_directory,
)
from msgnet._history import open_history_store


def stored_members(path: Path, group: str) -> tuple[str, ...]:
    with closing(sqlite3.connect(path)) as connection:
        rows = connection.execute(
            "SELECT user FROM group_members WHERE name = ? ORDER BY user", (group,)
        ).fetchall()
    return tuple(user for (user,) in rows)


async def test_create_makes_the_owner_a_member_and_ignores_repeats() -> None:
    async with open_group_directory(None) as groups:
        members = await groups.create("team", "carol", ["bob", "alice", "bob"])

        assert members == ("alice", "bob", "carol")
        assert groups.members("team") == members
        assert groups.is_member("team", "carol")
        assert not groups.is_member("team", "dave")


async def test_create_with_only_the_owner_listed_once() -> None:
    async with open_group_directory(None) as groups:
        assert await groups.create("solo", "carol", ["carol"]) == ("carol",)
        assert await groups.create("empty", "dave", []) == ("dave",)


async def test_creating_an_existing_group_raises_and_changes_nothing() -> None:
    async with open_group_directory(None) as groups:
        await groups.create("team", "carol", ["bob"])

        with pytest.raises(GroupExists, match="'team'"):
            await groups.create("team", "mallory", ["eve"])
        assert groups.members("team") == ("bob", "carol")


async def test_join_adds_a_member_and_joining_twice_is_a_no_op() -> None:
    async with open_group_directory(None) as groups:
        await groups.create("team", "carol", [])

        assert await groups.join("team", "bob") == ("bob", "carol")
        assert await groups.join("team", "bob") == ("bob", "carol")
        assert groups.members("team") == ("bob", "carol")


async def test_leave_removes_a_member_and_leaving_twice_is_a_no_op() -> None:
    async with open_group_directory(None) as groups:
        await groups.create("team", "carol", ["bob"])

        assert await groups.leave("team", "carol") == ("bob",)
        assert await groups.leave("team", "carol") == ("bob",)
        assert not groups.is_member("team", "carol")


async def test_a_group_outlives_its_last_member_and_can_be_joined_again() -> None:
    async with open_group_directory(None) as groups:
        await groups.create("team", "carol", [])

        assert await groups.leave("team", "carol") == ()
        assert groups.members("team") == ()
        with pytest.raises(GroupExists):
            await groups.create("team", "dave", [])
        assert await groups.join("team", "dave") == ("dave",)


async def test_an_unknown_group_is_not_found() -> None:
    async with open_group_directory(None) as groups:
        with pytest.raises(GroupNotFound, match="'ghost'"):
            groups.members("ghost")
        with pytest.raises(GroupNotFound, match="'ghost'"):
            await groups.join("ghost", "bob")
        with pytest.raises(GroupNotFound, match="'ghost'"):
            await groups.leave("ghost", "bob")
        assert not groups.is_member("ghost", "bob")


async def test_the_size_limit_counts_the_owner_and_stops_joins() -> None:
    async with open_group_directory(None, max_members=3) as groups:
        assert groups.max_members == 3
        with pytest.raises(GroupFull, match="4 members, more than the limit of 3"):
            await groups.create("big", "carol", ["a", "b", "c"])
        with pytest.raises(GroupNotFound):
            groups.members("big")

        await groups.create("team", "carol", ["a", "b"])
        with pytest.raises(GroupFull, match="'team'"):
            await groups.join("team", "d")
        assert groups.members("team") == ("a", "b", "carol")

        # A member already in a full group may "join" again; nobody is added.
        assert await groups.join("team", "a") == ("a", "b", "carol")


async def test_a_size_limit_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_members must be at least 1, got 0"):
        async with open_group_directory(None, max_members=0):
            pass


async def test_concurrent_joins_never_exceed_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "groups.db"
    full: list[str] = []

    async def join(groups: GroupDirectory, user: str) -> None:
        try:
            await groups.join("team", user)
        except GroupFull:
            full.append(user)

    async with open_group_directory(path, max_members=5) as groups:
        await groups.create("team", "carol", [])
        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(join, groups, f"user{n}")

        assert len(groups.members("team")) == 5
        assert len(full) == 6
        assert stored_members(path, "team") == groups.members("team")


async def test_the_database_matches_the_cache_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "groups.db"
    async with open_group_directory(path) as groups:
        await groups.create("team", "carol", ["bob", "alice"])
        await groups.create("empty", "dave", [])
        await groups.join("team", "erin")
        await groups.leave("team", "bob")
        await groups.leave("empty", "dave")
        before = {name: groups.members(name) for name in ("team", "empty")}

    assert stored_members(path, "team") == before["team"]
    async with open_group_directory(path) as groups:
        assert {name: groups.members(name) for name in ("team", "empty")} == before


async def test_reload_picks_up_another_directorys_changes(tmp_path: Path) -> None:
    path = tmp_path / "groups.db"
    async with (
        open_group_directory(path) as first,
        open_group_directory(path) as second,
    ):
        await first.create("team", "carol", [])
        with pytest.raises(GroupNotFound):
            second.members("team")

        await second.reload()
        assert second.members("team") == ("carol",)


async def test_the_directory_can_share_the_history_stores_file(tmp_path: Path) -> None:
    path = tmp_path / "msgnet.db"
    async with open_history_store(path) as store, open_group_directory(path) as groups:
        await groups.create("team", "carol", ["bob"])
        await store.save_cursor("bob", "phone", 5)

    async with open_group_directory(path) as groups:
        assert groups.members("team") == ("bob", "carol")


async def test_a_closed_directory_refuses_changes_but_still_answers_members() -> None:
    async with open_group_directory(None) as groups:
        await groups.create("team", "carol", [])
        await groups.aclose()

        with pytest.raises(trio.ClosedResourceError):
            await groups.join("team", "bob")
        assert groups.members("team") == ("carol",)


_users = st.sampled_from(["a", "b", "c", "d", "e", "f"])
_changes = st.lists(st.tuples(st.booleans(), _users), max_size=30)


@settings(max_examples=30, deadline=None)
@given(changes=_changes)
def test_any_sequence_of_joins_and_leaves_agrees_with_a_set(
    changes: list[tuple[bool, str]],
) -> None:
    async def check(path: Path) -> None:
        expected = {"a"}
        async with open_group_directory(path, max_members=4) as groups:
            await groups.create("g", "a", [])
            for joining, user in changes:
                if joining:
                    try:
                        await groups.join("g", user)
                    except GroupFull:
                        assert len(expected) == 4 and user not in expected
                        continue
                    expected.add(user)
                else:
                    await groups.leave("g", user)
                    expected.discard(user)
                assert groups.members("g") == tuple(sorted(expected))

        async with open_group_directory(path) as reopened:
            assert reopened.members("g") == tuple(sorted(expected))

    # A fresh file per example: hypothesis runs every example in one test call.
    with tempfile.TemporaryDirectory() as directory:
        trio.run(check, Path(directory) / "groups.db")
