"""Outside text shown as itself: every hostile name stays text in Streamlit markdown, shortened and on one line."""

from __future__ import annotations

import pytest
from conftest import live_markup, shown_text

from lungviz.present.text import plain_text, shorten

#: Names an upload or a zip member can carry, each with the markup it would render unescaped.
HOSTILE_NAMES = [
    ("![x](https://host/pixel.png).dcm", {"image or link", "web or e-mail address"}),
    ("[Open the case](https://example.invalid/login).png", {"image or link", "web or e-mail address"}),
    ("<img src=x onerror=alert(1)>.png", {"HTML tag or autolink"}),
    ("<b>benign</b> slice.dcm", {"HTML tag or autolink"}),
    ("<https://host/a>.png", {"HTML tag or autolink", "web or e-mail address"}),
    ("``x` `` break.png", {"code span"}),
    ("www.example.com.png", {"web or e-mail address"}),
    ("dr@example.com.png", {"web or e-mail address"}),
    (":red[benign] :streamlit: :smile:.png", {"Streamlit directive", "shortcode"}),
    ("[x][1]\n\n[1]: https://host/", {"image or link", "web or e-mail address"}),
]
#: Markdown that is not live markup but would still not read as the name: emphasis, headings, lists, tables, maths.
FORMATTING = ["**Reviewed: benign**.png", "# Heading.png", "1. item.png", "- item.png", "a|b|c.png", "$x^2$.png",
              "> quote.png", "~~struck~~.png", "back\\slash\\*.png", ":material/home: icon.png"]


@pytest.mark.parametrize(("name", "markup"), HOSTILE_NAMES)
def test_a_hostile_name_is_shown_as_its_own_characters_without_live_markup(name: str, markup: set[str]) -> None:
    assert set(live_markup(name)) == markup  # the check sees what the raw name would render
    shown = plain_text(name)
    assert live_markup(shown) == []
    assert shown_text(shown) == shorten(name, 1000)


@pytest.mark.parametrize("name", FORMATTING)
def test_every_markdown_character_is_escaped(name: str) -> None:
    escaped = plain_text(name)
    assert shown_text(escaped) == name
    bare = escaped.replace("\u2060", "")
    for i, ch in enumerate(bare):  # each punctuation character of the name follows a backslash
        if ch in "*#.-|$>~:/[]()" and (i == 0 or bare[i - 1] != "\\"):
            pytest.fail(f"'{ch}' at {i} of {escaped!r} is not escaped")


def test_shorten_keeps_one_line_and_drops_invisible_controls() -> None:
    assert shorten("a\n\nb\t c", 80) == "a b c"
    assert shorten("report\u202egnp.exe", 80) == "reportgnp.exe"  # a right-to-left override cannot disguise it
    assert shorten("x" * 30_000, 120) == "x" * 119 + "…"
    assert len(plain_text("y" * 30_000, 120)) == 120  # letters need no escaping
