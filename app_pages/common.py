"""Shared by the pages: session defaults, cached loaders (models, index, review log) and per-input results, and the
few widgets several pages show. Streamlit wiring only: every computation is a ``lungviz`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages.session import (  # noqa: F401  (the pages reach them as common.*)
    NAME_CHARS,
    PREFERENCES,
    STATE,
    UPLOAD_VIEW_KEYS,
    KeptUpload,
    digest,
    forget_upload,
    init_state,
    kept_upload,
)
from lungviz import paths
from lungviz.atlas import Atlas, atlas_path, load_atlas
from lungviz.data.io import DicomSlice, LoadedImage, load_image, read_series
from lungviz.data.lidc import load_case
from lungviz.data.preprocess import DEFAULT_SPACING_MM
from lungviz.errors import LungvizError
from lungviz.explain import LIME_SAMPLES, LIME_STABLE_SAMPLES, LimeResult, bundle_cam, lime_map
from lungviz.inference.finder import LISTED_FINDINGS, Finder, load_finder, scan, scan_series, series_volume
from lungviz.inference.lungmask import lung_mask
from lungviz.inference.nodule import LEVEL_WORDS, Assessment, assess, assess_series
from lungviz.inference.predict import (
    ESTIMATE_NAME,
    ModelSet,
    Prediction,
    load_models,
    predict,
    retrieval_query,
    short_flag,
)
from lungviz.library import (
    PICTURE_SOURCES,
    library_slice_of,
    same_patient_cases,
    series_split,
    similar_cases,
    slice_file_table,
    slice_spacings,
)
from lungviz.present.dicom_export import source_outlines
from lungviz.present.inventory import ReferencePredictions, reference_predictions
from lungviz.present.report import VIEW_LABELS, prob_pct, test_rate
from lungviz.present.text import call_words, plain_text
from lungviz.retrieval import LIBRARY_INDEX, CaseIndex, load_index, set_server_threads
from lungviz.reviews import MAX_NOTE_CHARS, MAX_REVIEWER_CHARS, VERDICTS, ReviewStore

INDEX_NAME = LIBRARY_INDEX
LIBRARY_PAGE = "app_pages/library.py"
MAP_METHODS = {"Grad-CAM": "gradcam", "Grad-CAM++": "gradcampp", "LIME": "lime"}
#: LIME precision choices: perturbations per run, and what the choice means for the user.
LIME_PRECISION = {
    "Fast": (LIME_SAMPLES, f"{LIME_SAMPLES} perturbations, about 2-3 s per 128 px view on a 2-core server; the "
                           "5 regions shown can change between runs a little more than they do with stock LIME."),
    "Stable": (LIME_STABLE_SAMPLES, f"{LIME_STABLE_SAMPLES:,} perturbations, about 10 s per view; the 5 regions shown "
                                    "are as repeatable as stock LIME's (1,000 coin-flip perturbations)."),
}
VIEW_COLOURS = {"nodule": "#1f4e79", "slice": "#aac4e2"}
VERDICT_LABELS = {"agree": "Agree", "disagree": "Disagree", "unsure": "Unsure"}
#: How long a per-input result stays cached without being used. Every per-input cache is also bounded in entries, and
#: decoded uploads (the largest values: up to the readers' decoded-size limit each) are kept for a few inputs only,
#: so one session uploading file after file cannot fill the server's memory.
RESULT_TTL = "30m"
UPLOAD_TTL = "10m"
#: Decoded images and DICOM series shared by all sessions (a session works on one or two uploads at a time).
MAX_DECODED_IMAGES = 4
MAX_DECODED_SERIES = 2
#: Per-session memories (LIME results, saved reviews for the report): the most recent inputs only.
MAX_SESSION_RESULTS = 32
#: A model probability for display: whole percent, but never a certain-looking 0% or 100%.
percent = prob_pct


# ------------------------------------------------------------------------------------ resources, loaded once


@st.cache_resource(show_spinner="Loading the models…")
def _model_set(folder: str) -> ModelSet:
    return load_models(Path(folder))


@st.cache_resource(show_spinner="Loading the similar-case index…")
def _case_index(folder: str) -> CaseIndex:
    set_server_threads(1)
    return load_index(Path(folder), INDEX_NAME)


@st.cache_resource(show_spinner="Loading the case thumbnails…")
def _atlas(folder: str) -> Atlas | None:
    try:
        return load_atlas(atlas_path(Path(folder), INDEX_NAME))
    except LungvizError:
        return None  # the pictures then come from the data folder only


def atlas() -> Atlas | None:
    """The thumbnail atlas shipped with the index, or None when it is not installed or damaged."""
    return _atlas(weights_folder())


@st.cache_resource(show_spinner="Loading the nodule finder…")
def _finder(folder: str) -> Finder:
    try:  # already loaded by load_models whenever it is installed
        loaded = _model_set(folder).finder
    except LungvizError:
        loaded = None
    return loaded if loaded is not None else load_finder(Path(folder))


@st.cache_data(show_spinner=False, max_entries=256, ttl=RESULT_TTL)
def _library_series(series_uid: str, data_root: str, split_file: str) -> tuple[str, str] | None:
    return series_split(series_uid, Path(data_root), Path(split_file))


@st.cache_resource(show_spinner="Indexing the library's slice files…")
def _slice_table(slices_root: str) -> dict[str, str]:
    return slice_file_table(Path(slices_root))


@st.cache_data(show_spinner=False, max_entries=4)
def _slice_spacings(slices_root: str) -> dict[str, float]:
    return slice_spacings(Path(slices_root))


def library_spacing(case_id: str) -> float | None:
    """The pixel spacing ``labels.csv`` gives a library case, or None."""
    return _slice_spacings(str(paths.lidc_slices_dir())).get(case_id)


def library_slice(data: bytes) -> tuple[str, str, str | None] | None:
    """``(case_id, file name, split)`` when an upload is one of the library's own slice image files."""
    root = paths.lidc_slices_dir()
    if not root.is_dir():
        return None
    return library_slice_of(data, _slice_table(str(root)), Path(weights_folder()) / "splits" / "holdout.json")


def library_series(series_uid: str) -> tuple[str, str] | None:
    """``(patient_id, split)`` when an uploaded DICOM series is one of the library's own LIDC scans."""
    return _library_series(series_uid, str(paths.data_dir()), str(Path(weights_folder()) / "splits" / "holdout.json"))


def finder_available() -> bool:
    """Whether the nodule finder's bundles are installed (quietly)."""
    try:
        _finder(weights_folder())
        return True
    except LungvizError:
        return False


@st.cache_data(show_spinner="Searching the slice for nodules…", max_entries=32, ttl=RESULT_TTL)
def nodule_candidates(folder: str, image: np.ndarray, is_hu: bool, spacing: float | None, top_k: int = 5,
                      ) -> list[dict]:
    """Ranked nodule candidates on a whole slice (dicts of :class:`lungviz.inference.finder.Candidate`)."""
    cands, _ = scan(_finder(folder), image, is_hu, spacing, top_k=top_k)
    return [c.to_dict() for c in cands]


@st.cache_data(show_spinner=False, max_entries=32, ttl=RESULT_TTL)
def lung_of(image: np.ndarray, is_hu: bool, spacing: float | None) -> np.ndarray:
    """The slice's lung mask, ``(H, W) bool`` (all False when no lung was found)."""
    return lung_mask(np.asarray(image, np.float32), is_hu, spacing or DEFAULT_SPACING_MM)


def series_candidates(folder: str, upload_id: str, series: list[DicomSlice]) -> list[list[dict]]:
    """Candidates on every slice of an uploaded series (its neighbours as the third dimension), searched once
    per upload with a progress bar and kept for the session."""
    return _series_search(folder, upload_id, series)["per_slice"]


def series_findings(folder: str, upload_id: str, series: list[DicomSlice]) -> list[dict]:
    """The series' listed findings (each candidate followed over consecutive slices, shown once), best first."""
    return _series_search(folder, upload_id, series)["findings"][:LISTED_FINDINGS]


def _series_search(folder: str, upload_id: str, series: list[DicomSlice]) -> dict:
    store = st.session_state.setdefault("_series_candidates", {})
    key = f"{folder}|{upload_id}"
    if key not in store:
        vol, sp, gap = series_volume(series)
        bar = st.progress(0.0, text="Searching every slice of the series for nodules…")
        res = scan_series(_finder(folder), vol, True, sp, gap,
                          progress=lambda done, total: bar.progress(done / total, text=f"Searching slice {done} of "
                                                                                         f"{total} for nodules…"))
        bar.empty()
        store.clear()  # one series at a time
        store[key] = {"per_slice": [[c.to_dict() for c in cands] for cands in res.per_slice],
                      "findings": [f.to_dict() for f in res.findings()]}
    return store[key]


@st.cache_resource
def _review_store(path: str) -> ReviewStore:
    return ReviewStore(path)


def weights_folder() -> str:
    return str(paths.weights_dir())


def models() -> ModelSet | None:
    """The installed models, or None after telling the user why there are none."""
    try:
        ms = _model_set(weights_folder())
    except LungvizError as err:
        st.error(str(err), icon=":material/error:")
        return None
    for note in ms.notes:
        st.warning(note, icon=":material/warning:")
    return ms


def case_index(quiet: bool = False) -> CaseIndex | None:
    """The similar-case index, or None (with a message unless ``quiet``)."""
    try:
        return _case_index(weights_folder())
    except LungvizError as err:
        if not quiet:
            st.warning(f"Similar cases are not available: {err}", icon=":material/info:")
        return None


def review_store() -> ReviewStore | None:
    from lungviz.reviews import default_path

    try:
        return _review_store(str(default_path()))
    except LungvizError as err:
        st.error(str(err), icon=":material/error:")
        return None


@st.cache_data(show_spinner=False, max_entries=16, ttl=600)
def _reference(folder: str, model: str) -> ReferencePredictions | None:
    return reference_predictions(model, "test", Path(folder))


def reference(model: str) -> ReferencePredictions | None:
    """The model's reference test predictions, None when not shipped (a damaged file is reported, not raised)."""
    try:
        return _reference(weights_folder(), model)
    except LungvizError as err:
        st.warning(str(err), icon=":material/warning:")
        return None


def headline_model(ms: ModelSet) -> str:
    """The model whose malignant probability the app leads with: the nodule model's estimate when installed."""
    return ESTIMATE_NAME if ms.nodule is not None else "slice-binary"


def headline(pred: Prediction) -> tuple[str | None, str | None]:
    """``(view, model)`` the estimate leads with: the nodule model's estimate, else the slice view's."""
    for view, name in (("nodule", ESTIMATE_NAME), ("slice", "slice-binary")):
        if "binary" in pred.views.get(view, {}):
            return view, name
    return None, None


# --------------------------------------------------------------------------------------- per-input results


@st.cache_data(show_spinner=False, max_entries=MAX_DECODED_IMAGES, ttl=UPLOAD_TTL)
def read_image(data: bytes, name: str) -> LoadedImage:
    """An uploaded image, decoded once per input while it is in use."""
    return load_image(data, name)


@st.cache_resource(show_spinner="Reading the DICOM series…", max_entries=MAX_DECODED_SERIES, ttl=UPLOAD_TTL)
def read_zip(upload_id: str, name: str, _data: bytes) -> list[DicomSlice]:
    """A zipped series, keyed by the upload's id: a resource cache, so a few hundred MB of slices are neither
    re-hashed nor copied on every slider move (the slices are never modified)."""
    return read_series(_data, name)


@st.cache_data(show_spinner="Predicting…", max_entries=64, ttl=RESULT_TTL)
def prediction(folder: str, context: np.ndarray | None, nodule_crop: np.ndarray | None,
               spacing_mm: float | None) -> Prediction:
    return predict(_model_set(folder), context, nodule_crop, spacing_mm)


@st.cache_data(show_spinner=False, max_entries=256, ttl=RESULT_TTL)
def cam_map(folder: str, bundle_name: str, image: np.ndarray, method: str) -> np.ndarray:
    b = _model_set(folder).networks[bundle_name]
    return bundle_cam(b, image, method)


def _keep_recent(memo: dict, most: int = MAX_SESSION_RESULTS) -> None:
    """Forget the oldest entries of a per-session memory beyond ``most``."""
    while len(memo) > most:
        memo.pop(next(iter(memo)))


def lime(folder: str, bundle_name: str, image: np.ndarray, progress: Callable[[float], None],
         num_samples: int = LIME_SAMPLES) -> LimeResult:
    """LIME of one view, kept per input in the session (its progress bar cannot live inside st.cache_data)."""
    key = digest(folder, bundle_name, image, str(num_samples))
    memo = st.session_state.setdefault("lime", {})
    if key not in memo:
        b = _model_set(folder).networks[bundle_name]
        memo[key] = lime_map(b.model, image, b.mean, b.std, num_samples=num_samples, progress=progress,
                             calibration=b.calibration)
        _keep_recent(memo)
    return memo[key]


@st.cache_data(show_spinner="Finding similar cases…", max_entries=64, ttl=RESULT_TTL)
def similar(folder: str, data_root: str, context: np.ndarray | None, nodule_crop: np.ndarray | None,
            spacing_mm: float | None, k: int, own_patient: str = "") -> list[dict]:
    """The ``k`` nearest library cases, queried with the index model's view of this input; when the input is one of
    the library's own images, its patient's cases (``own_patient``: a case or patient id) are left out."""
    index = _case_index(folder)
    assessment = prediction(folder, context, nodule_crop, spacing_mm).assessment  # cached: the estimate's reading
    query = retrieval_query(_model_set(folder), index.model, context, nodule_crop, spacing_mm,
                            assessment.reading if assessment is not None else None)
    exclude = same_patient_cases(index.records, own_patient) if own_patient else None
    return similar_cases(index, query, k, root=Path(data_root), exclude=exclude, atlas=_atlas(folder))


@st.cache_data(show_spinner="Loading the case…", max_entries=16, ttl=RESULT_TTL)
def library_case(root: str, case_id: str):
    """``(case, slices (S, H, W), masks (S, H, W) or None)`` of one library case."""
    case = load_case(Path(root), case_id)
    return case, case.load_slices(), case.load_masks()


# --------------------------------------------------------------------------------------------------- widgets


def probability_bars(pred: Prediction, task: str = "score") -> go.Figure | None:
    """Grouped bars: the calibrated class probabilities of ``task`` for each view."""
    fig = go.Figure()
    for view in ("nodule", "slice"):
        tp = pred.views.get(view, {}).get(task)
        if tp is not None:
            fig.add_bar(x=[str(c) for c in tp.classes], y=tp.probs, name=VIEW_LABELS.get(view, view),
                        marker_color=VIEW_COLOURS[view],
                        text=[percent(p) for p in tp.probs], textposition="outside", cliponaxis=False)
    if not fig.data:
        return None
    fig.update_layout(barmode="group", height=260, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      yaxis={"tickformat": ".0%", "range": [0, 1.1], "title": "probability"},
                      xaxis={"title": "panel score (1 = highly unlikely … 5 = highly suspicious)", "type": "category"},
                      legend={"orientation": "h", "y": 1.15}, uniformtext={"minsize": 8, "mode": "hide"})
    return fig


@st.cache_data(show_spinner="Following the nodule through the series…", max_entries=16, ttl=RESULT_TTL)
def series_assessment(folder: str, file_id: str, _series: list, index: int,
                      centre_rc: tuple[float, float] | None) -> Assessment | None:
    """The nodule model over the slices of the series the nodule reaches from slice ``index`` (cached per upload,
    slice and centre; ``_series`` is the decoded series of upload ``file_id``)."""
    ms = _model_set(folder)
    return None if ms.nodule is None else assess_series(ms.nodule, _series, index, centre_rc)


@st.cache_data(show_spinner=False, max_entries=4, ttl=RESULT_TTL)
def series_outlines(folder: str, file_id: str, _series: list, index: int, centre_rc: tuple[float, float] | None,
                    _assessment: Assessment) -> dict[int, np.ndarray]:
    """``{series index: (H, W) bool}``: the nodule model's outline on each slice it followed, in that slice's pixels
    (``_assessment`` is :func:`series_assessment` of the same folder, upload, slice and centre)."""
    return source_outlines(_assessment, _series, index, centre_rc)


@st.cache_data(show_spinner="Reading the nodule's slices…", max_entries=16, ttl=RESULT_TTL)
def case_assessment(folder: str, case_id: str, _slices: list[np.ndarray], spacing_mm: float | None,
                    thickness_mm: float | None) -> Assessment | None:
    """The nodule model over every slice of library case ``case_id`` (the heads over the central half, as
    evaluation reads a nodule); None without the nodule model."""
    ms = _model_set(folder)
    return None if ms.nodule is None else assess(ms.nodule, list(_slices), spacing_mm, thickness_mm, central=0.5)


def show_assessment(assessment: Assessment, pred: Prediction | None = None, measured: str | None = None) -> None:
    """The finding, first: the estimate with its band and call, the size, the characteristics in the readers' words
    and the factors that moved the estimate most, with the refer / uncertain flag in one line. ``measured``: how
    often test nodules given a like estimate were malignant (:func:`lungviz.present.report.band_sentence`)."""
    r = assessment.reading
    if not r.outlined:
        st.warning("Nothing outlined at the centre: the size is unknown and the estimate counts an average nodule's "
                   "size. Check that the nodule is at the centre.", icon=":material/warning:")
    est, look, why = st.columns([2.6, 3.4, 2.4], gap="medium")  # the estimate's column holds the flag's sentence
    with est:
        st.metric("Malignant probability", prob_pct(assessment.probability),
                  help="Malignant = the readers' panel score 4-5. The nodule model's estimate from the factors "
                       "beside it (size, characteristics, image evidence), fitted and calibrated on validation "
                       "patients.")
        st.markdown(f"**{assessment.risk_band}**; second-look call: **{call_words(assessment.call)}** (from "
                    f"{prob_pct(assessment.threshold)})")
        if measured:
            st.caption(measured)
        if r.outlined:
            where = f"largest of {r.n_slices} slices" if r.n_slices > 1 else "one slice"
            st.markdown(f"**Size** ({where}): {r.long_axis_mm:.1f} × {r.short_axis_mm:.1f} mm, mean "
                        f"{r.mean_axes_mm:.1f} mm" + (f"; volume {r.volume_mm3:.0f} mm³" if r.volume_mm3 else ""))
        if pred is not None:
            show_flag(pred, compact=True)
    with look:
        st.markdown("**Characteristics** (LIDC scales)")
        # a static table: its cells wrap, where a data grid cuts the readers' words off in this narrow column
        st.table([{"characteristic": CHARACTERISTIC_LABELS.get(h, h), "model's rating": w}
                  for h, w in assessment.characteristics.items()], hide_index=True, border="horizontal")
    with why:
        st.markdown(f"**What moved the estimate** from an average nodule's {prob_pct(assessment.baseline)} "
                    "(log-odds)")
        st.markdown("\n".join(f"- {f}" for f in assessment.top_factors()))


def show_call_on_test(assessment: Assessment) -> None:
    """How the nodule model's second-look call did on the held-out test nodules (for "How sure is this?")."""
    if (t := assessment.test_calls) is not None:
        st.caption(f"On test the second-look call found {test_rate(t, 'sensitivity')} of malignant nodules and "
                   f"cleared {test_rate(t, 'specificity')} of the others.")


#: The LIDC characteristics as a clinician reads them.
CHARACTERISTIC_LABELS = {"malignancy": "malignancy score", "subtlety": "subtlety", "internalStructure":
                         "internal structure", "calcification": "calcification", "sphericity": "sphericity",
                         "margin": "margin", "lobulation": "lobulation", "spiculation": "spiculation",
                         "texture": "texture"}


def show_flag(pred: Prediction, compact: bool = False) -> None:
    """The refer / uncertain flag with its reasons, or a plain statement that none was raised (``compact``: one
    line)."""
    if pred.refer:
        if compact:
            st.warning(f"**Refer / uncertain**: {', '.join(short_flag(r) for r in pred.flags)} (why: *How sure is "
                       "this?*)", icon=":material/flag:")
            return
        reasons = "".join(f"\n- {r}" for r in pred.flags)
        st.warning(f"**Refer / uncertain.** Do not rely on this estimate:{reasons}", icon=":material/flag:")
    elif compact:
        st.caption(":material/check_circle: No uncertainty flag (this does not make the estimate correct).")
    else:
        agree = " and the views agree" if len(pred.views) > 1 else ""
        centre = "" if pred.presence is not None else " (Whether a nodule sits at the crop's centre was not checked.)"
        st.success(f"No uncertainty flag: the estimate is outside the uncertain band{agree}. This does not make it "
                   f"correct.{centre}", icon=":material/check_circle:")


def view_table(pred: Prediction) -> list[dict]:
    """One row per view: malignant probability, the binary call, the probability it is made from and how that call
    did on the held-out test nodules, and the called panel score."""
    rows = []
    for view in ("nodule", "slice"):
        tasks = pred.views.get(view)
        if not tasks:
            continue
        b, s = tasks.get("binary"), tasks.get("score")
        rows.append({"view": VIEW_LABELS.get(view, view),
                     "malignant probability": percent(b.probs[b.classes.index("malignant")]) if b else "-",
                     "call": b.top if b else "-",
                     "calls malignant from": percent(b.threshold) if b else "-",
                     "sensitivity on test": test_rate(b.test_calls, "sensitivity") if b and b.test_calls else "-",
                     "specificity on test": test_rate(b.test_calls, "specificity") if b and b.test_calls else "-",
                     "panel score call": f"{s.top} ({percent(s.probs[s.classes.index(s.top)])})" if s else "-"})
    return rows


def review_form(case_id: str, source: str, summary: dict | None, key: str) -> None:
    """Agree / disagree / unsure and a note, saved to the review log and kept under ``key`` (the input's content key)
    for this case's report."""
    store = review_store()
    if store is None:
        return
    with st.form(f"review-{key}", clear_on_submit=False, border=True):
        st.markdown(f"**Your review of** {plain_text(case_id, NAME_CHARS)}")
        verdict = st.radio("Do you agree with the model?", VERDICTS, format_func=VERDICT_LABELS.get, index=None,
                           horizontal=True, key=f"verdict-{key}")  # no default: the log holds only given verdicts
        note = st.text_area("Note", key=f"note-{key}", placeholder="What you saw, why you agree or not…",
                            max_chars=MAX_NOTE_CHARS)
        reviewer = st.text_input("Reviewer (optional)", value=st.session_state.get("reviewer", "")[:MAX_REVIEWER_CHARS],
                                 key=f"reviewer-{key}", max_chars=MAX_REVIEWER_CHARS)
        submitted = st.form_submit_button("Save review", icon=":material/save:", type="primary")
    if submitted and verdict is None:
        st.warning("Choose agree, disagree or unsure before saving: the review was not saved.",
                   icon=":material/warning:")
    elif submitted:
        try:
            rid = store.add(case_id, source, verdict, note, reviewer, model_summary=summary)
        except LungvizError as err:
            show_error(err)
            return
        st.session_state["reviewer"] = reviewer
        saved = st.session_state["saved_reviews"]
        saved[key] = {"verdict": verdict, "note": note, "reviewer": reviewer}
        _keep_recent(saved)
        st.success(f"Review #{rid} saved to the review log.", icon=":material/check:")


def show_error(err: LungvizError | str) -> None:
    """A lungviz message that may quote a file name or other outside text, shown as text."""
    st.error(plain_text(err), icon=":material/error:")


#: The characteristics a similar case's card names (the compare view lists them all).
CARD_CHARACTERISTICS = ("texture", "margin", "spiculation", "calcification")


def reader_spread(scores: list | None) -> str:
    """The readers' malignancy scores, lowest first, with their range: "3, 4, 4, 5 (3-5)"."""
    s = sorted(int(v) for v in scores or [])
    if not s:
        return "-"
    return ", ".join(map(str, s)) + (f" ({s[0]}-{s[-1]})" if s[0] != s[-1] else " (all agree)")


def panel_words(head: str, value: float | None) -> str:
    """A panel median in the readers' words: the named level of its LIDC scale nearest to it ("4.5, marked")."""
    if value is None:
        return "-"
    words = LEVEL_WORDS.get(head, {})
    near = min(words, key=lambda k: abs(k - float(value))) if words else None
    return f"{float(value):g}" + (f", {words[near]}" if near is not None else "")


def same_view_picture(case: dict) -> tuple[np.ndarray | None, str | None]:
    """A similar case's picture in the upload's nodule-model view: the thumbnail atlas's (the model's view of the
    case), else the card's own picture (the data folder's middle slice)."""
    small = atlas()
    view = small.thumbnail(str(case.get("case_id"))) if small is not None else None
    if view is not None:
        return view, "atlas"
    return case.get("thumbnail"), case.get("thumbnail_source")


def similar_case_cards(cases: list[dict], key: str, upload_view: np.ndarray | None = None,
                       upload_chars: dict[str, str] | None = None) -> None:
    """Each similar case beside the upload, in the same view: its picture, the readers' spread, size and
    characteristics, a "Compare" button (the upload and that case side by side at full size) and one to open it.
    ``upload_view``: the upload's nodule-model view ``(S, S)`` in [0, 1]; ``upload_chars``: the model's ratings."""
    if not cases:
        st.info("No similar cases were found.")
        return
    ckey = f"compare-{key}"
    ids = [str(c["case_id"]) for c in cases]
    if st.session_state.get(ckey) in ids:
        _compare(cases[ids.index(st.session_state[ckey])], upload_view, upload_chars or {}, ckey)
    per_row = 5  # more per row squeezes the text to a letter per line
    for start in range(0, len(cases), per_row):
        row = cases[start : start + per_row]
        cols = st.columns([1] * (per_row + (upload_view is not None)))
        if upload_view is not None:  # the upload heads every row, at the cases' size
            with cols[0].container(border=True):
                st.image(upload_view, width="stretch", clamp=True, caption="this upload (nodule model's view)")
                st.markdown("**This upload**")
            cols = cols[1:]
        for i, (col, c) in enumerate(zip(cols, row, strict=False), start):
            _case_card(col, c, key, i, ckey)


def _case_card(col, c: dict, key: str, i: int, ckey: str) -> None:
    with col.container(border=True):
        picture, source = same_view_picture(c)
        if picture is not None:
            st.image(picture, width="stretch", clamp=True, caption=PICTURE_SOURCES.get(source or ""))
        else:
            st.caption("no picture: not in the data folder nor in the thumbnail atlas")
        st.markdown(f"**{c['case_id']}**")
        label = {1: "malignant", 0: "benign"}.get(c.get("malignant"), "-")
        d = c.get("diameter_mm")
        chars = c.get("characteristics") or {}
        looks = "  \n".join(f"{h}: {panel_words(h, chars.get(h))}" for h in CARD_CHARACTERISTICS if h in chars)
        st.markdown(f"Panel score **{c.get('malignancy', '-')}** ({label})  \nReaders: "
                    f"{reader_spread(c.get('reader_scores'))}  \n"
                    f"Diameter: {'-' if d is None else f'{float(d):.1f} mm'}  \n" + (f"{looks}  \n" if looks else "")
                    + f"Similarity: {c['similarity']:.2f}  \nSplit: {c.get('split', '-')}")
        if c["similarity"] > 0.995:
            st.caption(":material/info: Nearly identical: possibly this very case.")
        st.button("Compare", key=f"cmp-{key}-{i}", icon=":material/compare:", on_click=st.session_state.__setitem__,
                  args=(ckey, str(c["case_id"])), help="This upload and this case side by side at full size.")
        if st.button("Open in library", key=f"open-{key}-{i}", icon=":material/open_in_new:"):
            st.switch_page(LIBRARY_PAGE, query_params={"case": c["case_id"]})


def _compare(c: dict, upload_view: np.ndarray | None, upload_chars: dict[str, str], ckey: str) -> None:
    """The upload and one similar case next to each other at full size, with the case's readings beside the
    model's."""
    with st.container(border=True):
        head, close = st.columns([5, 1])
        head.markdown(f"**Compare: this upload and {c['case_id']}** (the same view, each scaled to its own range)")
        close.button("Close", key=f"{ckey}-close", icon=":material/close:",
                     on_click=st.session_state.__setitem__, args=(ckey, None))
        left, right, facts = st.columns([1, 1, 1], gap="medium")  # each picture a third of the page wide
        if upload_view is not None:
            left.image(upload_view, width="stretch", clamp=True, caption="This upload: the nodule model's view")
        picture, source = same_view_picture(c)
        if picture is not None:
            right.image(picture, width="stretch", clamp=True,
                        caption=f"{c['case_id']}: {PICTURE_SOURCES.get(source or '', 'picture')}")
        d = c.get("diameter_mm")
        chars = c.get("characteristics") or {}
        rows = [{"": "malignancy (panel score)", "this upload (model)": upload_chars.get("malignancy", "-"),
                 "similar case (readers)": f"{c.get('malignancy', '-')}; readers "
                                           f"{reader_spread(c.get('reader_scores'))}"},
                {"": "size", "this upload (model)": upload_chars.get("size", "-"),
                 "similar case (readers)": "-" if d is None else f"{float(d):.1f} mm diameter"}]
        rows += [{"": CHARACTERISTIC_LABELS.get(h, h), "this upload (model)": upload_chars.get(h, "-"),
                  "similar case (readers)": panel_words(h, v)} for h, v in chars.items()]
        facts.dataframe(rows, hide_index=True, width="stretch")
