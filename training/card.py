"""Write the model card (``weights/README.md``), its long tables (``weights/MODEL_CARD_TABLES.md``) and figures.

Every figure comes from a file a training command wrote into the weights folder and was measured on the test
split, which no shipped model trained on. The card is a list of section functions; each returns its card text and
its long tables, and a section whose record is missing says "not measured".
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungviz import RESEARCH_NOTICE, paths
from lungviz.atlas import ATLAS_PX, ATTRIBUTION
from lungviz.metrics import format_ci

CARD_FILE = "README.md"
TABLES_FILE = "MODEL_CARD_TABLES.md"
NOT_MEASURED = "not measured"
#: The slice view's networks; the card describes these, the nodule model, the finder and the histology model only.
SLICE_MODELS = ("slice-binary", "slice-score")
#: Models whose Grad-CAM localisation the card reports (``cam_localisation.json`` may hold others).
MAP_MODELS = ("nodule", *SLICE_MODELS)
#: Models with a test confusion matrix and reliability diagram in ``figures/``.
FIGURE_MODELS = (*SLICE_MODELS, "histology")
#: The similar-case index's metadata.
INDEX_FILES = ("index-nodule.json",)
#: The whole-slice ranker variants of ``finder.json``'s ``wholeslice`` block, in the card's order, as it names them.
WHOLESLICE_VARIANTS = {
    "network": "presence network alone, untuned 0.5 threshold (one slice)",
    "slice": "slice ranker as shipped: presence network, threshold fitted (one slice)",
    "slice_2d_shape": "network + density + 2D Hessian + diameter (one slice)",
    "hessian3d_only": "3D Hessian blob/vessel + density, no network (series)",
    "series_network": "presence network alone, threshold fitted (series scan)",
    "series_all_features": "network + density + 2D and 3D Hessian + diameter (series)",
    "series_all_points": "series ranker on the one-slice scan: every point, 4 turns (slower)",
    "series": "series ranker as shipped: network + 3D Hessian blob/vessel (series)",
}


class Missing(Exception):
    """A record or block a section needs is not in the weights folder."""


@dataclass
class Weights:
    """The weights folder the card reads, with each JSON file read once."""

    folder: Path
    _cache: dict[str, dict | None] = field(default_factory=dict)

    def get(self, name: str) -> dict | None:
        """``name`` (``"nodule.json"``) as a dict; None when missing or unreadable."""
        if name not in self._cache:
            try:
                data = json.loads((self.folder / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                data = None
            self._cache[name] = data if isinstance(data, dict) else None
        return self._cache[name]

    def need(self, name: str) -> dict:
        """Like :meth:`get`, raising :class:`Missing` when the file is not there."""
        data = self.get(name)
        if data is None:
            raise Missing(f"`{name}` is not installed")
        return data


@dataclass(frozen=True)
class Part:
    """What one section adds: text for the card and, optionally, long tables for the tables file."""

    card: str
    tables: str = ""


# ------------------------------------------------------------------------------------------------ formatting


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: one header row, then one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def num(v: float | None, digits: int = 3) -> str:
    """``0.812``, or ``–`` for a missing or non-finite value."""
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def pct(v: float | None) -> str:
    """``89%``, or ``–``."""
    return "–" if v is None or not np.isfinite(v) else f"{v:.0%}"


def pct_ci(report: dict, key: str) -> str:
    """``89% [80-95%]``: a rate with its 95% interval from ``report["ci95"]`` (or ``report[f"{key}_ci95"]``)."""
    ci = (report.get("ci95") or {}).get(key)
    value = pct(report.get(key))
    return f"{value} [{ci[0] * 100:.0f}-{ci[1] * 100:.0f}%]" if ci and value != "–" else value


def signed_ci(report: dict, key: str) -> str:
    """``+0.008 [-0.019, +0.035]``: a difference with its 95% interval."""
    ci = (report.get("ci95") or {}).get(key)
    value = report.get(key)
    if value is None:
        return "–"
    return f"{value:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


#: Metric keys of a network's report as the tables file names them.
FIGURE_WORDS = {"auroc": "AUROC", "auprc_weighted": "weighted AUPRC", "f1_weighted": "weighted F1",
                "f1_macro": "macro F1", "accuracy": "accuracy", "f1_malignant": "malignant F1",
                "sensitivity": "sensitivity", "specificity": "specificity", "qwk": "kappa (QWK)",
                "within_one": "within one score"}
#: A call point's rule in words.
RULE_WORDS = {"lower-bound": "95% lower bound of validation sensitivity", "point": "validation sensitivity"}


def words(name: str) -> str:
    """A rating's name as words: ``internalStructure`` -> ``internal structure``."""
    return re.sub(r"(?<=[a-z])([A-Z])", lambda m: " " + m.group(1).lower(), name)


def sentence(items: Sequence[str]) -> str:
    """Clauses joined by semicolons into one sentence, its first letter raised."""
    text = "; ".join(items)
    return text[:1].upper() + text[1:] + "."


def nodules(n: int) -> str:
    """``1 nodule``, ``3 nodules``."""
    return f"{n} nodule{'' if n == 1 else 's'}"


def band(lo: float, hi: float | None) -> str:
    """A size band in mm: ``6-10 mm`` or ``>= 20 mm``."""
    return f"{lo:g}-{hi:g} mm" if hi is not None else f">= {lo:g} mm"


def need(block: dict | None, *keys: str) -> dict:
    """``block[k1][k2]...``, raising :class:`Missing` naming the first absent key."""
    cur = block
    for k in keys:
        if not isinstance(cur, dict) or cur.get(k) is None:
            raise Missing(f"no `{k}` block")
        cur = cur[k]
    return cur


def guarded(label: str, fn: Callable[[], str]) -> str:
    """``fn()``, or ``**label**: not measured (why).`` when its record or block is missing."""
    try:
        return fn()
    except (Missing, KeyError, TypeError, IndexError) as err:
        why = str(err) if isinstance(err, Missing) else f"the record lacks {err}"
        return f"**{label}**: {NOT_MEASURED} ({why}).\n"


# ------------------------------------------------------------------------------------------------ sections


def intended_use(w: Weights) -> Part:
    """What the app is for and what it is not."""
    return Part(
        "A second look for radiologists and researchers reviewing a lung nodule on CT, for research and teaching. For "
        "a nodule it outlines and measures the nodule, rates the eight LIDC characteristics and the 1-5 malignancy "
        "score as the LIDC readers would, gives a benign/malignant estimate with the factors behind it, a map of where "
        "the model looked and similar reference cases. A nodule finder proposes where to look on a whole slice; a "
        "separate histology model is a teaching example. Not for diagnosis, screening or patient management. The "
        "labels are radiologists' ratings, not pathology.\n\n"
        "Each model below says what it predicts, on which data, how well on the held-out test patients, against whom "
        "(the readers' panel, their measured diameter, a single reader, a map fixed at the centre), and its limits. "
        f"Longer tables: [{TABLES_FILE}]({TABLES_FILE}). How the design was reached: `docs/nodule-model.md`.\n")


def data_and_split(w: Weights) -> Part:
    """The LIDC data, its labels and the patient-level split."""
    split = w.need("splits/holdout.json")
    by_split: dict[str, int] = {}
    for s in (split.get("assignment") or {}).values():
        by_split[s] = by_split.get(s, 0) + 1
    nodules = (w.get("nodule.json") or {}).get("training") or {}
    counts = " / ".join(f"{by_split.get(s, 0)} patients" + (f", {nodules[f'n_{s}']} nodules"
                                                            if nodules.get(f"n_{s}") else "")
                        for s in ("train", "val", "test"))
    context = ((w.get("nodule.json") or {}).get("preprocessing") or {}).get("context_px", 128)
    index = next((r for f in INDEX_FILES if (r := w.get(f))), None) or {}
    many = [int(r.get("n_readers") or 0) for r in index.get("records") or []]
    many = [n for n in many if n > 4]
    text = (
        "LIDC-IDRI (TCIA, CC BY 3.0; Armato et al., Med Phys 38:915-931, 2011; doi:10.7937/K9/TCIA.2015.LO9QL9SX): "
        f"{sum(by_split.values())} patients as {context} px axial crops through every slice a reader outlined, min-max "
        "scaled from HU.\n\n"
        "- **Labels.** The panel: the median of 1-4 readers' ratings, rounded half up. Benign/malignant groups "
        "scores 1-3 as benign and 4-5 as malignant. The outline is the readers' consensus (a pixel at least half "
        "of them drew); the diameter is theirs. Nodules read by one radiologist carry that reader's ratings only."
        + (f" {len(many)} nodules carry {min(many)}-{max(many)} ratings (extra reader marks in the source data); "
           "their panel is the median of all." if many else "") + "\n"
        f"- **Split.** By patient, stratified 70/15/15 (`splits/holdout.json`, fingerprint "
        f"`{split.get('fingerprint', '–')}`): train / validation / test = {counts}. Training fits the weights; "
        "validation chooses the epoch, the recipe, the calibration and the call points; test is read for this card. "
        "The test patients are never trained on.\n"
        "- **Inputs.** Images only. The readers' diameter and ratings are labels, never inputs.\n")
    return Part(text)


def nodule_model(w: Weights) -> Part:
    """The nodule model: outline, size, ratings, the estimate by its factors, its call and diagnosis truth."""
    spec = w.need("nodule.json")
    m = need(spec, "metrics")
    tr, pre = spec.get("training") or {}, spec.get("preprocessing") or {}
    rng = "-".join(f"{v:g}" for v in pre.get("field_mm_range") or [])
    intro = (
        f"One network (`{spec.get('arch', '?')}`, {spec.get('input_size', '?')} px) on a nodule view whose field "
        f"follows the nodule ({pre.get('field_factor', '?')} x the long axis it measures in a first pass, within "
        f"{rng} mm). It outlines the nodule and, from features pooled over that outline, gives benign/malignant, the "
        "1-5 score and the eight characteristics, each a calibrated distribution over its scale. Trained on "
        f"{tr.get('n_train', '?')} nodules ({tr.get('device', '?')}, {tr.get('train_seconds', 0) / 60:.0f} min); "
        "a nodule's reading averages its central slices. Test figures, 95% patient-bootstrap intervals.\n")
    parts = [intro,
             guarded("Outline", lambda: _outline(m)),
             guarded("Size", lambda: _size(m)),
             guarded("Characteristics and the 1-5 score", lambda: _ratings(m)),
             guarded("Benign/malignant estimate", lambda: _estimate(m)),
             guarded("Second-look call", lambda: _call(m)),
             guarded("Against diagnosis truth", lambda: _diagnosis(m)),
             guarded("Choices made after test figures were read", lambda: _after_test(m)),
             guarded("Limits", lambda: _nodule_limits(m, w.get("cam_localisation.json")))]
    tables = [guarded("Size by band", lambda: _size_table(m)),
              guarded("Ratings in detail", lambda: _ratings_table(m)),
              guarded("The estimate's factors", lambda: _factors_table(m)),
              guarded("The call points", lambda: _calls_table(m))]
    return Part("\n".join(parts), "\n".join(tables))


def _outline(m: dict) -> str:
    o = need(m, "test", "outline")
    same = o.get("dice_same_nodules")
    return (f"**Outline.** Dice {format_ci(o, 'dice')} with the readers' consensus. On the "
            f"{o['readers_pairwise_dice_n']} nodules with two or more readers, readers agree with each other at "
            f"{num(o['readers_pairwise_dice'])}"
            + (f" and the model with their consensus at {num(same)}" if same else "")
            + " (a consensus is easier to match than another reader).\n")


def _size(m: dict) -> str:
    s = need(m, "test", "size")
    bands = s["by_band"]
    gone = s.get("n_not_outlined", 0)
    return ("**Size** against the readers' diameter: mean absolute error of the long axis "
            f"{num(s['mae_long_axis_mm'], 1)} mm ({num(bands[0]['mae_long_axis_mm'], 1)} mm at "
            f"{band(*bands[0]['band_mm'])}, "
            f"{num(bands[-1]['mae_long_axis_mm'], 1)} mm at {band(*bands[-1]['band_mm'])}); of the mean of long and "
            f"short axis {num(s['mae_mean_axes_mm'], 1)} mm. By band in the tables file."
            + (f" {nodules(gone)} got no outline, so no size (the app says so)." if gone else "") + "\n")


def _size_table(m: dict) -> str:
    s = need(m, "test", "size")
    rows = [(band(*b["band_mm"]), b["n"], num(b["mae_long_axis_mm"], 1), num(b["mae_mean_axes_mm"], 1))
            for b in s["by_band"]]
    rows.append(("all", sum(b["n"] for b in s["by_band"]), num(s["mae_long_axis_mm"], 1),
                 num(s["mae_mean_axes_mm"], 1)))
    return ("**Size**: mean absolute error (mm, test) against the readers' diameter, by that diameter.\n\n"
            + table(("readers' diameter", "n", "long axis", "mean of long and short axis"), rows))


def _rating_rows(m: dict) -> list[tuple[str, dict]]:
    ratings = need(m, "test", "ratings")
    return [(h, r["single_reader"]) for h, r in ratings.items() if (r.get("single_reader") or {}).get("n_pairs")]


def _ratings(m: dict) -> str:
    rows = _rating_rows(m)
    if not rows:
        raise Missing("no single-reader comparison")
    label = {"malignancy": "1-5 malignancy score (the app's `nodule-score`)"}
    below = [words(h) for h, sr in rows if sr["model_qwk"] < sr["reader_qwk"]]
    zero = [words(h) for h, sr in rows if sr["model_qwk"] == 0]
    return ("**Characteristics and the 1-5 score** against the rest of the panel, leaving one reader out in turn; "
            f"model and that single reader on the same {rows[0][1]['n_pairs']} pairs (quadratic-weighted kappa):\n\n"
            + table(("rating", "model", "single reader"),
                    [(label.get(h, words(h)), format_ci(sr, "model_qwk"), format_ci(sr, "reader_qwk"))
                     for h, sr in rows])
            + (f"\nBelow the single reader: {', '.join(below)}." if below else "")
            + (f" A kappa of 0 ({', '.join(zero)}): the model gives every nodule the same level, as nearly all are "
               "rated alike." if zero else "") + "\n")


def _ratings_table(m: dict) -> str:
    ratings = need(m, "test", "ratings")
    rows = []
    for h, r in ratings.items():
        sr = r.get("single_reader") or {}
        rows.append((words(h), r.get("levels", "–"), r.get("n", "–"), num(r.get("qwk")), num(r.get("mae"), 2),
                     num(r.get("ece")), num(sr.get("model_mae"), 2), num(sr.get("reader_mae"), 2)))
    return ("**Ratings** (test): each head's distribution against the panel, and the absolute error of the model and "
            "of a single reader on the leave-one-reader-out pairs.\n\n"
            + table(("rating", "levels", "n", "kappa vs panel", "MAE vs panel", "ECE", "pairs: model MAE",
                     "pairs: single reader MAE"), rows))


def _estimate(m: dict) -> str:
    est = need(m, "estimate")
    f = need(est, "factors")
    rows = [("the readers' diameter", format_ci(est["readers_diameter"], "auroc"), "–")]
    for label, r in (("estimate by its factors (shipped)", f),
                     ("size and image evidence alone", est.get("size_and_image"))):
        if r:
            rows.append((label, format_ci(r["auroc"], "auroc"),
                         signed_ci(r["paired_vs_readers_diameter"], "minus_readers_diameter")))
    head = (m.get("test") or {}).get("malignant") or {}
    if head.get("auroc"):
        rows.append(("the network's own benign/malignant head", format_ci(head["auroc"], "auroc"), "–"))
    d = f["paired_vs_readers_diameter"]
    lo, hi = d["ci95"]["minus_readers_diameter"]
    verdict = ("ranks above" if lo > 0 else "ranks below" if hi < 0
               else "is level with (the paired interval holds 0)")
    sr = head.get("single_reader") or {}
    reader = (f" A single reader's own malignancy rating ranks {num(sr.get('reader_auroc'))} against the rest of the "
              f"panel, the head {num(sr.get('model_auroc'))} on the same pairs." if sr.get("n_pairs") else "")
    return ("**Benign/malignant estimate** (the app's `fused-binary`): a logistic model over "
            f"{', '.join(f['factors'])}, fitted on {est.get('n_val', '?')} validation nodules; the app shows each "
            "factor's contribution in log-odds. Ranking malignant above benign (AUROC, test), beside the readers' "
            f"own diameter on the same {est['readers_diameter']['n']} nodules:\n\n"
            + table(("ranking", "AUROC", "minus the readers' diameter (paired)"), rows)
            + f"\nThe estimate {verdict} the readers' diameter.{reader}\n")


def _factors_table(m: dict) -> str:
    model = need(m, "estimate", "factors", "model")
    signs = need(m, "estimate", "factors", "fit").get("signs") or {}
    rows = [(n, f"{c:+.3f}", f"{x:.3f}", {1: "+", -1: "-"}.get(signs.get(n, 0), "free"))
            for n, c, x in zip(model["names"], model["coef"], model["centre"], strict=True)]
    ece = (m.get("estimate") or {}).get("factors", {}).get("ece")
    return ("**The estimate's factors**: coefficient (log-odds per unit), the validation mean a contribution is "
            "measured from, and the sign the fit was held to"
            + (f"; the estimate's top-class ECE on test is {num(ece)}" if ece is not None else "") + ".\n\n"
            + table(("factor", "coefficient", "centre", "sign"), rows))


def _call(m: dict) -> str:
    c = need(m, "estimate", "factors", "call")
    read = {**c["test"], "ci95": c["test_ci95"]}
    rule = ("the 95% lower bound of validation sensitivity reaches" if c.get("rule") == "lower-bound"
            else "validation sensitivity reaches")
    return (f"**Second-look call.** Malignant from {c['threshold']:.1%}, chosen on validation so that {rule} "
            f"{c['target_sensitivity']:.0%}. On test it found {pct_ci(read, 'sensitivity')} of the malignant nodules "
            f"and cleared {pct_ci(read, 'specificity')} of the benign; it calls "
            f"{pct(c['test'].get('called_positive'))} of nodules malignant. PPV and NPV in the tables file.\n")


def _calls_table(m: dict) -> str:
    f = need(m, "estimate", "factors")
    rows = []
    for label, c in (("shipped", f.get("call")), ("plain rule", f.get("call_point_rule"))):
        if c:
            read = {**c["test"], "ci95": c["test_ci95"]}
            rows.append((label, RULE_WORDS.get(c.get("rule", ""), c.get("rule", "–")), f"{c['threshold']:.1%}",
                         pct_ci(read, "sensitivity"), pct_ci(read, "specificity"), pct_ci(read, "ppv"),
                         pct_ci(read, "npv")))
    if not rows:
        raise Missing("no call block")
    return ("**Call points** of the estimate (chosen on validation, read on test; PPV and NPV hold at this test "
            "set's malignant share).\n\n" + table(("call", "rule: reaches the target", "from", "test sensitivity",
                                                  "test specificity", "test PPV", "test NPV"), rows))


def _diagnosis(m: dict) -> str:
    dx = need(m, "diagnosis")
    if not dx.get("n_patients"):
        raise Missing("no test patient with a known diagnosis")
    rows = [(label, format_ci(dx[key], "auroc")) for key, label in (
        ("estimate", "the estimate by its factors"), ("readers_panel_score", "the readers' panel score"),
        ("readers_diameter", "the readers' diameter")) if dx.get(key)]
    return (f"**Against diagnosis truth** (LIDC's pathology or follow-up list, `lidc-diagnosis.csv`): only "
            f"{dx['n_patients']} test patients have one ({dx['n_cancer']} cancer, {dx['n_benign']} not), each read by "
            "their most suspicious nodule. Too few to tell these apart; the intervals span most of the scale.\n\n"
            + table(("ranking cancer above non-cancer", "AUROC"), rows))


def _after_test(m: dict) -> str:
    f = need(m, "estimate", "factors")
    items = ["- Two training recipes were tried; the first one's test figures had been read before the second, "
             "which ships, was chosen on validation alone."]
    if any((f.get("fit") or {}).get("signs", {}).values()):
        items.append("- Each factor's coefficient is held to the side radiology knows; that constraint was added for "
                     "the explanation's sake after an unconstrained fit's test AUROC had been read.")
    plain, call = f.get("call_point_rule"), f.get("call") or {}
    if plain and call.get("rule") == "lower-bound":
        items.append(f"- The call's conservative rule was chosen after the plain rule (validation sensitivity >= "
                     f"{plain['target_sensitivity']:.0%}, calling from {plain['threshold']:.1%}) had found "
                     f"{pct(plain['test']['sensitivity'])} on test.")
    return ("**Choices made after test figures were read** (`docs/nodule-model.md` tells the history):\n\n"
            + "\n".join(items) + "\n")


def _nodule_limits(m: dict, cam: dict | None) -> str:
    items = []
    est = (m.get("estimate") or {}).get("factors") or {}
    lo = ((est.get("paired_vs_readers_diameter") or {}).get("ci95") or {}).get("minus_readers_diameter")
    if lo and lo[0] <= 0:
        items.append("its estimate is not shown to rank better than the readers' own diameter")
    gone = ((m.get("test") or {}).get("size") or {}).get("n_not_outlined")
    if gone:
        items.append(f"{nodules(gone)} of the test split got no outline and so no size")
    shifted = (((cam or {}).get("models") or {}).get("nodule") or {}).get("shifted") or {}
    if shifted.get("nodule_cut_by_view"):
        items.append(f"moved off centre, {shifted['nodule_cut_by_view']} of {shifted['n']} test nodules reached past "
                     "the view's edge (the readers' outline can outgrow the measured long axis)")
    items.append("measured on LIDC slices only")
    return f"**Limits.** {sentence(items)}\n"


def maps(w: Weights) -> Part:
    """Grad-CAM localisation of each map model, centred and shifted, beside a map fixed at the centre."""
    cam = w.need("cam_localisation.json")
    models = need(cam, "models")
    rows = []
    for name in MAP_MODELS:
        r = models.get(name)
        if not r:
            rows.append((name, "–", NOT_MEASURED, "", "", "", ""))
            continue
        for view in ("centred", "shifted"):
            b, cp = r[view], r[view]["centre_prior"]
            rows.append((name, view, b["n"], f"{pct(b['peak_inside'])} ({pct(cp['peak_inside'])})",
                         f"{pct(b['mass_inside'])} ({pct(cp['mass_inside'])})", pct(b["mask_area"]),
                         b.get("nodule_cut_by_view", "–")))
    margin = cam.get("margin_mm", 3)
    text = (f"Each test nodule's middle slice is seen as the app cuts it (centred) and with its centre moved "
            f"{cam.get('shift', 0.25):.0%} of the view's side in a fixed random direction (shifted). A real map must "
            "beat a map fixed at the centre (in brackets), which looks perfect on centred views. *Peak*: the map's "
            "maximum lies inside the readers' outline; *mass*: its share inside that outline widened by "
            f"{margin:g} mm; *chance*: that region's share of the view.\n\n"
            + table(("model", "view", "n", "peak inside (centre)", "mass inside (centre)", "chance",
                     "nodules cut by the view"), rows))
    nod = models.get("nodule")
    if nod:
        text += ("\nThe nodule model's heads read only its own outline, so its map lies there by design: these "
                 "figures measure how well that outline finds the nodule and follows it.\n")
    return Part(text)


def slice_view(w: Weights) -> Part:
    """The slice view's networks: the whole crop around the nodule, binary and 1-5 score."""
    specs = {n: s for n in SLICE_MODELS if (s := w.get(f"{n}.json"))}
    if not specs:
        raise Missing("`slice-binary.json` and `slice-score.json` are not installed")
    diam = ((w.get("nodule.json") or {}).get("metrics") or {}).get("estimate", {}).get("readers_diameter") or {}
    rows = []
    for n, s in specs.items():
        t = s["metrics"]["test"]
        readers = t.get("readers") or {}
        if "reader_qwk" in readers:
            vs = f"kappa {format_ci(readers, 'model_qwk')}; single reader {format_ci(readers, 'reader_qwk')}"
            figure = f"kappa {format_ci(t, 'qwk')}"
        else:
            vs = (f"AUROC {format_ci(readers, 'model_auroc')}; single reader {format_ci(readers, 'reader_auroc')}"
                  if readers.get("n_pairs") else "–")
            figure = (f"AUROC {format_ci(t, 'auroc')}; sensitivity {pct_ci(t, 'sensitivity')}, specificity "
                      f"{pct_ci(t, 'specificity')}")
        rows.append((n, t["n"], figure, vs, num(t.get("ece"))))
    first = next(iter(specs.values()))
    same = diam.get("n") == first["metrics"]["test"]["n"]
    text = (f"`{first.get('arch', '?')}` networks on the whole crop around the nodule at "
            f"{first.get('input_size', '?')} px: benign/malignant and the 1-5 score; the logits are averaged over "
            "the central half of the nodule's slices, and temperature and prior correction are fitted on "
            "validation. Test figures; the single reader on the leave-one-reader-out pairs:\n\n"
            + table(("model", "n", "test", "against a single reader (pairs)", "ECE"), rows)
            + (f"\nThe readers' diameter alone ranks benign/malignant at AUROC {format_ci(diam, 'auroc')} on the same "
               "test nodules." if same and diam else "")
            + " Calibration, single-slice figures and reliability bins are in the tables file.\n\n"
            + _slice_limits(specs, diam if same else {}, w.get("cam_localisation.json"))
            + "".join(f"![{n} confusion](figures/{n}-confusion.png) ![{n} reliability](figures/{n}-reliability.png)\n"
                      for n in specs))
    return Part(text, "\n".join(_network_tables(n, s) for n, s in specs.items()))


def _slice_limits(specs: dict[str, dict], diam: dict, cam: dict | None) -> str:
    items = []
    for n, s in specs.items():
        t = s["metrics"]["test"]
        readers = t.get("readers") or {}
        binary = "reader_qwk" not in readers and t.get("auroc") is not None
        if binary and diam.get("auroc") and t["auroc"] < diam["auroc"]:
            items.append(f"`{n}` ranks below the readers' diameter ({num(t['auroc'])} against {num(diam['auroc'])})")
        if "reader_qwk" in readers and readers["model_qwk"] < readers["reader_qwk"]:
            items.append(f"`{n}` agrees with the panel less than a single reader does")
    models = (cam or {}).get("models") or {}
    weak = [n for n in specs if n in models and models[n]["shifted"]["peak_inside"] < 0.5]
    if weak:
        items.append(f"the maps of {', '.join(f'`{n}`' for n in weak)} rarely peak on the nodule (see Maps)")
    return f"**Limits.** {sentence(items)}\n\n" if items else ""


def _network_tables(name: str, spec: dict) -> str:
    """A network's test figures in full: every headline figure, calibration against chance, reliability bins."""
    t = spec["metrics"]["test"]
    keys = [k for k in ("auroc", "auprc_weighted", "f1_weighted", "f1_macro", "accuracy", "f1_malignant",
                        "sensitivity", "specificity", "qwk", "within_one") if t.get(k) is not None]
    per_image = spec.get("task") == "histology"  # one image per case: no slices to choose from
    one = {} if per_image else (spec["metrics"].get("test_single_slice") or {})
    rows = [(FIGURE_WORDS[k], format_ci(t, k)) + ((format_ci(one, k),) if one else ()) for k in keys]
    rows.append(("top-class ECE raw -> calibrated", f"{num(t.get('ece_raw'))} -> {num(t.get('ece'))}")
                + ((num(one.get("ece")),) if one else ()))
    band_ = t.get("ece_if_calibrated") or {}
    text = (f"### {name}\n\n{t['n']} test {'images' if per_image else 'nodules'}; temperature "
            f"{num(spec.get('temperature'), 2)}.\n\n"
            + table(("figure", "test") + (("test, middle slice only",) if one else ()), rows))
    if band_:
        text += (f"\nA perfectly calibrated model would show a top-class ECE of {num(band_['median'])} (95th "
                 f"percentile {num(band_['p95'])}) on as many cases; {num(t.get('ece'))} is "
                 f"{'beyond' if t['ece'] > band_['p95'] else 'within'} that.\n")
    rel = t.get("reliability_malignant")
    if rel:
        text += ("\nReliability of the malignant probability:\n\n"
                 + table(("bin", "n", "mean probability", "observed malignant"),
                         [(f"{b['lo']:.1f}-{b['hi']:.1f}", b["n"], num(b["mean_p"]), num(b["observed"]))
                          for b in rel if b.get("n")]))
    elif t.get("reliability"):
        text += ("\nReliability of the top class:\n\n"
                 + table(("bin", "n", "confidence", "accuracy"),
                         [(f"{b['lo']:.1f}-{b['hi']:.1f}", b["n"], num(b["confidence"]), num(b["accuracy"]))
                          for b in t["reliability"] if b.get("n")]))
    return text


def finder(w: Weights) -> Part:
    """The nodule finder: patch presence and localisation, the scan over test crops and whole DICOM slices."""
    pres, loc = w.need("finder-presence.json"), w.need("finder-locate.json")
    t, lt = pres["metrics"]["test"], loc["metrics"]["test"]
    res = w.get("finder.json") or {}
    text = (f"Two small CNNs (`{pres.get('arch', '?')}`) on {pres.get('input_size', '?')} px patches: one says "
            "whether a nodule is at a point, one where its centre is and how wide it is. Trained from scratch on the "
            "training patients' slices (LIDC-IDRI-0001..0003 left out for the whole-slice check); negatives are "
            "mostly vessels seen end-on. Test patches:\n\n"
            + table(("figure", "n", "test"), [
                ("presence: accuracy", t["n"], format_ci(t, "accuracy")),
                ("presence: AUROC", t["n"], format_ci(t, "auroc")),
                ("centre error per coordinate (mm)", lt["n"], format_ci(lt, "centre_mae_mm", 2)),
                ("diameter error (mm)", lt["n"], format_ci(lt, "diameter_mae_mm", 2))]))
    if mining := res.get("mining"):
        text += (f"\nA round of hard-negative mining (fine-tuning the presence network on the scan's own false "
                 f"candidates on the training crops) was {'kept' if mining['adopted'] else 'tried and not kept'}: "
                 f"validation crop-scan top-1 {pct(mining['crop_scan_val_top1_mined'])} with it, "
                 f"{pct(mining['crop_scan_val_top1_base'])} without.\n")
    cs = res.get("crop_scan_test") or {}
    text += (f"\n**Scanning a test crop** ({cs['n']} nodules): the best-ranked candidate lies within 5 mm of the "
             f"readers' centre for {pct(cs['top1_within_5mm'])}, one of the top three for "
             f"{pct(cs['top3_within_5mm'])}; "
             f"{cs['false_candidates_score_ge_0_5_per_crop']:.1f} other candidates per crop score >= 0.5.\n"
             if cs.get("n") else f"\n**Scanning a test crop**: {NOT_MEASURED}.\n")
    ws = res.get("wholeslice") or {}
    text += wholeslice_text(ws) if ws.get("variants") else f"\n**Whole DICOM slices and series**: {NOT_MEASURED}.\n"
    text += ("\nOn single 2D slices vessels look like small nodules: expect several candidates per slice and check "
             "each. The finder proposes where to crop; it is not a validated detector.\n")
    tables = ""
    shipped = (ws.get("variants") or {}).get("series") or {}
    if shipped.get("nodules"):
        tables = ("**Whole DICOM series**, per reader-confirmed nodule (series ranker, leave-one-series-out):\n\n"
                  + table(("patient", "slice", "diameter mm", "readers", "best candidate: distance mm",
                           "rank of first within 5 mm"),
                          [(r["patient_id"], r["slice_index"], r["diameter_mm"], r["n_readers"], r["best_distance_mm"],
                            r.get("rank_within_5mm") or "–") for r in shipped["nodules"]]))
    return Part(text, tables)


def wholeslice_text(ws: dict) -> str:
    """The finder on whole DICOM slices and series: each ranker variant, leave-one-series-out, with its FROC."""
    names = ", ".join(x["patient_id"] for x in ws.get("series") or [])
    first = next(iter(ws["variants"].values()))
    rows = []
    for key, label in WHOLESLICE_VARIANTS.items():
        if v := ws["variants"].get(key):
            fr = v["froc_all_slices"]
            froc = " / ".join(pct(fr[k]) for k in ("0.5", "1", "2", "4"))
            every = v.get("outlined_slices_best_on_nodule")
            rows.append((label, pct(v["best_within_5mm"]), pct(v["top3_within_5mm"]),
                         pct(every) if every is not None else "-", f"{v['false_per_slice_all_slices']:.2f}", froc))
    secs = ws.get("seconds_per_slice") or {}
    return (f"\n**Whole 512 x 512 DICOM slices of series** (slabs of slices around their nodules; {names}: "
            f"{first['n_nodules']} nodules outlined by at "
            f"least two readers, {first['n_slices_all']} slices; candidates only inside the lung mask), "
            "leave-one-series-out: each series ranked by a model and threshold fitted on the others. Best / top 3: a "
            f"candidate within {ws.get('hit_mm', 5):g} mm of the readers' median centre. Every outlined slice: for "
            f"each confirmed nodule on each slice it is outlined on ({first.get('n_outlined_slices', '?')} in all), "
            "the slice's best candidate lies on it (a larger sample, end slices included; where a slice shows two "
            "confirmed nodules only one can be best). False per slice: over every slice. FROC: "
            "sensitivity at 0.5 / 1 / 2 / 4 false candidates per slice. Goal: best within 5 mm for 80%, at most 2 "
            "false per slice. Limits: one nodule is 14 points; the rankers' features and the series scan's "
            "settings were chosen on these four series, over four trainings of the finder (docs/training.md), so "
            "the shipped rows are somewhat optimistic; LIDC-IDRI-0006 was in the networks' validation split; "
            "candidates are marked at the centroid of the dense blob they lie on, a rule written after a miss on "
            "LIDC-IDRI-0002 with its threshold chosen on these series. The series you do not have are the real "
            "test.\n\n"
            + table(("ranking", "best within 5 mm", "top 3", "every outlined slice", "false per slice",
                     "FROC 0.5 / 1 / 2 / 4"), rows)
            + series_opening_text(ws.get("series_opening"))
            + (f"\nMedian seconds per slice (one CPU thread, lung mask included): one slice "
               f"{secs.get('slice', 0):.2f} s, within a series {secs.get('series', 0):.2f} s.\n" if secs else ""))


def series_opening_text(so: dict | None) -> str:
    """How a series opens: its first finding, and the false findings ranked above each confirmed nodule."""
    if not so:
        return ""
    late = [f"{s['patient_id']} ("
            + (f"{s['false_findings_before_a_confirmed_nodule']} false before the first confirmed nodule)"
               if s["false_findings_before_a_confirmed_nodule"] is not None else "no confirmed nodule found)")
            for s in so["series"] if not s["opens_on_a_confirmed_nodule"]]
    listed = (f" {so['nodules_listed']} of {so['n_nodules']} are among the {so['listed_findings']} findings the app "
              "lists." if "nodules_listed" in so else "")
    return (f"\nOpening a series (the series ranker, leave-one-series-out; each candidate followed over consecutive "
            f"slices and listed once, best first, as the app lists them): the first finding lies on a confirmed "
            f"nodule in {so['opens_on_a_confirmed_nodule']} of {so['n_series']} series"
            + (f"; not in {', '.join(late)}" if late else "")
            + f". {so['nodules_with_no_false_finding_before']} of {so['n_nodules']} confirmed nodules have no false "
            f"finding ranked above them, {so['nodules_with_at_most_2_false_findings_before']} at most two.{listed} "
            "These series are slabs of 17 to 46 slices around their nodules, not whole scans of 100 to 300 slices, "
            "and the way findings are ranked was chosen on them: a whole scan has more false findings to rank "
            "against. Small nodules rank behind false candidates more often over a series than on their own "
            "slice.\n")


def similar_cases(w: Weights) -> Part:
    """The similar-case index and its evaluation."""
    index = next((r for f in INDEX_FILES if (r := w.get(f))), None)
    if index is None:
        raise Missing(f"neither of {', '.join(f'`{f}`' for f in INDEX_FILES)} is installed")
    records = index.get("records") or []
    library = sum(r.get("split") == "train" for r in records)
    ev = w.get("retrieval.json") or {}
    figure = (f"For the {ev.get('n_test_queries', '?')} test nodules, {pct(ev['precision_at_5_test_vs_train'])} of "
              "the five nearest training nodules share the query's benign/malignant label (chance "
              f"{pct(ev.get('chance_precision_at_5'))})." if ev.get("precision_at_5_test_vs_train") is not None
              else f"Retrieval precision: {NOT_MEASURED}.")
    if ev.get("atlas"):
        figure += (f" A {ev.get('atlas_bytes', 0) / 1e6:.1f} MB thumbnail atlas (`{ev['atlas']}`, one {ATLAS_PX} px "
                   "picture of each case's nodule view) shows the cases where the data folder is absent. "
                   + ATTRIBUTION)
    return Part(f"{len(records)} nodules embedded with `{index.get('model', '?')}` (cosine similarity of L2-normalised "
                f"embeddings, FAISS); the library shown to users is the {library} training nodules. {figure} "
                "Similar-looking cases are for comparison, not evidence of the diagnosis.\n")


def histology(w: Weights) -> Part:
    """The histology teaching model: four classes on chest CT screenshots."""
    spec = w.need("histology.json")
    t = spec["metrics"]["test"]
    tr = spec.get("training") or {}
    dup = spec.get("removed_near_duplicates_of_train") or {}
    band_ = t.get("ece_if_calibrated") or {}
    beyond = band_ and t["ece"] > band_["p95"]
    text = (f"A teaching example: `{spec.get('arch', '?')}` at {spec.get('input_size', '?')} px classifies a chest CT "
            f"image as {', '.join(c.replace('.', ' ') for c in spec['classes'])}. Trained on {tr.get('n_train', '?')} "
            "screenshots of mixed provenance (not HU) with the set's own split; "
            + (f"near copies of training images were removed from validation ({dup.get('val', 0)}) and test "
               f"({dup.get('test', 0)}). " if dup else "")
            + f"On {t['n']} test images: accuracy {format_ci(t, 'accuracy')}, macro F1 {format_ci(t, 'f1_macro')}, "
            f"AUROC {format_ci(t, 'auroc')}; top-class ECE {num(t['ece'])}"
            + (f", beyond what chance gives a calibrated model ({num(band_['p95'])}): read its probabilities as "
               "rough" if beyond else "") + ". Per class in the tables file. Not for clinical use.\n\n"
            "![histology confusion](figures/histology-confusion.png) "
            "![histology reliability](figures/histology-reliability.png)\n")
    cm = np.array(t["confusion"], dtype=float)
    recall = np.diag(cm) / np.maximum(cm.sum(1), 1)
    precision = np.diag(cm) / np.maximum(cm.sum(0), 1)
    f1 = np.where(recall + precision > 0, 2 * recall * precision / np.maximum(recall + precision, 1e-12), 0.0)
    per_class = ("**Per class** (test, from the confusion matrix):\n\n"
                 + table(("class", "images", "recall", "precision", "F1"),
                         [(c, int(cm[i].sum()), num(recall[i], 2), num(precision[i], 2), num(f1[i], 2))
                          for i, c in enumerate(spec["classes"])]))
    return Part(text, per_class + "\n" + _network_tables("histology", spec))


def known_limits(w: Weights) -> Part:
    """What none of the figures above cover."""
    items = ["- The labels are the LIDC readers' ratings, not biopsy; score 3 (indeterminate) is the largest class "
             "and counts as benign.",
             "- One public dataset (LIDC-IDRI, scanners of the 2000s), 2D slices, no external validation; calibration "
             "was fitted on this data's validation split and will drift elsewhere.",
             "- The histology model is a teaching example on screenshots, not HU images."]
    cam = (w.get("cam_localisation.json") or {}).get("models") or {}
    weak = [f"`{n}`" for n in MAP_MODELS if n in cam and cam[n]["shifted"]["peak_inside"] < 0.5]
    if weak:
        items.insert(2, f"- The maps of {', '.join(weak)} show the region the network used, not the nodule.")
    index = next((r for f in INDEX_FILES if (r := w.get(f))), None) or {}
    test = [r for r in index.get("records") or [] if r.get("split") == "test"]
    if test:
        malignant = sum(int(r.get("malignant") or 0) for r in test)
        items.insert(2, f"- The test split holds {len(test)} nodules ({malignant} malignant) of "
                        f"{len({r.get('patient_id') for r in test})} patients: intervals are wide, and a difference "
                        "inside them is not shown.")
    return Part("\n".join(items) + "\n")


#: The card's sections in order: heading and the function that writes it.
SECTIONS: tuple[tuple[str, Callable[[Weights], Part]], ...] = (
    ("Intended use", intended_use),
    ("Data, labels and split", data_and_split),
    ("Nodule model", nodule_model),
    ("Maps: does the map point at the nodule?", maps),
    ("Slice view", slice_view),
    ("Nodule finder", finder),
    ("Similar cases", similar_cases),
    ("Histology teaching model", histology),
    ("Known limits", known_limits),
)


# ------------------------------------------------------------------------------------------------ the documents


def render(folder: Path) -> dict[str, str]:
    """The card and its tables file as text, ``{file name: text}``, from the records in ``folder``."""
    w = Weights(Path(folder))
    card = ["# lungviz model card\n",
            f"> **{RESEARCH_NOTICE}** Figures were measured on held-out test patients of public research data "
            "(LIDC-IDRI); they do not describe performance on your patients, scanners or protocols.\n"]
    tables = ["# lungviz model card: long tables\n",
              f"Generated with [the model card]({CARD_FILE}) by `python -m training card`; test split, 95% "
              "patient-bootstrap intervals.\n"]
    for title, fn in SECTIONS:
        try:
            part = fn(w)
        except (Missing, KeyError, TypeError, IndexError) as err:
            why = str(err) if isinstance(err, Missing) else f"the record lacks {err}"
            part = Part(f"{NOT_MEASURED.capitalize()}: {why}.\n")
        card += [f"## {title}\n", part.card]
        if part.tables:
            tables += [f"## {title}\n", part.tables]
    return {CARD_FILE: "\n".join(card), TABLES_FILE: "\n".join(tables)}


def figures(name: str, spec: dict, out: Path) -> None:
    """Test confusion matrix and reliability diagram of one network as small PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test, classes = spec["metrics"]["test"], spec["classes"]
    out.mkdir(parents=True, exist_ok=True)
    cm = np.array(test["confusion"])
    fig, ax = plt.subplots(figsize=(3.2 + 0.3 * len(classes), 3.0 + 0.3 * len(classes)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black", fontsize=9)
    short = [c[:10] for c in classes]
    ax.set_xticks(range(len(classes)), short, rotation=45 if len(classes) > 3 else 0, fontsize=8)
    ax.set_yticks(range(len(classes)), short, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(f"{name}: test confusion", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{name}-confusion.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(3.6, 3.4), dpi=100)
    rel = test.get("reliability_malignant")
    if rel:
        pts = [(b["mean_p"], b["observed"], b["n"]) for b in rel if b["n"]]
        ax.set_xlabel("predicted malignant probability")
        ax.set_ylabel("observed malignant rate")
    else:
        pts = [(b["confidence"], b["accuracy"], b["n"]) for b in test["reliability"] if b["n"]]
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
    xs, ys, ns = (list(v) for v in zip(*pts, strict=True)) if pts else ([], [], [])
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.scatter(xs, ys, s=[10 + 2 * n for n in ns], color="tab:red", alpha=0.7, zorder=3)
    ax.plot(xs, ys, color="tab:red", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{name}: reliability (test)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{name}-reliability.png")
    plt.close(fig)



def write_card(folder: Path | None = None) -> Path:
    """Regenerate the card, its tables file and its figures in ``folder`` (default ``weights/``); the card's path."""
    folder = Path(folder or paths.weights_dir())
    for name, text in render(folder).items():
        (folder / name).write_text(text, encoding="utf-8")
    for name in FIGURE_MODELS:
        spec = Weights(folder).get(f"{name}.json")
        if spec and (spec.get("metrics") or {}).get("test", {}).get("confusion"):
            figures(name, spec, folder / "figures")
    return folder / CARD_FILE


def check_card(folder: Path | None = None, max_lines: int = 40) -> list[str]:
    """The card and tables file regenerated in memory against the files in ``folder``: a short unified diff per
    file that differs, empty when both are up to date."""
    folder = Path(folder or paths.weights_dir())
    out: list[str] = []
    for name, text in render(folder).items():
        path = folder / name
        shipped = path.read_text(encoding="utf-8") if path.is_file() else ""
        if shipped != text:
            diff = list(difflib.unified_diff(shipped.splitlines(), text.splitlines(), f"{name} (shipped)",
                                             f"{name} (regenerated)", n=0, lineterm=""))
            out += diff[:max_lines] + ([f"... {len(diff) - max_lines} more diff lines"] if len(diff) > max_lines
                                       else [])
    return out
