"""The model behind a small protocol: the only module that imports `dedalus_labs`.

The engine sees `ModelClient`; tests and benchmarks point the real SDK at a local server
through `DEDALUS_BASE_URL` rather than replacing this module. SDK errors become `ModelError`s
whose text is safe to show a user (no request bodies, no keys).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dedalus_labs
import httpx
from dedalus_labs import AsyncDedalus, DedalusRunner

from bot.errors import ModelError
from bot.store.base import Message

log = logging.getLogger(__name__)

TextSink = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class ModelChoice:
    """The models sessions may use (`ALLOWED_MODELS`) and the default (`DEFAULT_MODEL`). A
    session keeps the model it chose; when that one is no longer allowed, the default answers
    instead (its choice stays stored, so allowing the model again gives it back)."""

    allowed: tuple[str, ...]
    default: str

    def usable(self, stored: str) -> str:
        return stored if stored in self.allowed else self.default

    def retired_note(self, stored: str) -> str | None:
        """The one line saying a session's model is no longer allowed; None when it is."""
        if stored in self.allowed:
            return None
        return (
            f"This session's model {stored[:100]} is no longer allowed; {self.default} answers "
            "instead (/model picks another)."
        )


class ContextTooLong(ModelError):
    """The provider refused the conversation as too long for the model's context window."""

    def __init__(self) -> None:
        super().__init__(
            "This conversation is too long for the model; use /clear or /new.", "context_too_long"
        )


class ModelClient(Protocol):
    async def complete(
        self, messages: list[Message], model: str, mcp_servers: Sequence[str]
    ) -> list[Message]:
        """Run the model (with its tool rounds) and return only the messages the run added."""
        ...

    async def stream(
        self, messages: list[Message], model: str, mcp_servers: Sequence[str], on_text: TextSink
    ) -> str:
        """Run the model streaming, handing each text delta to `on_text`; return the full text."""
        ...


class DedalusModel:
    """`ModelClient` over `DedalusRunner`."""

    def __init__(self, client: AsyncDedalus) -> None:
        self._client = client
        self._runner = DedalusRunner(client)

    async def close(self) -> None:
        await self._client.close()

    @classmethod
    def connect(
        cls, api_key: str, base_url: str | None, timeout: float, max_retries: int
    ) -> DedalusModel:
        client = AsyncDedalus(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries
        )
        return cls(client)

    def _run_args(
        self, messages: list[Message], model: str, mcp_servers: Sequence[str]
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"messages": messages, "model": model}
        if mcp_servers:
            args["mcp_servers"] = list(mcp_servers)
        return args

    async def complete(
        self, messages: list[Message], model: str, mcp_servers: Sequence[str]
    ) -> list[Message]:
        with _model_errors():
            result = await self._runner.run(**self._run_args(messages, model, mcp_servers))
            conversation: list[Message] = result.to_input_list()
        # The runner returns the whole conversation; what this run added is the tail.
        return conversation[len(messages) :]

    async def stream(
        self, messages: list[Message], model: str, mcp_servers: Sequence[str], on_text: TextSink
    ) -> str:
        parts: list[str] = []
        chunks: AsyncIterator[Any] = self._runner.run(
            **self._run_args(messages, model, mcp_servers), stream=True
        )
        try:
            while True:
                with _model_errors():
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    parts.append(delta)
                    await on_text(delta)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        return "".join(parts)


@contextlib.contextmanager
def _model_errors() -> Iterator[None]:
    """Translate SDK failures into the `ModelError` a user is shown, logging one line. Only
    SDK calls run inside it, so a bug of ours is never mistaken for a bad answer."""
    try:
        yield
    except ModelError:
        raise
    except Exception as error:
        translated = _translate(error)
        if translated is None:
            raise
        log.warning("model call failed: %s: %s", type(error).__name__, translated)
        raise translated from error


def _translate(error: BaseException) -> ModelError | None:
    if isinstance(error, dedalus_labs.APITimeoutError):
        return ModelError(
            "The model timed out. Send your message again, or ask something shorter.",
            "timeout",
        )
    if isinstance(error, dedalus_labs.RateLimitError):
        return ModelError(
            "The model is rate limited right now. Wait a minute and send it again.",
            "rate_limited",
        )
    if isinstance(error, dedalus_labs.AuthenticationError | dedalus_labs.PermissionDeniedError):
        return ModelError(
            "The model service refused the bot's API key; tell the bot's admin.",
            "refused_key",
        )
    if isinstance(error, dedalus_labs.InternalServerError | dedalus_labs.APIConnectionError):
        return ModelError(
            "The model service is unavailable right now. Try again shortly.",
            "unavailable",
        )
    if isinstance(error, httpx.HTTPError):  # a stream cut mid-answer is not wrapped by the SDK
        return ModelError(
            "The model service broke off its answer. Send your message again.",
            "broken_off",
        )
    if isinstance(error, dedalus_labs.APIStatusError) and error.status_code < 400:
        # An `event: error` inside a stream that had already started with 200.
        return ModelError(
            "The model service broke off its answer. Send your message again.",
            "broken_off",
        )
    if isinstance(error, dedalus_labs.APIStatusError):
        if "context_length_exceeded" in str(error.body) or "context length" in str(error.body):
            return ContextTooLong()
        return ModelError(
            f"The model refused the request (HTTP {error.status_code}).", "refused_request"
        )
    if isinstance(
        error, dedalus_labs.APIError | ValueError | KeyError | TypeError | AttributeError
    ):
        # The SDK surfaces an unparseable answer as one of these, from deep inside the runner.
        return ModelError(
            "The model service sent an answer the bot could not read. Try again.",
            "unreadable",
        )
    return None
