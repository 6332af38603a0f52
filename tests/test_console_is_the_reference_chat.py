"""`python -m bot console` looks, answers and leaves as the reference's chat does: Ctrl-C
and Ctrl-D at the prompt leave at once with "Goodbye!", the banner names the session, model
and commands, and the model is told it talks to one person in a terminal."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.config import DEFAULT_CONSOLE_SYSTEM_PROMPT
from tests.console_process import Terminal, run_console
from tests.fakes.dedalus_api import FakeDedalusAPI


@pytest.fixture
def sqlite_env(api: FakeDedalusAPI, tmp_path: Path) -> dict[str, str]:
    """Leaving and the console's wording do not depend on the store: SQLite suffices."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **api.env()}
    return {**env, "SQLITE_PATH": str(tmp_path / "console.sqlite3"), "MODEL_MAX_RETRIES": "0"}


@pytest.fixture
def terminal(sqlite_env: dict[str, str]) -> Iterator[Terminal]:
    running = Terminal(sqlite_env)
    yield running
    running.close()


@pytest.mark.parametrize(
    ("keys", "typed"),
    [("\x03", "at an empty prompt"), ("half a question\x03", "halfway through a line")],
)
def test_ctrl_c_at_the_prompt_leaves_at_once_saying_goodbye(
    terminal: Terminal, api: FakeDedalusAPI, keys: str, typed: str
) -> None:
    """No Enter follows the ^C: the console must leave on the interrupt alone."""
    terminal.wait_for("[default] You: ")
    terminal.type(keys)
    terminal.wait_for("Goodbye!")
    assert terminal.exit_code() == 0, typed
    assert "Traceback" not in terminal.output
    assert api.request_count == 0  # the half-typed line was not sent


def test_ctrl_c_after_a_turn_leaves_too(terminal: Terminal, api: FakeDedalusAPI) -> None:
    terminal.wait_for("[default] You: ")
    terminal.type("hello\r")
    shown = terminal.wait_for("Assistant: echo: hello")
    terminal.wait_for("[default] You: ", shown)
    terminal.type("\x03")
    terminal.wait_for("Goodbye!", shown)
    assert terminal.exit_code() == 0


def test_ctrl_c_during_an_answer_leaves_and_keeps_nothing(
    terminal: Terminal, api: FakeDedalusAPI, sqlite_env: dict[str, str]
) -> None:
    held = threading.Event()
    api.reply_text("an answer that never ends", hold=held)
    terminal.wait_for("[default] You: ")
    terminal.type("hello\r")
    terminal.wait_for("Assistant: ")
    shown = len(terminal.output)  # the turn is under way (the fake holds its answer)
    terminal.type("\x03")
    terminal.wait_for("Interrupted; an answer in progress is not kept. Goodbye!", shown)
    held.set()
    assert terminal.exit_code() == 130
    assert "Traceback" not in terminal.output
    assert "Messages: 0" in run_console(["/status"], sqlite_env).stdout


def test_ctrl_d_at_the_prompt_leaves_saying_goodbye(terminal: Terminal) -> None:
    terminal.wait_for("[default] You: ")
    terminal.type("\x04")
    terminal.wait_for("Goodbye!")
    assert terminal.exit_code() == 0


def test_the_banner_is_the_references(sqlite_env: dict[str, str]) -> None:
    out = run_console(["/model 2", "/quit"], sqlite_env)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[:5] == ["=" * 60, "  Dedalus Session Management", "=" * 60, "", "Commands:"]
    assert "  /new [name]       - Start new session" in lines
    assert "  /quit             - Exit" in lines
    start = lines.index("Session: default")
    assert lines[start : start + 3] == ["Session: default", "Model: openai/gpt-5.1", ""]
    restarted = run_console(["/quit"], sqlite_env).stdout.splitlines()
    assert "Model: anthropic/claude-opus-4-5-20251101" in restarted
    assert restarted[-1] == "[default] You: Goodbye!"


def test_the_model_is_told_of_a_terminal_not_of_discord(
    sqlite_env: dict[str, str], api: FakeDedalusAPI
) -> None:
    run_console(["hello there"], sqlite_env)
    system, user = api.messages_sent()
    assert system == {"role": "system", "content": DEFAULT_CONSOLE_SYSTEM_PROMPT}
    assert "terminal" in system["content"]
    assert "Discord" not in system["content"] and "[" not in system["content"]
    assert user == {"role": "user", "content": "hello there"}

    api.reply_text("custom")
    run_console(["again"], {**sqlite_env, "CONSOLE_SYSTEM_PROMPT": "Be brief."})
    assert api.messages_sent()[0] == {"role": "system", "content": "Be brief."}


def test_mcp_clear_and_remove_explain_their_arguments(sqlite_env: dict[str, str]) -> None:
    out = run_console(
        ["/mcp acme/search", "/mcp clear extra", "/mcp remove", "/mcp add", "/mcp"], sqlite_env
    ).stdout
    assert "Usage: /mcp clear (nothing after it)" in out
    assert "Usage: /mcp remove <entry> (/mcp lists the active ones)" in out
    assert "Usage: /mcp add <entry>" in out
    assert "spaces" not in out and "''" not in out
    assert out.count("Active MCP servers: acme/search") == 1  # nothing was changed


def test_a_message_too_long_for_the_budget_is_answered_alone_and_said(
    sqlite_env: dict[str, str], api: FakeDedalusAPI
) -> None:
    env = {**sqlite_env, "CONTEXT_BUDGET_TOKENS": "400"}  # 1,600 bytes: no summary is due
    long = "tell me about this: " + "words " * 300
    out = run_console(["short question", long], env).stdout
    note = (
        "(The model saw this message without the earlier conversation: they did not fit the "
        "context budget together (CONTEXT_BUDGET_TOKENS).)"
    )
    assert out.count(note) == 1
    assert note in out.split("Assistant: echo: tell me about this:")[1]
    assert [m["role"] for m in api.messages_sent(0)] == ["system", "user"]
    assert [m["role"] for m in api.messages_sent(1)] == ["system", "user"]
