"""The fake Dedalus API, proven against the real `dedalus_labs` SDK rather than against itself.

If the SDK changes how it parses responses or maps errors, these tests fail here first instead of
somewhere deep in a bot test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from dedalus_labs import (
    APIStatusError,
    APITimeoutError,
    AsyncDedalus,
    AuthenticationError,
    BadRequestError,
    Dedalus,
    DedalusRunner,
    InternalServerError,
    RateLimitError,
)

from tests.fakes.dedalus_api import FakeDedalusAPI

MODEL = "openai/gpt-5.1"


@pytest.fixture
def api() -> Iterator[FakeDedalusAPI]:
    with FakeDedalusAPI() as fake:
        yield fake


@pytest.fixture
async def client(api: FakeDedalusAPI) -> AsyncIterator[AsyncDedalus]:
    async with AsyncDedalus(base_url=api.base_url, api_key="test-key", max_retries=0) as c:
        yield c


async def _stream_text(client: AsyncDedalus, **kwargs: Any) -> list[str]:
    """The non-empty content deltas of a streamed run."""
    stream = DedalusRunner(client).run(model=MODEL, stream=True, **kwargs)
    return [c.choices[0].delta.content async for c in stream if c.choices[0].delta.content]


async def test_non_streamed_run_returns_the_scripted_text(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    api.reply_text("Hello from the fake.")
    result = await DedalusRunner(client).run(input="hi", model=MODEL)
    assert result.final_output == "Hello from the fake."
    assert result.to_input_list()[-1] == {"role": "assistant", "content": "Hello from the fake."}
    # base_url is the bare origin: the SDK itself adds /v1/chat/completions.
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", api.base_url)
    assert api.calls == ["POST /v1/chat/completions"]
    assert api.last_request["model"] == [MODEL]  # the runner always sends a fallback list
    assert api.pending_replies == 0


async def test_streamed_run_yields_the_text_in_several_chunks(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    text = "The quick brown fox jumps over the lazy dog, and then does it again."
    api.reply_text(text)
    pieces = await _stream_text(client, input="hi")
    assert len(pieces) > 1
    assert "".join(pieces) == text
    assert api.last_request["stream"] is True


async def test_chunk_size_and_chunk_delay_shape_the_stream(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    api.reply_text("abcdef", chunk_size=2, chunk_delay=0.05)
    started = time.monotonic()
    assert await _stream_text(client, input="hi") == ["ab", "cd", "ef"]
    assert time.monotonic() - started >= 0.1


async def test_tool_call_round_sends_the_tool_result_back(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    call_id = api.reply_tool_call("lookup", {"q": "weather"})
    api.reply_text("It is sunny.")
    result = await DedalusRunner(client).run(input="weather?", model=MODEL)
    history = result.to_input_list()
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    call = history[1]["tool_calls"][0]
    assert call["id"] == call_id
    assert call["function"] == {"name": "lookup", "arguments": '{"q": "weather"}'}
    # No local tool named "lookup", so the runner records an error string as the result.
    assert history[2]["tool_call_id"] == call_id
    assert history[2]["content"].startswith("Error")
    assert result.final_output == "It is sunny."
    assert api.request_count == 2
    assert api.messages_sent(1)[-2:] == history[1:3]


async def test_streamed_tool_call_arrives_as_argument_deltas(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    call_id = api.reply_tool_call("lookup", {"q": "weather", "units": "metric"})
    api.reply_text("done")
    deltas: list[Any] = []
    finishes: list[str | None] = []
    async for chunk in DedalusRunner(client).run(input="hi", model=MODEL, stream=True):
        deltas += chunk.choices[0].delta.tool_calls or []
        finishes.append(chunk.choices[0].finish_reason)
    assert len(deltas) > 2
    assert deltas[0].id == call_id
    assert deltas[0].function.name == "lookup"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == {"q": "weather", "units": "metric"}
    assert "tool_calls" in finishes
    # A streamed call to a tool that is not local gets no result: the runner just asks again.
    assert api.request_count == 2
    assert api.messages_sent(1) == api.messages_sent(0)


@pytest.mark.parametrize(("status", "error"), [(429, RateLimitError), (500, InternalServerError)])
async def test_http_errors_raise_the_sdk_exception(
    api: FakeDedalusAPI, client: AsyncDedalus, status: int, error: type[APIStatusError]
) -> None:
    api.reply_error(status, retry_after=1)
    with pytest.raises(error) as info:
        await DedalusRunner(client).run(input="hi", model=MODEL)
    assert info.value.status_code == status
    assert info.value.response.headers["retry-after"] == "1"


async def test_context_length_exceeded_is_a_bad_request_naming_the_code(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    message = "This model's maximum context length is 8192 tokens."
    api.reply_error(400, code="context_length_exceeded", message=message)
    with pytest.raises(BadRequestError) as info:
        await DedalusRunner(client).run(input="hi", model=MODEL)
    body = info.value.body
    assert isinstance(body, dict)
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["message"] == message
    assert info.value.code is None  # the SDK does not unwrap {"error": {...}}
    assert "context_length_exceeded" in str(info.value)


async def test_reply_slower_than_the_client_timeout_raises_a_timeout(api: FakeDedalusAPI) -> None:
    api.reply_text("too late", delay=2.0)
    async with AsyncDedalus(
        base_url=api.base_url, api_key="test-key", max_retries=0, timeout=0.2
    ) as slow:
        with pytest.raises(APITimeoutError):
            await DedalusRunner(slow).run(input="hi", model=MODEL)


async def test_wrong_api_key_is_rejected_without_using_a_reply(api: FakeDedalusAPI) -> None:
    api.reply_text("never sent")
    async with AsyncDedalus(base_url=api.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(AuthenticationError) as info:
            await DedalusRunner(bad).run(input="hi", model=MODEL)
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["code"] == "invalid_api_key"
    assert api.request_count == 0
    assert api.pending_replies == 1


async def test_models_list(api: FakeDedalusAPI, client: AsyncDedalus) -> None:
    listing = await client.models.list()
    assert [m.id for m in listing.data] == list(api.models)
    assert api.calls == ["GET /v1/models"]


async def test_unscripted_requests_echo_the_last_user_message(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    result = await DedalusRunner(client).run(messages=messages, model=MODEL)
    assert result.final_output == "echo: second"
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]
    with_parts: Any = {"role": "user", "content": parts}
    response = await client.chat.completions.create(model=MODEL, messages=[with_parts])
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert response.choices[0].message.content == "echo: part one part two"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None


async def test_concurrent_requests_each_get_their_own_answer(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    runner = DedalusRunner(client)
    results = await asyncio.gather(*(runner.run(input=f"n{i}", model=MODEL) for i in range(5)))
    assert [r.final_output for r in results] == [f"echo: n{i}" for i in range(5)]
    assert api.request_count == 5


async def test_mcp_servers_reach_the_request_body(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    await DedalusRunner(client).run(input="hi", model=MODEL, mcp_servers=["org/name"])
    assert api.last_request["mcp_servers"] == ["org/name"]


async def test_stream_error_event_raises_after_the_partial_text(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    api.reply_stream_error("partial answer")
    pieces: list[str] = []
    with pytest.raises(APIStatusError) as info:
        async for chunk in DedalusRunner(client).run(input="hi", model=MODEL, stream=True):
            pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == "partial answer"
    assert type(info.value) is APIStatusError  # not a subclass: the HTTP status was 200
    assert info.value.status_code == 200


async def test_dropped_stream_raises_an_unwrapped_httpx_error(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    api.reply_stream_error("partial", drop=True)
    with pytest.raises(httpx.RemoteProtocolError):
        await _stream_text(client, input="hi")


async def test_malformed_json_raises_a_decode_error(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    api.reply_malformed()
    with pytest.raises(json.JSONDecodeError):
        await DedalusRunner(client).run(input="hi", model=MODEL)


async def test_json_that_is_not_a_completion_gives_empty_output(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    api.reply_malformed('{"unexpected": true}')
    result = await DedalusRunner(client).run(input="hi", model=MODEL)
    assert result.final_output == ""


def test_sync_client_in_a_sync_test(api: FakeDedalusAPI) -> None:
    api.reply_text("sync ok")
    with Dedalus(base_url=api.base_url, api_key="test-key", max_retries=0) as client:
        result = DedalusRunner(client).run(input="hi", model=MODEL)
    assert result.final_output == "sync ok"


_CHILD = """
import asyncio
from dedalus_labs import AsyncDedalus, DedalusRunner

async def main() -> None:
    runner = DedalusRunner(AsyncDedalus(max_retries=0))
    print((await runner.run(input="from child", model="m")).final_output)

asyncio.run(main())
"""


def test_child_process_reaches_the_fake_through_env(api: FakeDedalusAPI) -> None:
    api.reply_text("hello child")
    env = {**os.environ, **api.env()}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello child"
    assert api.messages_sent() == [{"role": "user", "content": "from child"}]


def test_start_and_stop_without_a_with_block() -> None:
    fake = FakeDedalusAPI(api_key="k", models=["openai/x"]).start()
    try:
        listing = httpx.get(f"{fake.base_url}/v1/models", headers={"Authorization": "Bearer k"})
        assert [m["id"] for m in listing.json()["data"]] == ["openai/x"]
        assert httpx.get(f"{fake.base_url}/v1/models").status_code == 401
    finally:
        fake.stop()
    fake.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{fake.base_url}/v1/models")


async def test_a_stream_ends_with_its_usage_only_when_asked(
    api: FakeDedalusAPI, client: AsyncDedalus
) -> None:
    """As OpenAI-style APIs do: a last chunk with no choices carries `usage`, and only for a
    request with `stream_options.include_usage`. (The runner drops that chunk: the bot reads
    usage below the SDK, see `bot.model.UsageTap`.)"""
    plain = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert [chunk.usage for chunk in [c async for c in plain]] == [None] * 3
    assert api.reported_usage == []

    asked = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    *chunks, last = [chunk async for chunk in asked]
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert last.choices == [] and last.usage is not None
    [reported] = api.reported_usage
    assert last.usage.model_dump() | reported == last.usage.model_dump()
    assert reported["total_tokens"] == reported["prompt_tokens"] + reported["completion_tokens"]


async def test_usage_can_be_left_out(api: FakeDedalusAPI, client: AsyncDedalus) -> None:
    api.report_usage = False
    response = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert response.usage is None and api.reported_usage == []
