"""Groups in a cluster: membership kept in the cluster log, read from memory."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from ._cluster import ClusterMember
from ._clustermap import GroupCreated, Membership
from ._groups import DEFAULT_MAX_GROUP_MEMBERS, GroupExists, GroupFull, GroupNotFound

__all__ = ["ClusterGroups"]


class ClusterGroups:
    """The group directory of a cluster, with the interface of ``GroupDirectory``.

    Every server folds the same cluster log, so every server sees the same
    members; a change returns once this server has read it back, so a client
    that creates a group and then sends to it never races its own change. Two
    concurrent creations of one name are settled by log order.
    """

    def __init__(
        self, member: ClusterMember, *, max_members: int = DEFAULT_MAX_GROUP_MEMBERS
    ) -> None:
        self._member = member
        self.max_members = max_members

    def members(self, group: str) -> tuple[str, ...]:
        members = self._member.map.groups.get(group)
        if members is None:
            raise GroupNotFound(f"no group {group!r}")
        return tuple(sorted(members))

    def __contains__(self, group: object) -> bool:
        return group in self._member.map.groups

    async def sync(self) -> None:
        """Apply every change written to the cluster log so far."""
        await self._member.sync()

    def is_member(self, group: str, user: str) -> bool:
        return user in self._member.map.groups.get(group, ())

    async def create(
        self, group: str, owner: str, members: Iterable[str]
    ) -> tuple[str, ...]:
        initial = tuple(sorted({owner, *members}))
        if group in self._member.map.groups:
            raise GroupExists(f"group {group!r} exists")
        self._check_size(group, len(initial))
        nonce = secrets.token_hex(8)
        await self._member.publish(
            GroupCreated(group=group, owner=owner, members=initial, nonce=nonce)
        )
        if self._member.map.group_nonces.get(group) != nonce:
            raise GroupExists(f"group {group!r} exists")
        return self.members(group)

    async def join(self, group: str, user: str) -> tuple[str, ...]:
        current = self.members(group)
        if user not in current:
            self._check_size(group, len(current) + 1)
            await self._member.publish(Membership(group=group, user=user, member=True))
        return self.members(group)

    async def leave(self, group: str, user: str) -> tuple[str, ...]:
        if user in self.members(group):
            await self._member.publish(Membership(group=group, user=user, member=False))
        return self.members(group)

    def _check_size(self, group: str, size: int) -> None:
        if size > self.max_members:
            raise GroupFull(
                f"group {group!r} would have {size} members; "
                f"the limit is {self.max_members}"
            )
