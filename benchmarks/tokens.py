"""Tokens sent per turn against turns so far: however long a conversation runs, what one turn
sends stays within the context budget, and with summaries the older history is still there,
folded into one message.

`python -m benchmarks.tokens [--turns N] [--budget-tokens T]` prints the table; the report
(`python -m benchmarks`) includes it. Tokens are counted as the budget counts them: stored
(JSON) bytes of every message sent, over four."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.common import MODEL, POLICY, Conversation, flush, redis_server
from bot.config import DEFAULT_SYSTEM_PROMPT
from bot.engine import Engine, EngineLimits
from bot.model import TextSink
from bot.store.base import Message, message_size
from bot.store.redis import RedisStore
from bot.summary import SUMMARY_REQUEST_MARK
from bot.usage import UsageMeter

CHECKPOINTS = (1, 10, 25, 50, 100, 150, 200, 300, 500, 750, 1000)


class ModelWithSummaries:
    """Answers at once; a summary request gets the longest summary the bot keeps (the worst
    case for what a turn sends), any other request the conversation's answer."""

    def __init__(self, answer: Message, summary_bytes: int) -> None:
        self.answer = answer
        self.summary = ("older talk " * (summary_bytes // 11))[: summary_bytes - 8]
        self.sent_bytes = 0
        self.summary_calls = 0

    async def complete(
        self,
        messages: list[Message],
        model: str,
        mcp_servers: Sequence[str],
        meter: UsageMeter | None = None,
    ) -> list[Message]:
        if str(messages[0].get("content", "")).startswith(SUMMARY_REQUEST_MARK):
            self.summary_calls += 1
            return [{"role": "assistant", "content": self.summary}]
        self.sent_bytes = sum(map(message_size, messages))
        return [dict(self.answer)]

    async def stream(
        self,
        messages: list[Message],
        model: str,
        mcp_servers: Sequence[str],
        on_text: TextSink,
        meter: UsageMeter | None = None,
    ) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class TokenRow:
    turns: int
    stored: int
    covered: int
    summary_calls: int
    sent: int
    """Tokens the turn sent, with summaries."""
    peak: int
    """The most any turn so far sent, with summaries."""
    sent_cut_only: int
    """...and without (the oldest messages are only cut)."""
    whole: int
    """Tokens of the system prompt, the whole history and the new message: what sending
    everything would take."""


async def _conversation(
    url: str, turns: int, budget_bytes: int, summaries: bool
) -> list[tuple[int, int, int, int, int]]:
    """Per turn: (tokens sent, stored messages, messages summarized, summary calls, whole)."""
    conversation = Conversation()
    store = RedisStore.from_url(url, POLICY)
    limits = EngineLimits(DEFAULT_SYSTEM_PROMPT, budget_bytes, summaries=summaries)
    model = ModelWithSummaries(conversation.answer, max(budget_bytes // 8, 200))
    engine = Engine(store, model, limits)
    scope = f"tokens-{summaries}"
    out = []
    whole = message_size({"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    try:
        for turn in range(turns):
            user = conversation.user(turn)
            await engine.reply(scope, user)
            await engine.background_done()
            whole += message_size(user)
            summary = await store.read_summary(scope, "default")
            stored = (await store.current_session(scope)).message_count
            covered = summary.covered if summary else 0
            out.append((model.sent_bytes // 4, stored, covered, model.summary_calls, whole // 4))
            whole += message_size(conversation.answer)
    finally:
        await store.close()
    return out


async def measure(url: str, turns: int, budget_tokens: int) -> list[TokenRow]:
    budget = budget_tokens * 4
    await flush(url)
    summarized = await _conversation(url, turns, budget, summaries=True)
    cut = await _conversation(url, turns, budget, summaries=False)
    rows = []
    for n in sorted({c for c in CHECKPOINTS if c <= turns} | {turns}):
        sent, stored, covered, calls, whole = summarized[n - 1]
        peak = max(row[0] for row in summarized[:n])
        rows.append(TokenRow(n, stored, covered, calls, sent, peak, cut[n - 1][0], whole))
    return rows


def table(rows: Sequence[TokenRow], budget_tokens: int) -> list[str]:
    lines = [
        f"## Tokens sent per turn (context budget {budget_tokens} tokens)",
        "",
        "One conversation of alternating 200- and 600-byte messages through the engine, with a",
        "model that answers at once and writes the longest summary the bot keeps (an eighth of",
        "the budget). *Sent* is what that turn sent (stored bytes / 4, system prompt, summary,",
        "history and new message); *cut only* is the same turn with summaries off; *whole* is",
        "the whole history and the new message, what sending everything would take. Each turn",
        "waits for the summary it started, if one was due (in the bot it runs meanwhile).",
        "",
        "| Turns so far | Stored messages | Summarized messages | Summary calls | Sent tokens"
        " | Most sent by any turn so far | Sent tokens, cut only | Whole history tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.turns} | {r.stored} | {r.covered} | {r.summary_calls} | {r.sent} | {r.peak}"
            f" | {r.sent_cut_only} | {r.whole} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokens", description=__doc__)
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--budget-tokens", type=int, default=16_000)
    args = parser.parse_args()
    with redis_server() as server:
        rows = asyncio.run(measure(server.url, args.turns, args.budget_tokens))
    print("\n".join(table(rows, args.budget_tokens)))
    print(f"model: {MODEL} (not called: in-process)", file=sys.stderr)


if __name__ == "__main__":
    main()
