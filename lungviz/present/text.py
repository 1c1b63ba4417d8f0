"""Text from outside (file and zip-member names, case labels, reviewers' names and notes, the messages that quote
them) shown as itself: on one line, shortened, and escaped so that Streamlit markdown can never render it as a link,
an image, HTML or formatting.

lungviz's own messages are plain text (the command line prints them as they are); the app shows any that can carry
such text through :func:`plain_text`.
"""

from __future__ import annotations

import re

#: How much of one piece of outside text a page shows (a message quoting a file name included).
MAX_SHOWN_CHARS = 1000
#: Every ASCII punctuation character: CommonMark renders each one backslash-escaped as the character itself, so no
#: link, image, autolink, HTML tag, code span, emphasis, heading, list, table or Streamlit directive can start.
_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")
#: Control characters and the bidirectional overrides that can make ``cod.exe`` look like ``exe.doc``.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: Zero-width and invisible; put after each colon so that Streamlit's shortcodes (``:streamlit:``, emoji), which it
#: matches in the text after unescaping, never match a name.
WORD_JOINER = "\u2060"
#: How the nodule model's benign/malignant call reads on screen and in reports: its call point is set low, for a
#: second look, so at the malignant side it flags a nodule to look at again; it is not a diagnosis.
CALL_WORDS = {"malignant": "flag for a second look", "benign": "no flag"}


def shorten(text: object, limit: int) -> str:
    """``text`` on one line (any run of white space, line breaks included, becomes one space), control and
    bidirectional-override characters dropped, cut to ``limit`` characters with an ellipsis."""
    text = _INVISIBLE.sub("", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def plain_text(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` as Streamlit markdown that shows exactly its characters (shortened to ``limit``)."""
    return _PUNCTUATION.sub(r"\\\1", shorten(text, limit)).replace(":", ":" + WORD_JOINER)


def call_words(call: str) -> str:
    """The benign/malignant call of the nodule model as shown to a reader (:data:`CALL_WORDS`)."""
    return CALL_WORDS.get(call, call)
