"""Session fixtures: a real Apache Kafka broker and a real PostgreSQL server."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from msgnet._devkafka import DevKafka, KafkaToolsMissing
from msgnet._devpostgres import DevPostgres, PostgresToolsMissing


def run_slow_tests() -> bool:
    """Fault tests with whole server processes run in CI, or when asked for."""
    return os.environ.get("CI") == "true" or os.environ.get("MSGNET_SLOW") == "1"


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    # The default local run stays within a few minutes; CI runs everything.
    if run_slow_tests():
        return
    skip = pytest.mark.skip(
        reason="slow fault test: runs under CI=true, or locally with MSGNET_SLOW=1"
    )
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[DevKafka | None]:
    """The session's development broker, or None when MSGNET_KAFKA_BOOTSTRAP is set.

    Started once per session on free loopback ports. Without Java or Maven the
    Kafka tests are skipped on a developer's machine, but fail under CI=true,
    where a missing broker must never pass as a green run.
    """
    if os.environ.get("MSGNET_KAFKA_BOOTSTRAP"):
        yield None
        return

    broker = DevKafka()
    try:
        broker.start()
    except KafkaToolsMissing as exc:
        broker.close()
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs a real Kafka broker for this test: {exc}")
        pytest.skip(f"no Kafka broker: {exc} (or set MSGNET_KAFKA_BOOTSTRAP)")
    except BaseException:
        broker.close()
        raise

    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: DevKafka | None) -> str:
    """The ``host:port`` of the broker the Kafka tests use."""
    if kafka_broker is None:
        return os.environ["MSGNET_KAFKA_BOOTSTRAP"]
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A PostgreSQL server for the tests: MSGNET_POSTGRES_DSN, or a throwaway one.

    The throwaway cluster lives in a temporary folder on a free loopback port
    for the whole session. Without PostgreSQL's programs the tests that need
    it are skipped on a developer's machine, but fail under CI=true. A given
    DSN must be allowed to create databases: each test gets its own.
    """
    given = os.environ.get("MSGNET_POSTGRES_DSN")
    if given:
        yield given
        return

    cluster = DevPostgres()
    try:
        cluster.start()
    except PostgresToolsMissing as exc:
        cluster.close()
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs a real PostgreSQL for this test: {exc}")
        pytest.skip(f"no PostgreSQL: {exc} (or set MSGNET_POSTGRES_DSN)")
    except BaseException:
        cluster.close()
        raise

    try:
        yield cluster.dsn
    finally:
        cluster.close()


@pytest.fixture
def postgres_database(postgres_dsn: str) -> Iterator[str]:
    """The DSN of a new, empty database on the test server, dropped afterwards."""
    name = f"msgnet_test_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(postgres_dsn, dbname=name)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )
