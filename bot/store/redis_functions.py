"""The store's scripts as one Redis function library (Redis 7 and later), called with FCALL
over the shared connection (`AutoPipeline`).

Why: a script sent with EVALSHA runs its whole text at every call, so the helpers most
scripts share (`_PRELUDE` in `bot.store.redis`, some thirty Lua functions) are built again at
every call: about a tenth of a turn's time inside Redis. A library's text runs once, when
it is loaded; a call then runs only its function's own body.

Where functions cannot be used (Redis before 7, a user not allowed to load or call them),
the scripts run with EVALSHA, as they always did: the first refusal says so, once.

The library's name, and so its functions' names, carry a hash of its text, so processes of
different versions of the bot on one Redis (during a rolling deploy) each call their own.
Redis keeps functions in its snapshots, so a library per version would pile up: a process's
first load deletes the others; a process still running an older version loads its own again
on its next call."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

log = logging.getLogger(__name__)

LIBRARY_PREFIX = "dcbot_"
"""The start of every library name of this bot, whatever its version."""

SHARED_FIRST_LINE = "local prefix = ARGV[1]\n"
"""How the shared text (the prelude) begins: in a library, `prefix` is set at every call."""

Call = Callable[..., Awaitable[Any]]
"""A command to Redis, its reply awaited (`AutoPipeline.call`)."""


class FunctionLibrary:
    """Scripts added one by one, then loaded as one library, each a function of it."""

    def __init__(self, shared: str) -> None:
        """`shared`: the text that begins the scripts that share it, whose first line is
        `SHARED_FIRST_LINE`: in the library it is there once, for all of them."""
        head, line, rest = shared.partition(SHARED_FIRST_LINE)
        if not line or head.strip():
            raise ValueError("the shared text must begin by reading ARGV[1] into prefix")
        self._shared, self._shared_body = shared, rest
        self._sources: list[str] = []
        self._names: list[str] = []
        self.text = ""
        self._name = ""
        self.usable: bool | None = None
        """None until Redis has said; False: run the scripts with EVALSHA instead."""
        self._loading: asyncio.Future[None] | None = None
        self._loaded_before = False

    def add(self, source: str) -> int:
        """A script's place in the library (`function`). Every script is added before the
        first call."""
        if self.text:
            raise RuntimeError("the library is already built")
        self._sources.append(source)
        return len(self._sources) - 1

    def function(self, index: int) -> str:
        if not self.text:
            self._build()
        return self._names[index]

    def _build(self) -> None:
        digest = hashlib.sha1("\0".join([self._shared, *self._sources]).encode()).hexdigest()
        self._name = library = LIBRARY_PREFIX + digest[:20]
        # KEYS, ARGV and prefix are the library's own locals, shared by every function and
        # helper: a call sets them, then runs its body (Redis runs one call at a time).
        parts = [f"#!lua name={library}\nlocal KEYS, ARGV, prefix\n", self._shared_body]
        for index, source in enumerate(self._sources):
            shares = source.startswith(self._shared)
            body = source[len(self._shared) :] if shares else source
            name = f"{library}_{index}"
            parts.append(f"\nlocal function run_{index}()\n{body}\nend\n")
            parts.append(
                f"redis.register_function('{name}', function(keys, args)\n"
                f"  KEYS, ARGV, prefix = keys, args, args[1]\n"
                f"  return run_{index}()\n"
                "end)\n"
            )
            self._names.append(name)
        self.text = "".join(parts)

    def command(self, index: int, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("FCALL", self.function(index), len(keys), *keys, *args)

    @staticmethod
    def answers(error: ResponseError) -> bool:
        """Whether `error`, the reply to an FCALL, is this library's to mend (`mend`)."""
        text = str(error)
        return text.startswith("Function not found") or _refused(error)

    async def mend(self, call: Call, error: ResponseError) -> None:
        """After `error` (`answers`): load the library Redis does not hold (a new server, one
        restarted without its data, one whose functions were deleted), or give up functions
        where Redis refuses them. Calls failing together share one load."""
        if _refused(error):
            self._give_up(error)
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load(call))
        await asyncio.shield(self._loading)

    async def _load(self, call: Call) -> None:
        if not self.text:
            self._build()
        try:
            await call("FUNCTION", "LOAD", self.text)
        except ResponseError as error:
            if "already exists" not in str(error):  # else another process just loaded it
                self._give_up(error)
                return
        self.usable = True
        if not self._loaded_before:
            self._loaded_before = True
            await self._delete_others(call)

    async def _delete_others(self, call: Call) -> None:
        """The libraries of other versions of the bot (see the module's text)."""
        listed = await call("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_PREFIX + "*")
        for entry in listed:
            fields = dict(zip(entry[::2], entry[1::2], strict=True))
            name = str(fields.get("library_name", ""))
            if name.startswith(LIBRARY_PREFIX) and name != self._name:
                with contextlib.suppress(ResponseError):  # deleted meanwhile by another process
                    await call("FUNCTION", "DELETE", name)
                log.info("storage: deleted the Redis function library %s of another version", name)

    def _give_up(self, error: ResponseError) -> None:
        if self.usable is not False:
            # Refused (Redis 6, an ACL) is a setting; anything else is worth a look.
            level = logging.INFO if _refused(error) else logging.WARNING
            log.log(level, "storage: Redis functions not used (%s); scripts use EVALSHA", error)
        self.usable = False


def _refused(error: ResponseError) -> bool:
    """Redis does not know FCALL (before 7), or this user may not use functions."""
    text = str(error).lower()
    if isinstance(error, NoPermissionError):
        return True
    return text.startswith("unknown command") and "fcall" in text
