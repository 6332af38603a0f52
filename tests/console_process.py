"""`python -m bot` run as a person runs it: lines on stdin, or a real terminal (a pty)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT_SECONDS = 60.0
"""How long a step may take before the test fails (a guard against hanging, not a timing)."""


def run_console(
    lines: list[str], env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *(args or ("console",))],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        cwd=ROOT,
        env=env,
    )


def _take_terminal() -> None:
    """In the child, in its new session: make the pty its controlling terminal, so the
    terminal sends it SIGINT for ^C (an inherited descriptor alone does not)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`python -m bot console` on a pseudo-terminal: what is typed goes through the
    terminal's line discipline, so ^C is turned into SIGINT by the terminal, as for a
    person at a keyboard."""

    def __init__(self, env: dict[str, str]) -> None:
        self._fd, child = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot", "console"],
            stdin=child,
            stdout=child,
            stderr=child,
            cwd=ROOT,
            env={**env, "TERM": "dumb"},
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(child)
        self.output = ""

    def wait_for(self, text: str, after: int = 0) -> int:
        """Read until `text` appears past position `after`; where it ends."""
        deadline = time.monotonic() + WAIT_SECONDS
        while (found := self.output.find(text, after)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                raise AssertionError(f"{text!r} never appeared; the terminal shows:\n{self.output}")
        return found + len(text)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self._fd, 65536)
        except OSError:  # the child closed the terminal
            return False
        self.output += data.decode(errors="replace")
        return bool(data)

    def type(self, keys: str) -> None:
        os.write(self._fd, keys.encode())

    def exit_code(self) -> int:
        """Wait for the process to end (reading what it still writes)."""
        deadline = time.monotonic() + WAIT_SECONDS
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.05)
        self._read(0)
        return self.process.wait(timeout=1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self._fd)
