"""The reference's terminal chat, over the same engine and commands as the Discord bot.

It looks and answers as the reference's `demo()` does (its banner, its `[session] You: `
prompt, its wording), and leaves as it does: at once on Ctrl-C or Ctrl-D at the prompt,
saying "Goodbye!".
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from bot.commands import Commands
from bot.engine import NOT_KEPT_NOTE, WITHOUT_HISTORY_NOTE, Engine
from bot.errors import BotError

RULE = "=" * 60
TITLE = "  Dedalus Session Management"
HELP = """Commands:
  /new [name]       - Start new session
  /list             - List sessions
  /load <name>      - Load session
  /clear            - Clear current session
  /compact          - Summarize the session's history now
  /model            - List available models
  /model <num|name> - Switch model
  /mcp              - List active MCP servers
  /mcp add <entry>  - Add MCP server (also: /mcp <entry>)
  /mcp remove <e>   - Remove MCP server
  /mcp clear        - Clear MCP servers
  /status           - Show current config
  /help             - Show these commands
  /quit             - Exit"""


class Console:
    def __init__(self, engine: Engine, commands: Commands, scope: str) -> None:
        self._engine = engine
        self._commands = commands
        self._scope = scope
        self._typed = TypedLines(sys.stdin.fileno())

    def _say(self, text: str = "", end: str = "\n") -> None:
        sys.stdout.write(text + end)
        sys.stdout.flush()

    async def run(self) -> None:
        # A signal goes to any thread not blocking it: the worker threads (SQLite, name
        # lookups) block SIGINT, so Ctrl-C during an answer wakes the main thread at once.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(initializer=_refuse_sigint)
        )
        self._say("\n".join([RULE, TITLE, RULE, "", HELP, ""]))
        try:
            first = await self._commands.store.current_session(self._scope)
            self._say(f"Session: {first.name}\nModel: {first.settings.model}\n")
        except BotError as error:
            self._say(f"Error: {error}\n")
        while True:
            try:
                session = (await self._commands.store.current_session(self._scope)).name
            except BotError as error:
                session = "?"
                self._say(f"Error: {error}")
            line = await self._typed.line(f"[{session}] You: ")
            if line is None:
                self._say("\nGoodbye!")
                return
            text = line.strip()
            if not text:
                continue
            try:
                if text.startswith("/"):
                    if not await self._command(text):
                        return
                else:
                    await self._chat(text)
            except BotError as error:
                self._say(f"Error: {error}")

    async def _chat(self, text: str) -> None:
        self._say("Assistant: ", end="")

        async def show(delta: str) -> None:
            self._say(delta, end="")

        reply = await self._engine.reply(
            self._scope, {"role": "user", "content": text}, on_text=show
        )
        self._say()
        if reply.shortened:
            self._say(
                "(The conversation was too long for the model; older messages were left out.)"
            )
        if reply.without_history:
            self._say(f"({WITHOUT_HISTORY_NOTE})")
        if not reply.kept:
            self._say(f"({NOT_KEPT_NOTE})")
        self._say()

    async def _command(self, text: str) -> bool:
        """Run one command, split as the reference splits it; False means quit."""
        parts = text.split(maxsplit=1)
        name, arg = parts[0].lower(), parts[1].strip() if len(parts) > 1 else ""
        commands, scope = self._commands, self._scope
        if name == "/quit":
            self._say("Goodbye!")
            return False
        if name == "/help":
            self._say(HELP)
        elif name == "/new":
            self._say(await commands.new(scope, arg or None))
        elif name == "/list":
            self._say(await commands.list(scope))
        elif name == "/load":
            self._say(await commands.load(scope, arg) if arg else "Usage: /load <name>")
        elif name == "/clear":
            self._say(await commands.clear(scope))
        elif name == "/compact":
            self._say(await commands.compact(scope))
        elif name == "/model":
            self._say(await commands.model(scope, arg or None))
        elif name == "/mcp":
            self._say(await self._mcp(arg))
        elif name == "/status":
            self._say(await commands.status(scope))
        else:
            self._say(f"Unknown command: {name} (/help lists them)")
        return True

    async def _mcp(self, arg: str) -> str:
        parts = arg.split(maxsplit=1)
        action = parts[0].lower() if parts else ""
        entry = parts[1].strip() if len(parts) > 1 else ""
        commands, scope = self._commands, self._scope
        if not arg:
            return await commands.mcp_list(scope)
        if action == "clear":
            return (
                "Usage: /mcp clear (nothing after it)" if entry else await commands.mcp_clear(scope)
            )
        if action == "remove":
            if not entry:
                return "Usage: /mcp remove <entry> (/mcp lists the active ones)"
            return await commands.mcp_remove(scope, entry)
        if action == "add":
            return await commands.mcp_add(scope, entry) if entry else "Usage: /mcp add <entry>"
        return await commands.mcp_add(scope, arg)  # the reference's `/mcp <url>`


class TypedLines:
    """Lines typed at the prompt, read by the event loop, so that Ctrl-C is an answer too.

    A blocking `input()` misses a Ctrl-C that arrives just before its read starts (the
    handler runs, but the read is not interrupted, and waits for Enter); the event loop is
    woken by any signal, whenever it arrives. The prompt is shown only once Ctrl-C is
    handled so. A terminal delivers whole lines (with its own line editing, as the
    reference's `input()` has); a pipe may deliver several at once."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self._ended = False

    async def line(self, prompt: str) -> str | None:
        """Show `prompt`, then the next line, without its line break; None on Ctrl-C or at
        the end of input."""
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        previous = signal.getsignal(signal.SIGINT)
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        try:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            while b"\n" not in self._buffer and not self._ended:
                if not await self._more(interrupted):
                    self._buffer = b""
                    return None
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)
        if b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
        elif self._buffer:  # the input ended mid-line (Ctrl-D after some text)
            line, self._buffer = self._buffer, b""
        else:
            return None
        return line.decode(errors="replace").rstrip("\r")

    async def _more(self, interrupted: asyncio.Event) -> bool:
        """Wait for more input (or its end); False when Ctrl-C came first."""
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def read() -> None:
            try:
                data = os.read(self._fd, 65536)
            except OSError:  # the terminal hung up
                data = b""
            self._buffer += data
            self._ended = not data
            arrived.set()

        try:
            loop.add_reader(self._fd, read)
        except PermissionError:  # a regular file (or /dev/null): reading never waits
            read()
            return not interrupted.is_set()
        waits = [asyncio.ensure_future(arrived.wait()), asyncio.ensure_future(interrupted.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(self._fd)
            for waiting in waits:
                waiting.cancel()
        return not interrupted.is_set()


def _refuse_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
