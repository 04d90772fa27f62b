"""Answers to a user's history and group requests, apart from the connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import protocol
from protocol import ErrorCode

from ._context import ServerContext
from ._groups import GroupExists, GroupFull, GroupNotFound

__all__ = ["FRAME_OVERHEAD", "Refused", "Request", "answer", "members_of"]

FRAME_OVERHEAD = 512
"""Bytes a Deliver or HistoryEntry needs besides its body, at most: the ids,
the integers and the field names. A UTF-8 body takes at most 4 bytes a
character, so most sizes are known without encoding anything."""

GroupRequest = (
    protocol.GroupCreate
    | protocol.GroupJoin
    | protocol.GroupLeave
    | protocol.GroupMembers
)
Request = protocol.HistoryRequest | GroupRequest


class Refused(Exception):
    """The request fails with a non-fatal Error; the connection goes on."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def not_a_member(user: str, group: str) -> Refused:
    return Refused(ErrorCode.FORBIDDEN, f"{user!r} is not a member of {group!r}")


async def answer(
    context: ServerContext, user: str, request: Request
) -> protocol.Message:
    """The reply to ``request`` made by ``user``; raises ``Refused`` instead."""
    if isinstance(request, protocol.HistoryRequest):
        return await _history(context, user, request)
    groups = context.groups
    members: Sequence[str]
    if isinstance(request, protocol.GroupCreate):
        try:
            members = await groups.create(request.group, user, request.members)
        except GroupExists:
            raise Refused(
                ErrorCode.CONFLICT, f"group {request.group!r} exists"
            ) from None
        except GroupFull as exc:
            raise Refused(ErrorCode.BAD_MESSAGE, str(exc)) from None
    elif isinstance(request, protocol.GroupJoin):
        members = await _change(context, groups.join, request.group, user)
    elif isinstance(request, protocol.GroupLeave):
        members = await _change(context, groups.leave, request.group, user)
    else:
        members = await members_of(context, request.group, user)
    return protocol.GroupInfo(
        rid=request.rid, group=request.group, members=list(members)
    )


async def members_of(context: ServerContext, group: str, user: str) -> Sequence[str]:
    """The members of a group ``user`` belongs to; raises ``Refused`` otherwise.

    A miss is checked again after catching up with changes made through other
    servers, so what a client just did through one server holds at any other.
    """
    groups = context.groups
    for attempt in range(2):
        try:
            members = groups.members(group)
        except GroupNotFound:
            members = ()
            if attempt == 1:
                raise Refused(ErrorCode.NOT_FOUND, f"no group {group!r}") from None
        if user in members:
            return members
        if attempt == 0:
            await groups.sync()
    raise not_a_member(user, group)


async def _change(
    context: ServerContext,
    change: Callable[[str, str], Awaitable[Sequence[str]]],
    group: str,
    user: str,
) -> Sequence[str]:
    if group not in context.groups:
        # Perhaps created through another server a moment ago.
        await context.groups.sync()
    try:
        return await change(group, user)
    except GroupNotFound:
        raise Refused(ErrorCode.NOT_FOUND, f"no group {group!r}") from None
    except GroupFull as exc:
        raise Refused(ErrorCode.FORBIDDEN, str(exc)) from None


async def _history(
    context: ServerContext, user: str, request: protocol.HistoryRequest
) -> protocol.HistoryPage:
    """One page of a conversation ``user`` takes part in; never anyone else's."""
    history = context.history
    if history is None:
        raise Refused(ErrorCode.UNAVAILABLE, "this server keeps no history")
    if request.group is not None:
        await members_of(context, request.group, user)
    entries, older = await history.page(
        peer_a=user,
        peer_b=request.peer,
        group=request.group,
        before=request.before,
        limit=request.limit,
    )
    page = protocol.HistoryPage(rid=request.rid, messages=entries, next=older)

    # Large bodies can add up past the frame limit: send the newest entries
    # that fit, and point ``next`` at the older ones left out.
    limit = context.config.max_frame_size
    if sum(4 * len(entry.body) + FRAME_OVERHEAD for entry in entries) > limit:
        while len(entries) > 1 and len(protocol.encode_message(page)) > limit:
            entries = entries[len(entries) // 2 :]
            page = protocol.HistoryPage(
                rid=request.rid, messages=entries, next=entries[0].seq
            )
    return page
