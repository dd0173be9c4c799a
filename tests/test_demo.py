"""`files-proxy demo` and `files-proxy simulate` as a newcomer runs them: subprocesses, the SDK, Ctrl-C."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
from collections.abc import Iterator

import anthropic
import httpx
import psutil
import pytest

from tests.constants import FILES_BETA
from tests.support import FILES_PROXY, WATCH, free_port


@contextlib.contextmanager
def _running(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`files-proxy ARGS` with piped output; killed at the end if the test did not stop it."""
    command = [FILES_PROXY, *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def _read_until(process: subprocess.Popen[str], marker: str) -> str:
    assert process.stdout is not None
    printed = ""
    while marker not in printed:
        line = process.stdout.readline()
        assert line, f"exited early: {printed!r} {process.stderr.read() if process.stderr else ''}"
        printed += line
    return printed


def _interrupt(process: subprocess.Popen[str]) -> int:
    """Ctrl-C; everything the process printed after that goes to the secret scan."""
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=15)
    WATCH.feed(stdout + stderr)
    return process.returncode


@pytest.fixture
def demo() -> Iterator[tuple[subprocess.Popen[str], str]]:
    with _running("demo", "--port", "0") as process:
        yield process, _read_until(process, "Ctrl-C")


def test_demo_prints_a_url_and_key_that_work_with_the_sdk_and_stops_on_ctrl_c(
    demo: tuple[subprocess.Popen[str], str],
) -> None:
    process, printed = demo
    url = re.search(r"base URL:\s+(\S+)", printed)
    key = re.search(r"proxy key:\s+(\S+)", printed)
    assert url and key
    assert f'base_url="{url[1]}"' in printed and f'api_key="{key[1]}"' in printed

    with anthropic.Anthropic(base_url=url[1], api_key=key[1], max_retries=0) as client:
        [example] = client.files.list()
        assert len(client.files.download(example.id).read()) == example.size_bytes
        uploaded = client.files.upload(file=("mine.txt", b"demo", "text/plain"))
        assert {f.id for f in client.files.list()} == {example.id, uploaded.id}
    with anthropic.Anthropic(base_url=url[1], api_key="fp-wrong", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            stranger.files.list()

    assert psutil.Process(process.pid).children(recursive=True) == []
    assert _interrupt(process) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url[1]}/healthz")


def test_simulate_answers_the_sdk_directly_in_both_generations() -> None:
    port = free_port()
    with _running("simulate", "--port", str(port)) as process:
        _read_until(process, f"127.0.0.1:{port}")
        with anthropic.Anthropic(
            base_url=f"http://127.0.0.1:{port}", api_key="sk-any", max_retries=0
        ) as client:
            uploaded = client.files.upload(file=("ga.txt", b"ga", "text/plain"))
            page = client.files.list()
            assert [f.id for f in page.data] == [uploaded.id]
            assert page.next_page is None
            beta_page = client.beta.files.list(betas=[FILES_BETA])
            assert [f.id for f in beta_page.data] == [uploaded.id]
            assert beta_page.to_dict().keys() == {"data", "has_more", "first_id", "last_id"}
        assert _interrupt(process) == 0
