"""A store that cannot be used is found at start-up, not when users write: a bad SQLite file
stops every mode with one line naming `SQLITE_PATH`; an unreachable Redis stops the console,
import and export with one line naming its host and port, and the bot waits for it, saying so
in its log (plain text, no password) and starting once it answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bot_process import BotProcess, bot_environment, wait_connected
from tests.conftest import RedisServer, free_port
from tests.fakes.dedalus_api import FakeDedalusAPI
from tests.fakes.discord_gateway import FakeDiscord

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "hunter2-redis-password"
MODES = {
    "bot": ["-m", "bot"],
    "console": ["-m", "bot", "console"],
    "import": ["-m", "bot", "import", "sessions.json"],
    "export": ["-m", "bot", "export", "out.json"],
}


def run_mode(mode: str, cwd: Path, *, as_unprivileged: bool = False, **env: str) -> str:
    """Run `python -m bot` in `mode` (with the secrets every mode needs, and a file to
    import) and return its standard error, having checked it is one line and exit 2."""
    (cwd / "sessions.json").write_text('{"chat": [{"role": "user", "content": "hi"}]}')
    command = [sys.executable, *MODES[mode]]
    if as_unprivileged and os.geteuid() == 0:  # root writes anywhere: drop that power
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to test as root"
        dropped = "-dac_override,-dac_read_search"
        command = [setpriv, f"--bounding-set={dropped}", f"--inh-caps={dropped}", *command]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "DISCORD_TOKEN": "t",
            "DEDALUS_API_KEY": "k",
            **env,
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], output
    return result.stderr.strip()


def bad_sqlite_path(case: str, directory: Path) -> Path:
    directory.mkdir()
    if case == "missing folder":
        return directory / "no-such-folder" / "sessions.sqlite3"
    if case == "a folder":
        return directory
    if case == "not a database":
        (directory / "notes.txt").write_text("not a database\n")
        return directory / "notes.txt"
    read_only = directory / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    return read_only / "sessions.sqlite3"


SQLITE_CASES = [
    *[(mode, "missing folder") for mode in MODES],
    ("bot", "a folder"),
    ("console", "not a database"),
    ("export", "read-only folder"),
]
SAID = {
    "missing folder": "is in a folder that does not exist",
    "a folder": "names a folder, not a file",
    "not a database": "names a file that is not an SQLite database",
    "read-only folder": "cannot be opened for writing",
}


@pytest.mark.parametrize(("mode", "case"), SQLITE_CASES)
def test_a_bad_sqlite_path_stops_every_mode_with_one_line_naming_it(
    tmp_path: Path, mode: str, case: str
) -> None:
    path = bad_sqlite_path(case, tmp_path / "store")
    said = run_mode(
        mode, tmp_path, as_unprivileged=case == "read-only folder", SQLITE_PATH=str(path)
    )
    assert said.startswith(f"error: SQLITE_PATH {SAID[case]}"), said
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("mode", ["console", "import", "export"])
def test_an_unreachable_redis_stops_the_tools_with_one_line_naming_host_and_port(
    tmp_path: Path, mode: str
) -> None:
    port = free_port()  # nothing listens there
    said = run_mode(mode, tmp_path, REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    assert said == (
        f"error: REDIS_URL points at Redis at 127.0.0.1:{port}, which cannot be used"
        " (connection refused)"
    )
    assert not (tmp_path / "out.json").exists()


async def test_the_bot_waits_for_redis_saying_so_then_answers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password=PASSWORD)  # on a free port, not started yet
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    with FakeDiscord() as fake, FakeDedalusAPI() as api:
        bot = BotProcess(bot_environment(fake, api, url), tmp_path / "bot.log")
        try:
            waiting = f"storage: Redis at 127.0.0.1:{server.port} cannot be used"
            await fake.wait_for(
                lambda: waiting in bot.text() or bot.process.poll() is not None,
                what="the bot to say it waits for Redis",
            )
            assert bot.process.poll() is None, bot.text()
            assert "connected as" not in bot.text()  # it did not start blind
            server.start()
            wait_connected([bot], timeout=60)
            fake.user_says(fake.general_id, fake.member, "hello", mentions_bot=True)
            answers = await fake.wait_bot_messages(fake.general_id, 1, timeout=60)
        finally:
            bot.stop()
            server.stop()
    assert answers[0].content  # the fake model's answer, through the store
    log = bot.text()
    assert "(connection refused); trying again in 1 s" in log
    assert f"storage: Redis at 127.0.0.1:{server.port} answers now" in log
    assert PASSWORD not in log and "Traceback" not in log
    assert "\x1b[" not in log  # a log file gets no colour codes
