"""The terminal console, driven through stdin/stdout as a person would, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.console_process import run_console
from tests.fakes.dedalus_api import FakeDedalusAPI


def test_history_model_and_mcp_survive_a_restart(
    console_env: dict[str, str], api: FakeDedalusAPI
) -> None:
    first = run_console(["My name is Ada.", "/model 3", "/mcp acme/search", "/quit"], console_env)
    assert first.returncode == 0, first.stderr
    assert "Assistant: echo: My name is Ada." in first.stdout
    assert "Switched to: google/gemini-3-pro-preview" in first.stdout
    assert "Added MCP server: acme/search" in first.stdout

    api.reply_text("You told me: Ada.")
    second = run_console(["What is my name?", "/status"], console_env)
    assert second.returncode == 0, second.stderr
    assert "Assistant: You told me: Ada." in second.stdout
    assert "Model: google/gemini-3-pro-preview" in second.stdout
    assert "MCP Servers: acme/search" in second.stdout
    assert "Messages: 4" in second.stdout
    sent = api.messages_sent()
    assert [m["content"] for m in sent[1:]] == [
        "My name is Ada.",
        "echo: My name is Ada.",
        "What is my name?",
    ]
    assert api.last_request["mcp_servers"] == ["acme/search"]


def test_sessions_are_created_listed_loaded_and_cleared(console_env: dict[str, str]) -> None:
    out = run_console(
        ["hello", "/new work", "in work", "/list", "/load default", "/clear", "/status"],
        console_env,
    ).stdout
    assert "Started new session: work" in out
    assert "* work (2 messages)" in out and "  default (2 messages)" in out
    assert "Loaded session: default (2 messages)" in out
    assert "Cleared session: default" in out
    assert "Messages: 0" in out


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("/model 9", "Unknown model '9'. Choose one of: 1. openai/gpt-5.1"),
        ("/model gpt-2", "Unknown model 'gpt-2'"),
        ("/mcp ftp://example.com/x", "Only https:// URLs"),
        ("/mcp https://user:pw@example.com/x", "credentials are refused"),
        ("/mcp not a slug", "cannot contain spaces"),
        ("/mcp remove acme/none", "is not active"),
        ("/new " + "x" * 101, "at most 100 characters"),
        ("/load ghost", "no session named 'ghost'"),
        ("/load", "Usage: /load <name>"),
        ("/frobnicate", "Unknown command: /frobnicate"),
    ],
)
def test_bad_command_input_is_explained_and_changes_nothing(
    console_env: dict[str, str], line: str, said: str
) -> None:
    out = run_console(["hello", line, "/status", "/list"], console_env).stdout
    assert said in out
    assert "Traceback" not in out
    assert "Session: default" in out and "Model: openai/gpt-5.1" in out
    assert "MCP Servers: None" in out and "Messages: 2" in out
    assert "* default (2 messages)" in out and "ghost" not in out.split(said)[-1]


def test_import_then_export_round_trips_the_reference_file(
    console_env: dict[str, str], tmp_path: Path
) -> None:
    reference = tmp_path / "sessions.json"
    reference.write_text(
        '{"default": [{"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "hello"}], "other": []}'
    )
    imported = run_console([], console_env, "import", str(reference))
    assert imported.returncode == 0, imported.stderr
    assert "Imported 2 session(s)" in imported.stdout
    exported = tmp_path / "out.json"
    assert run_console([], console_env, "export", str(exported)).returncode == 0
    assert json.loads(exported.read_text()) == json.loads(reference.read_text())


@pytest.mark.parametrize(
    ("content", "position"),
    [
        ('{"default": [{"role": "user", "content": "hi"},]}', "bad.json: line 1, column 48"),
        ('{"default": [{"role": "user"}, {"role": "wizard"}]}', '$["default"][1].role'),
        ('{"ok": [], " padded": []}', '$[" padded"]: A session name cannot start or end'),
        ('{"ok": [], "a\\tb": []}', '$["a\\tb"]: A session name cannot contain control'),
        ('{"ok": [], "ok": [{"role": "user"}]}', '$["ok"]: this session appears twice'),
        ('{"a": [{"role": "user", "content": "x\\ud800"}]}', '$["a"][0]: holds a lone surrogate'),
        ('{"default": [{"role": "tool", "content": "x"}]}', '$["default"][0].tool_call_id'),
        ('["not", "an", "object"]', "$: expected an object"),
    ],
)
def test_a_malformed_import_names_the_problem_and_imports_nothing(
    console_env: dict[str, str], tmp_path: Path, content: str, position: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = run_console([], console_env, "import", str(bad))
    assert result.returncode == 1
    assert position in result.stderr and "Traceback" not in result.stderr
    exported = tmp_path / "after.json"
    nothing = run_console([], console_env, "export", str(exported))
    assert "Scope 'console' has no sessions; nothing was written." in nothing.stderr
    assert not exported.exists()


def test_compact_in_the_console_summarizes_the_session(
    console_env: dict[str, str], api: FakeDedalusAPI
) -> None:
    lines = ["/compact", "My name is Ada.", "/compact", "/status", "Who am I?", "/quit"]
    done = run_console(lines, console_env)
    assert done.returncode == 0, done.stderr
    assert "Error: This session has no messages yet; there is nothing to summarize." in done.stdout
    assert "Summary covers the first 2 messages of this session now" in done.stdout
    assert "Summary: covers the first 2 messages" in done.stdout
    sent = api.messages_sent()
    assert [m["role"] for m in sent] == ["system", "system", "user"]
    assert "My name is Ada." in sent[1]["content"] and sent[2]["content"] == "Who am I?"
