"""Case library: browse the indexed LIDC cases with filters, and open one: its slices, the readers' outline beside
the model's map, the readers' scores and characteristics, and the model's prediction."""

from __future__ import annotations

import streamlit as st

from app_pages import common
from lungviz import paths
from lungviz.data.preprocess import resize
from lungviz.errors import LungvizError
from lungviz.explain import overlay
from lungviz.inference.predict import view_image, with_assessment
from lungviz.library import (
    NEEDS_DATA_FOLDER,
    PICTURE_SOURCES,
    SPLIT_NOTES,
    case_picture,
    characteristic_rows,
    diameter_range,
    filter_records,
    label_check_note,
    library_rows,
    mask_outline,
    reader_count_note,
)
from lungviz.present.inventory import map_finds_nodule, map_hidden_note, map_localisation_text
from lungviz.present.report import VIEW_LABELS, evidence_notes, reader_spread
from lungviz.present.text import plain_text

SHOW_PX = 256

st.title("Case library")
index = common.case_index(quiet=True)
if index is None:
    st.error(f"The case library is not available: the similar-case index (`{common.INDEX_NAME}`) is not installed "
             f"in {paths.weights_dir()}. Build it with `python -m training index`.", icon=":material/error:")
    st.stop()
root = paths.lidc_slices_dir()
has_data = root.is_dir()
records = index.records
by_id = {r["case_id"]: r for r in records}
ms = common.models()
ref = common.reference(common.headline_model(ms)) if ms is not None else None
correct = ref.correct_by_case() if ref is not None else {}


#: The list's filter widgets: kept while a case is open (Streamlit forgets a widget's value when it is not drawn).
FILTER_KEYS = ("lib-scores", "lib-panel", "lib-splits", "lib-diam", "lib-outcome")
for _key in FILTER_KEYS:
    if _key in st.session_state:
        st.session_state[_key] = st.session_state[_key]


def _close_case() -> None:
    st.query_params.clear()


def _facts(record: dict) -> None:
    """The case's panel and reader scores, diameter and characteristics, from the index's record."""
    facts, chars = st.columns([1, 1], gap="large")
    d, spacing = record.get("diameter_mm"), record.get("pixel_spacing_mm")
    with facts:
        m1, m2, m3 = st.columns(3)
        m1.metric("Panel score", "-" if record.get("malignancy") is None else record["malignancy"],
                  help="Median of the readers' malignancy ratings (1-5), rounded half up.")
        m2.metric("Readers", record.get("n_readers") or len(record.get("reader_scores") or []))
        m3.metric("Diameter", "-" if d is None else f"{float(d):.1f} mm")
        st.markdown(f"Each reader's score: **{reader_spread(record.get('reader_scores'))}**  \n"
                    f"Panel: **{ {1: 'malignant (4-5)', 0: 'benign (1-3)'}.get(record.get('malignant'), '-') }**  \n"
                    f"Label check: `{record.get('label_check', '-')}` · pixel spacing "
                    f"{'-' if spacing is None else f'{float(spacing):.2f} mm'}")
        for note in (reader_count_note(record.get("n_readers")), label_check_note(record.get("label_check"))):
            if note:
                st.caption(f":material/info: {note}")
    with chars:
        st.markdown("**Readers' characteristics (panel medians)**")
        st.table(characteristic_rows(record.get("characteristics") or {}), hide_index=True, border="horizontal")


def _show_case(record: dict) -> None:
    case_id = record["case_id"]
    st.button("Back to the list", icon=":material/arrow_back:", on_click=_close_case)
    st.header(case_id)
    split = record.get("split", "?")
    {"train": st.warning, "val": st.info, "test": st.success}.get(split, st.info)(
        SPLIT_NOTES.get(split, f"Split: {split}."), icon=":material/dataset:")
    _facts(record)
    if not has_data:  # the index's record and the atlas's thumbnail are all there is
        picture, source = case_picture(record, root, common.atlas())
        if picture is not None:
            st.image(resize(picture, SHOW_PX // 2), caption=PICTURE_SOURCES[source or "atlas"], clamp=True)
        st.info(f"{NEEDS_DATA_FOLDER} It is not at {root}.", icon=":material/folder_off:")
        return
    try:
        case, slices, masks = common.library_case(str(root), case_id)
    except LungvizError as err:
        st.error(str(err), icon=":material/error:")
        return
    n = len(slices)
    middle = int(record.get("middle_index", n // 2))

    st.subheader("Slices, readers' outline and the model's map")
    index_ = (st.slider("Slice (inferior → superior)", 1, n, middle + 1, key=f"libslice-{case_id}") if n > 1 else 1) - 1
    outline = st.toggle("Show the readers' outline (drawn by at least half the readers)", value=True,
                        key="lib-outline")
    mask = masks[index_] if masks is not None else None
    img = slices[index_]
    cols = st.columns(3)
    cols[0].image(mask_outline(resize(img, SHOW_PX), mask) if outline and mask is not None else resize(img, SHOW_PX),
                  caption=f"Slice {index_ + 1} of {n}"
                          + (" with the readers' outline" if outline else ""),
                  width="stretch", clamp=True)
    b = ms.bundle("slice", "binary") if ms is not None else None
    if b is not None and map_finds_nodule(b.name, common.weights_folder(), getattr(b, "cam_layer", "")) is False \
            and not cols[1].toggle(f"Show the {VIEW_LABELS['slice'].lower()}'s Grad-CAM anyway", key="lib-weak-map"):
        cols[1].caption(f"{map_hidden_note(VIEW_LABELS['slice'].lower())} (Figures below.)")
    elif b is not None:
        vimg = view_image(b.spec, img, None, case.pixel_spacing_mm)
        shown = overlay(resize(vimg, SHOW_PX), common.cam_map(common.weights_folder(), b.name, vimg, "gradcam"),
                        st.session_state.get("alpha", 0.4))
        if outline and mask is not None:
            shown = mask_outline(shown, view_image(b.spec, mask, None, case.pixel_spacing_mm))
        cols[1].image(shown, caption=f"Grad-CAM, {VIEW_LABELS['slice'].lower()}", width="stretch")
    if ms is not None and ms.nodule is not None:
        reading = common.prediction(common.weights_folder(), img, None, case.pixel_spacing_mm).assessment
        if reading is not None:
            sl = reading.reading.slices[0]
            shown = overlay(resize(sl.view, SHOW_PX), common.cam_map(common.weights_folder(), ms.nodule.name,
                                                                     sl.view, "gradcam"),
                            st.session_state.get("alpha", 0.4))
            cols[2].image(shown, caption=f"Grad-CAM, nodule model ({sl.field_mm:.0f} mm view)", width="stretch")
    if ms is not None:
        where = map_localisation_text(common.weights_folder(), ms, ["nodule", "slice"])
        st.caption(":material/info: Grad-CAM colours run blue (none) to red (strongest), scaled to each map's own "
                   f"maximum; a map shows where the model looked, not that its call is right. {where}".strip())
    if masks is None:
        st.caption("This case has no reader masks.")

    with st.expander(f"All {n} slices"):
        per_row = 8
        for start in range(0, n, per_row):
            row = st.columns(per_row)
            for j, col in enumerate(row[: min(per_row, n - start)]):
                col.image(slices[start + j], caption=f"{start + j + 1}", width="stretch", clamp=True)

    st.subheader("The model on this case")
    if split == "train":
        st.warning("This is a training case: the model has seen it, so agreement here says little about how it "
                   "does on new cases.", icon=":material/visibility:")
    if ms is None:
        return
    try:
        pred = common.prediction(common.weights_folder(), slices[middle], None, case.pixel_spacing_mm)
    except LungvizError as err:
        st.error(str(err), icon=":material/error:")
        return
    head_view, head = common.headline(pred)
    if ms.nodule is not None:  # every slice of the nodule, as evaluation reads it
        whole = common.case_assessment(common.weights_folder(), case_id, list(slices), case.pixel_spacing_mm,
                                       case.slice_thickness_mm)
        if whole is not None:
            pred = with_assessment(pred, whole)
    if pred.assessment is not None:
        common.show_assessment(pred.assessment, pred)
    else:
        p = pred.malignant_probability(head_view) if head_view else None
        st.metric(f"Malignant probability ({VIEW_LABELS.get(head_view or '', '-').lower()})", common.percent(p))
        common.show_flag(pred)
    with st.expander("How sure is this?", icon=":material/query_stats:"):
        if pred.assessment is not None:
            common.show_call_on_test(pred.assessment)
        st.dataframe(common.view_table(pred), hide_index=True, width="stretch")
        fig = common.probability_bars(pred, "score")
        if fig is not None:
            st.plotly_chart(fig, key=f"lib-bars-{case_id}", config={"displayModeBar": False})
        for note in evidence_notes(pred):
            st.caption(f":material/info: {note}")
        st.caption(f"The slice view reads the middle slice ({middle + 1} of {n}, the largest reader outline); the "
                   "nodule model reads every slice.")
    if case_id in correct:
        st.caption(f"On the test split the model ({head}) was **{'right' if correct[case_id] else 'wrong'}** for this "
                   "nodule (all central slices averaged).")

    st.subheader("Review")
    common.review_form(case_id, "library", pred.to_dict(), f"lib-{case_id}")


def _browse() -> None:
    st.caption(f"{len(records)} LIDC-IDRI nodules with their radiologists' ratings. Train cases were seen by the "
               "model; test cases were held out.")
    st.caption(f":material/folder: {NEEDS_DATA_FOLDER}"
               + ("" if has_data else f" It is not at {root}: open a case for its ratings and thumbnail."))
    with st.container(border=True):
        f1, f2, f3 = st.columns(3)
        scores = f1.multiselect("Panel score", [1, 2, 3, 4, 5], default=[1, 2, 3, 4, 5], key="lib-scores")
        panel = f2.segmented_control("Panel", ["any", "benign (1-3)", "malignant (4-5)"], default="any",
                                     key="lib-panel")
        splits = f3.multiselect("Split", ["train", "val", "test"], default=["train", "val", "test"],
                                key="lib-splits")
        g1, g2 = st.columns(2)
        lo, hi = diameter_range(records)
        diam = g1.slider("Diameter (mm)", float(lo), float(max(hi, lo + 1)), (float(lo), float(max(hi, lo + 1))),
                         step=0.5, key="lib-diam")
        outcome = g2.segmented_control(
            "Model on test", ["any", "correct", "wrong"], default="any", key="lib-outcome", disabled=not correct,
            help="From the reference test predictions (test cases only)." if correct else
            "The reference test predictions are not installed.")
    chosen = filter_records(
        records, scores=scores, splits=splits, diameter_mm=diam,
        malignant={"benign (1-3)": False, "malignant (4-5)": True}.get(panel or "any"),
        model_correct={"correct": True, "wrong": False}.get(outcome or "any"), correct_by_case=correct,
    )
    st.markdown(f"**{len(chosen)}** of {len(records)} cases")
    event = st.dataframe(library_rows(chosen, correct), hide_index=True, width="stretch", height=420,
                         on_select="rerun", selection_mode="single-row", key="lib-table")
    picked = event.selection.rows if event is not None and hasattr(event, "selection") else []
    if picked:
        st.query_params["case"] = chosen[picked[0]]["case_id"]
        st.rerun()
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    target = c1.selectbox("Open a case", [r["case_id"] for r in chosen], index=None, key="lib-open",
                          placeholder="Choose a case id, or select a row above")
    if c2.button("Open", icon=":material/open_in_new:", disabled=target is None, key="lib-open-btn"):
        st.query_params["case"] = target
        st.rerun()


wanted = st.query_params.get("case")
if wanted and wanted in by_id:
    _show_case(by_id[wanted])
else:
    if wanted:
        st.warning(f"Case {plain_text(wanted, common.NAME_CHARS)} is not in the library.", icon=":material/warning:")
    _browse()
