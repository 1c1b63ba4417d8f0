"""Inspect an upload: a slice (and optional nodule crop) or a DICOM series -> the finding, how sure it is, saliency
maps, similar library cases, review and report.

The title and the uploaders are drawn before the models' libraries are imported (below them), so a fresh server
shows its first page in seconds."""

from __future__ import annotations

import streamlit as st

from app_pages import session
from lungviz.present.text import plain_text

IMAGE_TYPES = ["png", "jpg", "jpeg", "tif", "tiff", "bmp", "npy", "dcm", "dicom"]
SHOW_PX = 256  # side at which the model's views (64-128 px) and their maps are shown
#: The finding's place while a whole slice's nodule centre is not placed: no estimate for an arbitrary spot.
UNPLACED_MESSAGE = ("No finding yet: nothing on this image has been chosen as the nodule (the finder proposed no "
                    "candidate here, or is not installed). Click the nodule on the image under *Choose the nodule* "
                    "below, or type its position; the estimate appears once a centre is placed.")

st.title("Inspect a nodule")

up1, up2 = st.columns(2)
present = {k: k in st.session_state for k in ("upload_slice", "upload_crop")}  # before the uploaders run
main_file = up1.file_uploader("Slice image, DICOM slice or DICOM series (.zip)", type=[*IMAGE_TYPES, "zip"],
                              key="upload_slice",
                              help="PNG, JPG, TIFF, NPY or DICOM (.dcm). A crop about 9 cm wide centred on the "
                                   "nodule (as in the LIDC slices set) or a whole CT slice.")
crop_file = up2.file_uploader("Nodule crop (optional)", type=IMAGE_TYPES, key="upload_crop",
                              help="A zoomed crop of the nodule, taken to span about 32 mm. Without it the nodule "
                                   "view is cut from the slice in millimetres.")
# A file uploaded before a visit to another page comes back (the uploader forgets it).
main_file, main_back = session.kept_upload("upload_slice", present["upload_slice"], main_file)
crop_file, crop_back = session.kept_upload("upload_crop", present["upload_crop"], crop_file)
for col, f, back, k in ((up1, main_file, main_back, "upload_slice"), (up2, crop_file, crop_back, "upload_crop")):
    if back and f is not None:
        col.caption(f":material/history: Still inspecting **{plain_text(f.name, session.NAME_CHARS)}** from earlier in "
                    "this session; upload a file to replace it.")
        col.button("Forget it", key=f"forget-{k}", on_click=session.forget_upload, args=(k,),
                   icon=":material/close:")
if main_file is None and crop_file is None:  # the introduction, only until there is a finding to show
    st.caption("Upload a CT slice centred on the nodule (or a whole slice, then choose the nodule), optionally a "
               "nodule crop, or a DICOM series as .zip. You get a calibrated estimate of how the LIDC radiologists "
               "would rate the nodule, where the model looked, and similar reference cases.")
    st.info("Upload a file to start, for example a slice PNG from the LIDC slices set "
            "(`lidc-slices/<patient>/<nodule>/images/slice-N.png`), a DICOM slice or a zipped DICOM series.",
            icon=":material/upload_file:")
# The models' libraries (torch, timm, ...) load here, after the first page is drawn.
import numpy as np
import plotly.graph_objects as go

from app_pages import common
from lungviz import RESEARCH_NOTICE, paths
from lungviz.data.io import LoadedImage
from lungviz.data.preprocess import (
    DEFAULT_SPACING_MM,
    SLICE_CROP_PX,
    VIEWS,
    WINDOW_PRESETS,
    crop_around,
    mm_to_px,
    resize,
    valid_spacing,
)
from lungviz.data.upload import (
    PICK_ZOOMS,
    CaseInput,
    display_image,
    from_loaded,
    from_series,
    is_whole_slice,
    zoom_ranges,
)
from lungviz.errors import LungvizError
from lungviz.explain import lime_overlay, overlay
from lungviz.inference.lungmask import NO_LUNG_MESSAGE, mask_overlay
from lungviz.inference.outline import outline_overlay
from lungviz.inference.predict import with_assessment
from lungviz.library import SPLIT_NOTES, series_split_note
from lungviz.metrics import reliability_bin
from lungviz.present.dicom_export import ModelInfo, dicom_findings, reference_headers, upload_slices
from lungviz.present.inventory import map_finds_nodule, map_hidden_note, map_localisation_note
from lungviz.present.report import (
    VIEW_LABELS,
    CaseReport,
    band_sentence,
    build_html,
    build_pdf,
    data_uri,
    evidence_notes,
    model_versions,
    pct,
    report_filename,
)

if main_file is None and crop_file is None:
    common.models()  # drawn first, then loaded: a fresh server shows its page before the models are in memory
    st.stop()
ms = common.models()
if ms is None:
    st.stop()
folder = common.weights_folder()


def _read(file) -> LoadedImage | list:
    """An upload as a loaded image or a DICOM series; a user error is shown and the page stops."""
    try:
        data = file.getvalue()
        if file.name.lower().endswith(".zip"):
            return common.read_zip(file.file_id, file.name, data)
        return common.read_image(data, file.name)
    except LungvizError as err:
        common.show_error(err)
    except Exception as err:  # a file no reader anticipated must not show a traceback
        common.show_error(f"{file.name}: lungviz could not read this file ({type(err).__name__}). Upload a PNG, JPG, "
                          "TIFF, NPY or DICOM image, or a zip of DICOM slices.")
    st.stop()


def _centre_picker(image: np.ndarray, is_hu: bool, spacing: float | None, key: str,
                   controls, found: list[dict] | None = None) -> tuple[float, float] | None:
    """The nodule centre on a whole slice: a click on the image (plotly selection) or number inputs in ``controls``.
    ``found``: the slice's candidates when already searched (a series), else the slice is searched here.

    None while nobody has placed it: the finder proposed nothing (no lung, no candidate, or no finder) and the user
    has not clicked or typed a position yet. The page then gives no estimate for an arbitrary spot."""
    h, w = image.shape
    pkey = placed_key(key)
    rkey, ckey = centre_keys(key)
    lung = common.lung_of(image, is_hu, spacing)
    cands = found if found is not None else (
        common.nodule_candidates(folder, image, is_hu, spacing) if common.finder_available() else None)
    first = (int(round(cands[0]["y"])), int(round(cands[0]["x"]))) if cands else (h // 2, w // 2)
    if rkey not in st.session_state:  # start at the finder's best candidate, else the middle (not yet placed)
        st.session_state[rkey], st.session_state[ckey] = first
        st.session_state[pkey] = bool(cands)

    sp_px = spacing or DEFAULT_SPACING_MM
    rings = [(c["y"], c["x"], max(6.0, c["diameter_mm"] / sp_px / 2 + 3)) for c in cands or []]

    def on_click() -> None:
        points = st.session_state[f"pick-{key}"].selection.points
        if points:
            y, x = float(points[0]["y"]), float(points[0]["x"])
            inside = [(np.hypot(y - ry, x - rx), ry, rx) for ry, rx, rad in rings if np.hypot(y - ry, x - rx) <= rad]
            if inside:  # a click in a candidate's ring accepts that candidate
                _, y, x = min(inside)
            _place_centre(key, int(np.clip(round(y), 0, h - 1)), int(np.clip(round(x), 0, w - 1)))

    with controls:  # the page reruns after each click and Plotly's own zoom does not survive it: this one does
        zoom = st.segmented_control("Zoom around the centre", list(PICK_ZOOMS), key=f"zoom-{key}",
                                    default=next(iter(PICK_ZOOMS)),
                                    help="Magnify the slice around the nodule centre; it stays magnified as you "
                                         "click. Scrolling or dragging on the image zooms too, until the next click.")
    shown = display_image(image, is_hu, _window())
    if st.session_state.get("show_lung"):  # the checkbox below the candidates
        shown = mask_overlay(shown, lung)
    row, col = st.session_state[rkey], st.session_state[ckey]
    fig = go.Figure(go.Image(source=data_uri(shown), hoverinfo="skip"))
    step = max(4, max(h, w) // 96)  # an invisible grid of points makes a click select a position
    gy, gx = np.mgrid[0:h:step, 0:w:step]
    fig.add_scatter(x=gx.ravel(), y=gy.ravel(), mode="markers", marker={"size": step + 2, "opacity": 0},
                    hovertemplate="row %{y}, column %{x}<extra></extra>", showlegend=False)
    nodule_mm = common_field_mm()
    for side, colour, name in ((SLICE_CROP_PX, "#ffd400", "slice view"),
                               (mm_to_px(nodule_mm, spacing), "#00e5ff", "nodule view")):
        fig.add_shape(type="rect", x0=col - side / 2, x1=col + side / 2, y0=row - side / 2, y1=row + side / 2,
                      line={"color": colour, "width": 2}, name=name)
    for rank, (cand, (_, _, rad)) in enumerate(zip(cands or [], rings, strict=True), 1):
        fig.add_shape(type="circle", x0=cand["x"] - rad, x1=cand["x"] + rad, y0=cand["y"] - rad, y1=cand["y"] + rad,
                      line={"color": "#ff9500" if rank == 1 else "#ffcc80", "width": 2})
        fig.add_annotation(x=cand["x"] + rad, y=cand["y"] - rad, text=str(rank), showarrow=False,
                           font={"color": "#ff9500", "size": 14}, xanchor="left", yanchor="bottom")
    fig.add_scatter(x=[col], y=[row], mode="markers", marker={"symbol": "cross-thin", "size": 16,
                                                                "line": {"color": "#ff3b30", "width": 2}},
                    hoverinfo="skip", showlegend=False)
    x_range, y_range = zoom_ranges((h, w), (row, col), PICK_ZOOMS.get(zoom or "", 1.0))
    fig.update_layout(height=520, margin={"l": 0, "r": 0, "t": 0, "b": 0}, clickmode="event+select",
                      dragmode="zoom", xaxis={"visible": False, "range": x_range},
                      yaxis={"visible": False, "range": y_range}, uirevision=f"{key}-{zoom}-{row}-{col}")
    st.plotly_chart(fig, key=f"pick-{key}", on_select=on_click, selection_mode="points",
                    config={"displayModeBar": True, "displaylogo": False, "scrollZoom": True,
                            "modeBarButtonsToRemove": ["select2d", "lasso2d", "toImage", "autoScale2d"]})
    with controls:
        if not lung.any():
            st.warning(NO_LUNG_MESSAGE, icon=":material/search_off:")
        _candidate_picker(cands if lung.any() else [], key, series=found is not None)
        st.checkbox("Show the lung mask", key="show_lung",
                    help="A faint green tint over the lungs as lungviz finds them: the finder proposes candidates only "
                         "inside it.")
        c1, c2 = st.columns(2)
        c1.number_input("Nodule centre: row", 0, h - 1, step=1, key=rkey, on_change=_mark_placed, args=(key,))
        c2.number_input("Nodule centre: column", 0, w - 1, step=1, key=ckey, on_change=_mark_placed, args=(key,))
        if not st.session_state.get(pkey):  # the position shown is only the default: let the reader confirm it
            st.button("Use this position", key=f"use-position-{key}", on_click=_mark_placed, args=(key,),
                      icon=":material/my_location:", help="Assess the nodule at the red cross as it is.")
        sp = f"{spacing:.2f} mm/pixel" if spacing else "unknown spacing (0.70 mm/pixel assumed)"
        st.caption(f"Click the nodule, or a ring to accept that candidate; drag or scroll to zoom, double-click to "
                   f"zoom out. Yellow: the slice view "
                   f"({SLICE_CROP_PX} pixels, about {SLICE_CROP_PX * (spacing or 0.7):.0f} mm); cyan: the nodule "
                   f"view ({nodule_mm:.0f} mm), at {sp}.")
    if not st.session_state.get(pkey):
        return None
    return float(st.session_state[rkey]), float(st.session_state[ckey])


def centre_keys(key: str) -> tuple[str, str]:
    """Session keys of the nodule centre's row and column inputs for upload ``key``."""
    return f"row-{key}", f"col-{key}"


def placed_key(key: str) -> str:
    """Session key: whether the nodule centre of upload ``key`` was placed (by the finder or by hand)."""
    return f"placed-{key}"


def _mark_placed(key: str) -> None:
    st.session_state[placed_key(key)] = True


def _place_centre(key: str, row: int, col: int) -> None:
    """Move the nodule centre of upload ``key`` to (``row``, ``col``), as placed by the user."""
    rkey, ckey = centre_keys(key)
    st.session_state[rkey], st.session_state[ckey] = row, col
    _mark_placed(key)


def _candidate_picker(cands: list[dict] | None, key: str, series: bool = False) -> None:
    """The finder's ranked candidates (orange circles on the image); accepting one moves the nodule centre there."""
    if cands is None:
        st.caption("The nodule finder is not installed: click the nodule or type its position.")
        return
    if not cands:
        st.caption("The nodule finder proposed no candidate on this slice: click the nodule or type its position.")
        return

    def label(i: int) -> str:
        c = cands[i]
        return (f"{i + 1}. about {c['diameter_mm']:.0f} mm, nodule-likeness {c['score']:.2f} (row {c['y']:.0f}, "
                f"column {c['x']:.0f})")

    # One widget per candidate list: on another slice of a series the list changes, and a widget kept across lists
    # would hold an entry of the old one.
    where = np.array([[c["x"], c["y"]] for c in cands], np.float64)
    ckey_list = f"cand-{common.digest(key, where)}"

    chosen = st.session_state.setdefault(f"chosen-{key}", {})  # per candidate list of this upload: the entry shown
    if ckey_list not in st.session_state:  # drawn anew, it shows its first entry
        chosen[ckey_list] = 0

    def accept(button: bool = False) -> None:
        i = st.session_state.get(ckey_list)
        if not isinstance(i, int) or not 0 <= i < len(cands):
            return
        # While the slider moves fast, a list drawn anew can report its first entry as a change: only a choice other
        # than the one shown, or the button, moves the centre.
        if not button and i == chosen.get(ckey_list, 0):
            return
        chosen[ckey_list] = i
        _place_centre(key, int(round(cands[i]["y"])), int(round(cands[i]["x"])))

    st.selectbox("Nodule candidates (orange circles, best first)", range(len(cands)), format_func=label,
                 key=ckey_list, on_change=accept,
                 help="Proposed by the nodule finder (a presence classifier and a localiser trained on LIDC "
                      "patches). It often also proposes vessels seen end-on: check each candidate yourself. "
                      "Nodule-likeness is the finder's 0-1 score for ranking its candidates (how much the point "
                      "looks like a nodule centre), not a malignancy estimate. Its size is a rough guide: the nodule "
                      "model measures the chosen nodule below.")
    st.button("Use this candidate", key=f"use-{ckey_list}", on_click=accept, args=(True,),
              icon=":material/my_location:")
    st.caption(("The centre (red cross) starts at the series' best finding and stays where you put it when you "
                "change slices." if series else "The centre (red cross) starts at the best candidate.")
               + " Check it is the nodule you mean before reading the estimate.")


def _series_finding_picker(findings: list[dict], key: str) -> None:
    """The series' best findings; going to one moves the slice slider and the nodule centre to it."""
    fkey = f"finding-{key}"

    def label(i: int) -> str:
        f = findings[i]
        seen = (f"seen on {f['first_slice'] + 1}-{f['last_slice'] + 1}" if f["last_slice"] > f["first_slice"]
                else "one slice only")
        return (f"F{i + 1}: about {f['diameter_mm']:.0f} mm, slice {f['slice_index'] + 1} ({seen}; row "
                f"{f['y']:.0f}, column {f['x']:.0f})")

    def go() -> None:
        i = st.session_state.get(fkey)
        if isinstance(i, int) and 0 <= i < len(findings):
            f = findings[i]
            st.session_state[slice_key(key)] = f["slice_index"] + 1
            _place_centre(key, round(f["y"]), round(f["x"]))

    pick, button = st.columns([5, 1], vertical_alignment="bottom")
    pick.selectbox("Series findings F1, F2, … (best first)", range(len(findings)), format_func=label, key=fkey,
                   on_change=go, help="The finder's best candidates over the whole series, each followed over the "
                                      "consecutive slices it is seen on and listed once. The page opens on the first. "
                                      "Small nodules can rank below other candidates, often vessels: check the list, "
                                      "and scroll the series yourself.")
    button.button("Go", key=f"go-{fkey}", on_click=go, help="Show this finding's slice and centre it.")


def common_field_mm() -> float:
    """The field in millimetres an uploaded nodule crop is taken to span."""
    return float(VIEWS["nodule"].field_mm)


def _window() -> str:
    return st.session_state.get("window") or "lung"


def _window_select(is_hu: bool) -> None:
    if is_hu:
        st.segmented_control("CT window (display only)", list(WINDOW_PRESETS), key="window",
                             help="The models always see the crop min-max scaled from HU, as in training.")


def _dicom_downloads(assessment, centre_rc: tuple[float, float] | None, report: CaseReport) -> None:
    """The nodule model's finding as DICOM SR and its outline as DICOM SEG, for a DICOM upload; both are built when
    a button is clicked (the same content gives the same UIDs, so the SR always references the SEG offered)."""
    st.markdown("**Download as DICOM**")
    if assessment is None or ms.nodule is None:
        st.caption("DICOM SR and SEG come from the nodule model, which is not installed.")
        return
    try:
        if main_file is None:
            raise LungvizError("DICOM SR and SEG are made for DICOM uploads only.")
        zipped = main_file.name.lower().endswith(".zip")
        sources = _read(main_file) if zipped else upload_slices(main_file.getvalue(), main_file.name)
        index = _series_index(main_file.file_id, len(sources)) if zipped else 0
        reference_headers([sources[index]])
    except LungvizError as err:
        st.caption(f":material/info: {plain_text(err.message)}")
        return
    model = ModelInfo.from_spec(ms.nodule.name, ms.nodule.spec)
    made: dict = {}

    def build():
        if "files" not in made:
            made["files"] = dicom_findings(sources, index, centre_rc, assessment, model)
        return made["files"]

    st.caption("The finding (size, characteristics, estimate, model and version) as a DICOM SR measurement report "
               "and the outline as DICOM SEG, both referencing the uploaded series: they open in OHIF and 3D Slicer.")
    st.download_button("Findings as DICOM SR", lambda: build().sr, file_name=report_filename(report, "sr.dcm"),
                       mime="application/dicom", icon=":material/download:", key="dicom-sr", on_click="ignore")
    if assessment.reading.outlined:
        st.download_button("Outline as DICOM SEG", lambda: build().seg, file_name=report_filename(report, "seg.dcm"),
                           mime="application/dicom", icon=":material/download:", key="dicom-seg", on_click="ignore")
    else:
        st.caption("The nodule model outlined nothing, so there is no DICOM SEG.")


THROUGH_PX = 384  # side at which a slice's neighbourhood of the nodule is shown when moving through a series


def _through_series(series: list, assessment, index: int, centre_rc: tuple[float, float] | None, key: str) -> None:
    """The nodule followed through a series: its size per slice, the largest axis and the volume, and a slider
    through the series that draws the model's outline (in the slice's own pixels) on each slice it followed."""
    r = assessment.reading
    sizes = r.slice_sizes()
    read = [s["index"] for s in sizes]
    outlines = common.series_outlines(folder, main_file.file_id, series, index, centre_rc, assessment)
    st.subheader("The nodule through the series")
    zs = [float(series[k].z_mm) for k in read]
    span = (f"series slices {min(read) + 1}-{max(read) + 1}, z {min(zs):.1f} to {max(zs):.1f} mm"
            if len(read) > 1 else f"series slice {read[0] + 1}, z {zs[0]:.1f} mm")
    largest = max(sizes, key=lambda s: s["long_axis_mm"])
    size = (f" Largest axis **{largest['long_axis_mm']:.1f} mm** (slice {largest['index'] + 1})"
            + (f"; volume **{r.volume_mm3:.0f} mm³**." if r.volume_mm3 else "; volume unknown (one slice).")
            if r.outlined else " Nothing was outlined, so the size is unknown.")
    st.markdown(f"The estimate is over the nodule's **{r.n_slices} slice{'s' if r.n_slices != 1 else ''}** "
                f"({span}), followed from the slice you picked.{size}")
    table_col, view_col = st.columns([3, 2], gap="large")
    with table_col:
        st.dataframe([{"slice": k + 1, "z (mm)": round(z, 1), "long axis (mm)": round(s["long_axis_mm"], 1),
                       "short axis (mm)": round(s["short_axis_mm"], 1), "area (mm²)": round(s["area_mm2"], 1),
                       "": "picked" if k == index else ""}
                      for k, z, s in zip(read, zs, sizes, strict=True)],
                     hide_index=True, width="stretch", height=min(36 * (len(read) + 1) + 4, 320))
        if len(read) > 1:
            fig = go.Figure()
            for field, name in (("long_axis_mm", "long axis"), ("short_axis_mm", "short axis")):
                fig.add_scatter(x=zs, y=[s[field] for s in sizes], mode="lines+markers", name=name)
            fig.update_layout(height=220, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                              xaxis={"title": "z (mm)"}, yaxis={"title": "mm", "rangemode": "tozero"},
                              legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom"})  # above the curves
            st.plotly_chart(fig, key="series-sizes", config={"displayModeBar": False})
    with view_col:
        n = len(series)
        skey = f"through-{key}"
        if st.session_state.get(f"{skey}-from") != (index, centre_rc):  # a new pick starts at the picked slice
            st.session_state[skey], st.session_state[f"{skey}-from"] = index + 1, (index, centre_rc)
        k = (st.slider("Move through the series (slice)", 1, n, key=skey) if n > 1 else 1) - 1
        st.image(_series_view(series, k, outlines, read, [s.centre_rc for s in r.slices]), width=THROUGH_PX)
        st.caption(_series_view_caption(series, k, sizes, read))


def _series_view(series: list, k: int, outlines: dict, read: list[int],
                 centres: list[tuple[float, float] | None]) -> np.ndarray:
    """Slice ``k`` around the nodule (the slice view's field, centred where the nodule is on the nearest followed
    slice), in the chosen window, with the model's outline when it followed the nodule there."""
    sl = series[k]
    h, w = sl.hu.shape
    near = min(range(len(read)), key=lambda i: abs(read[i] - k))
    centre = centres[near] if is_whole_slice(sl.hu) and centres[near] is not None else (h / 2.0, w / 2.0)
    side = min(SLICE_CROP_PX, h, w) if is_whole_slice(sl.hu) else max(h, w)
    crop = crop_around(display_image(sl.hu, True, _window()), centre, side, fill=0.0)
    mask = outlines.get(k)
    if mask is None:
        return resize(crop, THROUGH_PX)
    edge = crop_around(mask.astype(np.float32), centre, side, fill=0.0) > 0.5
    return outline_overlay(resize(crop, THROUGH_PX), resize(edge.astype(np.float32), THROUGH_PX) > 0.5)


def _series_view_caption(series: list, k: int, sizes: list[dict], read: list[int]) -> str:
    sl = series[k]
    where = f"Slice {k + 1} of {len(series)}, z = {sl.z_mm:.1f} mm: "
    if k not in read:
        return where + "outside the nodule's slices (no outline)"
    s = sizes[read.index(k)]
    if not s["area_mm2"]:
        return where + "followed, nothing outlined"
    return where + (f"outline {s['long_axis_mm']:.1f} × {s['short_axis_mm']:.1f} mm, area {s['area_mm2']:.0f} mm²")


def slice_key(key: str) -> str:
    """Session key of the series slider of upload ``key`` (it counts slices from 1)."""
    return f"slice-{key}"


def _series_index(file_id: str, n: int) -> int:
    """The slice (0-based) chosen on the series slider of upload ``file_id``; the middle before it is drawn."""
    return int(st.session_state.get(slice_key(common.digest(file_id)), n // 2 + 1)) - 1


def _centre_line(centre_rc: tuple[float, float]) -> str:
    """Where the finding's centre is, for the first screen: for a searched series, which of its findings it is."""
    at = f"row {centre_rc[0]:.0f}, column {centre_rc[1]:.0f}"
    series = _read(main_file) if main_file is not None and main_file.name.lower().endswith(".zip") else None
    findings = (common.series_findings(folder, main_file.file_id, series)
                if isinstance(series, list) and common.finder_available() else [])
    if not findings:
        return f"Centre at {at}: change it under *Choose the nodule* below."
    k = _series_index(main_file.file_id, len(series))
    sp = valid_spacing(float(np.mean(series[k].pixel_spacing_mm))) or DEFAULT_SPACING_MM
    # on a finding: within 5 mm of where it is followed on the slice shown
    here = next((i for i, f in enumerate(findings) for kk, r, c in f["track"]
                 if kk == k and np.hypot(r - centre_rc[0], c - centre_rc[1]) * sp <= 5.0), None)
    if here is not None:
        return f"Series finding F{here + 1} of {len(findings)} ({at}): change it below."
    return f"Centre at {at}, not one of the {len(findings)} listed series findings: change it below."


def _case_input() -> tuple[CaseInput | None, str, str]:
    """Widgets for the uploaded files -> the model inputs, a label for the case and the DICOM series UID ("" when
    not DICOM). No inputs (None) while a whole slice's nodule centre has not been placed."""
    loaded = _read(main_file) if main_file is not None else None
    crop = _read(crop_file) if crop_file is not None else None
    # the slice and centre widgets belong to the main file: adding or removing a crop must not reset them
    key = common.digest(main_file.file_id if main_file else "")
    if isinstance(loaded, list):  # a DICOM series
        if crop is not None:
            st.info("The nodule crop is not used with a DICOM series: the nodule view is cut from the chosen slice.")
        n = len(loaded)
        st.subheader("Choose the nodule")
        with st.container(border=True):
            picture, controls = st.columns([3, 2], gap="large")
            with controls:
                st.markdown(f"**DICOM series** {plain_text(main_file.name, common.NAME_CHARS)}: {n} slices")
                _window_select(True)
                found = (common.series_candidates(folder, main_file.file_id, loaded)
                         if common.finder_available() else None)
                findings = common.series_findings(folder, main_file.file_id, loaded) if found is not None else []
                # a series opens on the slice of its best finding
                st.session_state.setdefault(slice_key(key), (findings[0]["slice_index"] if findings else n // 2) + 1)
                if findings:
                    _series_finding_picker(findings, key)
                # numbered from 1, as the series table and the slider below count
                index = (st.slider("Slice (inferior → superior)", 1, n, key=slice_key(key)) if n > 1 else 1) - 1
                sl = loaded[index]
                st.caption(f"Slice {index + 1} of {n}, z = {sl.z_mm:.1f} mm, "
                           f"instance {sl.instance_number}")
            with picture:
                centre = _centre_picker(sl.hu, True, valid_spacing(float(np.mean(sl.pixel_spacing_mm))), key,
                                         controls, found[index] if found is not None else None)
        label = f"{main_file.name} slice {index + 1}"
        return (from_series(loaded, index, centre) if centre else None), label, loaded[index].series_uid
    centre = None
    if loaded is not None and (loaded.is_hu or is_whole_slice(loaded.pixels)):
        st.subheader("Choose the nodule")
        with st.container(border=True):
            picture, controls = st.columns([3, 2], gap="large")
            with controls:
                st.markdown(f"**{plain_text(loaded.name, common.NAME_CHARS)}**: {loaded.pixels.shape[1]} × "
                            f"{loaded.pixels.shape[0]} pixels"
                            + (", Hounsfield units" if loaded.is_hu else ""))
                _window_select(loaded.is_hu)
            with picture:
                if is_whole_slice(loaded.pixels):
                    centre = _centre_picker(loaded.pixels, loaded.is_hu, loaded.pixel_spacing_mm, key, controls)
                    if centre is None:
                        return None, loaded.name, ""
                else:
                    st.image(display_image(loaded.pixels, True, _window()), width=SHOW_PX, clamp=True)
    names = [f.name for f in (main_file, crop_file) if f is not None]
    uid = str(loaded.meta.get("series_uid", "")) if loaded is not None else ""
    return from_loaded(loaded, crop, centre), " + ".join(names), uid


# The finding leads the page: its box comes before the slice and centre choice of a whole slice or a series, which
# is drawn first (the finding depends on it) but shown below.
finding_box = st.container()
try:
    case, case_label, series_uid = _case_input()
    if case is None:  # a whole slice or series on which nobody has placed the nodule yet
        with finding_box:
            st.subheader("Finding")
            st.info(UNPLACED_MESSAGE, icon=":material/ads_click:")
        st.stop()
    # one of the library's own slice files: named by its case, measured at its case's pixel spacing
    same = common.library_slice(main_file.getvalue()) if main_file is not None and not series_uid else None
    if same is not None:
        case_label = f"{same[0]} ({case_label})"
        known_mm = common.library_spacing(same[0])
        if case.spacing_mm is None and known_mm is not None:
            case.spacing_mm = known_mm
            case.notes.append(f"The pixel spacing of library case {same[0]}, {known_mm:.2f} mm, was used: the "
                              "image file carries none.")
    pred = common.prediction(folder, case.context, case.nodule_crop, case.spacing_mm)
    followed = series = None
    if series_uid and pred.assessment is not None and isinstance(series := _read(main_file), list):
        # a series: the nodule model reads every slice the nodule reaches, not the chosen one alone
        index = _series_index(main_file.file_id, len(series))
        followed = common.series_assessment(folder, main_file.file_id, series, index, case.centre_rc)
        if followed is not None:
            pred = with_assessment(pred, followed)
except LungvizError as err:
    common.show_error(err)
    st.stop()
input_notes = list(case.notes)  # what the page says about the input goes into the report too
own_patient = ""  # the library patient this input comes from, when it is one of the library's own images
library_note = None  # (note, whether it is a test case) when the input is one of the library's own images
if (known := common.library_series(series_uid)) is not None:
    own_patient = known[0]
    library_note = (series_split_note(*known), known[1] == "test")
elif same is not None:
    case_id, name, split = same
    own_patient = case_id
    library_note = (f"This image is {name} of library case {case_id}. " + SPLIT_NOTES.get(str(split), ""),
                    split == "test")
if library_note is not None:
    input_notes.append(library_note[0])
if case.centre_rc is not None:
    input_notes.append(f"Nodule centre used: row {case.centre_rc[0]:.0f}, column {case.centre_rc[1]:.0f} "
                       f"(pixels of {case_label}).")

# ------------------------------------------------------------------------------------------------ the finding

head_view, headline = common.headline(pred)
p = pred.malignant_probability(head_view) if head_view else None
spec = (ms.nodule.spec.metrics.get("binary_test") if head_view == "nodule" and ms.nodule
        else (ms.bundles[headline].spec.metrics.get("test") if headline in ms.bundles else None))
bins = (spec or {}).get("reliability_malignant")  # the headline's reliability table on the test split
a = pred.assessment
shown = a.reading.slices[a.reading.shown] if a is not None else None
outline_image = (outline_overlay(resize(shown.view, SHOW_PX), resize(shown.outline.astype(np.float32), SHOW_PX) > 0.5)
                 if shown is not None and shown.outline.any() else None)
with finding_box:
    st.subheader("Finding")
    seen, finding = st.columns([1, 3], gap="medium")
    with seen:
        if shown is not None:
            st.image(outline_image if outline_image is not None else resize(shown.view, SHOW_PX), width="stretch",
                     clamp=True, caption=f"The nodule model's view ({shown.field_mm:.0f} mm, sized to the nodule)"
                                         + (" with its outline" if outline_image is not None else ""))
        elif "slice" in pred.images:
            st.image(resize(pred.images["slice"], SHOW_PX), width="stretch", clamp=True,
                     caption="Slice view as the model sees it")
        if case.centre_rc is not None:  # a whole slice: the centre is chosen below the finding
            st.caption(_centre_line(case.centre_rc))
    with finding:
        if a is not None:
            common.show_assessment(a, pred, band_sentence(bins, p))
        else:
            st.metric("Malignant probability: slice view", common.percent(p),
                      help="Panel score 4-5 (malignant) against 1-3 (benign).")
            common.show_flag(pred, compact=True)
    for note in case.notes:  # notes on a conversion name the file
        st.caption(f":material/info: {plain_text(note)}")
    if library_note is not None:
        (st.info if library_note[1] else st.warning)(plain_text(library_note[0]), icon=":material/database:")

    with st.expander("How sure is this?", icon=":material/query_stats:"):
        if pred.refer:
            common.show_flag(pred)  # each reason in full
        if a is not None:
            common.show_call_on_test(a)
        st.dataframe(common.view_table(pred), hide_index=True, width="stretch")
        fig = common.probability_bars(pred, "score")
        if fig is not None:
            st.markdown("**Panel score distribution (1-5), calibrated**")
            st.plotly_chart(fig, key="score-bars", config={"displayModeBar": False})
        for note in evidence_notes(pred):
            st.caption(note)
        ref = common.reference(headline) if headline else None
        hist_col, rel_col = st.columns([3, 2], gap="large")
        with hist_col:
            if ref is None or "malignant" not in ref.classes:
                st.info(f"The reference test predictions of {headline} are not installed "
                        f"(`weights/reference/{headline}-test.csv`), so this case cannot be placed among them.")
            else:
                hfig = go.Figure()
                probs, truths = np.array(ref.probabilities("malignant")), np.array(ref.truths())
                for label, colour in (("benign", "#4c78a8"), ("malignant", "#e45756")):
                    n_label = int((truths == label).sum())
                    hfig.add_histogram(x=probs[truths == label], name=f"panel: {label} (n={n_label})",
                                       xbins={"start": 0, "end": 1, "size": 0.05}, marker_color=colour, opacity=0.7)
                if p is not None:
                    hfig.add_vline(x=p, line_width=3, line_color="black",
                                   annotation_text=f"this case {common.percent(p)}",
                                   annotation_position="top left" if p > 0.5 else "top right")
                    called_from = pred.views[head_view]["binary"].threshold
                    if abs(called_from - 0.5) > 5e-3:  # where this model's malignant call starts
                        hfig.add_vline(x=called_from, line_width=1, line_dash="dash", line_color="#57606a",
                                       annotation_text=f"calls malignant from {common.percent(called_from)}",
                                       annotation_position="bottom right")
                hfig.update_layout(barmode="overlay", height=300, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                                   xaxis={"title": f"{headline} malignant probability", "tickformat": ".0%",
                                          "range": [0, 1]},
                                   yaxis={"title": "test nodules"}, legend={"orientation": "h", "y": 1.2})
                st.plotly_chart(hfig, key="confidence-hist", config={"displayModeBar": False})
                st.caption(f"{len(probs)} held-out test nodules of the LIDC split, coloured by the panel's rating.")
        with rel_col:
            band = reliability_bin(bins, p) if bins and p is not None else None
            if band is None:
                st.info("No reliability table on held-out data is recorded for this model.")
            elif not band.get("n"):
                st.warning(f"No test nodule received a probability between {pct(band['lo'])} and {pct(band['hi'])}: "
                           "calibration was never checked in this range.", icon=":material/warning:")
            else:
                st.metric(f"Observed malignant rate, band {pct(band['lo'])}-{pct(band['hi'])}", pct(band["observed"]),
                          help="Among held-out test nodules the model placed in the same probability band.")
                st.markdown(f"{band_sentence(bins, p)} Their mean estimate: {pct(band['mean_p'])}.")
                if band["n"] < 20:
                    st.caption(":material/warning: Few cases in this band: the observed rate is imprecise.")
        st.caption("Validation figures for every model: the Models page and the model card.")

# --------------------------------------------------------------------------------------- the nodule in the series

if followed is not None and isinstance(series, list):
    _through_series(series, followed, index, case.centre_rc, common.digest(main_file.file_id))

# ------------------------------------------------------------------------------------------------------ maps

st.subheader("Where the model looked")
mc1, mc2 = st.columns([2, 3])
method = mc1.segmented_control("Map", list(common.MAP_METHODS), key="map_method") or "Grad-CAM"
alpha = mc2.slider("Map opacity", 0.0, 1.0, step=0.05, key="alpha")
lime_samples = common.LIME_PRECISION["Fast"][0]
if common.MAP_METHODS[method] == "lime":
    precision = st.segmented_control("LIME precision", list(common.LIME_PRECISION), key="lime_precision",
                                     help="More perturbations give regions that change less from run to run.")
    lime_samples, note = common.LIME_PRECISION[precision or "Fast"]
    st.caption(note)
map_bundles = {v: b for v, b in (("nodule", ms.nodule), ("slice", ms.bundle("slice", "binary")))
               if b is not None and v in pred.images and "binary" in pred.views.get(v, {})}
maps: dict[str, np.ndarray] = {}
map_cols = st.columns(4)
for i, (view, bundle) in enumerate(map_bundles.items()):
    img = pred.images[view]
    big = resize(img, SHOW_PX)
    call = pred.views[view]["binary"].top
    if view == "nodule":  # the class its image head's Grad-CAM explains
        call = "malignant" if shown.logits[1] > shown.logits[0] else "benign"
    label = VIEW_LABELS[view].lower()
    map_cols[2 * i].image(big, caption=f"{VIEW_LABELS[view]}: the view without a map", width="stretch", clamp=True)
    layer = getattr(bundle, "cam_layer", "")
    note = map_localisation_note(bundle.name, folder, layer)
    with map_cols[2 * i + 1]:
        # a Grad-CAM measured to look away from the nodule is not shown beside one that finds it, unless asked for
        if method == "Grad-CAM" and map_finds_nodule(bundle.name, folder, layer) is False and not st.toggle(
                f"Show the {label}'s Grad-CAM anyway", key=f"weak-map-{view}",
                help="Hidden because on the shifted test views this model's Grad-CAM peaked on the nodule in under "
                     "half of the nodules."):
            hidden = map_hidden_note(label)
            st.caption(f"{hidden} {note or ''}")
            input_notes.append(f"{hidden} It is left out of this report.")
            continue
        if common.MAP_METHODS[method] == "lime":
            bar = st.progress(0.0, text=f"LIME, {label}…")
            res = common.lime(folder, bundle.name, img, lambda f, bar=bar, label=label: bar.progress(
                min(1.0, f), text=f"LIME, {label}: {f:.0%}"), num_samples=lime_samples)
            bar.progress(1.0, text=f"LIME, {label}: done ({res.num_samples} samples; LIME's linear fit explains "
                                   f"{max(res.score, 0.0):.0%} of the model's response, lower = read with caution)")
            overlaid = lime_overlay(big, res, k=5, alpha=alpha)
            caption = f"LIME, {label}: the 5 regions most in favour of '{call}'"
        else:
            heat = common.cam_map(folder, bundle.name, img, common.MAP_METHODS[method])
            overlaid = overlay(big, heat, alpha)
            caption = f"{method}, {label}: evidence for '{call}'"
        st.image(overlaid, caption=caption, width="stretch")
        if note:
            st.caption(note)
    maps[f"{method}, {label}"] = overlaid
    if method != "Grad-CAM":  # the report always carries Grad-CAM too
        maps[f"Grad-CAM, {label}"] = overlay(big, common.cam_map(folder, bundle.name, img, "gradcam"), alpha)
st.caption("Maps show which pixels drove the model's call; they do not show that the call is right. Grad-CAM colours "
           "run blue (none) → green → yellow → red (strongest), scaled to each map's own maximum; LIME tints green "
           "(outlined in yellow) the regions supporting the call.")

# ------------------------------------------------------------------------------------------------ similar cases

st.subheader("Similar library cases")
index = common.case_index()
similar: list[dict] = []
if index is not None:
    k = st.columns([1, 3])[0].slider("How many", 1, 10, key="k_similar")
    try:
        similar = common.similar(folder, str(paths.lidc_slices_dir()), case.context, case.nodule_crop,
                                 case.spacing_mm, k, own_patient)
    except LungvizError as err:
        st.warning(plain_text(f"Similar cases are not available: {err}"), icon=":material/info:")
    own = ""
    if own_patient:
        own = (f"This input is one of the library's own images: the cases of its patient "
               f"({own_patient.split('/')[0]}) are left out of the similar cases.")
        input_notes.append(own)
    st.caption("Nearest cases by the nodule model's features. The library holds training cases too (seen by the "
               "model); the panel and reader scores are the LIDC radiologists' ratings, not pathology. " + own)
    upload_view = shown.view if shown is not None else pred.images.get("nodule", pred.images.get("slice"))
    upload_chars = dict(a.characteristics) if a is not None else {}
    if a is not None and a.reading.outlined:
        upload_chars["size"] = f"{a.reading.long_axis_mm:.1f} × {a.reading.short_axis_mm:.1f} mm"
    common.similar_case_cards(similar, "inspect", upload_view, upload_chars)

# ------------------------------------------------------------------------------------------- review and report

st.subheader("Review and report")
rev_col, rep_col = st.columns([3, 2], gap="large")
with rev_col:
    review_key = common.digest(case_label, case.context, case.nodule_crop)  # this input, not just its file name
    common.review_form(case_label, "upload", {**pred.to_dict(), "input_digest": review_key}, review_key)
with rep_col:
    saved = st.session_state["saved_reviews"].get(review_key, {})
    report = CaseReport(
        case_id=case_label, source="upload", file_names=list(case.names), input_notes=input_notes,
        images={**pred.images, **({'Nodule model outline': outline_image} if outline_image is not None else {})},
        prediction=pred, maps=maps,
        similar=[{f: s.get(f) for f in ("case_id", "malignancy", "reader_scores", "diameter_mm", "similarity",
                                        "thumbnail")} for s in similar],
        verdict=saved.get("verdict"), note=saved.get("note", ""), reviewer=saved.get("reviewer", ""),
        models=model_versions(ms.provenance), notice=RESEARCH_NOTICE,
    )
    st.markdown("**Download the case report**")
    st.caption("Inputs, estimate, maps, similar cases, your saved review and the research-use notice.")
    st.download_button("HTML report", lambda: build_html(report), file_name=report_filename(report, "html"),
                       mime="text/html", icon=":material/download:", key="report-html", on_click="ignore")
    st.download_button("PDF report", lambda: build_pdf(report), file_name=report_filename(report, "pdf"),
                       mime="application/pdf", icon=":material/picture_as_pdf:", key="report-pdf", on_click="ignore")
    _dicom_downloads(pred.assessment, case.centre_rc, report)
