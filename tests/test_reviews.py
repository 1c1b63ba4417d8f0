"""The SQLite review log: round trip, filters, CSV export, validation, WAL and concurrent writers."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from lungviz import __version__
from lungviz.errors import LungvizError
from lungviz.reviews import (
    CSV_FIELDS,
    FIELDS,
    MAX_NOTE_CHARS,
    MAX_REVIEWER_CHARS,
    SCHEMA_VERSION,
    ReviewStore,
    default_path,
    summary_headline,
)

SUMMARY = {
    "views": {"fused": {"binary": {"classes": ["benign", "malignant"], "probabilities": [0.3, 0.7],
                                   "prediction": "malignant"}}},
    "malignant_probability": 0.7,
    "flag": "refer / uncertain",
    "reasons": ["malignant probability 70% is in the uncertain band (25%-75%)"],
}
TRICKY_NOTE = 'spiculated, "upper lobe"\nsecond line; 5 > 4 & é'


@pytest.fixture
def store(tmp_path: Path) -> ReviewStore:
    return ReviewStore(tmp_path / "reviews.sqlite3")


def test_round_trip(store: ReviewStore) -> None:
    before = datetime.now(UTC)
    rid = store.add("LIDC-IDRI-0001/nodule-0", "library", "agree", note=TRICKY_NOTE, reviewer="dr a",
                    model_summary=SUMMARY)
    (row,) = store.list()
    assert set(row) == set(FIELDS)
    assert row["id"] == rid
    assert (row["case_id"], row["source"], row["verdict"], row["reviewer"]) == (
        "LIDC-IDRI-0001/nodule-0", "library", "agree", "dr a")
    assert row["note"] == TRICKY_NOTE
    assert row["model_summary"] == SUMMARY
    assert row["app_version"] == __version__
    created = datetime.fromisoformat(row["created_utc"])
    assert created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC) + timedelta(seconds=1)
    assert store.count() == 1


def test_numpy_summary_and_no_summary(store: ReviewStore) -> None:
    store.add("a", "upload", "unsure", model_summary={"malignant_probability": np.float32(0.25),
                                                      "probs": np.array([0.75, 0.25])})
    store.add("b", "upload", "unsure")
    rows = {r["case_id"]: r for r in store.list()}
    assert rows["a"]["model_summary"] == {"malignant_probability": 0.25, "probs": [0.75, 0.25]}
    assert rows["b"]["model_summary"] is None


def test_reopen_keeps_reviews_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.sqlite3"  # the folder is created
    ReviewStore(path).add("a", "library", "agree")
    again = ReviewStore(path)
    assert again.count() == 1
    assert again.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"
    ReviewStore(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LungvizError, match="newer lungviz"):
        ReviewStore(path)


def test_not_a_database_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LungvizError, match="damaged"):
        ReviewStore(path)


def test_default_path_follows_lungviz_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGVIZ_HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / "reviews.sqlite3"
    assert ReviewStore().path == tmp_path / "home" / "reviews.sqlite3"


def test_wal_mode_is_on(store: ReviewStore) -> None:
    assert store.journal_mode() == "wal"
    with sqlite3.connect(store.path) as conn:  # persisted in the file, not just set on our connections
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"verdict": "maybe"}, "verdict"),
        ({"verdict": ""}, "verdict"),
        ({"source": "pacs"}, "source"),
        ({"case_id": "  "}, "case"),
        ({"model_summary": [0.1, 0.9]}, "summary"),
        ({"note": "x" * 20_001}, "note"),
        ({"reviewer": "R" * 30_000}, "reviewer's name is 30,000 characters long"),
        ({"reviewer": "R" * (MAX_REVIEWER_CHARS + 1)}, "reviewer's name"),
        ({"case_id": "c" * 30_000}, "case name is 30,000 characters long"),
    ],
)
def test_invalid_review_raises_and_stores_nothing(store: ReviewStore, kwargs: dict, match: str) -> None:
    args = {"case_id": "c1", "source": "library", "verdict": "agree", **kwargs}
    with pytest.raises(LungvizError, match=match):
        store.add(**args)
    assert store.count() == 0


def test_verdict_and_source_are_normalised(store: ReviewStore) -> None:
    store.add(" c1 ", "Library", " Disagree ")
    (row,) = store.list()
    assert (row["case_id"], row["source"], row["verdict"]) == ("c1", "library", "disagree")


def test_filters_and_newest_first(store: ReviewStore) -> None:
    ids = [
        store.add("LIDC-0001/nodule-0", "library", "agree", reviewer="ann"),
        store.add("LIDC-0002/nodule-1", "library", "disagree", reviewer="bob"),
        store.add("upload: slice.png", "upload", "unsure", reviewer="ann"),
        store.add("LIDC-0001/nodule-2", "library", "disagree", reviewer="ann"),
    ]
    assert [r["id"] for r in store.list()] == ids[::-1]
    assert [r["id"] for r in store.list(verdict="disagree")] == [ids[3], ids[1]]
    assert [r["id"] for r in store.list(source="upload")] == [ids[2]]
    assert [r["id"] for r in store.list(case_query="lidc-0001")] == [ids[3], ids[0]]  # part of the id, any case
    assert [r["id"] for r in store.list(reviewer="ann", verdict="disagree")] == [ids[3]]
    assert [r["id"] for r in store.list(limit=2)] == [ids[3], ids[2]]
    assert store.list(case_query="%") == []  # LIKE wildcards are taken literally
    assert store.count(reviewer="ann") == 3
    assert store.counts_by_verdict(source="library") == {"agree": 1, "disagree": 2, "unsure": 0}
    store.add("LIDC-0003/nodule-0", "upload", "agree", reviewer="Dr Äsa Öberg")  # part of a name, in any case
    assert store.count(reviewer="ÄSA") == store.count(reviewer="dr äsa") == store.count(reviewer=" öberg ") == 1
    with pytest.raises(LungvizError, match="verdict"):
        store.list(verdict="nope")


def test_since_filter(store: ReviewStore) -> None:
    old = store.add("old", "library", "agree")
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE reviews SET created_utc = ? WHERE id = ?", ("2020-01-01T00:00:00.000000+00:00", old))
    new = store.add("new", "library", "agree")
    assert [r["id"] for r in store.list(since="2021-06-01")] == [new]
    assert [r["id"] for r in store.list(since=datetime(2019, 12, 31, 23, tzinfo=UTC))] == [new, old]
    # an aware time in another zone is compared in UTC: 2020-01-01 00:30 at +01:00 is 2019-12-31 23:30 UTC
    assert [r["id"] for r in store.list(since="2020-01-01T00:30:00+01:00")] == [new, old]
    with pytest.raises(LungvizError, match="not a date"):
        store.list(since="last tuesday")


def test_csv_export_columns_and_content(store: ReviewStore, tmp_path: Path) -> None:
    store.add("c1", "library", "agree", note=TRICKY_NOTE, reviewer="ann", model_summary=SUMMARY)
    store.add("c2", "upload", "disagree", note="plain")
    out = tmp_path / "reviews.csv"
    assert store.export_csv(out) == 2
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")  # a BOM, so spreadsheets read UTF-8 as UTF-8
    with out.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_FIELDS
        rows = list(reader)
    assert [r["case_id"] for r in rows] == ["c2", "c1"]
    c1 = rows[1]
    assert c1["note"] == TRICKY_NOTE
    assert (c1["source"], c1["verdict"], c1["reviewer"]) == ("library", "agree", "ann")
    assert float(c1["malignant_probability"]) == pytest.approx(0.7)
    assert c1["flag"] == "refer / uncertain"
    assert json.loads(c1["model_summary"]) == SUMMARY
    assert rows[0]["model_summary"] == rows[0]["malignant_probability"] == ""
    # filters apply to the export; the text form matches the file
    only = list(csv.DictReader(io.StringIO(store.to_csv_text(verdict="disagree").removeprefix("\ufeff"),
                                           newline="")))
    assert [r["case_id"] for r in only] == ["c2"]
    assert store.to_csv_text() == out.read_bytes().decode("utf-8")


def test_csv_export_to_buffer_and_empty(store: ReviewStore) -> None:
    buf = io.StringIO()
    assert store.export_csv(buf) == 0
    assert buf.getvalue().strip() == "\ufeff" + ",".join(CSV_FIELDS)


def test_csv_export_neutralises_formulas_and_keeps_non_latin_text(store: ReviewStore) -> None:
    store.add("c1", "upload", "unsure", note='=HYPERLINK("https://example.invalid","x")', reviewer="Dr Ä 李")
    store.add("c2", "upload", "agree", note="-3 mm since the last scan, spiculé 结节")
    text = store.to_csv_text()
    assert text.startswith("\ufeff")
    rows = {r["case_id"]: r for r in csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""))}
    assert rows["c1"]["note"] == "'=HYPERLINK(\"https://example.invalid\",\"x\")"  # shown as text, never run
    assert rows["c1"]["reviewer"] == "Dr Ä 李" and rows["c2"]["note"] == "'-3 mm since the last scan, spiculé 结节"


def test_a_reviewer_name_at_the_limit_is_stored_whole(store: ReviewStore) -> None:
    store.add("c1", "library", "agree", reviewer="R" * MAX_REVIEWER_CHARS)
    assert store.list()[0]["reviewer"] == "R" * MAX_REVIEWER_CHARS


@pytest.mark.parametrize("value", [" =1+1", "\n=cmd|' /C calc'!A0", "  @SUM(A1:A2)", "\r\n+1", "\t-2", "\xa0=1",
                                   "\t", "\rtext", "=", "@"])
def test_csv_formula_guard_sees_through_leading_white_space(store: ReviewStore, value: str) -> None:
    store.add("c1", "upload", "unsure", note=value, reviewer=f"x{value}")
    row = next(csv.DictReader(io.StringIO(store.to_csv_text().removeprefix("\ufeff"), newline="")))
    assert row["note"] == "'" + value
    assert row["reviewer"] == f"x{value}".strip()  # not at the start: left alone (names are stored stripped)


@pytest.mark.parametrize("value", ["a = b", "1 + 1", "e-mail: dr@example.org", "3-4 mm", ""])
def test_csv_formula_guard_leaves_ordinary_text_alone(store: ReviewStore, value: str) -> None:
    store.add("c1", "upload", "unsure", note=value)
    row = next(csv.DictReader(io.StringIO(store.to_csv_text().removeprefix("\ufeff"), newline="")))
    assert row["note"] == value


def _damage(path: Path, sql: str, *args: object) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(sql, args)


@pytest.mark.parametrize("stored", ["{not json", "[0.1, 0.9]", '"refer"', "3", "[" * 100_000,
                                    '{"malignant_probability": "high", "flag": 3}',
                                    '{"malignant_probability": NaN}', '{"malignant_probability": 7}'])
def test_a_damaged_model_summary_does_not_stop_listing_or_export(store: ReviewStore, stored: str) -> None:
    store.add("good", "library", "agree", model_summary={"malignant_probability": 0.25, "flag": "none"})
    bad = store.add("bad", "upload", "disagree", model_summary={"malignant_probability": 0.5})
    _damage(store.path, "UPDATE reviews SET model_summary = ? WHERE id = ?", stored, bad)
    rows = {r["case_id"]: r for r in store.list()}
    assert summary_headline(rows["good"]["model_summary"]) == (0.25, "none")
    assert summary_headline(rows["bad"]["model_summary"]) == (None, "")  # whatever the row holds
    exported = {r["case_id"]: r for r in csv.DictReader(io.StringIO(store.to_csv_text().removeprefix("\ufeff"),
                                                                    newline=""))}
    assert exported["good"]["malignant_probability"] == "0.2500"
    assert exported["bad"]["malignant_probability"] == "" and exported["bad"]["verdict"] == "disagree"


def test_damaged_text_columns_read_as_text(store: ReviewStore) -> None:
    rid = store.add("c1", "upload", "agree", note="fine", reviewer="ann")
    _damage(store.path, "UPDATE reviews SET note = CAST(? AS BLOB), reviewer = 42 WHERE id = ?", b"caf\xe9 \xff", rid)
    _damage(store.path, "UPDATE reviews SET case_id = CAST(? AS TEXT) WHERE id = ?", b"bad \xff utf-8", rid)
    (row,) = store.list()
    assert row["note"] == "caf\ufffd \ufffd" and row["reviewer"] == "42" and row["case_id"] == "bad \ufffd utf-8"
    assert "bad \ufffd utf-8" in store.to_csv_text()


def test_csv_export_to_a_file_is_whole_or_not_at_all(store: ReviewStore, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from lungviz import files

    out = tmp_path / "export.csv"
    store.add("c1", "library", "agree")
    assert store.export_csv(out) == 1
    before = out.read_bytes()
    store.add("c2", "library", "disagree", note="x" * 10_000)

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(LungvizError, match="cannot write the review export"):
        store.export_csv(out)
    assert out.read_bytes() == before  # the earlier export is intact
    assert sorted(p.name for p in tmp_path.iterdir() if "export" in p.name) == ["export.csv"]  # no temporary file


def test_a_full_disk_saves_nothing_and_says_so(store: ReviewStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's own "database or disk is full", made by capping the log at the pages it has: the review is refused
    with a plain message, nothing of it stays (rows, id sequence, file integrity), and the log takes reviews again
    once there is room."""
    first = store.add("c1", "library", "agree", note="first")
    before = store.list()
    connect = sqlite3.connect

    def full_disk(*args, **kwargs) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(sqlite3, "connect", full_disk)
    with pytest.raises(LungvizError) as info:
        store.add("c2", "upload", "disagree", note="x" * MAX_NOTE_CHARS, model_summary=SUMMARY)  # needs new pages
    assert str(info.value) == (f"{store.path}: the disk holding the review log is full; nothing was saved. Free some "
                               "space and try again.")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert "disk is full" in str(info.value.__cause__)
    assert store.list() == before and store.count() == 1  # reading still works on a full disk
    monkeypatch.undo()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert store.add("c2", "upload", "disagree", note="x" * MAX_NOTE_CHARS) == first + 1
    assert [r["case_id"] for r in store.list()] == ["c2", "c1"]


# ------------------------------------------------------------------------------------------ concurrent writers

N_PER_THREAD = 200
THREADS = 2
PROCESSES = 2


def _writer_process(path: str, worker: int, barrier, ids_file: str) -> None:
    """One 'app session' in its own process: opens the log after the barrier (racing the schema creation with the
    other process) and adds reviews from several threads at once; writes the ids it got to ``ids_file``."""
    barrier.wait(timeout=60)
    store = ReviewStore(path)
    got: list[int] = []
    lock = threading.Lock()

    def run(thread: int) -> None:
        mine = [store.add(f"case-{worker}-{thread}-{i}", "library", ("agree", "disagree", "unsure")[i % 3],
                          note=f"w{worker} t{thread} #{i}") for i in range(N_PER_THREAD)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(ids_file).write_text("\n".join(map(str, got)))


def test_two_processes_with_threads_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    procs = [ctx.Process(target=_writer_process, args=(str(path), w, barrier, str(tmp_path / f"ids-{w}.txt")))
             for w in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    total = PROCESSES * THREADS * N_PER_THREAD
    ids = [int(x) for w in range(PROCESSES) for x in (tmp_path / f"ids-{w}.txt").read_text().split()]
    assert len(ids) == total and len(set(ids)) == total
    store = ReviewStore(path)
    assert store.count() == total
    rows = store.list()
    assert {r["id"] for r in rows} == set(ids)
    expected = {f"case-{w}-{t}-{i}" for w in range(PROCESSES) for t in range(THREADS) for i in range(N_PER_THREAD)}
    assert sorted(r["case_id"] for r in rows) == sorted(expected)
    assert store.journal_mode() == "wal"
