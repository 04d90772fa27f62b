"""Tests for the routing maths: Kafka-compatible partitioning and slot assignment."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgnet._routing import (
    MAX_USER_ID_LENGTH,
    assign_partitions,
    murmur2,
    partition_for,
    slot_for_partition,
)

with warnings.catch_warnings():
    # kafka-python 3.0 calls the deprecated importlib.resources.read_text while it
    # imports, which the suite's filterwarnings = error would turn into a failure.
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.partitioner.default import DefaultPartitioner
    from kafka.partitioner.default import murmur2 as kafka_python_murmur2

REPO_ROOT = Path(__file__).resolve().parent.parent

user_ids = st.text(min_size=1, max_size=MAX_USER_ID_LENGTH)
partition_counts = st.integers(min_value=1, max_value=10_000)


# -- murmur2 and partition_for agree with Kafka ------------------------------------


# Signed results of the Java client's Utils.murmur2, as its UtilsTest states them.
KAFKA_JAVA_MURMUR2_VECTORS = [
    ("21", -973932308),
    ("foobar", -790332482),
    ("a-little-bit-long-string", -985981536),
    ("a-little-bit-longer-string", -1486304829),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    ("abc", 479470107),
]


@pytest.mark.parametrize(("text", "expected"), KAFKA_JAVA_MURMUR2_VECTORS)
def test_murmur2_gives_the_java_clients_signed_hash(text: str, expected: int) -> None:
    assert murmur2(text.encode("utf-8")) == expected


@pytest.mark.parametrize(("text", "expected"), KAFKA_JAVA_MURMUR2_VECTORS)
def test_partition_is_the_java_hash_without_sign_bit_modulo_count(
    text: str, expected: int
) -> None:
    # Worked by hand from the Java vectors: clear the sign bit, then take the modulo.
    for partitions in (1, 3, 16, 100):
        assert partition_for(text, partitions) == (expected & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize(
    ("user_id", "partitions", "expected"),
    [
        ("foobar", 16, 14),
        ("abc", 16, 11),
        ("21", 3, 0),
        ("a-little-bit-long-string", 7, 1),
    ],
)
def test_partition_of_known_ids(user_id: str, partitions: int, expected: int) -> None:
    assert partition_for(user_id, partitions) == expected


@given(data=st.binary(max_size=300))
def test_murmur2_matches_kafka_python_on_any_bytes(data: bytes) -> None:
    # kafka-python returns the same 32 bits read as unsigned; ours is Java's signed int.
    ours = murmur2(data)

    assert -(2**31) <= ours < 2**31
    assert ours & 0xFFFFFFFF == kafka_python_murmur2(data)


class _OneTopicCluster:
    """Just enough cluster metadata for kafka-python's DefaultPartitioner."""

    def __init__(self, topic: str, partitions: int) -> None:
        self._topic = topic
        self._partitions = set(range(partitions))

    def topics(self) -> set[str]:
        return {self._topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions


@given(user_id=user_ids, partitions=partition_counts)
def test_partition_matches_kafka_python_default_partitioner(
    user_id: str, partitions: int
) -> None:
    key = user_id.encode("utf-8")
    cluster = _OneTopicCluster("inbox", partitions)

    kafkas = DefaultPartitioner().partition("inbox", user_id, key, b"", b"", cluster)

    assert partition_for(user_id, partitions) == kafkas


@given(user_id=user_ids, partitions=partition_counts)
def test_partition_is_in_range_for_any_id_and_count(
    user_id: str, partitions: int
) -> None:
    assert 0 <= partition_for(user_id, partitions) < partitions


def test_partition_accepts_an_id_of_exactly_the_maximum_length() -> None:
    assert 0 <= partition_for("é" * MAX_USER_ID_LENGTH, 16) < 16


# -- deterministic across processes ------------------------------------------------


_CHILD_SCRIPT = """
import json, sys
from msgnet._routing import partition_for
ids, counts = json.load(sys.stdin)
json.dump([[partition_for(i, n) for n in counts] for i in ids], sys.stdout)
"""


def _varied_ids(count: int) -> list[str]:
    # ASCII, accented, CJK and astral characters, so multi-byte UTF-8 is exercised.
    rng = random.Random(20240611)
    alphabet = "abcxyz0189-_.@éüß漢字😀"
    return [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, MAX_USER_ID_LENGTH)))
        for _ in range(count)
    ]


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_partition_is_the_same_in_a_process_with_another_hash_seed(
    hash_seed: str,
) -> None:
    ids = _varied_ids(300)
    counts = [1, 7, 16, 64, 1000]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}

    child = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT],
        input=json.dumps([ids, counts]),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=True,
    )

    here = [[partition_for(i, n) for n in counts] for i in ids]
    assert json.loads(child.stdout) == here


# -- uniformity ---------------------------------------------------------------------


UNIFORMITY_PARTITIONS = 16

# Chi-square critical value for 15 degrees of freedom at the 0.1% level. The ids are
# fixed, so the statistic is a fixed number: this checks the hash spreads realistic
# ids, it is not a random trial that could fail by chance.
CHI_SQUARE_BOUND = 37.70


def _sequential_ids() -> list[str]:
    return [f"user-{n}" for n in range(20_000)]


def _chi_square(route: Callable[[str], int], ids: list[str]) -> float:
    counts = Counter(route(user_id) for user_id in ids)
    expected = len(ids) / UNIFORMITY_PARTITIONS
    return sum(
        (counts[p] - expected) ** 2 / expected for p in range(UNIFORMITY_PARTITIONS)
    )


@pytest.mark.parametrize(
    "ids", [_sequential_ids(), _varied_ids(20_000)], ids=["sequential", "varied"]
)
def test_partitions_are_near_uniform_over_many_ids(ids: list[str]) -> None:
    statistic = _chi_square(lambda i: partition_for(i, UNIFORMITY_PARTITIONS), ids)

    assert statistic < CHI_SQUARE_BOUND


@pytest.mark.parametrize(
    "broken_route",
    [
        lambda user_id: len(user_id) % UNIFORMITY_PARTITIONS,
        lambda user_id: 0,
        lambda user_id: sum(user_id.encode("utf-8")) % UNIFORMITY_PARTITIONS,
    ],
    ids=["length", "constant", "byte-sum"],
)
def test_uniformity_bound_rejects_a_broken_hash(
    broken_route: Callable[[str], int],
) -> None:
    assert _chi_square(broken_route, _sequential_ids()) > CHI_SQUARE_BOUND


# -- partitions to slots ------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int]:
    partitions = draw(st.integers(min_value=1, max_value=2_000))
    slots = draw(st.integers(min_value=1, max_value=partitions))
    return partitions, slots


@given(layout=layouts())
def test_assignment_gives_every_partition_one_owner_and_balanced_slots(
    layout: tuple[int, int],
) -> None:
    partitions, slots = layout

    owned = assign_partitions(partitions, slots)

    assert len(owned) == slots
    assert sorted(p for slot in owned for p in slot) == list(range(partitions))
    sizes = [len(slot) for slot in owned]
    assert max(sizes) - min(sizes) <= 1
    assert owned == assign_partitions(partitions, slots)


@given(layout=layouts())
def test_slot_for_partition_agrees_with_assignment(layout: tuple[int, int]) -> None:
    partitions, slots = layout

    owned = assign_partitions(partitions, slots)

    for slot, slot_partitions in enumerate(owned):
        for partition in slot_partitions:
            assert slot_for_partition(partition, partitions, slots) == slot


def test_assignment_deals_partitions_round_robin() -> None:
    assert assign_partitions(8, 3) == ((0, 3, 6), (1, 4, 7), (2, 5))
    assert assign_partitions(4, 4) == ((0,), (1,), (2,), (3,))
    assert assign_partitions(5, 1) == ((0, 1, 2, 3, 4),)


# -- bad arguments ------------------------------------------------------------------


def _naming(value: object) -> str:
    return re.escape(repr(value))


@pytest.mark.parametrize(
    ("user_id", "exc_type"),
    [
        (42, TypeError),
        (b"alice", TypeError),
        (None, TypeError),
        ("", ValueError),
        ("x" * (MAX_USER_ID_LENGTH + 1), ValueError),
        ("bad\ud800surrogate", ValueError),
    ],
)
def test_partition_for_rejects_a_bad_user_id_naming_it(
    user_id: object, exc_type: type[Exception]
) -> None:
    with pytest.raises(exc_type, match=_naming(user_id)):
        partition_for(user_id, 16)  # type: ignore[arg-type]


BAD_COUNTS = [
    (0, ValueError),
    (-3, ValueError),
    (1.5, TypeError),
    ("16", TypeError),
    (True, TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize(("partitions", "exc_type"), BAD_COUNTS)
def test_partition_for_rejects_a_bad_partition_count_naming_it(
    partitions: object, exc_type: type[Exception]
) -> None:
    with pytest.raises(exc_type, match=_naming(partitions)):
        partition_for("alice", partitions)  # type: ignore[arg-type]


@pytest.mark.parametrize(("count", "exc_type"), BAD_COUNTS)
def test_assignment_rejects_bad_counts_naming_them(
    count: object, exc_type: type[Exception]
) -> None:
    with pytest.raises(exc_type, match=_naming(count)):
        assign_partitions(count, 1)  # type: ignore[arg-type]
    with pytest.raises(exc_type, match=_naming(count)):
        assign_partitions(8, count)  # type: ignore[arg-type]
    with pytest.raises(exc_type, match=_naming(count)):
        slot_for_partition(0, count, 1)  # type: ignore[arg-type]
    with pytest.raises(exc_type, match=_naming(count)):
        slot_for_partition(0, 8, count)  # type: ignore[arg-type]


def test_assignment_refuses_more_slots_than_partitions() -> None:
    with pytest.raises(ValueError, match=r"slots \(9\).*partitions \(8\)"):
        assign_partitions(8, 9)
    with pytest.raises(ValueError, match=r"slots \(9\).*partitions \(8\)"):
        slot_for_partition(0, 8, 9)


@pytest.mark.parametrize(
    ("partition", "exc_type"),
    [(-1, ValueError), (8, ValueError), ("0", TypeError), (False, TypeError)],
)
def test_slot_for_partition_rejects_a_bad_partition_naming_it(
    partition: object, exc_type: type[Exception]
) -> None:
    with pytest.raises(exc_type, match=_naming(partition)):
        slot_for_partition(partition, 8, 3)  # type: ignore[arg-type]
