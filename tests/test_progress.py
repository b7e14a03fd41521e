"""Progress bars: shown on stderr when it is a terminal (a pseudo-terminal here) and the output is
not JSON; piped and JSON output are unchanged and carry nothing extra."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from gradlab import progress

ROOT = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_only_inside_shown(capsys):
    with progress.bar(3, "counting", unit="run") as done:
        done.update(3)
    assert capsys.readouterr().err == ""
    with progress.shown(), progress.bar(3, "counting", unit="run") as done:
        done.update(3)
    err = capsys.readouterr().err
    assert "counting" in err and "0/3" in err and "run" in err  # the count, rate and time left
    assert not progress.active()


def test_the_command_line_rule():
    assert progress.wanted(False, _Terminal())
    assert not progress.wanted(True, _Terminal())  # --json
    assert not progress.wanted(False, io.StringIO())  # piped


def _run(args: list[str], *, terminal: bool) -> tuple[int, str, str]:
    """``gradlab ARGS`` with stdout piped and stderr on a pseudo-terminal (or piped)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "gradlab", *args]
    if not terminal:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100, as a terminal
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=follower, text=True, env=env, cwd=ROOT)
    finally:
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
    return done.returncode, done.stdout, b"".join(chunks).decode("utf-8", "replace")


def test_simulate_shows_progress_on_a_real_terminal():
    code, out, err = _run(["simulate", "dpo", "--steps", "4", "--seeds", "2"], terminal=True)
    assert code == 0 and "expected_length" in out
    assert "training" in err and "/2" in err and "run" in err


def test_output_is_the_same_whether_stderr_is_a_terminal_or_not(monkeypatch, capsys):
    """In process (the compiled program is reused): the text on stdout does not depend on the
    terminal, the bar goes to stderr only on a terminal, and --json prints nothing on stderr."""
    from gradlab.cli import main

    args = ["simulate", "dpo", "--steps", "4", "--seeds", "2"]
    seen = {}
    cases = (("tty", _Terminal(), []), ("pipe", io.StringIO(), []), ("json", _Terminal(), ["--json"]))
    for label, stream, extra in cases:
        monkeypatch.setattr(sys, "stderr", stream)
        assert main([*args, *extra]) == 0
        seen[label] = (capsys.readouterr().out, stream.getvalue())
    assert seen["tty"][0] == seen["pipe"][0] and "training" in seen["tty"][1]
    assert seen["pipe"][1] == "" and seen["json"][1] == "" and seen["json"][0].startswith("{")


def test_a_counter_reports_through_a_bar(capsys):
    with progress.counter("checking", unit="row") as report:
        report(1, 4, "unigram")
    assert capsys.readouterr().err == ""  # off outside shown()
    with progress.shown(), progress.counter("checking", unit="row") as report:
        report(0, 4, "unigram")
        report(4, 4, "bigram")
    err = capsys.readouterr().err
    assert "checking" in err and "/4" in err and "row" in err
