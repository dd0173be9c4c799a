"""README's shell snippets that need no network, run as written, so README cannot drift from the
program: the Quickstart's demo (and the Python snippet it prints), hash-key, and check-config on the
example config as shipped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import WATCH

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent


def snippet(marker: str) -> str:
    """The ```sh block right after `<!-- marker -->` in README, unindented."""
    found = re.search(rf"<!-- {re.escape(marker)} -->\s*```sh\n(.*?)```", README, re.DOTALL)
    assert found, f"README has no snippet marked {marker!r}"
    return textwrap.dedent(found[1])


def run_in(folder: Path, script: str) -> subprocess.CompletedProcess[str]:
    """A snippet under bash in `folder`, with this venv's `files-proxy` first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    WATCH.feed(result.stdout + result.stderr)
    return result


def test_hash_key_snippet_prints_a_sha256(tmp_path: Path) -> None:
    result = run_in(tmp_path, snippet("snippet: hash-key"))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"[0-9a-f]{64}\n", result.stdout)


def test_check_config_snippet_passes_on_the_example_config_as_shipped(tmp_path: Path) -> None:
    shutil.copy(ROOT / "config.example.toml", tmp_path / "config.example.toml")
    result = run_in(tmp_path, snippet("snippet: check-config"))
    assert result.returncode == 0, result.stderr
    assert "config.example.toml: OK" in result.stdout
    assert "tenant research" in result.stdout


def test_quickstart_demo_prints_a_snippet_that_lists_and_downloads_in_the_venv() -> None:
    """The Quickstart's last command (with `--port 0`, as README suggests when 8080 is taken), then the
    Python it prints, run with the venv's own interpreter."""
    command = snippet("quickstart").strip().split(" && ")[-1]
    assert command == ".venv/bin/files-proxy demo"
    demo = [str(BIN / "files-proxy"), "demo", "--port", "0"]
    with subprocess.Popen(demo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            banner = ""
            while "Ctrl-C" not in banner:
                line = process.stdout.readline()
                assert line, f"demo exited: {banner}"
                banner += line
            code = textwrap.dedent(banner.split("):\n", 1)[1].rsplit("Ctrl-C", 1)[0])
            assert f"paste this into {BIN / 'python'}" in banner
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert result.stdout == "['example-output.bin']\n4096 bytes downloaded\n"
        finally:
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=15)
            WATCH.feed(banner + stdout + stderr)
    assert process.returncode == 0
    assert stderr == ""  # the demo's terminal holds the banner, not a log line per request
