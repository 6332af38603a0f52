"""What is sent to the model never exceeds the context budget, whatever the parts: system
prompt, summary, channel context, history (with tool rounds and images) and the new message;
and no tool call is ever sent without its results, nor a result without its call."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.context import build_context, summary_message
from bot.store.base import Message, message_size

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)


@st.composite
def exchanges(draw: st.DrawFn) -> list[Message]:
    """Stored history as the engine stores it: user turns, each answered, some with tool
    rounds (an assistant `tool_calls` message, then one result per call), some with images,
    now and then a stored system message (an import may bring one)."""
    history: list[Message] = []
    for turn in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            image = {
                "type": "image_url",
                "image_url": {"url": "https://x/" + "i" * draw(st.integers(0, 80))},
            }
            history.append(
                {"role": "user", "content": [{"type": "text", "text": draw(texts)}, image]}
            )
        else:
            history.append({"role": "user", "content": draw(texts)})
        for round_ in range(draw(st.integers(0, 2))):
            ids = [f"c{turn}-{round_}-{i}" for i in range(draw(st.integers(1, 3)))]
            calls = [
                {"id": i, "type": "function", "function": {"name": "f", "arguments": draw(texts)}}
                for i in ids
            ]
            history.append({"role": "assistant", "content": None, "tool_calls": calls})
            history += [{"role": "tool", "tool_call_id": i, "content": draw(texts)} for i in ids]
        if draw(st.integers(0, 9)) == 0:
            history.append({"role": "system", "content": draw(texts)})
        history.append({"role": "assistant", "content": draw(texts)})
    return history


@settings(max_examples=400, deadline=None)
@given(
    system=texts,
    summary=st.one_of(st.none(), texts),
    channel=st.lists(texts, max_size=5),
    history=exchanges(),
    cut=st.integers(0, 60),
    user=texts,
    budget=st.integers(0, 6_000),
    measured=st.booleans(),
)
def test_the_total_sent_never_exceeds_the_budget_and_no_tool_call_is_orphaned(
    system: str,
    summary: str | None,
    channel: list[str],
    history: list[Message],
    cut: int,
    user: str,
    budget: int,
    measured: bool,
) -> None:
    recent = history[min(cut, len(history)) :]  # a store's window may start mid-exchange
    new: Message = {"role": "user", "content": user}
    around = [{"role": "user", "content": f"[Someone]: {t}"} for t in channel]
    context = build_context(
        system,
        summary,
        around,
        recent,
        new,
        budget,
        recent_bytes=sum(map(message_size, recent)) if measured else None,
    )
    sent = context.messages
    total = sum(map(message_size, sent))
    assert total == context.total_bytes
    mandatory = message_size({"role": "system", "content": system}) + message_size(new)
    if mandatory <= budget:
        assert total <= budget
    else:  # the system prompt and the new message go alone, whatever the budget says
        assert sent == [{"role": "system", "content": system}, new]

    assert sent[0] == {"role": "system", "content": system} and sent[-1] == new
    body = sent[1:-1]
    if summary and body and body[0] == summary_message(summary):
        body = body[1:]
    history_sent = body[: len(body) - len([m for m in body if m in around])]
    assert all(m in around for m in body[len(history_sent) :])
    assert not history_sent or history_sent[0]["role"] == "user"
    assert all(m["role"] != "system" for m in history_sent)
    called = [c["id"] for m in history_sent for c in m.get("tool_calls") or []]
    answered = [m["tool_call_id"] for m in history_sent if m["role"] == "tool"]
    assert sorted(called) == sorted(answered)
    # What was left out is the oldest: the history sent is the newest of the window.
    tail = [m for m in recent[context.history_from :] if m["role"] != "system"]
    assert [m["role"] for m in history_sent] == [m["role"] for m in tail]


def test_every_part_counts_against_the_budget() -> None:
    """Each part takes its room: with a summary and channel context, less history fits."""
    history: list[Message] = []
    for i in range(40):
        history += [
            {"role": "user", "content": f"question {i} " + "q" * 80},
            {"role": "assistant", "content": f"answer {i} " + "a" * 80},
        ]
    new: Message = {"role": "user", "content": "and now?"}
    alone = build_context("sys", None, (), history, new, 3_000)
    summary = "s" * 500
    around = [{"role": "user", "content": "[Bea]: " + "c" * 400}]
    crowded = build_context("sys", summary, around, history, new, 3_000)
    assert summary_message(summary) in crowded.messages and around[0] in crowded.messages
    assert crowded.history_bytes < alone.history_bytes
    assert alone.total_bytes <= 3_000 and crowded.total_bytes <= 3_000
