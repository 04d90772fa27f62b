"""The cluster map is a pure fold of the cluster log: same log, same map."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgnet._clustermap import (
    ClusterLayout,
    ClusterMap,
    GroupCreated,
    Heartbeat,
    Membership,
    SlotClaim,
    decode_entry,
    encode_entry,
)

LAYOUT = ClusterLayout(partitions=8, slots=3)


def claim(slot: int, epoch: int, server: str) -> SlotClaim:
    return SlotClaim(
        slot=slot,
        epoch=epoch,
        server=server,
        incarnation=f"{server}-i",
        host="h",
        port=1,
    )


def fold(*entries: object) -> ClusterMap:
    cluster_map = ClusterMap()
    for entry in entries:
        cluster_map.apply(entry)  # type: ignore[arg-type]
    return cluster_map


def test_the_first_claim_of_an_epoch_wins_and_later_ones_are_ignored() -> None:
    cluster_map = fold(LAYOUT, claim(1, 1, "a"), claim(1, 1, "b"), claim(1, 3, "c"))
    assert cluster_map.owners[1].server == "a"
    assert cluster_map.epoch(1) == 1


def test_a_takeover_needs_exactly_the_next_epoch() -> None:
    cluster_map = fold(LAYOUT, claim(0, 1, "a"), claim(0, 2, "standby"))
    assert cluster_map.owners[0].server == "standby"
    assert cluster_map.owner_of(3) == cluster_map.owners[0]


def test_claims_before_the_layout_or_for_unknown_slots_are_ignored() -> None:
    cluster_map = fold(claim(0, 1, "early"), LAYOUT, claim(7, 1, "nowhere"))
    assert cluster_map.owners == {}


def test_partitions_of_a_slot_follow_round_robin_routing() -> None:
    cluster_map = fold(LAYOUT)
    assert [cluster_map.partitions_of(s) for s in range(3)] == [
        (0, 3, 6),
        (1, 4, 7),
        (2, 5),
    ]
    assert {cluster_map.slot_of(p) for p in (1, 4, 7)} == {1}


def test_group_creation_is_settled_by_log_order_and_membership_changes_apply() -> None:
    cluster_map = fold(
        GroupCreated(group="g", owner="a", members=("a", "b"), nonce="first"),
        GroupCreated(group="g", owner="z", members=("z",), nonce="second"),
        Membership(group="g", user="c", member=True),
        Membership(group="g", user="a", member=False),
        Membership(group="unknown", user="c", member=True),
    )
    assert cluster_map.group_nonces["g"] == "first"
    assert cluster_map.groups == {"g": {"b", "c"}}


def test_the_map_needs_a_layout_to_route() -> None:
    with pytest.raises(LookupError, match="cluster init"):
        ClusterMap().owner_of(0)


entries = st.one_of(
    st.builds(
        SlotClaim,
        slot=st.integers(0, 3),
        epoch=st.integers(1, 4),
        server=st.sampled_from(["a", "b", "c"]),
        incarnation=st.sampled_from(["x", "y"]),
        host=st.just("127.0.0.1"),
        port=st.integers(1, 65535),
        ws_port=st.none() | st.integers(1, 65535),
    ),
    st.builds(
        Heartbeat,
        server=st.sampled_from(["a", "b"]),
        incarnation=st.sampled_from(["x", "y"]),
        sequence=st.integers(0, 100),
        host=st.just("h"),
        port=st.integers(1, 65535),
        standby=st.booleans(),
    ),
    st.builds(
        Membership,
        group=st.sampled_from(["g", "h"]),
        user=st.sampled_from(["u", "v"]),
        member=st.booleans(),
    ),
)


@given(st.lists(entries, max_size=30))
def test_every_reader_of_the_same_log_builds_the_same_map(log: list[object]) -> None:
    """Two servers folding the same records, one after a round trip through bytes."""
    direct = fold(LAYOUT, *log)
    replayed = ClusterMap()
    for entry in [LAYOUT, *log]:
        key, value = encode_entry(entry)  # type: ignore[arg-type]
        decoded = decode_entry(key, value)
        assert decoded == entry
        replayed.apply(decoded)  # type: ignore[arg-type]
    assert replayed == direct
    for slot, owner in direct.owners.items():
        assert owner.epoch >= 1 and owner.slot == slot


def test_a_record_of_unknown_kind_is_skipped_and_a_malformed_one_refused() -> None:
    assert decode_entry(b"future/thing", b"\x80") is None
    with pytest.raises(ValueError, match="malformed"):
        decode_entry(b"hb/a", b"\x81\xa1x\x01")
