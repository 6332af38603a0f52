"""`python -m bot import/export` on real files in the reference's own format and names: every
name comes back unchanged, nothing is replaced or dropped unsaid, and a failed export says
so in one line and leaves no file anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot.discord_bot.scopes import scope_for
from tests.console_process import run_console
from tests.discord_harness import Harness

# What the reference's `/new <name>` makes: the rest of the line, stripped.
REFERENCE_SESSIONS: dict[str, list[dict[str, Any]]] = {
    "default": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "my project": [
        {"role": "user", "content": "plan it"},
        {"role": "assistant", "content": "step one"},
    ],
    "notes: week 1": [],
    "ada@work": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    "café ☕ 日本語": [{"role": "user", "content": "bonjour"}],
    "50% off {sale}!": [],
}


def write_reference_file(path: Path, sessions: dict[str, list[dict[str, Any]]]) -> Path:
    """As the reference's `save_sessions` writes it."""
    path.write_text(json.dumps(sessions, indent=2))
    return path


def test_every_reference_name_imports_exports_and_loads_unchanged(
    console_env: dict[str, str], tmp_path: Path
) -> None:
    reference = write_reference_file(tmp_path / "sessions.json", REFERENCE_SESSIONS)
    imported = run_console([], console_env, "import", str(reference))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines() == [
        "Imported 6 session(s) into scope 'console': 'default', 'my project', "
        "'notes: week 1', 'ada@work', 'café ☕ 日本語', '50% off {sale}!'."
    ]
    exported = tmp_path / "out.json"
    assert run_console([], console_env, "export", str(exported)).returncode == 0
    assert json.loads(exported.read_text()) == REFERENCE_SESSIONS
    out = run_console(
        ["/load my project", "/status", "/load café ☕ 日本語", "/list"], console_env
    ).stdout
    assert "Loaded session: my project (2 messages)" in out
    assert "Session: my project" in out
    assert "Loaded session: café ☕ 日本語 (1 message)" in out
    assert "  notes: week 1 (0 messages)" in out and "  50% off {sale}! (0 messages)" in out


def test_a_name_taken_is_refused_kept_beside_or_replaced_only_when_asked(
    console_env: dict[str, str], tmp_path: Path
) -> None:
    first = write_reference_file(tmp_path / "first.json", REFERENCE_SESSIONS)
    assert run_console([], console_env, "import", str(first)).returncode == 0
    newer = {
        "my project": [{"role": "user", "content": "newer"}],
        "fresh": [{"role": "user", "content": "new one"}],
    }
    second = write_reference_file(tmp_path / "second.json", newer)

    refused = run_console([], console_env, "import", str(second))
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        "error: Scope 'console' already has session(s) 'my project'; nothing was imported. "
        "Choose --on-conflict keep-both (import beside them) or replace (overwrite them)."
    ]
    kept = run_console([], console_env, "import", "--on-conflict", "keep-both", str(second))
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.splitlines() == [
        "Imported 2 session(s) into scope 'console': 'my project (2)', 'fresh'.",
        "Kept both: the file's 'my project' was imported as 'my project (2)'; "
        "the stored one is unchanged.",
    ]
    replaced = run_console([], console_env, "import", "--on-conflict", "replace", str(second))
    assert replaced.stdout.splitlines() == [
        "Imported 2 session(s) into scope 'console': 'my project', 'fresh'.",
        "Replaced the stored 'my project' (2 message(s) before).",
        "Replaced the stored 'fresh' (1 message(s) before).",
    ]
    exported = tmp_path / "out.json"
    assert run_console([], console_env, "export", str(exported)).returncode == 0
    stored = json.loads(exported.read_text())
    assert stored["my project"] == newer["my project"]
    assert stored["my project (2)"] == newer["my project"]
    assert stored["default"] == REFERENCE_SESSIONS["default"]


def test_unpaired_tool_messages_and_messages_over_the_cap_are_dropped_and_said(
    console_env: dict[str, str], tmp_path: Path
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
    sessions: dict[str, list[dict[str, Any]]] = {
        "tools": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "let me see", "tool_calls": [call]},
            {"role": "user", "content": "never mind"},
            {"role": "tool", "tool_call_id": "call_9", "content": "orphan"},
            {"role": "assistant", "content": "ok"},
        ],
        "long": [{"role": "user", "content": f"message {i}"} for i in range(6)],
    }
    reference = write_reference_file(tmp_path / "sessions.json", sessions)
    env = {**console_env, "HISTORY_CAP_MESSAGES": "4"}
    imported = run_console([], env, "import", str(reference))
    assert imported.stdout.splitlines()[1:] == [
        "Dropped the unpaired tool calls or results of 2 message(s) of 'tools' "
        "(the model refuses them); any text they carried was kept.",
        "Left out the oldest 2 message(s) of 'long', over HISTORY_CAP_MESSAGES or HISTORY_CAP_MB.",
    ]
    exported = tmp_path / "out.json"
    run_console([], env, "export", str(exported))
    assert json.loads(exported.read_text())["long"] == sessions["long"][2:]
    assert json.loads(exported.read_text())["tools"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "let me see"},
        {"role": "user", "content": "never mind"},
        {"role": "assistant", "content": "ok"},
    ]


@pytest.mark.parametrize("target", ["missing/out.json", "a folder"])
def test_an_export_that_cannot_be_written_says_so_and_leaves_no_file(
    console_env: dict[str, str], tmp_path: Path, target: str
) -> None:
    reference = write_reference_file(tmp_path / "sessions.json", REFERENCE_SESSIONS)
    assert run_console([], console_env, "import", str(reference)).returncode == 0
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    work = tmp_path / "work"
    (work / "a folder").mkdir(parents=True)
    before = sorted(work.rglob("*"))
    env = {**console_env, "TMPDIR": str(system_temp)}

    result = run_console([], env, "export", str(work / target))
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    said = {
        "missing/out.json": f"error: The folder {work / 'missing'} does not exist; nothing "
        "was written.",
        "a folder": f"error: {work / 'a folder'} is a folder; give a file name, such as "
        f"{work / 'a folder' / 'sessions.json'}.",
    }
    assert result.stderr.strip() == said[target]
    assert sorted(work.rglob("*")) == before
    assert list(system_temp.iterdir()) == []


def test_an_export_to_a_name_too_long_says_so(console_env: dict[str, str], tmp_path: Path) -> None:
    reference = write_reference_file(tmp_path / "sessions.json", REFERENCE_SESSIONS)
    assert run_console([], console_env, "import", str(reference)).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    result = run_console([], console_env, "export", str(work / ("x" * 300)))
    assert result.returncode == 1
    assert result.stderr.endswith("File name too long; nothing was written.\n")
    assert len(result.stderr.splitlines()) == 1
    assert list(work.iterdir()) == []


def test_a_write_failing_after_its_temporary_file_was_made_removes_it(tmp_path: Path) -> None:
    """The rename onto the target is the step that can fail once the temporary file exists
    (here: a name the file system refuses, which the command checks before)."""
    from bot.transfer import ExportFailed, write_whole

    with pytest.raises(ExportFailed, match="File name too long; nothing was written"):
        write_whole(tmp_path / ("x" * 300), "{}")
    assert list(tmp_path.iterdir()) == []


def test_exporting_a_scope_with_no_sessions_says_so_and_writes_nothing(
    console_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out.json"
    result = run_console([], console_env, "export", "--scope", "discord:123", str(out))
    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: Scope 'discord:123' has no sessions; nothing was written. --scope is "
    )
    assert "discord:<id> for a Discord channel" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()


async def test_an_imported_channel_session_is_offered_and_loaded_by_discord(
    harness: Harness, tmp_path: Path
) -> None:
    """An admin imports a reference file into a channel's scope; `/load` offers its names
    and loads one, and its history is what the model is sent next."""
    import asyncio

    fake = harness.discord
    reference = write_reference_file(tmp_path / "sessions.json", REFERENCE_SESSIONS)
    env = {**harness.api.env(), "PATH": "/usr/bin:/bin", "REDIS_URL": harness.redis_url}
    scope = scope_for(fake.general_id)
    imported = await asyncio.to_thread(
        run_console, [], env, "import", "--scope", scope, str(reference)
    )
    assert imported.returncode == 0, imported.stderr

    choices = await fake.autocomplete("load", "name", "PROJ", fake.member, fake.general_id)
    assert [(c["name"], c["value"]) for c in choices] == [("my project", "my project")]
    choices = await fake.autocomplete("load", "name", "☕", fake.member, fake.general_id)
    assert [c["value"] for c in choices] == ["café ☕ 日本語"]
    said = await harness.command(
        "load", {"name": "my project"}, user=fake.member, channel_id=fake.general_id
    )
    assert said == "Loaded session: my project (2 messages)"
    await harness.say(fake.general_id, fake.member, "and then?", mentions_bot=True)
    await harness.answer(fake.general_id, 1)
    assert [m["content"] for m in harness.api.messages_sent()[1:3]] == ["plan it", "step one"]
