"""The one exception type users can cause, with messages a clinician can read."""

from __future__ import annotations

from pathlib import Path


class LungvizError(Exception):
    """A problem with the user's input or setup, described in plain language.

    The app and the command line show ``str(err)`` and never a traceback.
    """

    def __init__(self, message: str, *, source: str | Path | None = None) -> None:
        self.source = str(source) if source is not None else None
        text = f"{self.source}: {message}" if self.source else message
        super().__init__(text)
        self.message = message
