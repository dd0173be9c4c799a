"""The `files-proxy` command in-process (hash-key, check-config, serve failing fast) and as `python -m proxy`."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import uvloop

from proxy.cli import main
from proxy.config import hash_key
from proxy.server import bind_listener, run_on_server_loop

ROOT = Path(__file__).resolve().parent.parent
ENV_ALPHA = "FILES_PROXY_TEST_KEY_ALPHA"
ENV_MISSING = "FILES_PROXY_TEST_KEY_NEVER_SET"
KEY_ALPHA = "sk-ant-test-alpha-cli-41c7"
KEY_BRAVO = "sk-ant-test-bravo-cli-08e2"
PROXY_KEY = "fp-test-cli-key"


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_config(folder: Path, *, alpha_env: str = ENV_ALPHA, extra_cache: str = "") -> Path:
    (folder / "bravo.key").write_text(KEY_BRAVO + "\n", encoding="utf-8")
    path = folder / "proxy.toml"
    path.write_text(
        f"""
[cache]
url = "memory://"
{extra_cache}

[[tenants]]
name = "alpha"
workspace = "alpha-prod"
api_key_env = "{alpha_env}"
client_key_sha256 = ["{hash_key(PROXY_KEY)}"]

[[tenants]]
name = "bravo"
workspace = "bravo-prod"
api_key_file = "bravo.key"
client_key_sha256 = ["{hash_key("fp-bravo-1")}", "{hash_key("fp-bravo-2")}"]
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(PROXY_KEY, id="plain"),
        pytest.param("abc", id="short"),
        pytest.param("fp-" + "z" * 200, id="long"),
    ],
)
def test_hash_key_argument(capsys: pytest.CaptureFixture[str], key: str) -> None:
    assert main(["hash-key", key]) == 0

    captured = capsys.readouterr()
    assert captured.out == sha256_hex(key) + "\n"
    assert captured.err == ""


@pytest.mark.parametrize(
    ("argv", "stdin"),
    [
        pytest.param(["hash-key"], f"{PROXY_KEY}\n", id="no-argument"),
        pytest.param(["hash-key", "-"], f"{PROXY_KEY}\n", id="dash"),
        pytest.param(["hash-key"], f"  {PROXY_KEY}\r\n", id="surrounding-whitespace"),
        pytest.param(["hash-key"], PROXY_KEY, id="no-newline"),
    ],
)
def test_hash_key_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))

    assert main(argv) == 0

    assert capsys.readouterr().out == sha256_hex(PROXY_KEY) + "\n"


@pytest.mark.parametrize(
    "stdin",
    [
        pytest.param("", id="empty"),
        pytest.param("\n", id="blank-line"),
    ],
)
def test_hash_key_refuses_empty_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))

    assert main(["hash-key"]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert "empty key" in captured.err


def test_check_config_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_ALPHA, KEY_ALPHA)
    path = write_config(tmp_path)

    assert main(["check-config", "--config", str(path)]) == 0

    captured = capsys.readouterr()
    assert f"{path}: OK" in captured.out
    assert "tenant alpha: workspace alpha-prod, 1 proxy key(s)" in captured.out
    assert "tenant bravo: workspace bravo-prod, 2 proxy key(s)" in captured.out
    for secret in (KEY_ALPHA, KEY_BRAVO, PROXY_KEY):
        assert secret not in captured.out
        assert secret not in captured.err


def test_check_config_does_not_print_the_store_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_ALPHA, KEY_ALPHA)
    path = write_config(tmp_path)
    path.write_text(
        path.read_text().replace('url = "memory://"', 'url = "redis://cache:s3cret-pw@redis.internal:6379/0"')
    )

    assert main(["check-config", "--config", str(path)]) == 0

    out = capsys.readouterr().out
    assert "cache:    redis://cache:***@redis.internal:6379/0" in out
    assert "s3cret-pw" not in out


def test_check_config_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_ALPHA, KEY_ALPHA)
    path = write_config(tmp_path, extra_cache="colour = 'blue'")

    assert main(["check-config", "--config", str(path)]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.endswith("\n")
    assert "cache.colour" in captured.err
    assert KEY_ALPHA not in captured.err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"

    assert main(["check-config", "--config", str(path)]) == 2

    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert str(path) in captured.err


def test_serve_fails_fast_on_a_missing_env_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_MISSING, raising=False)
    path = write_config(tmp_path, alpha_env=ENV_MISSING)

    assert main(["serve", "--config", str(path), "--host", "127.0.0.1", "--port", "0"]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert ENV_MISSING in captured.err
    assert "files-proxy demo" in captured.err


def test_python_dash_m_proxy_is_the_same_program() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "proxy", "hash-key", "abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == sha256_hex("abc") + "\n"


def test_the_listener_hands_out_connections_with_nagle_off() -> None:
    """Without TCP_NODELAY on accepted sockets, every kept-alive response waits for a delayed ACK."""
    listener = bind_listener("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()[:2]):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_servers_run_on_uvloop_as_uvicorn_run_would() -> None:
    """`asyncio.run` would serve on the stdlib loop, which costs about a third more per request."""
    seen: list[object] = []

    async def note_loop() -> None:
        seen.append(asyncio.get_running_loop())

    run_on_server_loop(note_loop())
    assert isinstance(seen[0], uvloop.Loop)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["serve", "--config", "{config}"], id="serve"),
        pytest.param(["demo"], id="demo"),
        pytest.param(["simulate"], id="simulate"),
    ],
)
def test_a_busy_port_is_one_clear_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv(ENV_ALPHA, KEY_ALPHA)
    config = write_config(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = [part.format(config=config) for part in command] + ["--port", str(port)]
        completed = subprocess.run(
            [sys.executable, "-m", "proxy", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ),
        )

    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_serve_says_where_it_listens_and_takes_log_level_after_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_ALPHA, KEY_ALPHA)
    config = write_config(tmp_path)
    command = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        "--log-level",
        "debug",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as serve:
        try:
            assert serve.stderr is not None
            first = serve.stderr.readline()
            url = re.search(r"serving on (http://127\.0\.0\.1:\d+)", first)
            assert url, first
            assert httpx.get(f"{url[1]}/healthz").status_code == 200
        finally:
            serve.send_signal(signal.SIGTERM)
            _, rest = serve.communicate(timeout=30)
    assert serve.returncode == 0
    assert "Started server process" in rest  # uvicorn's info lines show at debug only: the level took effect


def test_every_option_of_every_command_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "check-config", "hash-key", "simulate", "usage", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = capsys.readouterr().out
        options = re.findall(r"^  (-{1,2}[\w-]+|\w+)", help_text, re.MULTILINE)
        assert options, command
        for option in options:
            line = next(line for line in help_text.splitlines() if line.startswith(f"  {option}"))
            following = help_text.split(line, 1)[1].split("\n  -", 1)[0]
            assert len((line + following).split()) > 2, f"{command} {option} has no help"


def test_a_raw_key_where_its_hash_belongs_says_to_run_hash_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_ALPHA, KEY_ALPHA)
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace(hash_key(PROXY_KEY), PROXY_KEY), encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == 2

    err = capsys.readouterr().err
    assert "files-proxy hash-key" in err
    assert PROXY_KEY not in err


@pytest.mark.parametrize("command", [["simulate", "--port", "0"], ["demo", "--port", "0"]])
def test_without_the_simulator_package_demo_and_simulate_say_how_to_install_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """The simulator is its own package, which a production install (the image) leaves out."""
    monkeypatch.setitem(sys.modules, "files_api_simulator", None)  # as if not installed
    assert main(command) == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert "simulator is not installed" in line and "pip install -e ./simulator" in line
    assert captured.out == ""
