"""What a session keeps: preferences, the upload kept across pages, and short keys for inputs. Light on purpose:
the app's entry and the top of the Inspect page import only this, so a fresh server draws its first page before
the models and their libraries are imported."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

#: Preferences kept across pages (widget keys re-assigned each run, so leaving a page does not reset them).
PREFERENCES = {"alpha": 0.4, "map_method": "Grad-CAM", "lime_precision": "Fast", "k_similar": 5, "window": "lung",
               "reviewer": ""}
#: Prefixes of per-upload keys (DICOM slice, nodule centre and whether it was placed) kept like the preferences, so
#: that an upload kept across pages (:func:`kept_upload`) comes back at the slice and centre the user chose.
UPLOAD_VIEW_KEYS = ("slice-", "row-", "col-", "placed-", "finding-", "chosen-")
#: Other session values: LIME results per input, saved reviews per case (for the report).
STATE = {"lime": {}, "saved_reviews": {}}
#: How much of a file name the page shows.
NAME_CHARS = 120


@dataclass(frozen=True)
class KeptUpload:
    """An uploaded file kept in the session, so that the Inspect page still has it after a visit to another page
    (Streamlit forgets a file uploader's file when its page is left)."""

    name: str
    data: bytes = field(repr=False)
    file_id: str

    def getvalue(self) -> bytes:
        return self.data


def kept_upload(widget_key: str, present: bool, file) -> tuple[KeptUpload | None, bool]:
    """The file of the uploader ``widget_key``, kept across pages, and whether it came back from an earlier visit
    (the uploader itself then shows no file). ``present``: whether the uploader's key was in the session before the
    widget ran; absent means the page was just re-entered, so the kept file comes back. A file removed from the
    uploader (present, empty, not a file that came back) is forgotten."""
    kept: dict = st.session_state.setdefault("kept_uploads", {})
    restored: set = st.session_state.setdefault("kept_restored", set())
    if file is not None:
        kept[widget_key] = KeptUpload(file.name, file.getvalue(), file.file_id)
        restored.discard(widget_key)
    elif not present and widget_key in kept:
        restored.add(widget_key)
    elif widget_key not in restored:
        kept.pop(widget_key, None)
    return kept.get(widget_key), widget_key in restored


def forget_upload(widget_key: str) -> None:
    """Drop a kept upload (the "forget" button of a file that came back)."""
    st.session_state.setdefault("kept_uploads", {}).pop(widget_key, None)
    st.session_state.setdefault("kept_restored", set()).discard(widget_key)


def init_state() -> None:
    """Set session defaults once; re-assign the preferences so Streamlit keeps them while their page is not shown.
    The slice and centre chosen on the kept upload are kept the same way; those of earlier uploads are forgotten,
    so a session that uploads file after file does not pile them up."""
    for key, value in STATE.items():
        if key not in st.session_state:
            st.session_state[key] = type(value)()
    for key, value in PREFERENCES.items():
        st.session_state[key] = st.session_state.get(key, value)
    kept = st.session_state.get("kept_uploads", {}).get("upload_slice")
    current = digest(kept.file_id) if kept is not None else None
    for key in [k for k in st.session_state if isinstance(k, str) and k.startswith(UPLOAD_VIEW_KEYS)]:
        if current is not None and key.endswith(f"-{current}"):
            st.session_state[key] = st.session_state[key]
        else:
            del st.session_state[key]


def digest(*parts: bytes | str | np.ndarray | None) -> str:
    """A short key for an input (bytes, text or arrays), for session values and widget keys."""
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, str):
            h.update(p.encode())
        elif p is not None:
            h.update(p)
        h.update(b"|")
    return h.hexdigest()[:16]
