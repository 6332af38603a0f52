"""Answers longer than Discord's 2,000 characters are split where a reader expects."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.discord_bot.render import MESSAGE_LIMIT, split_message


def fences_balanced(piece: str) -> bool:
    return sum(1 for line in piece.split("\n") if line.strip().startswith("```")) % 2 == 0


def test_short_text_is_one_message() -> None:
    assert split_message("hello") == ["hello"]


def test_paragraphs_are_kept_whole() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 150 for i in range(6)]
    pieces = split_message("\n\n".join(p.strip() for p in paragraphs))
    assert len(pieces) > 1
    assert all(len(p) <= MESSAGE_LIMIT for p in pieces)
    for piece in pieces:
        assert piece.startswith("Paragraph") and piece.endswith("word")


def test_a_code_block_cut_in_two_is_closed_and_reopened_with_its_language() -> None:
    code = "\n".join(f"    total += {i}  # step {i}" for i in range(150))
    text = f"Here is the code:\n\n```python\n{code}\n```\n\nThat is all."
    pieces = split_message(text)
    assert len(pieces) >= 2
    assert all(len(p) <= MESSAGE_LIMIT and fences_balanced(p) for p in pieces)
    assert pieces[0].endswith("\n```") and pieces[1].startswith("```python\n")
    rejoined = "\n".join(p.removesuffix("\n```").removeprefix("```python\n") for p in pieces)
    assert all(f"total += {i}  #" in rejoined for i in range(150))


def test_a_line_without_spaces_is_cut_hard() -> None:
    pieces = split_message("x" * 4500)
    assert [len(p) for p in pieces][:2] == [MESSAGE_LIMIT - 4, MESSAGE_LIMIT - 4]
    assert "".join(pieces) == "x" * 4500


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="ab \n", min_size=1, max_size=900),
            st.just("```py"),
            st.just("```"),
        ),
        max_size=12,
    ).map("\n".join)
)
def test_every_piece_fits_and_no_text_is_lost(text: str) -> None:
    pieces = split_message(text)
    assert all(len(p) <= MESSAGE_LIMIT for p in pieces)
    kept = "".join(pieces).replace("```py", "").replace("```", "")
    original = text.replace("```py", "").replace("```", "")
    assert "".join(kept.split()) == "".join(original.split())
