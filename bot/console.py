"""The reference's terminal chat, over the same engine and commands as the Discord bot."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from bot.commands import Commands
from bot.engine import NOT_KEPT_NOTE, Engine
from bot.errors import BotError

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
  /quit             - Exit"""


class Console:
    def __init__(
        self,
        engine: Engine,
        commands: Commands,
        scope: str,
        stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout,
    ) -> None:
        self._engine = engine
        self._commands = commands
        self._scope = scope
        self._in = stdin
        self._out = stdout

    def _say(self, text: str = "", end: str = "\n") -> None:
        self._out.write(text + end)
        self._out.flush()

    async def run(self) -> None:
        self._say("Dedalus session chat. /help lists the commands, /quit exits.")
        while True:
            try:
                session = (await self._commands.store.current_session(self._scope)).name
            except BotError as error:
                session = "?"
                self._say(str(error))
            self._say(f"[{session}] You: ", end="")
            line = await asyncio.to_thread(self._in.readline)
            if not line:
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
        if not reply.kept:
            self._say(f"({NOT_KEPT_NOTE})")

    async def _command(self, text: str) -> bool:
        """Run one command; False means quit."""
        name, _, arg = text.partition(" ")
        name, arg = name.lower(), arg.strip()
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
        action, _, entry = arg.partition(" ")
        commands, scope = self._commands, self._scope
        if not arg:
            return await commands.mcp_list(scope)
        if action == "clear" and not entry:
            return await commands.mcp_clear(scope)
        if action == "remove":
            return await commands.mcp_remove(scope, entry)
        if action == "add":
            return await commands.mcp_add(scope, entry)
        return await commands.mcp_add(scope, arg)  # the reference's `/mcp <url>`
