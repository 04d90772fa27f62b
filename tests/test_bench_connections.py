"""bench.connections refuses, up front, a count the open-file limits cannot hold."""

from __future__ import annotations

import resource

import pytest

from bench import connections


def test_count_above_the_servers_open_file_limit_is_refused_before_connecting() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no open-file limit to exceed")

    with pytest.raises(connections.TooManyConnections, match=f"{hard:,}"):
        connections.hold_connections(connections=hard + 1, workers=64)


def test_share_above_a_client_process_limit_asks_for_more_workers() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 2 * connections.SERVER_SPARE_FILES:
        pytest.skip("no usable open-file limit to exceed")

    with pytest.raises(connections.TooManyConnections, match="use more --workers"):
        connections.hold_connections(
            connections=hard - connections.SERVER_SPARE_FILES, workers=1
        )


def test_command_line_reports_the_limit_and_exits_with_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no open-file limit to exceed")

    with pytest.raises(SystemExit) as exited:
        connections.main([f"--connections={hard + 1}", "--workers=64"])

    assert exited.value.code == 2
    assert "open-file limit" in capsys.readouterr().err


def test_connections_must_be_a_positive_count_or_max() -> None:
    with pytest.raises(SystemExit):
        connections.main(["--connections=0"])
