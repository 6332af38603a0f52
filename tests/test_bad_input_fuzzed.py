"""Every command argument, fuzzed: each input gets a clear refusal (and nothing changes) or
is accepted as something valid; none crashes."""

from __future__ import annotations

import asyncio
import re
import string
import tempfile
import unicodedata
from pathlib import Path

from dedalus_labs.lib.mcp.wire import serialize_mcp_servers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.commands import PERSONA_MAX_CHARS, Commands, PersonaInEffect, checked_mcp_server
from bot.errors import InvalidInput
from bot.store.base import (
    SessionInfo,
    StorePolicy,
    checked_session_name,
    readable_name,
    session_name_problem,
    shown_name,
    stored_name,
)
from bot.store.sqlite import SqliteStore
from tests.conftest import TEST_MODELS

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

nasty_text = st.one_of(
    st.text(),
    st.text(alphabet=string.printable),
    st.text(min_size=200, max_size=3000),
    st.sampled_from(["", " ", "\n", "\x00", "\u202e", "é", "🙂", "../x", "a b", "x" * 51]),
)
urlish = st.builds(
    lambda scheme, creds, host, path: f"{scheme}{creds}{host}{path}",
    st.sampled_from(["https://", "HTTPS://", "http://", "ftp://", "javascript:", "", "//"]),
    st.sampled_from(["", "user:pw@", "user@", ":@"]),
    st.sampled_from(
        ["example.com", "mcp.example.com:8443", "", "exa mple.com", "[::1]", "é.com", "host:99999"]
    ),
    st.sampled_from(["", "/", "/sse", "/a b", "/\t", "?q=1", "#x"]),
)
slugish = st.builds(
    lambda org, name, version: f"{org}/{name}{version}",
    st.text(alphabet=string.ascii_letters + "-_.@ /", max_size=12),
    st.text(alphabet=string.ascii_letters + "-_.@ /", max_size=12),
    st.sampled_from(["", "@v1", "@1.2.3", "@", "@ v1", "@v1@v2"]),
)


class Fixture:
    """A fresh SQLite store per example would be slow; one per test, checked for change."""

    def __init__(self) -> None:
        self.directory = tempfile.TemporaryDirectory()
        self.store = SqliteStore(
            Path(self.directory.name) / "s.sqlite3", StorePolicy(TEST_MODELS[0])
        )
        self.commands = Commands(self.store, TEST_MODELS, TEST_MODELS[0])

    def run(self, coroutine: object) -> object:
        return asyncio.run(coroutine)  # type: ignore[arg-type]

    def snapshot(self) -> tuple[SessionInfo, list[SessionInfo]]:
        async def read() -> tuple[SessionInfo, list[SessionInfo]]:
            return await self.store.current_session("s"), await self.store.list_sessions("s")

        return asyncio.run(read())


def test_model_choices() -> None:
    fixture = Fixture()

    @FUZZ
    @given(st.one_of(nasty_text, st.integers(-5, 10).map(str), st.sampled_from(TEST_MODELS)))
    def check(choice: str) -> None:
        before = fixture.snapshot()
        try:
            said = fixture.run(fixture.commands.model("s", choice))
        except InvalidInput as refused:
            assert str(refused).startswith("Unknown model") and "1. " in str(refused)
            assert fixture.snapshot() == before
            return
        assert isinstance(said, str)
        if choice.strip():
            assert fixture.snapshot()[0].settings.model in TEST_MODELS

    check()


def test_mcp_entries() -> None:
    fixture = Fixture()

    @FUZZ
    @given(st.one_of(nasty_text, urlish, slugish))
    def check(entry: str) -> None:
        before = fixture.snapshot()
        try:
            fixture.run(fixture.commands.mcp_add("s", entry))
        except InvalidInput as refused:
            assert 0 < len(str(refused)) < 200
            assert fixture.snapshot() == before
            return
        added = fixture.snapshot()[0].settings.mcp_servers[-1]
        assert added == checked_mcp_server(entry)
        assert not any(c.isspace() or not c.isprintable() for c in added)
        assert "@" not in added.split("/")[2] if added.startswith("https://") else True
        serialize_mcp_servers([added])  # the SDK accepts whatever we accept
        fixture.run(fixture.commands.mcp_clear("s"))

    check()


def test_session_names() -> None:
    fixture = Fixture()

    @FUZZ
    @given(nasty_text)
    def check(name: str) -> None:
        before = fixture.snapshot()
        try:
            fixture.run(fixture.commands.new("s", name))
        except InvalidInput:
            assert fixture.snapshot() == before
            return
        current = fixture.snapshot()[0].name
        if name.strip():
            assert current == checked_session_name(name)
        else:  # no name: the next free `chat-N`
            assert current.startswith("chat-")

    check()


@FUZZ
@given(st.one_of(nasty_text, st.from_regex(r"[\w.-]+", fullmatch=True)))
def test_stored_names_read_back_as_given_and_old_names_are_stored_as_before(name: str) -> None:
    """Every session name survives the stores' escaping; a name of the alphabet allowed
    before (`[\\w.-]+`) is stored exactly as it was, so data stored then is found now."""
    stored = stored_name(name)
    assert shown_name(stored) == name
    if session_name_problem(name) is None:
        assert readable_name(stored)
    if re.fullmatch(r"[\w.-]+", name):
        assert stored == name


def test_reply_modes_and_mcp_removals() -> None:
    fixture = Fixture()
    fixture.run(fixture.commands.mcp_add("s", "acme/tool"))

    @FUZZ
    @given(nasty_text, st.one_of(nasty_text, st.just("acme/tool ")))
    def check(mode: str, removal: str) -> None:
        before = fixture.snapshot()
        try:
            fixture.run(fixture.commands.set_reply_mode("s", mode))
            assert mode.strip().lower() in {"mentions", "all", "threads"}
        except InvalidInput as refused:
            assert str(refused).startswith("Unknown mode") and fixture.snapshot() == before
        try:
            fixture.run(fixture.commands.mcp_remove("s", removal))
            assert removal.strip() == "acme/tool"
            fixture.run(fixture.commands.mcp_add("s", "acme/tool"))
        except InvalidInput as refused:
            assert "is not active" in str(refused) and fixture.snapshot() == before

    check()


def test_personas() -> None:
    """Any text: stored as given (trimmed, line breaks as `\\n`) and sent from the next turn,
    or refused with one line, leaving the persona there was."""
    fixture = Fixture()
    fixture.run(fixture.commands.set_persona("s", "You are the first persona."))

    @FUZZ
    @given(
        st.one_of(
            nasty_text,
            st.text(min_size=PERSONA_MAX_CHARS - 5, max_size=PERSONA_MAX_CHARS + 5),
            st.sampled_from(["a\r\nb", "\tx\ty\n", "a\x7fb", "a\u0085b", "\ud800", "🙂" * 4000]),
        )
    )
    def check(text: str) -> None:
        before = fixture.run(fixture.commands.persona_in_effect("s"))
        try:
            said = fixture.run(fixture.commands.set_persona("s", text))
        except InvalidInput as refused:
            assert "\n" not in str(refused) and 0 < len(str(refused)) < 200
            assert fixture.run(fixture.commands.persona_in_effect("s")) == before
            return
        assert isinstance(said, str) and "\n" not in said
        stored = fixture.run(fixture.commands.persona_in_effect("s"))
        assert isinstance(stored, PersonaInEffect) and stored.text is not None
        assert stored.text == text.replace("\r\n", "\n").replace("\r", "\n").strip()
        assert 0 < len(stored.text) <= PERSONA_MAX_CHARS
        assert all(c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs") for c in stored.text)
        stored.text.encode()  # storable and sendable as UTF-8

    check()
