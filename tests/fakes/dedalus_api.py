"""A fake Dedalus chat-completions server that the real `dedalus_labs` SDK talks to in tests.

Why a real HTTP server instead of mocks: the SDK's request building, retries, SSE decoding and
error mapping stay in the loop, so tests exercise what production exercises. The server runs in
a background thread with its own event loop, so sync tests, async tests (whatever their loop)
and child processes (given `DEDALUS_BASE_URL`, see `env()`) can all use it.

Each chat-completions request consumes one scripted reply, first in first out; with none left
the fake answers `"echo: <last user text>"` so tests that script nothing still get an answer.

A summary request (the bot's summarizer: its system message starts with
`SUMMARY_REQUEST_MARK`) is kept apart: recorded in `summary_requests`, not `requests`, and
answered from its own script (`reply_summary_error`, `hold_summaries`), by default with
`SUMMARY_PREFIX` followed by the summary so far and the start of each user line it was given,
so a test can see that content reach later model calls. Turns and summaries therefore never
take each other's scripted replies, whichever comes first.

How failures surface in the SDK (0.3.0):
- `reply_error(status)` -> the SDK's status error for that code; `exc.body` is the whole
  `{"error": {...}}` dict, so the code is `exc.body["error"]["code"]` (`exc.code` stays None).
- `reply_stream_error()` -> after the partial content, an SSE `event: error` frame; the SDK raises
  a plain `APIStatusError` with `status_code == 200` (the status already sent). With `drop=True`
  the socket is closed mid-stream and `httpx.RemoteProtocolError` escapes unwrapped.
- `reply_malformed()` -> by default invalid JSON labelled `application/json`; the SDK lets
  `json.JSONDecodeError` escape unwrapped. A JSON object that is not a completion, or a non-JSON
  content type, does not raise at all: the runner returns an empty `final_output`.

Token usage, as OpenAI-style APIs report it: a JSON answer carries `usage` (`prompt_tokens`,
`completion_tokens`, `total_tokens`); a streamed one only when the request asked with
`stream_options: {"include_usage": true}`, in a last chunk whose `choices` is empty. The counts
are about a token per four characters of the messages sent and of the answer; `reported_usage`
lists what was reported, and `report_usage = False` leaves it out (a provider that does not
report it).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self

from aiohttp import web

from bot.config import REFERENCE_MODELS
from bot.summary import SUMMARY_REQUEST_MARK

Json = dict[str, Any]
SUMMARY_PREFIX = "SUMMARY:"
"""How the fake's default summary starts."""
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


@dataclass(frozen=True)
class _Reply:
    """One scripted answer; `kind` picks how the handler renders it."""

    kind: str  # "text" | "tool_call" | "error" | "malformed" | "stream_error"
    delay: float = 0.0
    text: str = ""  # the answer, the partial answer, or the malformed body
    chunk_size: int | None = None
    chunk_delay: float = 0.0
    tool_call: Json = field(default_factory=dict)
    status: int = 200
    error: Json = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    drop: bool = False
    hold: threading.Event | None = None


def _error_body(status: int, message: str | None, code: str | None) -> Json:
    """The OpenAI-style error envelope that providers behind Dedalus return."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    text = message or f"{status} {HTTPStatus(status).phrase}"
    return {"error": {"message": text, "type": kind, "param": None, "code": code}}


def _last_user_text(body: Json) -> str:
    """Text of the last user message; list content joins its text parts."""
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
                return " ".join(str(p.get("text", "")) for p in parts)
            return str(content or "")
    return ""


def _is_summary_request(body: Json) -> bool:
    messages = body.get("messages") or []
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    return first.get("role") == "system" and str(first.get("content", "")).startswith(
        SUMMARY_REQUEST_MARK
    )


def _fake_summary(body: Json) -> str:
    """The summary so far, then the start of each user line of the transcript."""
    text = _last_user_text(body)
    before, _, after = text.partition("Messages that came after it:\n")
    old = before.removeprefix("Summary so far:\n").strip()
    old = old.removeprefix(SUMMARY_PREFIX).strip()
    said = [line[6:90] for line in after.splitlines() if line.startswith("user: ")]
    return " ".join([SUMMARY_PREFIX, *([old] if old else []), *(f"<{s}>" for s in said)])


def _split(text: str, size: int | None) -> list[str]:
    """Stream pieces: `size` characters each, or three words (with their spacing) each."""
    if size:
        return [text[i : i + size] for i in range(0, len(text), size)]
    words = re.findall(r"\s*\S+\s*|\s+", text)
    return ["".join(words[i : i + 3]) for i in range(0, len(words), 3)]


class FakeDedalusAPI:
    """Serves `POST /v1/chat/completions` and `GET /v1/models` on 127.0.0.1 at a free port."""

    def __init__(self, *, api_key: str = "test-key", models: Sequence[str] = REFERENCE_MODELS):
        self.api_key = api_key
        self.models = tuple(models)
        self.base_url = ""  # set by start(): pass it as AsyncDedalus(base_url=...)
        self._lock = threading.Lock()
        self._replies: deque[_Reply] = deque()
        self._summary_replies: deque[_Reply] = deque()
        self._summary_hold: threading.Event | None = None
        self._requests: list[Json] = []
        self._summary_requests: list[Json] = []
        self._calls: list[str] = []
        self._ids = itertools.count(1)
        self._reported: list[Json] = []
        self.report_usage = True
        """False: no answer carries `usage`, as with a provider that does not report it."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free port and serve from a daemon thread; returns once it accepts connections."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(sock), self._loop).result(timeout=5)
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def _serve(self, sock: socket.socket) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._list_models)
        # handler_cancellation: a client that timed out should not leave a sleeping handler.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner

    def stop(self) -> None:
        """Close the server and its thread; safe to call twice."""
        loop, thread, runner = self._loop, self._thread, self._runner
        self._loop = self._thread = self._runner = None
        if loop is None or thread is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Variables that point a child process's `AsyncDedalus()` at this fake."""
        return {"DEDALUS_BASE_URL": self.base_url, "DEDALUS_API_KEY": self.api_key}

    # --- scripting -------------------------------------------------------------------------

    def _push(self, reply: _Reply) -> None:
        with self._lock:
            self._replies.append(reply)

    def reply_text(
        self,
        text: str,
        *,
        delay: float = 0.0,
        chunk_size: int | None = None,
        chunk_delay: float = 0.0,
        hold: threading.Event | None = None,
    ) -> None:
        """A plain assistant answer; streamed as several deltas, `chunk_delay` apart. With
        `hold`, nothing is sent until the test sets that event (a model call that lasts
        exactly as long as the test needs, however slow the machine)."""
        self._push(
            _Reply("text", delay, text, chunk_size=chunk_size, chunk_delay=chunk_delay, hold=hold)
        )

    def reply_tool_call(
        self, name: str, arguments: Json, *, call_id: str | None = None, delay: float = 0.0
    ) -> str:
        """An assistant `tool_calls` message (finish_reason "tool_calls"); returns the call id."""
        call_id = call_id or f"call_fake{next(self._ids)}"
        function = {"name": name, "arguments": json.dumps(arguments)}
        call = {"id": call_id, "type": "function", "function": function}
        self._push(_Reply("tool_call", delay, tool_call=call))
        return call_id

    def reply_error(
        self,
        status: int,
        *,
        message: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
    ) -> None:
        """An HTTP error with an OpenAI-style body; `retry_after` sets the Retry-After header."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        error = _error_body(status, message, code)
        self._push(_Reply("error", delay, status=status, error=error, headers=headers))

    def reply_malformed(
        self, body: str = "{not json", *, content_type: str = "application/json", delay: float = 0.0
    ) -> None:
        """HTTP 200 whose body is not a chat completion (invalid JSON unless `body` says else)."""
        self._push(_Reply("malformed", delay, body, content_type=content_type))

    def reply_stream_error(
        self,
        after_text: str = "partial",
        *,
        message: str = "upstream provider failed mid-stream",
        drop: bool = False,
        delay: float = 0.0,
    ) -> None:
        """Stream `after_text`, then an `event: error` frame (or, with `drop`, close the socket).

        A non-streamed request gets the error as an HTTP 500 instead.
        """
        error = _error_body(500, message, "stream_error")
        self._push(_Reply("stream_error", delay, after_text, status=500, error=error, drop=drop))

    def reply_summary_error(self, status: int, *, message: str | None = None) -> None:
        """The next summary request fails with this HTTP status."""
        error = _error_body(status, message, None)
        with self._lock:
            self._summary_replies.append(_Reply("error", status=status, error=error))

    def hold_summaries(self, hold: threading.Event | None) -> None:
        """Summary requests are answered only once `hold` is set (None: at once again)."""
        with self._lock:
            self._summary_hold = hold

    @property
    def summary_requests(self) -> list[Json]:
        """Bodies of the summary requests (kept apart from `requests`), in arrival order."""
        with self._lock:
            return list(self._summary_requests)

    # --- recording -------------------------------------------------------------------------

    @property
    def requests(self) -> list[Json]:
        """Bodies of the authorised chat-completions requests, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> Json:
        """The latest chat-completions body; IndexError if none arrived."""
        return self.requests[-1]

    @property
    def request_count(self) -> int:
        """How many authorised chat-completions requests arrived."""
        with self._lock:
            return len(self._requests)

    @property
    def calls(self) -> list[str]:
        """Every HTTP request seen, as "METHOD /path", rejected ones included."""
        with self._lock:
            return list(self._calls)

    @property
    def reported_usage(self) -> list[Json]:
        """The `usage` of each answer that carried one, in the order they were sent."""
        with self._lock:
            return list(self._reported)

    def _usage(self, body: Json, answer: str) -> Json | None:
        """The usage to report for this answer, recorded; None when none is reported."""
        if not self.report_usage:
            return None
        prompt = max(1, len(json.dumps(body.get("messages"))) // 4)
        completion = max(1, len(answer) // 4)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        with self._lock:
            self._reported.append(usage)
        return usage

    @property
    def pending_replies(self) -> int:
        """Scripted replies not consumed yet (a test can assert it reached 0)."""
        with self._lock:
            return len(self._replies)

    def messages_sent(self, i: int = -1) -> list[Json]:
        """The `messages` list of chat-completions request `i`."""
        return list(self.requests[i].get("messages") or [])

    # --- handlers --------------------------------------------------------------------------

    def _denied(self, request: web.Request) -> web.Response | None:
        with self._lock:
            self._calls.append(f"{request.method} {request.path}")
        if request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        error = _error_body(401, "Incorrect API key provided.", "invalid_api_key")
        return web.json_response(error, status=401)

    async def _list_models(self, request: web.Request) -> web.Response:
        if denied := self._denied(request):
            return denied
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": m.split("/")[0]}
            | {"created_at": "2025-01-01T00:00:00Z", "provider": m.split("/")[0]}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    def _envelope(self, obj: str, model: str) -> Json:
        ident = f"chatcmpl-fake{next(self._ids)}"
        return {"id": ident, "object": obj, "created": int(time.time()), "model": model}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if denied := self._denied(request):
            return denied
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            error = _error_body(400, "Body is not a JSON object.", None)
            return web.json_response(error, status=400)
        summary = _is_summary_request(body)
        with self._lock:
            if summary:
                self._summary_requests.append(body)
                queue, hold = self._summary_replies, self._summary_hold
            else:
                self._requests.append(body)
                queue, hold = self._replies, None
            reply = queue.popleft() if queue else None
        if reply is None and summary:
            reply = _Reply("text", text=_fake_summary(body), hold=hold)
        reply = reply or _Reply("text", text="echo: " + _last_user_text(body))
        await asyncio.sleep(reply.delay)
        while reply.hold is not None and not reply.hold.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # a threading.Event: the test sets it from its own thread
        model = body.get("model")  # the runner sends a list of fallbacks; answer with the first
        model = str((model[0] if model else "") if isinstance(model, list) else model or "")
        if reply.kind == "malformed":
            return web.Response(text=reply.text, content_type=reply.content_type)
        if reply.kind == "error" or (reply.kind == "stream_error" and not body.get("stream")):
            return web.json_response(reply.error, status=reply.status, headers=reply.headers)
        if body.get("stream"):
            return await self._stream(request, reply, model, body)
        message: Json = {"role": "assistant", "content": reply.text}
        if reply.kind == "tool_call":
            message = {"role": "assistant", "content": None, "tool_calls": [reply.tool_call]}
        finish = "tool_calls" if reply.kind == "tool_call" else "stop"
        answer = json.dumps(reply.tool_call) if reply.kind == "tool_call" else reply.text
        usage = self._usage(body, answer)
        return web.json_response(
            self._envelope("chat.completion", model)
            | {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
            | ({"usage": usage} if usage is not None else {})
        )

    async def _stream(
        self, request: web.Request, reply: _Reply, model: str, body: Json
    ) -> web.StreamResponse:
        """SSE the way OpenAI streams: a role delta, content or tool-call deltas, a finish delta."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        envelope = self._envelope("chat.completion.chunk", model)

        async def send(delta: Json, finish: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            await resp.write(f"data: {json.dumps(envelope | {'choices': [choice]})}\n\n".encode())

        if reply.kind == "tool_call":
            fn = reply.tool_call["function"]
            first = reply.tool_call | {"index": 0, "function": fn | {"arguments": ""}}
            await send({"role": "assistant", "content": None, "tool_calls": [first]})
            for part in _split(fn["arguments"], 8):
                await send({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
            await send({}, "tool_calls")
        else:
            await send({"role": "assistant", "content": ""})
            for i, piece in enumerate(_split(reply.text, reply.chunk_size)):
                if i and reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                await send({"content": piece})
            if reply.kind == "stream_error":
                if reply.drop and request.transport is not None:
                    request.transport.close()
                    return resp
                await resp.write(f"event: error\ndata: {json.dumps(reply.error)}\n\n".encode())
                await resp.write_eof()
                return resp
            await send({}, "stop")
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            answer = json.dumps(reply.tool_call) if reply.kind == "tool_call" else reply.text
            usage = self._usage(body, answer)
            if usage is not None:
                last = envelope | {"choices": [], "usage": usage}
                await resp.write(f"data: {json.dumps(last)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
