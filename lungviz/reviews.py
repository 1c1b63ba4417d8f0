"""The review log: each reviewer's verdict on a case and on what the model showed, in SQLite under the home folder.

One file (default ``paths.home_dir() / "reviews.sqlite3"``) in WAL mode, so several app sessions (threads or
processes) can write at once while others read. Every operation opens its own short-lived connection with a busy
timeout; writes run in ``BEGIN IMMEDIATE`` transactions. The schema is created idempotently and its version kept
in ``PRAGMA user_version``.

Speed: ``synchronous = NORMAL`` (SQLite's advice for WAL: a commit survives an app crash; only a power cut can undo
the last few) and one idle connection held by the store, so closing an operation's connection does not checkpoint
and delete the WAL every time. Together they spare each review a disk sync and a new WAL, which dominate its time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import sqlite3
import weakref
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path
from time import monotonic, sleep
from typing import Any, TextIO

from lungviz import __version__, paths
from lungviz.errors import LungvizError
from lungviz.files import replacing

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
VERDICTS = ("agree", "disagree", "unsure")
SOURCES = ("upload", "library")
#: Columns of :meth:`ReviewStore.list` rows, in order.
FIELDS = ("id", "created_utc", "case_id", "source", "verdict", "note", "reviewer", "app_version", "model_summary")
#: Columns of the CSV export: the stored fields with two headline numbers of the model summary pulled out.
CSV_FIELDS = ("id", "created_utc", "case_id", "source", "verdict", "note", "reviewer", "app_version",
              "malignant_probability", "flag", "model_summary")
#: How long an operation waits for another session's write lock before giving up.
BUSY_TIMEOUT_S = 30.0
MAX_NOTE_CHARS = 20_000
#: A name, not a text: long enough for any reviewer's name and role, short enough for one line of a report.
MAX_REVIEWER_CHARS = 200
#: A library case id or an upload's label (its file names): bounded like a file path.
MAX_CASE_ID_CHARS = 1000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_utc TEXT NOT NULL,
    case_id TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN {SOURCES!r}),
    verdict TEXT NOT NULL CHECK (verdict IN {VERDICTS!r}),
    note TEXT NOT NULL DEFAULT '',
    reviewer TEXT NOT NULL DEFAULT '',
    app_version TEXT NOT NULL,
    model_summary TEXT
);
CREATE INDEX IF NOT EXISTS reviews_created ON reviews (created_utc);
CREATE INDEX IF NOT EXISTS reviews_case ON reviews (case_id);
"""


def default_path() -> Path:
    """The review log in the user's home folder (``LUNGVIZ_HOME`` overrides the folder)."""
    return paths.home_dir() / "reviews.sqlite3"


def utc_now() -> str:
    """The current time as the log stores it: UTC ISO 8601 with microseconds (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _utc_text(when: datetime | date | str) -> str:
    """A filter time in the stored format; naive times and bare dates are taken as UTC."""
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when.strip())
        except ValueError as err:
            raise LungvizError(f"'{when}' is not a date or time; use a form like 2025-01-31 or 2025-01-31T14:00.") \
                from err
    if not isinstance(when, datetime):
        when = datetime.combine(when, time())
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _as_text(value: Any) -> str:
    """A stored value read back as text (a damaged row may hold a number, bytes or NULL in a text column)."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text not in allowed:
        raise LungvizError(f"the {what} must be one of {', '.join(allowed)}; got '{value}'.")
    return text


def _json_default(obj: Any) -> Any:
    """numpy scalars and arrays (as found in prediction summaries) as plain JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def summary_headline(summary: dict | None) -> tuple[float | None, str]:
    """The malignant probability (None unless a number in [0, 1]) and the flag ("" when none) of a stored model
    summary, whatever a damaged row holds."""
    if not isinstance(summary, dict):
        return None, ""
    p, flag = summary.get("malignant_probability"), summary.get("flag")
    valid = isinstance(p, int | float) and not isinstance(p, bool) and 0.0 <= p <= 1.0  # NaN fails too
    return (float(p) if valid else None), (flag if isinstance(flag, str) else "")


def _parse_summary(text: Any, review_id: Any) -> dict | None:
    """A stored model summary back as a dict; None (logged) when the row holds something else, so that one damaged
    row cannot stop the log from being listed or exported."""
    if text is None or text == "":
        return None
    try:
        summary = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        summary = None
    if not isinstance(summary, dict):
        log.warning("review %s: its model summary is unreadable and is left out", review_id)
        return None
    return summary


class ReviewStore:
    """The review log in one SQLite file; safe to share between threads, sessions and processes."""

    def __init__(self, path: str | Path | None = None, timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path).expanduser() if path is not None else default_path()
        self.timeout_s = float(timeout_s)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LungvizError(f"cannot create the folder for the review log ({err.strerror}).",
                               source=self.path.parent) from err
        self._init_schema()
        # An idle connection that has read the file keeps the WAL open between operations (it holds no lock).
        keeper = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        keeper.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        self._release = weakref.finalize(self, keeper.close)

    def close(self) -> None:
        """Release the idle connection (operations still work afterwards, only slower)."""
        self._release()

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReviewStore({str(self.path)!r})"

    # -------------------------------------------------------------------------------------------- connections

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection (autocommit; transactions are explicit), closed on exit; SQLite errors read plainly."""
        conn = None
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            conn.text_factory = _as_text  # text that is not UTF-8 (a damaged row) reads with replacement characters
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.create_function("casefold", 1, lambda v: v.casefold() if isinstance(v, str) else v,
                                 deterministic=True)  # SQLite's lower() folds ASCII only
            yield conn
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise LungvizError("the review log is busy with another session; please try again.",
                                   source=self.path) from err
            if "disk is full" in str(err):  # SQLite rolls the change back whole
                raise LungvizError("the disk holding the review log is full; nothing was saved. Free some space and "
                                   "try again.", source=self.path) from err
            raise LungvizError(f"cannot use the review log ({err}).", source=self.path) from err
        except sqlite3.DatabaseError as err:
            raise LungvizError(f"the review log is damaged or is not a review log ({err}).",
                               source=self.path) from err
        finally:
            if conn is not None:
                conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A connection inside a ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on error."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _init_schema(self) -> None:
        """Switch to WAL and create the tables once; safe when several sessions start together."""
        self._enable_wal()
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LungvizError(f"the review log was written by a newer lungviz (schema {version}, this version "
                                   f"reads {SCHEMA_VERSION}); update lungviz or choose another file.", source=self.path)
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _enable_wal(self) -> None:
        """``PRAGMA journal_mode = WAL`` (persistent in the file; a no-op once set), retried while another session
        holds the file: SQLite answers a contended journal-mode switch with "locked" at once, without waiting for
        the busy timeout."""
        deadline = monotonic() + self.timeout_s
        while True:
            try:
                with self._connect() as conn:
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except LungvizError as err:
                if "busy" not in err.message or monotonic() >= deadline:
                    raise
                sleep(0.02)

    def journal_mode(self) -> str:
        """The file's journal mode (``"wal"`` unless the file system cannot do WAL)."""
        with self._connect() as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    def schema_version(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------------------------------------ writing

    def add(self, case_id: str, source: str, verdict: str, note: str = "", reviewer: str = "",
            model_summary: dict | None = None) -> int:
        """Store one review and return its id.

        ``source``: ``"upload"`` or ``"library"``; ``verdict``: ``"agree"``, ``"disagree"`` or ``"unsure"``;
        ``model_summary``: what the reviewer saw, e.g. ``Prediction.to_dict()``, stored as JSON.
        """
        case_id = str(case_id or "").strip()
        if not case_id:
            raise LungvizError("a review needs the case it is about (a library case id or the uploaded file name).")
        source = _choice(source, SOURCES, "case source")
        verdict = _choice(verdict, VERDICTS, "verdict")
        if len(case_id) > MAX_CASE_ID_CHARS:
            raise LungvizError(f"the case name is {len(case_id):,} characters long; at most {MAX_CASE_ID_CHARS:,} "
                               "can be stored (rename the file).")
        note, reviewer = str(note or ""), str(reviewer or "").strip()
        if len(note) > MAX_NOTE_CHARS:
            raise LungvizError(f"the note is {len(note):,} characters long; keep it under {MAX_NOTE_CHARS:,}.")
        if len(reviewer) > MAX_REVIEWER_CHARS:
            raise LungvizError(f"the reviewer's name is {len(reviewer):,} characters long; keep it under "
                               f"{MAX_REVIEWER_CHARS}.")
        if model_summary is not None and not isinstance(model_summary, dict):
            raise LungvizError("the model summary must be a dictionary such as Prediction.to_dict().")
        summary = None if model_summary is None else json.dumps(model_summary, default=_json_default,
                                                                ensure_ascii=False, sort_keys=True)
        with self._write() as conn:  # the time is taken under the write lock, so time order is id order
            cur = conn.execute(
                "INSERT INTO reviews (created_utc, case_id, source, verdict, note, reviewer, app_version, "
                "model_summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (utc_now(), case_id, source, verdict, note, reviewer, __version__, summary),
            )
            return int(cur.lastrowid)

    # ------------------------------------------------------------------------------------------------ reading

    @staticmethod
    def _where(verdict: str | None, source: str | None, case_query: str | None, reviewer: str | None,
               since: datetime | date | str | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if verdict:
            clauses.append("verdict = ?")
            args.append(_choice(verdict, VERDICTS, "verdict"))
        if source:
            clauses.append("source = ?")
            args.append(_choice(source, SOURCES, "case source"))
        if case_query and case_query.strip():
            q = case_query.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append("case_id LIKE ? ESCAPE '\\'")
            args.append(f"%{q}%")
        if reviewer and reviewer.strip():
            clauses.append("instr(casefold(reviewer), ?) > 0")  # part of the name, in any case ("dr ä": "Dr Ä")
            args.append(reviewer.strip().casefold())
        if since is not None and since != "":
            clauses.append("created_utc >= ?")
            args.append(_utc_text(since))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def list(self, verdict: str | None = None, source: str | None = None, case_query: str | None = None,
             reviewer: str | None = None, since: datetime | date | str | None = None,
             limit: int | None = None) -> list[dict]:
        """Reviews newest first, as dicts with :data:`FIELDS` (``model_summary`` parsed back to a dict).

        ``case_query`` matches part of the case id and ``reviewer`` part of the reviewer's name (both in any case);
        ``since`` keeps reviews at or after that UTC time.
        """
        where, args = self._where(verdict, source, case_query, reviewer, since)
        sql = f"SELECT {', '.join(FIELDS)} FROM reviews{where} ORDER BY created_utc DESC, id DESC"
        if limit is not None:
            if int(limit) < 0:
                raise LungvizError(f"the number of reviews to show must be 0 or more; got {limit}.")
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._connect() as conn:
            rows = conn.execute(sql, args).fetchall()
        out = []
        for row in rows:
            rec = {k: (v if k in ("id", "model_summary") or isinstance(v, str) else _as_text(v))
                   for k, v in zip(FIELDS, row, strict=True)}
            rec["model_summary"] = _parse_summary(rec["model_summary"], rec["id"])
            out.append(rec)
        return out

    def count(self, verdict: str | None = None, source: str | None = None, case_query: str | None = None,
              reviewer: str | None = None, since: datetime | date | str | None = None) -> int:
        """How many reviews match the filters (all of them by default)."""
        where, args = self._where(verdict, source, case_query, reviewer, since)
        with self._connect() as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM reviews{where}", args).fetchone()[0])

    def counts_by_verdict(self, **filters: Any) -> dict[str, int]:
        """``{verdict: count}`` for every verdict (zeros included), under the same filters as :meth:`count`."""
        return {v: self.count(**{**filters, "verdict": v}) for v in VERDICTS}

    # ----------------------------------------------------------------------------------------------- exporting

    def export_csv(self, dest: str | Path | TextIO, **filters: Any) -> int:
        """Write the matching reviews (newest first, :data:`CSV_FIELDS`) as UTF-8 CSV to a path or text buffer.

        Notes keep their commas, quotes and line breaks (standard CSV quoting). The text starts with a UTF-8
        byte-order mark, so that spreadsheet programs read accented and non-Latin text right (read it back with
        ``encoding="utf-8-sig"``), and a text cell that a spreadsheet would run as a formula (starting with ``=``,
        ``+``, ``-``, ``@``) is written with a leading apostrophe. A file is written whole or not at all. Returns the
        number of rows.
        """
        rows = self.list(**filters)
        if isinstance(dest, (str, Path)):
            target = Path(dest).expanduser()
            try:
                with replacing(target) as tmp, tmp.open("x", newline="", encoding="utf-8-sig") as fh:
                    _write_csv(fh, rows)
            except OSError as err:
                raise LungvizError(f"cannot write the review export ({err.strerror}).", source=target) from err
        else:
            dest.write(BOM)
            _write_csv(dest, rows)
        return len(rows)

    def to_csv_text(self, **filters: Any) -> str:
        """The CSV export as text (for a download button)."""
        buf = io.StringIO(newline="")
        self.export_csv(buf, **filters)
        return buf.getvalue()


BOM = "\ufeff"
#: A text cell a spreadsheet may run as a formula (CSV injection): one starting with ``= + - @``, also after white
#: space or line breaks (some spreadsheets skip them), or with a tab or carriage return.
FORMULA = re.compile(r"\A(?:\s*[=+\-@]|[\t\r])")


def _cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a formula-like string gets a leading apostrophe."""
    return f"'{value}" if isinstance(value, str) and FORMULA.match(value) else value


def _write_csv(fh: TextIO, rows: list[dict]) -> None:
    writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, lineterminator="\r\n")
    writer.writeheader()
    for rec in rows:
        p, flag = summary_headline(rec["model_summary"])
        p = "" if p is None else f"{p:.4f}"
        summary = "" if rec["model_summary"] is None else json.dumps(rec["model_summary"], ensure_ascii=False,
                                                                     sort_keys=True)
        row = {**rec, "malignant_probability": p, "flag": flag, "model_summary": summary}
        writer.writerow({k: _cell(v) for k, v in row.items() if k in CSV_FIELDS})
