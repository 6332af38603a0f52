"""The model behind a small protocol: the only module that imports `dedalus_labs`.

The engine sees `ModelClient`; tests and benchmarks point the real SDK at a local server
through `DEDALUS_BASE_URL` rather than replacing this module. SDK errors become `ModelError`s
whose text is safe to show a user (no request bodies, no keys).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dedalus_labs
import httpx
from dedalus_labs import AsyncDedalus, DedalusRunner

from bot.errors import ModelError
from bot.store.base import Message
from bot.usage import CallUsage, UsageMeter

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
        self,
        messages: list[Message],
        model: str,
        mcp_servers: Sequence[str],
        meter: UsageMeter | None = None,
    ) -> list[Message]:
        """Run the model (with its tool rounds) and return only the messages the run added;
        `meter` is filled in, call by call, with the tokens the calls reported (or what an
        estimate of them needs), also when the run then fails."""
        ...

    async def stream(
        self,
        messages: list[Message],
        model: str,
        mcp_servers: Sequence[str],
        on_text: TextSink,
        meter: UsageMeter | None = None,
    ) -> str:
        """Run the model streaming, handing each text delta to `on_text`; return the full text."""
        ...


_METER: contextvars.ContextVar[UsageMeter | None] = contextvars.ContextVar("meter", default=None)
"""The meter of the run in progress in this task: the HTTP layer below the SDK fills it."""
STREAM_OPTIONS = {"include_usage": True}
"""Asks an OpenAI-style API to end a streamed answer with a chunk carrying its `usage`."""
USAGE_BODY_MAX_BYTES = 8 * 1024 * 1024
"""A JSON answer longer than this is not parsed again for its usage (it counts as unreported)."""


class UsageTap(httpx.AsyncBaseTransport):
    """Reads each chat completion's `usage` off the wire, as the answer passes to the SDK.

    The runner drops what it is not interested in: it returns no usage for a run, and in a
    stream it skips the last chunk, the one with no choices that carries `usage`. Every
    call of a run (tool rounds included) goes through this transport, so each call the API
    accepts is noted in the meter of the run in progress (`_METER`) with the tokens its
    answer reports, or with the size of its request and of the answer text that arrived
    (for an estimate), counted as it passes: an answer that breaks off midway keeps what
    came. A call refused with an error status spent nothing and is not noted."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        meter = _METER.get()
        if (
            meter is None
            or response.status_code != 200
            or not request.url.path.endswith("/chat/completions")
        ):
            return response
        try:
            sent = len(request.content)
        except httpx.RequestNotRead:  # a streamed request body: its size is not known
            sent = 0
        call = meter.call(sent)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_UsageReader(response.stream, call, streamed),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class _UsageReader(httpx.AsyncByteStream):
    """Passes an answer's bytes on unchanged, noting the `usage` found in it (in a JSON
    answer at its end, in an SSE stream in whichever `data:` line carries one) and, for an
    estimate, the length of the answer's text and tool calls."""

    def __init__(self, inner: httpx.AsyncByteStream, call: CallUsage, streamed: bool) -> None:
        self._inner = inner
        self._call = call
        self._streamed = streamed
        self._buffer = b""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._take(chunk)
            yield chunk
        if not self._streamed:
            self._note(self._buffer, "message")
        elif self._buffer:
            self._line(self._buffer)

    def _take(self, chunk: bytes) -> None:
        if not self._streamed:
            if len(self._buffer) + len(chunk) <= USAGE_BODY_MAX_BYTES:
                self._buffer += chunk
            return
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            self._note(line[len(b"data:") :], "delta")

    def _note(self, body: bytes, part: str) -> None:
        try:
            answer = json.loads(body)
        except ValueError:
            return  # nothing readable here: the call counts what the rest says
        if not isinstance(answer, dict):
            return
        choices = answer.get("choices")
        if isinstance(choices, list):
            self._call.answer_chars += sum(
                _text_chars(choice.get(part)) for choice in choices if isinstance(choice, dict)
            )
        usage: Any = answer.get("usage")
        try:
            tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        except (ValueError, TypeError, KeyError):
            return  # no usage here (or none readable): the call counts as unreported
        if self._call.reported is None:
            self._call.reported = tokens

    async def aclose(self) -> None:
        await self._inner.aclose()


def _text_chars(message: object) -> int:
    """The characters of a message (or a stream's delta) that the model wrote: its text and
    its tool calls' names and arguments."""
    if not isinstance(message, dict):
        return 0
    content = message.get("content")
    chars = len(content) if isinstance(content, str) else 0
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            chars += sum(len(v) for v in function.values() if isinstance(v, str))
    return chars


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
        """A client whose HTTP layer reads the token usage of every answer (`UsageTap`), with
        the SDK's own connection defaults."""
        limits = dedalus_labs.DEFAULT_CONNECTION_LIMITS
        transport = UsageTap(httpx.AsyncHTTPTransport(limits=limits))
        client = AsyncDedalus(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=dedalus_labs.DefaultAsyncHttpxClient(transport=transport),
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
        self,
        messages: list[Message],
        model: str,
        mcp_servers: Sequence[str],
        meter: UsageMeter | None = None,
    ) -> list[Message]:
        with _metered(meter), _model_errors():
            result = await self._runner.run(**self._run_args(messages, model, mcp_servers))
            conversation: list[Message] = result.to_input_list()
        # The runner returns the whole conversation; what this run added is the tail.
        return conversation[len(messages) :]

    async def stream(
        self,
        messages: list[Message],
        model: str,
        mcp_servers: Sequence[str],
        on_text: TextSink,
        meter: UsageMeter | None = None,
    ) -> str:
        parts: list[str] = []
        with _metered(meter):
            chunks: AsyncIterator[Any] = self._runner.run(
                **self._run_args(messages, model, mcp_servers),
                stream=True,
                stream_options=STREAM_OPTIONS,
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
def _metered(meter: UsageMeter | None) -> Iterator[UsageMeter]:
    """Make `meter` (a throwaway one when None) the meter of the calls made inside, which
    the HTTP layer fills in (`UsageTap`), whether the run then succeeds or not."""
    meter = meter if meter is not None else UsageMeter()
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


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
