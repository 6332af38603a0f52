"""Answers longer than Discord's 2,000 characters are split where a reader expects."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.discord_bot.render import MESSAGE_LIMIT, split_message


def fences_balanced(piece: str) -> bool:
    """Discord opens or closes a code block at every ```, wherever it stands on a line."""
    return piece.count("```") % 2 == 0


_LANGUAGE = re.compile(r"^[A-Za-z0-9_+\-.#]{1,32}(?=\n|$)")
"""The language of an opening fence, as Discord reads it (the splitter keeps 32 characters)."""


def most_pieces(text: str) -> int:
    """Every piece but the last carries at least half of what fits in a message."""
    return 2 + len(text) // (MESSAGE_LIMIT // 2 - 40)


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


def test_a_fence_followed_by_an_endless_line_is_split_like_any_text() -> None:
    """This answer once froze the whole bot: the loop never ended and memory grew."""
    text = "```" + "lorem ipsum dolor sit amet " * 222
    pieces = split_message(text)
    assert 3 <= len(pieces) <= most_pieces(text)
    assert all(len(p) <= MESSAGE_LIMIT for p in pieces)
    assert all(fences_balanced(p) for p in pieces[:-1])
    assert "".join(pieces).count("lorem") == 222


@pytest.mark.parametrize(
    "info",
    ["x" * 1990, "x" * 5000, "lorem ipsum " * 400, "a" * 1995 + "\n", "py" + " " * 2100],
)
def test_a_long_info_string_never_makes_a_piece_too_long(info: str) -> None:
    text = "Here:\n```" + info + "\ncode line\n" * 300 + "```\nDone."
    pieces = split_message(text)
    assert len(pieces) <= most_pieces(text)
    assert all(len(p) <= MESSAGE_LIMIT and fences_balanced(p) for p in pieces)


def test_a_block_opened_mid_line_is_closed_and_reopened() -> None:
    code = "\n".join(f"value_{i} = {i}" for i in range(300))
    pieces = split_message(f"Try this: ```python\n{code}\n``` and tell me.")
    assert len(pieces) >= 2
    assert all(len(p) <= MESSAGE_LIMIT and fences_balanced(p) for p in pieces)
    assert all(p.startswith("```python\n") for p in pieces[1:])


def test_a_block_is_not_left_empty_at_the_end_of_a_piece() -> None:
    prose = "word " * 397  # the opening fence line ends right where a piece must end
    pieces = split_message(prose + "\n```js\n" + "let x = 1;\n" * 200 + "```")
    assert "```js" not in pieces[0]
    assert pieces[1].startswith("```js\n")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="ab \n`", min_size=1, max_size=900),
            st.just("```py"),
            st.just("```"),
            st.just(" ```js\n"),  # a fence that opens mid-line
            st.integers(1, 3000).map(lambda n: "```" + "info " * (n // 5) + "i" * (n % 5)),
            st.integers(1, 3000).map(lambda n: "```" + "l" * n + "\n"),
        ),
        max_size=12,
    ).map("\n".join)
)
def test_every_piece_fits_and_no_text_is_lost(text: str) -> None:
    pieces = split_message(text)
    assert len(pieces) <= most_pieces(text)
    assert all(len(p) <= MESSAGE_LIMIT for p in pieces)
    assert all(fences_balanced(p) for p in pieces[:-1])  # the model may leave one open
    assert words(pieces) == words([text])


def words(pieces: list[str]) -> str:
    """What must survive a split: the text without whitespace, fences, or the languages of
    opening fences (a reopened block repeats its language). Pieces are separate messages."""
    parts = "\n".join(pieces).split("```")
    kept = [parts[0]]
    for n, part in enumerate(parts[1:]):
        kept.append(_LANGUAGE.sub("", part) if n % 2 == 0 else part)
    return "".join("".join(kept).replace("`", "").split())
