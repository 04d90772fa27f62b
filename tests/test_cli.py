"""The ``msgnet`` command: tokens, send and listen, serve's settings and errors.

Argument handling is tested by calling ``main`` in this process; the client
commands run ``main`` in a worker thread (each has its own trio run) against a
``python -m msgnet serve`` process, and the exit codes of the real entry point
are checked on a process too.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import trio
from support import SECRET, RawConnection, token
from test_server_durability import (
    REPO,
    WAIT,
    child_environment,
    client_of,
    server_process,
)

import protocol
from msgnet import AuthError, ServerConfig, verify_token
from msgnet._cli import main


def run_in_thread(argv: Sequence[str]) -> int:
    return main(argv)


def one_error_line(text: str) -> str:
    """The single line a failed command wrote; never a traceback or usage."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --- token -----------------------------------------------------------------------


def test_token_prints_a_token_that_verifies_for_that_user(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["token", "alice", "--secret", SECRET]) == 0
    printed = capsys.readouterr().out.strip()

    verify_token(SECRET, printed, user="alice")
    with pytest.raises(AuthError):
        verify_token(SECRET, printed, user="bob")
    with pytest.raises(AuthError):
        verify_token("another-secret-" + "z" * 40, printed, user="alice")


def test_token_without_a_secret_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "alice", "--data-dir", str(tmp_path / "empty")]) == 2
    assert "no secret" in one_error_line(capsys.readouterr().err)


# --- serve's settings ------------------------------------------------------------


def test_serve_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for field in attrs.fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name
    assert "--config" in text


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--port", "abc"], "'abc'"),
        (["--idle-timeout", "soon"], "'soon'"),
        (["--port", "70000"], "70000"),
        (["--rate-limit", "-1"], "-1"),
        (["--backplane", "carrier-pigeon"], "'carrier-pigeon'"),
        (["--no-such-setting", "1"], "--no-such-setting"),
    ],
)
def test_bad_serve_flag_is_a_one_line_error_with_exit_code_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["serve", *argv])
    except SystemExit as exit:
        code = exit.code  # type: ignore[assignment]
    assert code == 2
    assert named in one_error_line(capsys.readouterr().err)


def test_bad_environment_value_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MSGNET_MAX_CONNECTIONS", "lots")
    assert main(["serve"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "max_connections" in line
    assert "'lots'" in line


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("max_conections = 5\n", "'max_conections'"),
        ("port = 'seventy'\n", "'seventy'"),
        ("port = [\n", "cannot read"),
    ],
    ids=["unknown key", "wrong type", "not toml"],
)
def test_bad_config_file_is_a_one_line_error_with_exit_code_2(
    toml: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "msgnet.toml"
    path.write_text(toml)
    assert main(["serve", "--config", str(path)]) == 2
    assert named in one_error_line(capsys.readouterr().err)


def test_the_installed_entry_point_exits_2_on_a_bad_setting(tmp_path: Path) -> None:
    path = tmp_path / "msgnet.toml"
    path.write_text("max_conections = 5\n")
    done = subprocess.run(
        [sys.executable, "-m", "msgnet", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        env=child_environment(),
        cwd=str(REPO),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "max_conections" in one_error_line(done.stderr)


async def test_config_file_then_environment_then_flags_each_win(
    tmp_path: Path,
) -> None:
    """Seen from a client: the Welcome carries the name and two limits."""
    config = tmp_path / "msgnet.toml"
    config.write_text(
        'name = "from-toml"\nidle_timeout = 11.0\nmax_frame_size = 5000\n'
    )
    environment = {"MSGNET_IDLE_TIMEOUT": "22", "MSGNET_MAX_FRAME_SIZE": "6000"}
    async with server_process(
        tmp_path / "data",
        "--config",
        str(config),
        "--max-frame-size",
        "7000",
        env=environment,
    ) as server:
        raw = RawConnection(await trio.open_tcp_stream("127.0.0.1", server.port))
        async with raw.stream:
            with trio.fail_after(WAIT):
                welcome = await raw.hello("alice")
    assert isinstance(welcome, protocol.Welcome)
    assert welcome.server == "from-toml"
    assert welcome.idle_timeout == 22.0
    assert welcome.max_frame == 7000


# --- send and listen -------------------------------------------------------------


async def test_send_and_listen_exchange_a_message_through_a_server_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with server_process(tmp_path) as server:
        # Give bob's "cli" device a stored cursor, so that listen resumes from
        # here however late it connects.
        async with client_of(server, "bob", device="cli") as bob:
            await bob.ack()
            await bob.ping()

        common = ["--port", str(server.port), "--secret", SECRET]
        with trio.fail_after(WAIT * 3):
            sent = await trio.to_thread.run_sync(
                run_in_thread,
                ["send", "--user", "alice", *common, "--to", "bob", "over the wire"],
                abandon_on_cancel=True,
            )
            assert sent == 0
            send_output = capsys.readouterr().out
            listened = await trio.to_thread.run_sync(
                run_in_thread,
                ["listen", "--user", "bob", *common, "--count", "1"],
                abandon_on_cancel=True,
            )
            assert listened == 0
            listen_output = capsys.readouterr().out

    assert send_output.startswith("sent ")
    assert listen_output.strip().endswith("alice -> @bob: over the wire")


async def test_send_with_a_token_for_someone_else_is_refused_with_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with server_process(tmp_path) as server:
        argv = ["send", "--user", "alice", "--port", str(server.port)]
        argv += ["--token", token("mallory"), "--to", "bob", "hi"]
        with trio.fail_after(WAIT * 3):
            code = await trio.to_thread.run_sync(
                run_in_thread, argv, abandon_on_cancel=True
            )
    assert code == 1
    assert "auth_failed" in one_error_line(capsys.readouterr().err)
