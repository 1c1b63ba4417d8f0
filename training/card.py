"""Write the model card (weights/README.md) and its figures from the shipped specs and experiment files.

Every number in the card is read from a file that a training command wrote; nothing is typed in by hand
except the published reference figures, which are labelled as such.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from lungviz import RESEARCH_NOTICE, metrics, paths
from lungviz.calibration import PRIOR_AFTER_T, Calibration
from lungviz.fusion import SIZE_FEATURE, SIZE_SOURCES
from lungviz.inventory import diameter_sentence, read_result
from lungviz.library import MAX_LIDC_READERS
from lungviz.metrics import (
    MALIGNANT_ECE_LIMIT,
    MISCALIBRATION_WORDS,
    format_ci,
    miscalibration_direction,
    with_malignant_ece,
)
from lungviz.shape import (
    GREY_FEATURES,
    MIN_SHAPE_PX,
    OUTLINE_FEATURE_LABELS,
    RING_PX,
    SHAPE_FEATURES,
    feature_groups_text,
)

#: Reference figures of the published full-slice / nodule-crop study (their own split, not ours).
PUBLISHED = {
    "nodule-binary": {"f1_weighted": 0.81, "auprc_weighted": 0.88},
    "slice-binary": {"f1_weighted": 0.70, "auprc_weighted": 0.81},
    "nodule-score": {"f1_weighted": 0.45, "auprc_weighted": 0.55},
    "slice-score": {"f1_weighted": 0.39, "auprc_weighted": 0.41},
}
ORDER = ("nodule-binary", "slice-binary", "fused-binary", "nodule-score", "slice-score", "fused-score", "histology")


def _budget(setup: dict) -> str:
    """One line on the training budget of a screen or CV run, which may be shorter than the shipped models'."""
    size = f" at {setup['input_size']} px" if setup.get("input_size") else ""
    field = f", {setup['field_mm']:g} mm nodule field" if setup.get("field_mm") else ""
    return (f"Budget per run{size}{field}: {setup.get('epochs')} epochs of {setup.get('epoch_samples')} samples, "
            "unfreezing at "
            f"epochs {', '.join(str(e) for e in setup.get('stages', []))} (the shipped models' own budgets are under "
            "'Per model').")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def figures(name: str, spec: dict, out: Path) -> dict[str, str]:
    """Confusion matrix and reliability diagram (test split) as small PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = spec["metrics"]["test"]
    classes = spec["classes"]
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
    ax.set_ylabel("truth (panel)")
    ax.set_title(f"{name}: test confusion", fontsize=9)
    fig.tight_layout()
    cm_path = out / f"{name}-confusion.png"
    fig.savefig(cm_path)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(3.6, 3.4), dpi=100)
    rel = test.get("reliability_malignant")
    if rel:
        xs = [b["mean_p"] for b in rel if b["n"]]
        ys = [b["observed"] for b in rel if b["n"]]
        ns = [b["n"] for b in rel if b["n"]]
        ax.set_xlabel("predicted malignant probability")
        ax.set_ylabel("observed malignant rate")
    else:
        rel = test["reliability"]
        xs = [b["confidence"] for b in rel if b["n"]]
        ys = [b["accuracy"] for b in rel if b["n"]]
        ns = [b["n"] for b in rel if b["n"]]
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.scatter(xs, ys, s=[10 + 2 * n for n in ns], color="tab:red", alpha=0.7, zorder=3)
    ax.plot(xs, ys, color="tab:red", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    curve = (f"ECE of this curve {with_malignant_ece(test)['ece_malignant']:.3f}, top-class {test['ece']:.3f}"
             if test.get("reliability_malignant") else f"ECE {test['ece']:.3f}")
    ax.set_title(f"{name}: reliability (test)\n{curve}", fontsize=9)  # two lines: one is wider than the plot
    fig.tight_layout()
    rel_path = out / f"{name}-reliability.png"
    fig.savefig(rel_path)
    plt.close(fig)
    return {"confusion": f"figures/{cm_path.name}", "reliability": f"figures/{rel_path.name}"}


def diameter_baseline(folder: Path, split_name: str = "test") -> dict | None:
    """AUROC of the readers' mean diameter alone for benign vs malignant on one split (with patient bootstrap);
    None when the split file or the data is not there."""
    from lungviz.errors import LungvizError
    from lungviz.splits import Split
    from training.datasets import load_cases

    split_file = folder / "splits" / "holdout.json"
    if not split_file.is_file():
        return None
    try:
        cases, _ = load_cases("lidc")
    except LungvizError:
        return None
    split = Split.load(split_file)
    sel = [c for c in split.select(cases, split_name) if c.malignant is not None and c.diameter_mm is not None]
    return metrics.score_auroc(np.array([c.malignant for c in sel]), np.array([c.diameter_mm for c in sel]),
                               [c.patient_id for c in sel], 1000)


def fused_test_auroc(specs: dict) -> float | None:
    """The shipped fused-binary model's test AUROC (None without it)."""
    return specs.get("fused-binary", {}).get("metrics", {}).get("test", {}).get("auroc")


def members_text(component: str, members: list[str], folder: Path | None, key: str = "auroc") -> str:
    """What a fused view's mean-logit ensemble is made of: each network's recipe and validation figure ``key``
    (the figure each was selected on: auroc for binary, qwk for score)."""
    nets = [component, *members]
    label = "AUROC" if key == "auroc" else "kappa"
    rows = []
    for n in nets:
        spec = read_result(f"{n}.json", folder)
        if spec is None:
            rows.append(f"| {n} | not installed | – | – | – |")
            continue
        tr, val = spec.get("training", {}), (spec.get("metrics") or {}).get("val", {})
        extra = [f"weight averaging (EMA {tr['ema']})" if tr.get("ema") else "",
                 f"the readers' own scores as soft labels (weight {tr['soft_labels']:g})" if tr.get("soft_labels")
                 else ""]
        field_mm = (spec.get("preprocessing") or {}).get("field_mm")
        rows.append(f"| {n} | {spec.get('input_size', '?')} px, {f'{field_mm:g} mm' if field_mm else '–'}"
                    f" | {tr.get('epochs', '?')} epochs of {tr.get('epoch_samples', '?')} samples"
                    f"{''.join(', ' + e for e in extra if e)} | {tr.get('device', '?')}, "
                    f"{(tr.get('train_seconds') or 0) / 60:.0f} min, seed {tr.get('seed', '?')}"
                    f" | {_fmt(val.get(key))} |")
    return (f"Its `{component.split('-')[0]}` view is the mean of the calibrated logits of {len(nets)} networks "
            "(equal weights), each with its own input size and calibration:\n\n"
            f"| network | input, nodule field | training | trained on | val {label} |\n"
            "| --- | --- | --- | --- | --- |\n"
            + "\n".join(rows) + "\n")


def inputs_text(fusion_spec: dict) -> str:
    """What a fusion adds to the views, in words: "size", or e.g. "size and the outline's shape and grey levels"."""
    what = feature_groups_text((fusion_spec.get("fusion") or {}).get("features") or [])
    return "size" + (f" and the outline's {what}" if what else "")


def size_only_text(specs: dict) -> str | None:
    """The card's paragraph on the image-measured size alone beside fused-binary (None when not measured)."""
    size = specs.get("fused-binary", {}).get("size_only_auroc", {})
    t, fused = size.get("test"), fused_test_auroc(specs)
    if not t:
        return None
    val_size = _fmt(size.get("val", {}).get("auroc"))
    source = (specs["fused-binary"].get("fusion") or {}).get("size_source", "finder")
    text = (f"**Image-measured size alone** (the diameter measured by {SIZE_SOURCES.get(source, source)}, the size "
            f"input of `fused-binary`, with no malignancy CNN): test AUROC {format_ci(t, 'auroc')} on {t['n']} "
            f"nodules, validation {val_size}; "
            f"`fused-binary` (views + {inputs_text(specs['fused-binary'])}) scores {_fmt(fused)} on test.")
    if fused is not None and fused < t["auroc"]:
        val_fused = _fmt(specs["fused-binary"].get("training", {}).get("val_score"))
        text += (" **On the test split the two image views do not add to the measured size.** The fusion was chosen "
                 f"on validation, where views + {inputs_text(specs['fused-binary'])} scored {val_fused} against "
                 f"{val_size} for the size alone.")
    agreement = diameter_sentence(specs["fused-binary"].get("size_vs_readers_test"))
    return f"{text} {agreement}" if agreement else text


def finder_section(w, folder: Path) -> None:
    """The nodule finder: patch-level presence and localisation on the test split, then the whole scan."""
    pres, loc = read_result("finder-presence.json", folder), read_result("finder-locate.json", folder)
    res = read_result("finder.json", folder)
    if not pres or not loc:
        return
    t, lt = pres["metrics"]["test"], loc["metrics"]["test"]
    pre = pres["preprocessing"]
    fields = pre.get("channel_fields_mm") or [pre["field_mm"]]
    tr = pres.get("training", {})
    base = tr.get("base_training") or {}
    mined = (f" Then one round of hard-negative mining: the scan's {tr['mined_false_candidates']:,} false candidates "
             f"on the training crops became {tr.get('mined_share', 0):.0%} of the negatives while the presence model "
             f"was fine-tuned for {tr.get('train_seconds', 0) / 60:.1f} min." if base else "")
    w("## Nodule finder (presence classifier and localiser)\n")
    field_text = (f"a {fields[0]:g} mm field" if len(fields) == 1
                  else f"{', '.join(f'{f:g}' for f in fields)} mm fields as channels")
    ltr = loc.get("training", {})
    w(f"Two `{pres['arch']}` models on {pres['input_size']} px patches ({field_text}), cut from slices min-max "
      "scaled over the 128 native pixels around the point as the "
      "slices set stores them. Positives are centred (within "
      f"{tr.get('pos_jitter_mm', 2):g} mm) on the centroid of the readers' 50% consensus; negatives at least "
      f"{tr.get('neg_margin_mm', 5):g} mm outside the outline, {tr.get('hard_negatives', 0):.0%} of them at the "
      "scan's own candidate points (mostly vessels seen end-on). The localiser sees the nodule up to "
      f"{tr.get('loc_offset_mm', 10):g} mm off centre. Patient-level split as above; LIDC-IDRI-0001..0003 are "
      "left out of training (their DICOM series are the whole-slice test). Trained from scratch on "
      f"{tr.get('device', '?')}: presence {(base or tr).get('train_seconds', 0) / 60:.1f} min "
      f"({(base or tr).get('images_per_second', 0):.0f} patches/s), localiser "
      f"{ltr.get('train_seconds', 0) / 60:.1f} min ({ltr.get('images_per_second', 0):.0f} patches/s).{mined}\n")
    w("| test split (patches) | n | result |")
    w("| --- | --- | --- |")
    w(f"| presence: accuracy / nodule F1 / AUROC | {t['n']} | {format_ci(t, 'accuracy')} / "
      f"{format_ci(t, 'f1_nodule')} / {format_ci(t, 'auroc')} (published 2D LUNA16 patches: 0.90 / 0.91 / –) |")
    w(f"| localiser: centre MAE per coordinate | {lt['n']} | {format_ci(lt, 'centre_mae_px', 2)} px = "
      f"{format_ci(lt, 'centre_mae_mm', 2)} mm (published: 2.5 px) |")
    w(f"| localiser: diameter MAE | {lt['n']} | {format_ci(lt, 'diameter_mae_px', 2)} px = "
      f"{format_ci(lt, 'diameter_mae_mm', 2)} mm (published: 2.4 px) |")
    w("")
    if res:
        cs = res.get("crop_scan_test")
        if cs and cs.get("n"):
            w(f"**Whole scan on test crops** ({cs['n']} nodules, the 128 px slices-set crop through each "
              f"nodule's largest outline): best-ranked candidate within 5 mm of the readers' centre "
              f"{cs['top1_within_5mm']:.1%}, within the top 3 {cs['top3_within_5mm']:.1%}; other candidates "
              f"scored >= 0.5: {cs['false_candidates_score_ge_0_5_per_crop']:.1f} per crop; "
              f"{cs['seconds_per_crop'] * 1000:.0f} ms per crop.\n")
        ws = res.get("wholeslice")
        if ws and ws.get("variants"):
            wholeslice_table(w, ws)
    w("On a single slice vessels seen end-on look like small nodules, so expect several candidates per slice and "
      "check each one. The finder proposes where to crop; it is not a detector validated for screening.\n")


#: The whole-slice ranker variants, in the card's order, and how the card names them.
WHOLESLICE_VARIANTS = {
    "network": "presence network alone (one slice)",
    "slice": "slice ranker: network + density + 2D Hessian (one slice)",
    "hessian3d_only": "3D Hessian blob/vessel + density, no network (series)",
    "series_all_points": "series ranker on every candidate point (slower)",
    "series": "series ranker as shipped: network + 2D + 3D Hessian (series)",
}


def wholeslice_table(w: Callable[[str], None], ws: dict) -> None:
    """The finder on whole DICOM slices and series: each ranker variant, leave-one-series-out, with its FROC."""
    names = ", ".join(s["patient_id"] for s in ws["series"])
    n = next(iter(ws["variants"].values()))["n_nodules"]
    n_all = next(iter(ws["variants"].values()))["n_slices_all"]
    w(f"**Whole 512 x 512 DICOM slices and series** ({names}: {n} nodules outlined by at least two readers, "
      f"{n_all} slices; candidates only inside the lung mask). Leave-one-series-out: each series is ranked by a "
      "model and a threshold fitted on the other series only. Best / top 3: a candidate within "
      f"{ws['hit_mm']:g} mm of the readers' median centre on the nodule's central slice. False candidates: above "
      f"the threshold (fitted for {ws['target_false_per_slice']:g} per slice) and not on any outlined nodule, "
      "per slice over every slice of the series. FROC: sensitivity at 0.5 / 1 / 2 / 4 false candidates per "
      "slice, over every slice. 'Best on a confirmed nodule' also counts a best candidate on the nodule but more "
      "than 5 mm from its centre (a large nodule) or on the other confirmed nodule of the same slice. Seven nodules "
      "make each figure coarse (one nodule = 14 points); LIDC-IDRI-0006 was in the networks' validation split.\n")
    w("| ranking | best within 5 mm | top 3 | best on a confirmed nodule | false per slice | FROC 0.5 / 1 / 2 / 4 |")
    w("| --- | --- | --- | --- | --- | --- |")
    for key, label in WHOLESLICE_VARIANTS.items():
        v = ws["variants"].get(key)
        if not v:
            continue
        fr = v["froc_all_slices"]
        w(f"| {label} | {v['best_within_5mm']:.0%} | {v['top3_within_5mm']:.0%} | "
          f"{v.get('best_on_a_confirmed_nodule', float('nan')):.0%} | {v['false_per_slice_all_slices']:.2f} | "
          f"{' / '.join(f'{fr[k]:.0%}' for k in ('0.5', '1', '2', '4'))} |")
    secs = ws.get("seconds_per_slice", {})
    if secs:
        w(f"\nMedian seconds per slice (one CPU thread, lung mask included): one slice "
          f"{secs.get('slice', 0):.2f} s, in a series {secs.get('series', 0):.2f} s.\n")


def tta_section(w: Callable[[str], None], folder: Path) -> None:
    """Test-time augmentation, checked on each shipped network: the comparison `python -m training tta` wrote."""
    res = read_result("tta.json", folder)
    if not res:
        return

    def ci(d: list | None) -> str:
        return f"[{d[0]:+.3f}, {d[1]:+.3f}]" if d else "–"

    w("## Test-time augmentation (validation decides)\n")
    adopted = ", ".join(f"{family}: {'adopted' if yes else 'not adopted'}" for family, yes in res["adopted"].items())
    w(f"Transforms: {res['transforms']}; each network keeps its own calibration. A task family adopts it only if "
      f"every one of its networks rises on validation ({res['selection']}); test is reported, never used to decide. "
      f"Decision: {adopted}.\n")
    w("| model | figure | val: without → with | val: difference, 95% interval | test: without → with | "
      "test: difference, 95% interval | test ECE: without → with |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for r in res["results"]:
        v, t = r["val"], r["test"]
        w(f"| {r['model']} | {r['selection']} | {v['plain']:.3f} → {v['tta']:.3f} | {ci(v['difference_ci95'])} | "
          f"{t['plain']:.3f} → {t['tta']:.3f} | {ci(t['difference_ci95'])} | {t['ece_plain']:.3f} → "
          f"{t['ece_tta']:.3f} |")
    w("")
    if note := earlier_calibration(res, "The ECE columns"):
        w(note)
    w("The ECE columns keep the shipped temperature, fitted without TTA; a network that adopted TTA would have it "
      "refitted on validation. Where validation and test move in opposite directions, the split of about 330 "
      "nodules cannot tell the two apart.\n")


def class_bias_section(w: Callable[[str], None], folder: Path) -> None:
    """A per-class bias on top of each network's temperature: the check `python -m training class-bias` wrote."""
    res = read_result("class_bias.json", folder)
    if not res:
        return
    w("## Per-class calibration (validation decides)\n")
    w("Each network's calibration fits one number, the temperature. A per-class bias `c`, fitted with it on "
      "validation by likelihood (probabilities `softmax(z / T + b + c)`; the call unchanged), could correct a class "
      f"the network over- or under-predicts. A network adopts it only on validation ({res['selection']}); test is "
      f"read after, never used to decide. Adopted: {', '.join(res['adopted']) or 'none'}.\n")
    w("| model | val cases | val out-of-fold NLL: temperature → with bias | draws with lower NLL | val out-of-fold "
      "ECE | test NLL | test ECE |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for r in res["results"]:
        t, b = r["temperature"], r["temperature_bias"]
        w(f"| {r['model']} | {r['n_val']} | {t['val_oof_nll']:.3f} → {b['val_oof_nll']:.3f} | "
          f"{r['draws_lower_nll']} of {r['draws']} | {t['val_oof_ece']:.3f} → {b['val_oof_ece']:.3f} | "
          f"{t['test_nll']:.3f} → {b['test_nll']:.3f} | {t['test_ece']:.3f} → {b['test_ece']:.3f} |")
    w("")
    if note := earlier_calibration(res, "The temperature columns"):
        w(note)
    kept = [r for r in res["results"] if not r["adopt"]]
    better_on_test = [r for r in kept if r["temperature_bias"]["test_nll"] < r["temperature"]["test_nll"]
                      and r["temperature_bias"]["test_ece"] < r["temperature"]["test_ece"]]
    if better_on_test:
        moved = ", ".join(f"{r['model']} ({r['temperature']['test_ece']:.3f} → {r['temperature_bias']['test_ece']:.3f})"
                          for r in better_on_test)
        w(f"On test the bias would have lowered both the NLL and the ECE of {moved}, which validation did not "
          "support; a calibration chosen on test would make its test figures no longer a held-out measurement, so "
          "the shipped calibration stays. With a few hundred validation cases (histology: "
          f"{next((r['n_val'] for r in res['results'] if r['model'] == 'histology'), '–')} images) the extra "
          "parameters cost more out of fold than they gain; a larger calibration set would be needed to tell.\n")


def ordinal_calls_section(w: Callable[[str], None], folder: Path) -> None:
    """The expected-score call for the score models: the check `python -m training ordinal-calls` wrote."""
    res = read_result("ordinal_calls.json", folder)
    if not res:
        return
    w("## Which score a score model calls (validation decides)\n")
    w("A score model calls one panel score (a network the class of its prior-corrected logits, a fused model its most "
      "likely score: see 'Probabilities and calls'). The call that minimises the expected squared distance from the "
      "panel's score under the calibrated probabilities is the score nearest the expected score. Quadratic kappa, "
      "what the score models are chosen on, weighs a disagreement by its squared distance but divides by the "
      "disagreement expected by chance from the spread of the calls, so that call need not raise it. A model adopts "
      "that call only on validation "
      f"({res['selection']}); test is read after and may veto, never adopt (a paired test kappa difference below "
      f"zero with 95% confidence). The rule was written down before the check first ran. Adopted: "
      f"{', '.join(res['adopted']) or 'none'}.\n")
    w("| model | val: out-of-fold kappa, shipped call → expected | draws higher | val: weighted F1 | val: exact "
      "agreement | test: kappa | test: difference [95% CI] | test: weighted F1 | test: exact agreement | test: calls "
      "changed |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def pair(fig: dict, key: str) -> str:
        return f"{fig['shipped'][key]:.3f} → {fig['expected'][key]:.3f}"

    for r in res["results"]:
        v, t = r["val_oof"], r["test"]
        lo, hi = r["test_kappa_difference_ci95"]
        veto = " (vetoed on test)" if r.get("vetoed_on_test") else ""
        w(f"| {r['model']}{veto} | {pair(v, 'kappa')} | {r['draws_higher_kappa']} of {r['draws']} | "
          f"{pair(v, 'f1_weighted')} | {pair(v, 'exact')} | {pair(t, 'kappa')} | "
          f"{r['test_kappa_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {pair(t, 'f1_weighted')} | {pair(t, 'exact')} | "
          f"{r['test_calls_changed']:.0%} |")
    w("")
    lower = [r["model"] for r in res["results"] if r["test_kappa_difference_ci95"][1] < 0]
    w("The networks' seed or recipe was chosen on the validation kappa of their shipped call, which does not depend on "
      "the temperature, so that call's out-of-fold figure is the figure they were chosen on: validation favours the "
      "shipped call here."
      + (f" On test, read after, the expected-score call's kappa was lower with 95% confidence for "
         f"{', '.join(lower)}." if lower else "") + "\n")


def class_bias_clause(models: list[str], folder: Path) -> str:
    """For the known limits: which of ``models`` the per-class bias check covered and rejected ("" for none)."""
    res = read_result("class_bias.json", folder) or {}
    checked = [r["model"] for r in res.get("results", []) if r["model"] in models and not r["adopt"]]
    if not checked:
        return ""
    return (f"; for {', '.join(checked)} a per-class bias on top of the temperature was checked and validation did "
            "not support it (see 'Per-class calibration')")


#: The fused model the operating points compare with the readers' diameter (the app's main estimate; fixed in
#: advance, not picked on test).
MAIN_BINARY = "fused-binary"
RULE_TEXT = {"point": "reached on validation", "lower-bound": "95% lower bound on validation"}


def operating_points_section(w: Callable[[str], None], folder: Path) -> None:
    """High-sensitivity thresholds of the binary models, chosen on validation and read on test: the record
    `python -m training operating-points` wrote."""
    res = read_result("operating_points.json", folder)
    if not res:
        return

    def fig(p: dict, key: str) -> str:
        lo, hi = p["test_ci95"].get(key, (float("nan"), float("nan")))
        return f"{p['test'][key]:.2f} [{lo:.2f}, {hi:.2f}]"

    rows = {r["model"]: r for r in res["results"]}
    w("## High-sensitivity operating points (threshold chosen on validation)\n")
    w("Where a missed cancer costs more than a false alarm, a binary model would be read at a lower threshold than "
      f"its call. Per target sensitivity, two rules pick the threshold on validation ({res['selection']}): the "
      "highest threshold whose validation sensitivity reaches the target (*reached*), and the highest whose 95% "
      "Wilson lower bound of validation sensitivity does (*lower bound*, which should hold on new cases). The "
      "readers' mean diameter, thresholded the same way, is the baseline.\n")
    w("| model | target sensitivity | rule | threshold | val sensitivity | test sensitivity | test specificity | "
      "test PPV | test NPV | test share called malignant |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["results"]:
        for p in r["points"]:
            t = f"{p['threshold']:.1f} mm" if r["score"] == "mm" else f"{p['threshold']:.1%}"
            rule = RULE_TEXT.get(p.get("rule", "point"), p.get("rule")) + ("" if p.get("reachable", True) else
                                                                         " (not reachable)")
            w(f"| {r['model']} | {p['target_sensitivity']:.0%} | {rule} | {t} | {p['val']['sensitivity']:.0%} | "
              f"{fig(p, 'sensitivity')} | {fig(p, 'specificity')} | {p['test']['ppv']:.2f} | "
              f"{p['test']['npv']:.2f} | {p['test']['called_positive']:.0%} |")
    w("")
    for rule, text in RULE_TEXT.items():
        points = [(r, p) for r in res["results"] for p in r["points"] if p.get("rule", "point") == rule]
        if not points:
            continue
        gaps = [p["test"]["sensitivity"] - p["target_sensitivity"] for _, p in points]
        short = sum(g < 0 for g in gaps)
        w(f"- *{text.capitalize()}*: test sensitivity below the target in {short} of {len(points)} rows (test "
          f"minus target: {min(gaps) * 100:+.0f} to {max(gaps) * 100:+.0f} percentage points).")
    w("")
    w("The *reached* rule puts the threshold at the validation malignant nodule that just reaches the target, the "
      "most optimistic choice; with "
      f"{next(iter(rows.values()))['n_val_positive']} malignant validation nodules its sensitivity is not expected "
      "to hold on new cases. "
      "Where even calling every validation malignant nodule leaves the lower bound short of the target, the *lower "
      "bound* row says so and its threshold is the lowest-scored validation malignant nodule. Read these thresholds "
      "as a sketch of the trade-off, not as validated working points.\n")
    main, base = rows.get(MAIN_BINARY), next((r for r in res["results"] if r["score"] == "mm"), None)
    if main and base:
        verdicts = []
        for m, b in zip(main["points"], base["points"], strict=True):
            ms, bs = m["test"], b["test"]
            sens, spec = ([round(x[key], 2) for x in (ms, bs)] for key in ("sensitivity", "specificity"))
            better = ("level" if sens[0] == sens[1] and spec[0] == spec[1]
                      else "the readers' diameter at least as good on both" if sens[1] >= sens[0]
                      and spec[1] >= spec[0] else f"{MAIN_BINARY} at least as good on both"
                      if sens[0] >= sens[1] and spec[0] >= spec[1] else "neither better on both")
            verdicts.append(f"{m['target_sensitivity']:.0%}, {RULE_TEXT.get(m.get('rule', 'point'))}: "
                            f"{MAIN_BINARY} {ms['sensitivity']:.2f} / {ms['specificity']:.2f}, the diameter "
                            f"{bs['sensitivity']:.2f} / {bs['specificity']:.2f} ({better})")
        w(f"**{MAIN_BINARY} against the readers' diameter** (test sensitivity / specificity): "
          + "; ".join(verdicts) + ".\n")
    prevalence = sorted({round(r["test_positive_share"], 2) for r in res["results"]})
    w(f"PPV and NPV hold at this test set's malignant share ({', '.join(f'{v:.0%}' for v in prevalence)}); where "
      "malignancy is rarer or commoner they move with it.\n")


def outliner_section(w: Callable[[str], None], folder: Path) -> None:
    """The nodule outliner: overlap with the readers' outline, its diameter against theirs, size alone as a test."""
    spec = read_result("outliner.json", folder)
    if not spec:
        return
    pre, tr, m = spec["preprocessing"], spec.get("training", {}), spec["metrics"]
    w("## Nodule outliner (segmentation and measured size)\n")
    w(f"`{spec['arch']}`: the ImageNet-pretrained `{spec['arch'].split('+')[0]}` up to stride 16 with a "
      "feature-pyramid decoder, on the central "
      f"{pre['field_mm']:g} mm of each slice at {spec['input_size']} px. It learns the {pre.get('target', 'union')} "
      "of the readers' outlines (inside any reader's outline) on every outlined slice of the training nodules, with "
      "the classifiers' augmentation; validation Dice chose the epoch. The outline is the region above "
      f"{pre.get('threshold', 0.5):g} nearest the centre; its size is the diameter of the circle of the same area, "
      "averaged over the central half of the slices as the classifiers' logits are. Trained on "
      f"{tr.get('device', '?')} for {tr.get('train_seconds', 0) / 60:.1f} min "
      f"({tr.get('images_per_second', 0):.0f} images/s; best epoch {tr.get('best_epoch', '?')} of "
      f"{tr.get('epochs', '?')}).\n")
    w("| split | n | Dice with the readers' outline | measured / readers' diameter (median) | "
      "measured size alone: AUROC malignant |")
    w("| --- | --- | --- | --- | --- |")
    for name, label in (("val", "validation"), ("test", "test"), ("test_single_slice", "test, middle slice")):
        r = m.get(name)
        if r:
            size = r.get("size_auroc") or {}
            w(f"| {label} | {r['n']} | {format_ci(r, 'dice')} | {r['ratio_to_readers_median']:.0%} | "
              f"{format_ci(size, 'auroc') if size else '–'} |")
    w("")
    w("The readers' diameter is the longest axis on their largest slice; the outliner's is a same-area circle on "
      "the central slices, so the two differ by construction for elongated or irregular nodules. The outline is "
      "shown in the app so that a reader can see what was measured, with its long and short axis on that slice; it "
      "is a research measurement, not a volumetry tool.\n")
    sizes_section(w, folder)
    outline_features_section(w, folder)
    score_inputs_section(w, folder)


def nodule_model_section(w: Callable[[str], None], folder: Path) -> None:
    """The nodule model: outline, size, the readers' characteristics and the estimate by its factors, each beside
    the readers (single reader, diameter) on the same test nodules, and against what became of the patients."""
    spec = read_result("nodule.json", folder)
    if not spec:
        return
    m, tr, pre = spec["metrics"], spec.get("training", {}), spec.get("preprocessing", {})
    t = m["test"]
    w("## Nodule model (outline, size, characteristics and the estimate by its factors)\n")
    w(f"`{spec['arch']}`: one network on a {spec['input_size']} px nodule view whose field follows the nodule "
      f"({pre.get('field_factor', 2.5):g} x the long axis it measures in a first pass at "
      f"{pre.get('first_field_mm', 40):g} mm, within {'-'.join(f'{v:g}' for v in pre.get('field_mm_range', []))} "
      "mm). It outlines the nodule (the readers' consensus >= 50%) and, from features pooled over that outline "
      "widened by one grid cell, gives benign/malignant, the 1-5 panel score and the eight LIDC characteristics, "
      "each a distribution over its scale (temperature per head fitted on validation). Pixels only: the readers' "
      "measurements and ratings are labels, never inputs. Training views move the nodule up to "
      f"{tr.get('shift', 0):.0%} of the view off its centre. Trained on {tr.get('device', '?')} in "
      f"{tr.get('train_seconds', 0) / 60:.0f} min (best epoch {tr.get('best_epoch', '?')}); train/val/test "
      f"{tr.get('n_train')}/{tr.get('n_val')}/{tr.get('n_test')} nodules, by patient. A nodule's reading averages "
      "the logits over the central half of its slices.\n")
    o = t["outline"]
    same = o.get("dice_same_nodules")
    w(f"**Outline.** Test Dice {format_ci(o, 'dice')} against the readers' consensus outline (>= 50%), in the "
      f"model's view. On the {o['readers_pairwise_dice_n']} nodules with two or more readers the readers agree with "
      f"each other at a Dice of {o['readers_pairwise_dice']:.3f} (estimated from their counts on the same slices)"
      + (f", the model with their consensus at {same:.3f}" if same is not None else "")
      + ": not like for like, as a consensus is easier to match than another reader.\n")
    w("**Size** against the readers' diameter (mean absolute error, mm, test):\n")
    w("| readers' diameter | n | long axis | mean of long and short axis |")
    w("| --- | --- | --- | --- |")
    for b in t["size"]["by_band"]:
        lo, hi = b["band_mm"]
        band = f"{lo:g}-{hi:g} mm" if hi is not None else f">= {lo:g} mm"
        w(f"| {band} | {b['n']} | {_fmt(b['mae_long_axis_mm'], 1)} | {_fmt(b['mae_mean_axes_mm'], 1)} |")
    unmeasured = t["size"].get("n_not_outlined", 0)
    w(f"| all | {t['n'] - unmeasured} | {t['size']['mae_long_axis_mm']:.1f} | {t['size']['mae_mean_axes_mm']:.1f} |\n")
    if unmeasured:
        w(f"The model outlined nothing on any read slice of {unmeasured} test nodules: their size is unknown (the "
          "app says so) and they are left out of this table.\n")
    w("**Characteristics and the score**, each against the rest of the panel with one reader left out in turn; the "
      "model and that single reader on the very same pairs (quadratic-weighted kappa, test, 95% patient-bootstrap "
      "intervals):\n")
    w("| rating | pairs | model | single reader |")
    w("| --- | --- | --- | --- |")
    for h, r in t["ratings"].items():
        sr = r["single_reader"]
        if sr.get("n_pairs"):
            w(f"| {h} | {sr['n_pairs']} | {format_ci(sr, 'model_qwk')} | {format_ci(sr, 'reader_qwk')} |")
    below = [h for h, r in t["ratings"].items() if r["single_reader"].get("n_pairs")
             and r["single_reader"]["model_qwk"] < r["single_reader"]["reader_qwk"]]
    if below:
        w(f"\nBelow the single reader on {', '.join(below)}. A kappa of 0 means the model gives every nodule the "
          "same level (nearly all nodules are rated soft tissue, so agreeing on the rare others is all kappa "
          "counts).")
    mal = t["malignant"]
    w(f"\nThe network's own benign/malignant head: test AUROC {format_ci(mal['auroc'], 'auroc')}.\n")
    est = m.get("estimate")
    if est:
        f = est["factors"]
        two = est.get("size_and_image")
        w("**The estimate by its factors** (shipped): a logistic model over "
          f"{', '.join(f['factors'])}, fitted on the {est['n_val']} validation nodules (L2 strength by "
          f"patient-grouped cross-validation, C = {f['fit']['C']:g}). Each factor's contribution is its coefficient "
          "times its distance from the average validation nodule, in log-odds; the app lists the largest.\n")
        w("| estimate (test) | AUROC | minus the readers' diameter (paired) | top-class ECE |")
        w("| --- | --- | --- | --- |")
        w(f"| readers' diameter | {format_ci(est['readers_diameter'], 'auroc')} | – | – |")
        for label, r in (("factors (shipped)", f), ("size and image evidence alone", two)):
            if r:
                d = r["paired_vs_readers_diameter"]
                w(f"| {label} | {format_ci(r['auroc'], 'auroc')} | {format_ci(d, 'minus_readers_diameter')} | "
                  f"{r['ece']:.3f} |")
        zero = [n for n, cf in zip(f["model"]["names"], f["model"]["coef"], strict=True) if cf == 0.0]
        signs = ", ".join(f"{n} {sg:+d}" for n, sg in (f["fit"].get("signs") or {}).items() if sg)
        if signs:
            one = len(zero) == 1
            nothing = (f" {' and '.join(zero).capitalize()} reached that bound and "
                       f"{'contributes' if one else 'contribute'} nothing, so the app never lists "
                       f"{'it' if one else 'them'} among the factors." if zero else "")
            w(f"\nEach coefficient is kept on the side radiology knows ({signs}).{nothing} The constraint was added "
              "for the explanation's sake after an unconstrained fit's test figures had been read "
              "(`docs/nodule-model.md`).\n")
        c = f["call"]
        rule = ("the 95% lower bound of its validation sensitivity reaches" if c.get("rule") == "lower-bound"
                else "its validation sensitivity reaches")
        read = {**c["test"], "ci95": c["test_ci95"]}
        w(f"\nIts call point, {c['threshold']:.1%}, was chosen on validation so that {rule} "
          f"{c['target_sensitivity']:.0%}; on test it found {format_ci(read, 'sensitivity')} of the malignant "
          f"nodules and cleared {format_ci(read, 'specificity')} of the benign.")
        if (plain := f.get("call_point_rule")) and c.get("rule") == "lower-bound":
            w(f" The plain rule (validation sensitivity itself >= {plain['target_sensitivity']:.0%}) calls from "
              f"{plain['threshold']:.1%} and found {plain['test']['sensitivity']:.0%} on test; the conservative rule "
              "was chosen after that figure had been read, as the plain one had also fallen short on test for every "
              "model of the earlier operating-points check.")
        w("")
    dx = m.get("diagnosis")
    if dx and dx.get("n_patients"):
        w(f"**Against what became of the patients** (LIDC's diagnosis list): {dx['n_patients']} test patients with a "
          f"known diagnosis ({dx['n_cancer']} cancer, {dx['n_benign']} benign), each by their most suspicious "
          "nodule. Too few for firm conclusions.\n")
        for key, label in (("estimate", "the estimate by its factors"), ("readers_panel_score", "the readers' panel "
                           "score"), ("readers_diameter", "the readers' diameter")):
            if dx.get(key):
                w(f"- {label}: AUROC {format_ci(dx[key], 'auroc')}")
        w("")


def fusion_features_text(f: dict, tr: dict) -> str:
    """The per-model paragraph on what a fusion adds to its views: the size and any outline features, with their
    weights, and the validation figure with and without them."""
    weights = dict(zip(f["features"], f["feature_weights"], strict=True))
    text = (f"It also uses the nodule's size as {SIZE_SOURCES.get(f.get('size_source', 'finder'), '?')} measures it "
            "on the image (log diameter at the crop centre, averaged over the central half of the slices)"
            + (f", with per-class weights {', '.join(f'{v:+.2f}' for v in weights[SIZE_FEATURE])}"
               if SIZE_FEATURE in weights else ""))
    extra = [(n, fw) for n, fw in weights.items() if n != SIZE_FEATURE]
    if extra:
        text += (", and its outline's " + ", ".join(f"{OUTLINE_FEATURE_LABELS.get(n, n)} ({fw[-1] - fw[0]:+.2f})"
                                                    for n, fw in extra)
                 + " (each standardised on validation; in brackets its weight towards the last class per standard "
                   "deviation; a feature that cannot be measured counts at the validation mean)")
    text += (f". On validation (AUROC for binary, kappa for score) it scores {_fmt(tr.get('val_score'))}, against "
             f"{_fmt(tr.get('val_score_views_only'))} without the size")
    if extra and tr.get("val_score_size_without_outline") is not None:
        text += f" and {_fmt(tr['val_score_size_without_outline'])} with the size alone"
    return text + (" (fitted and scored on the same split, so a guide only: the inputs were chosen on out-of-fold "
                   "figures, in the nodule outliner's section). The measuring model never sees the readers' "
                   "measurements.\n")


def _candidate_label(candidate: str) -> str:
    """An outline-feature candidate as the inputs it adds beside the views: "size", "size and shape", ..."""
    if candidate == "size":
        return "size"
    return f"size{',' if ' and ' in candidate else ' and'} {candidate}"


def _shipped_text(candidate: str) -> str:
    """A candidate as the card names a choice: "the size alone", or the outline features it adds."""
    return "the size alone" if candidate == "size" else candidate


def _test_difference(row: dict, key: str, base: str = "size") -> str:
    """A candidate's paired difference from the ``base`` candidate on a test readout, with its interval."""
    r = row.get(key) or {}
    ci = r.get("difference_ci95")
    if r.get(f"difference_from_{base}") is None:
        return "–"
    return f"{r[f'difference_from_{base}']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _check_table(w: Callable[[str], None], res: dict, figure: str, base: str, base_words: str,
                 label: Callable[[str], str]) -> None:
    """The table of a fusion-input check (:func:`training.experiments.fusion_input_check`): per candidate its
    out-of-fold validation ``figure``, the draws it beat ``base`` on, and its test readouts."""
    name = {"auroc": "AUROC", "kappa": "kappa"}[figure]
    middle = any("test_middle_slice" in r for r in res["results"])
    w(f"| inputs beside the views | val: out-of-fold {name} (mean, range over fold draws) | val: draws higher than "
      f"{base_words} | val: out-of-fold ECE | test: {name} | test: difference from {base_words} | test: ECE |"
      + (f" test, middle slice: {name}, difference, ECE |" if middle else ""))
    w("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if middle else ""))
    for r in res["results"]:
        lo, hi = r[f"val_oof_{figure}_range"]
        drawn = r[f"draws_higher_than_{base}"]
        higher = "–" if drawn is None else f"{drawn} of {res['draws']}"
        one = r.get("test_middle_slice") or {}
        w(f"| {label(r['candidate'])} | {r[f'val_oof_{figure}_mean']:.3f} ({lo:.3f} - {hi:.3f}) | {higher} | "
          f"{_fmt(r.get('val_oof_ece_mean'))} | {format_ci(r['test_fused'], figure)} | "
          f"{_test_difference(r, 'test_fused', base)} | {_fmt(r['test_fused'].get('ece'))} |"
          + (f" {_fmt(one.get(figure))}, {_test_difference(r, 'test_middle_slice', base)}, {_fmt(one.get('ece'))} |"
             if middle else ""))
    w("")


def _test_verdict(w: Callable[[str], None], rows: dict[str, dict], chosen: str, base: str, figure: str,
                  moved: str) -> None:
    """The sentence on what test says of the chosen candidate against ``base``: ``moved`` ("the chosen set moved
    fused-binary's AUROC") by its paired difference, and its top-class ECE before and after."""
    new, old = rows[chosen], rows[base]
    ci = new["test_fused"].get("difference_ci95")
    if not ci:
        return
    verdict = ("confirms a gain" if ci[0] > 0 else "shows a loss" if ci[1] < 0
               else "can neither confirm nor rule out a gain or a loss")
    w(f"On test {moved} by {_test_difference(new, 'test_fused', base)} (paired patient bootstrap): test {verdict}; "
      f"its top-class ECE went from {_fmt(old['test_fused'].get('ece'))} to {_fmt(new['test_fused'].get('ece'))}.\n")


def _better_on_test(w: Callable[[str], None], rows: dict[str, dict], chosen: str, shipped: str, figure: str,
                    label: Callable[[str], str]) -> None:
    """Name the candidates that scored higher on test than what ships without winning on validation."""
    better = [f"'{label(c)}'" for c, r in rows.items() if c not in (chosen, shipped)
              and r["test_fused"][figure] > rows[shipped]["test_fused"][figure]]
    if better:
        they = "it" if len(better) == 1 else "they"
        w(f"On test {' and '.join(better)} scored higher than what ships, but {they} did not win on validation; "
          "shipping a set for its test figures would spend the test split.\n")


def outline_features_section(w: Callable[[str], None], folder: Path) -> None:
    """Whether the outline's shape and grey levels join fused-binary: the check `python -m training
    outline-features` wrote."""
    res = read_result("outline_features.json", folder)
    if not res:
        return
    chosen = res["chosen_on_validation"]
    w("### Which outline features fused-binary uses\n")
    w("Beside the size, the outline's shape (" + ", ".join(OUTLINE_FEATURE_LABELS[n] for n in SHAPE_FEATURES)
      + ") and grey levels (" + ", ".join(OUTLINE_FEATURE_LABELS[n] for n in GREY_FEATURES)
      + f", the ring {RING_PX} view pixels wide; on the crop's 0-1 grey scale, not HU), each averaged over the "
      f"central half of the slices, were tried as further inputs of fused-binary; shape is not measured on outlines "
      f"under {MIN_SHAPE_PX} view pixels. Decided on the validation split ({res['n_val']} nodules): "
      f"{res['selection']}. Test ({res['n_test']} nodules) was read after the choice; it may veto a change, never "
      f"cause one (a chosen set whose paired test AUROC difference from the size alone is below zero with 95% "
      f"confidence does not ship). Chosen on validation: **{_shipped_text(chosen)}**"
      + (f"; vetoed on test, shipped: **{_shipped_text(res.get('shipped', 'size'))}**"
         if res.get("vetoed_on_test") else "") + ".\n")
    _check_table(w, res, "auroc", "size", "the size alone", _candidate_label)
    rows = {r["candidate"]: r for r in res["results"]}
    w("The rule reads the validation AUROC only. The calibration columns, the paired test differences and the "
      "middle-slice readout (what the app sees: views and outline on one slice) are reported beside it; they, and "
      "the test veto, were added after earlier runs of this check had been read on test (the project README tells "
      "the history).\n")
    if chosen != "size":
        new = rows[chosen]
        ci = new["test_fused"].get("difference_ci95")
        _test_verdict(w, rows, chosen, "size", "auroc", "the chosen set moved fused-binary's AUROC")
        if res.get("vetoed_on_test"):
            one = new.get("test_middle_slice") or {}
            mid_ci = one.get("difference_ci95")
            w("Test vetoed it, so the size alone ships, as before this check. The veto was added to the check after "
              "its test figures, this set's included, had been seen, against the rule as first written (test only "
              "reported): in effect the test split decided that this set does not ship, and fused-binary's reported "
              "test figures are a slightly optimistic choice between two models. The veto is narrow: the interval "
              f"ends at {ci[1]:+.4f}"
              + ("; on the middle slice (what the app sees) the difference is "
                 f"{_test_difference(new, 'test_middle_slice')}"
                 + (", which would not veto" if mid_ci[1] >= 0 else ", which would veto too") if mid_ci else "")
              + ".\n")
        _better_on_test(w, rows, chosen, res.get("shipped", chosen), "auroc", _candidate_label)
    alone = res.get("val_feature_alone_auroc") or {}
    if alone:
        w("Each feature alone on validation (AUROC for malignant; below 0.5 = lower values go with malignant): "
          + ", ".join(f"{OUTLINE_FEATURE_LABELS.get(n, n).split(' (')[0]} {v:.2f}" for n, v in alone.items())
          + ". These are measured on the outliner's outline, which the app shows; they are not the readers' "
          "characteristics ratings.\n")


def _score_candidate_label(candidate: str) -> str:
    """A fused-score input candidate as the inputs it adds beside the views: "none", "size", ..."""
    return "none" if candidate == "views" else candidate


def score_inputs_section(w: Callable[[str], None], folder: Path) -> None:
    """Whether the outliner's size (and the outline's shape and grey levels) join fused-score: the check `python -m
    training score-inputs` wrote."""
    res = read_result("score_inputs.json", folder)
    if not res:
        return
    chosen, shipped = res["chosen_on_validation"], res.get("shipped", res["chosen_on_validation"])
    w("### Which measured inputs fused-score uses\n")
    w("Beside its two views, fused-score was tried with the nodule outliner's size (as fused-binary uses it) and "
      "with the size and the outline's shape and grey levels (the inputs fused-binary weighs), each averaged over "
      f"the central half of the slices. Decided on the validation split ({res['n_val']} nodules): "
      f"{res['selection']}. Test ({res['n_test']} nodules) was read after the choice; it may veto a change, never "
      "cause one (a chosen candidate whose paired test kappa difference from the views alone is below zero with 95% "
      f"confidence does not ship). Chosen on validation: **{_score_candidate_label(chosen)}**"
      + (f"; vetoed on test, shipped: **{_score_candidate_label(shipped)}**" if res.get("vetoed_on_test") else "")
      + ". The rule was written down before the check first ran; it is the outline-feature check's, with kappa (what "
        "the score models are chosen on) for AUROC. An earlier fit-and-score on validation, with the finder's size "
        "and earlier networks, had found no gain.\n")
    _check_table(w, res, "kappa", "views", "the views alone", _score_candidate_label)
    rows = {r["candidate"]: r for r in res["results"]}
    if chosen != "views":
        _test_verdict(w, rows, chosen, "views", "kappa", "the chosen inputs moved fused-score's kappa")
        _better_on_test(w, rows, chosen, shipped, "kappa", _score_candidate_label)


def sizes_section(w: Callable[[str], None], folder: Path) -> None:
    """Which of the outliner's sizes fused-binary uses: the comparison `python -m training sizes` wrote."""
    res = read_result("size_measures.json", folder)
    if not res:
        return
    labels = {"circle": "same-area circle", "long_axis": "long axis", "mean_axes": "mean of long and short axis"}
    w("### Which size fused-binary uses\n")
    w(f"The outline measured three ways, each averaged over the central half of the slices, each tried as "
      f"fused-binary's size input. Chosen on the validation split ({res['n_val']} nodules) by the {res['selection']}; "
      f"test ({res['n_test']} nodules) was read once, after the choice. Chosen: "
      f"**{labels.get(res['chosen_on_validation'])}**; shipped: {labels.get(res['shipped_measure'])}.\n")
    if not with_current_calibration(res):
        w("These fusions weighed the views' logits as the earlier calibration scaled them (it divided the prior "
          "correction by the temperature); a fusion's free view weights and class bias absorb most of that "
          "difference.\n")
    w("| size measure | val: fused-binary, out-of-fold AUROC (mean, range over fold draws) | val: size alone | "
      "test: fused-binary AUROC | test: size alone | test: measured / readers' diameter (median) |")
    w("| --- | --- | --- | --- | --- | --- |")
    for r in res["results"]:
        every = r["test_vs_readers"][-1] if r["test_vs_readers"] else {}  # the last row: every nodule
        lo, hi = r["val_oof_auroc_range"]
        w(f"| {labels.get(r['measure'], r['measure'])} | {r['val_oof_auroc_mean']:.3f} ({lo:.3f} - {hi:.3f}) | "
          f"{r['val_size_alone_auroc']:.3f} | {format_ci(r['test_fused'], 'auroc')} | "
          f"{format_ci(r['test_size_alone'], 'auroc')} | {every.get('median', float('nan')):.0%} |")
    w("")
    w("The axes are measured edge to edge on the outliner's view (each pixel counted whole), so they read about one "
      "view pixel longer than a distance between outline points; the readers' diameter is the longest axis on "
      "their largest slice, these are means over the central half of the slices.\n")


def ablation_section(w: Callable[[str], None], ablation: dict, shipped: dict | None = None) -> None:
    """What else was tried on the shipped recipe (``shipped``: that model's spec), validation split only."""
    setup = ablation["setup"]
    name = f"{setup.get('view')}-{setup.get('task')}"
    w(f"## What else was tried ({name}, validation split only)\n")
    trained = (shipped or {}).get("training", {})
    same = all(trained.get(k) == setup.get(k) for k in ("input_size", "field_mm", "epochs", "epoch_samples"))
    own = (shipped or {}).get("metrics", {}).get("val", {}).get("auroc") if same else None
    recipe = [r["val_auroc"] for r in ablation["results"] if set(r.get("overrides") or {}) <= {"seed"}]
    recipe += [own] if own is not None else []
    spread = (f" The recipe's own runs (the shipped {name} included, validation AUROC {own:.3f}) span "
              f"{min(recipe):.3f}-{max(recipe):.3f}: read smaller differences as chance." if own is not None and
              len(recipe) > 1 else "")
    w(_budget(setup) + " One training run per row; the recipe rows differ only in the seed." + spread
      + " The test split was not used to compare.\n")
    if note := earlier_calibration(ablation, "The val ECE column"):
        w(note)
    w("| variation | val AUROC [95% CI] | val malignant F1 | val ECE | best epoch | minutes |")
    w("| --- | --- | --- | --- | --- | --- |")
    for r in ablation["results"]:
        auroc = format_ci({"auroc": r.get("val_auroc"), "ci95": {"auroc": r.get("val_auroc_ci95")}}, "auroc")
        w(f"| {r['variant']} | {auroc} | {_fmt(r.get('val_f1_malignant'))} | "
          f"{_fmt(r.get('val_ece'))} | {r['best_epoch']} | {r['seconds'] / 60:.1f} |")
    w("")


def search_section(w: Callable[[str], None], search: dict, specs: dict) -> None:
    """The recipe search behind the shipped networks: each recipe's validation figure over its seeds."""
    from training.experiments import selection_figure

    summary = search["summary"]
    spreads = [r["max"] - r["min"] for recipes in summary.values() for r in recipes.values() if r["n_seeds"] > 1]
    setup = search["setup"]
    w("## Recipe search (validation split only)\n")
    w(f"Run on {search.get('run_on', 'the training machine')}. {setup[:1].upper()}{setup[1:]}; selection on the "
      f"{search['selection']}. A recipe is judged by its mean over seeds"
      + (f": the seeds of one recipe differ by up to {max(spreads):.3f}" if spreads else "") + ".\n")
    w("| model | recipe | seeds | val mean | min - max |")
    w("| --- | --- | --- | --- | --- |")
    for model, recipes in summary.items():
        for label, r in sorted(recipes.items(), key=lambda kv: -kv[1]["mean"]):
            w(f"| {model} | {label} | {r['n_seeds']} | {r['mean']:.3f} | {r['min']:.3f} - {r['max']:.3f} |")
    w("")
    w("Shipped: per model the recipe with the best mean, as its best seed, where re-measured on the original "
      "images it scored higher on validation than the network it would replace. Each shipped network's settings "
      "and its validation figure on the original images:\n")
    w("| model | input | field | epochs x samples | seed | trained on | val (original images) |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    shifts = {}
    for model in summary:
        s = specs.get(model)
        if not s:
            continue
        tr, val = s.get("training", {}), s["metrics"]["val"]
        key = selection_figure(model).removeprefix("val_")
        copy = tr.get("val_on_training_copy")
        if copy is not None:
            shifts[model] = val[key] - copy
        figure = f"{'AUROC' if key == 'auroc' else 'kappa'} {val[key]:.3f}" + (
            f" (on the copy: {copy:.3f})" if copy is not None else "")
        field = f"{s['preprocessing']['field_mm']:g} mm" if s["preprocessing"].get("field_mm") else "whole crop"
        w(f"| {model} | {s['input_size']} px | {field} | {tr.get('epochs')} x {tr.get('epoch_samples')} | "
          f"{tr.get('seed')} | {tr.get('device', '?')} | {figure} |")
    w("")
    if shifts:
        w("On the original images the networks trained on the compressed copy score "
          f"{', '.join(f'{d:+.3f} ({m})' for m, d in shifts.items())} against the copy. Two causes are likely and "
          "not separated here: each was the best of its seeds on the copy's validation figures (a best-of-three "
          "overstates), and it trained with the copy's compression. Retraining on lossless images (on a GPU) would "
          "tell them apart.\n")


def calibration_section(w: Callable[[str], None], specs: dict) -> None:
    """Each model's test ECE beside the ECE a perfectly calibrated model would show on as many cases."""
    rows = [(n, s["metrics"]["test"]) for n, s in specs.items() if s["metrics"]["test"].get("ece_if_calibrated")]
    if not rows:
        return
    w("**How much of the ECE is chance.** ECE is never zero on a finite test set: even a perfectly calibrated "
      "model, whose every prediction comes true as often as it says, shows some. Redrawing each test nodule's "
      "outcome from the model's own confidence gives the ECE such a model would show on as many nodules. An ECE "
      "above that band's 95th percentile is evidence of miscalibration; below it the test set cannot tell.\n")
    w("| model | n | ECE after calibration | a calibrated model: median [95th percentile] | share of draws ≥ ours |")
    w("| --- | --- | --- | --- | --- |")
    for n, t in rows:
        band = t["ece_if_calibrated"]
        w(f"| {n} | {t['n']} | {t['ece']:.3f} | {band['median']:.3f} [{band['p95']:.3f}] | "
          f"{band.get('p_value', float('nan')):.2f} |")
    w("")


def malignant_calibration(w: Callable[[str], None], specs: dict) -> None:
    """The calibration of each binary model's malignant probability (the number the app shows), on val and test."""
    rows = [(n, {k: with_malignant_ece(s["metrics"][k]) for k in ("val", "test") if s["metrics"].get(k)})
            for n, s in specs.items() if s["metrics"]["test"].get("reliability_malignant")]
    if not rows:
        return
    w("**Calibration of the malignant probability.** The ECE above is top-class: it bins each case by the "
      "probability of its most probable class, so a benign case at 66% and a malignant case at 66% share a bin and "
      "their errors can cancel. The app shows the malignant probability itself; its own ECE (the curve in the "
      "reliability diagrams, 10 equal-width bins) and its mean against the observed malignant rate:\n")
    w("| model | split | n | mean malignant probability | observed malignant rate | ECE of the malignant probability |")
    w("| --- | --- | --- | --- | --- | --- |")
    for n, reps in rows:
        for split, t in reps.items():
            w(f"| {n} | {split} | {t['n']} | {t['mean_malignant_p']:.1%} | {t['observed_malignant_rate']:.1%} | "
              f"{t['ece_malignant']:.3f} |")
    w("")
    fused = dict(rows).get("fused-binary", {}).get("test")
    for n, r in rows:
        t, v = r.get("test"), r.get("val")
        if t is None or t["ece_malignant"] <= MALIGNANT_ECE_LIMIT:
            continue
        w(f"{n}'s malignant probability is not well calibrated: it "
          f"{MISCALIBRATION_WORDS[miscalibration_direction(t.get('reliability_malignant') or [])]} (mean "
          f"{t['mean_malignant_p']:.0%} against {t['observed_malignant_rate']:.0%} malignant on test, ECE "
          f"{t['ece_malignant']:.3f}"
          + (f"; on validation {v['mean_malignant_p']:.0%} against {v['observed_malignant_rate']:.0%}, ECE "
             f"{v['ece_malignant']:.3f}"
             if v else "") + "). Its top-class ECE is low only because the errors of its benign and malignant cases "
          "(binned by their most probable class) cancel. Read its probability as a ranking rather than a rate"
          + (f"; the fused estimate, which the app leads with, is within {MALIGNANT_ECE_LIMIT} (ECE "
             f"{fused['ece_malignant']:.3f})" if fused and fused["ece_malignant"] <= MALIGNANT_ECE_LIMIT else "")
          + (". Its temperature divides the prior correction for balanced training as well as the logits, which "
             "leaves part of the balanced sampling's upward shift in place"
             if specs[n].get("kind") != "fusion" and not specs[n].get("calibration") else "") + ".\n")


def with_current_calibration(result: dict) -> bool:
    """Whether an experiment record was measured with the current calibration order (one order for the record, or
    one per network as records written before ``shared_order`` hold it)."""
    recorded = result.get("calibration")
    return (set(recorded.values()) if isinstance(recorded, dict) else {recorded}) == {PRIOR_AFTER_T}


def earlier_calibration(result: dict, what: str) -> str:
    """A sentence for an experiment record measured with the earlier calibration ("" for the current one)."""
    if with_current_calibration(result):
        return ""
    return (f"{what}: top-class ECE measured with the earlier calibration, which divided the prior correction by "
            "the temperature too (see 'Probabilities and calls'); the calls, and so every F1, were the same under "
            "either, and AUROC does not depend on it.\n")


def calls_section(w: Callable[[str], None], specs: dict) -> None:
    """How each model turns its calibrated probabilities into the call its decision figures score."""
    nets = {n: Calibration.from_spec(s) for n, s in specs.items() if s.get("kind") != "fusion"}
    if not nets or not all(c.order == PRIOR_AFTER_T for c in nets.values()):
        return
    w("**Probabilities and calls.** A network's probabilities are `softmax(z / T + b)`: its logits `z` divided by a "
      "temperature `T` and shifted by `b = log(train prior / balanced prior)`, which undoes the balanced sampling "
      "of training; `T` is fitted on validation by likelihood with `b` in place. Its call, which the F1, "
      "sensitivity, specificity, kappa and confusion figures score, is the class of the prior-corrected logits "
      "`argmax(z + b)`, the rule their decision figures were always measured with. When `T` > 1 that rule leans "
      "towards the rarer classes; for the binary networks it is a threshold on the malignant probability (below "
      "50% when `T` > 1, above it when `T` < 1; each network's is in the table). The fused models call their most "
      "probable class.\n")
    w("| model | temperature T | calls malignant from | test sensitivity | test specificity |")
    w("| --- | --- | --- | --- | --- |")
    for n, s in specs.items():
        t = s["metrics"]["test"]
        if "sensitivity" not in t:
            continue
        temperature, threshold = (f"{nets[n].temperature:.2f}", nets[n].threshold()) if n in nets else ("–", 0.5)
        w(f"| {n} | {temperature} | {threshold:.0%} | {format_ci(t, 'sensitivity')} | "
          f"{format_ci(t, 'specificity')} |")
    w("")


def write_card(folder: Path | None = None) -> Path:
    """Regenerate ``weights/README.md`` and ``weights/figures/``."""
    folder = folder or paths.weights_dir()
    specs = {n: s for n in ORDER if (s := read_result(f"{n}.json", folder)) is not None}
    figs = {n: figures(n, s, folder / "figures") for n, s in specs.items()}
    screen, cv = read_result("screen.json", folder), read_result("cv.json", folder)
    ablation, search = read_result("ablation.json", folder), read_result("search.json", folder)
    cam, retrieval = read_result("cam_localisation.json", folder), read_result("retrieval.json", folder)
    diam = diameter_baseline(folder)
    L: list[str] = []
    w = L.append
    w("# lungviz model card\n")
    w(f"> **{RESEARCH_NOTICE}** The figures below were measured on a held-out split of public research data "
      "(LIDC-IDRI); they do not describe performance on your patients, scanners or protocols.\n")
    w("## Intended use\n")
    w("A second look for radiologists and researchers reviewing a lung nodule on CT, for research and teaching: "
      "a calibrated estimate of how the LIDC radiologists would rate the nodule's malignancy, a map of where the "
      "model looked and similar reference cases. Not for diagnosis, screening decisions or patient management. "
      "The labels are radiologists' suspicion ratings (1-5), not pathology.\n")
    w("## Data and labels\n")
    w("- LIDC-IDRI (TCIA, CC BY 3.0; Armato et al., Med Phys 38:915-931, 2011; doi:10.7937/K9/TCIA.2015.LO9QL9SX): "
      "2,236 labelled nodules from 745 patients as 128 px axial crops (every slice any reader outlined). "
      "Each crop is min-max scaled from HU as the slices set stores it.\n")
    w("- Label = the panel: median of 1-4 readers' malignancy ratings rounded half up (`score`, 1-5); `binary` "
      "groups 1-3 as benign and 4-5 as malignant. Nodules read by one radiologist carry that reader's score only.\n")
    records = (read_result("index-nodule-binary.json", folder) or {}).get("records") or []
    many = [int(r["n_readers"]) for r in records if int(r.get("n_readers") or 0) > MAX_LIDC_READERS]
    if many:
        w(f"- {len(many)} nodules carry {min(many)}-{max(many)} ratings, more than the {MAX_LIDC_READERS} readers of a "
          "usual LIDC scan: the source data attached more reader marks than that to them; their panel score is the "
          "median of all of them.\n")
    w("- Split: patient-level, stratified 70/15/15 (`weights/splits/holdout.json`, fingerprint "
      f"`{next(iter(specs.values()))['split_fingerprint'] if specs else '–'}`). Train fits the weights, validation "
      "drives early stopping, prior correction, temperature scaling and the choice of Grad-CAM layer, test is used "
      "once for this card"
      + "".join(f" (and once to veto a change validation chose; see '{section}')" for file, section in (
          ("outline_features.json", "Which outline features fused-binary uses"),
          ("score_inputs.json", "Which measured inputs fused-score uses"))
          if (read_result(file, folder) or {}).get("vetoed_on_test")) + ".\n")
    adds = [f"{name} adds the nodule's diameter measured on the image by "
            f"{SIZE_SOURCES.get((spec.get('fusion') or {}).get('size_source', 'finder'), '?')}"
            + inputs_text(spec).removeprefix("size") for name, spec in specs.items()
            if SIZE_FEATURE in ((spec.get("fusion") or {}).get("features") or [])]
    w("- Models see images only; the readers' measurements (diameter, characteristics) are never inputs."
      + (" " + "; ".join(adds) + "." if adds else "") + "\n")
    w("## Results on the test split (95% patient-bootstrap intervals)\n")
    w("| model | n | AUROC | weighted AUPRC | weighted F1 | malignant F1 | kappa (QWK) | "
      "top-class ECE raw → calibrated |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, s in specs.items():
        t = s["metrics"]["test"]
        w(f"| {n} | {t['n']} | {format_ci(t, 'auroc')} | {format_ci(t, 'auprc_weighted')} | "
          f"{format_ci(t, 'f1_weighted')} | {format_ci(t, 'f1_malignant')} | {format_ci(t, 'qwk')} | "
          f"{_fmt(t.get('ece_raw'))} → {_fmt(t.get('ece'))} |")
    w("")
    if all(s.get("metrics_of") or s.get("kind") == "fusion" for s in specs.values()):
        w("Every figure is measured with the stored float16 weights, as the app loads them.\n")
    calibration_section(w, specs)
    calls_section(w, specs)
    malignant_calibration(w, specs)
    w("Nodule-level figures average the logits of the central half of each nodule's slices. The app usually sees "
      "one slice; the same models on the single middle slice of each test nodule:\n")
    w("| model | AUROC | weighted F1 | malignant F1 | kappa (QWK) | ECE |")
    w("| --- | --- | --- | --- | --- | --- |")
    for n, s in specs.items():
        t = s["metrics"].get("test_single_slice")
        if t:
            w(f"| {n} | {format_ci(t, 'auroc')} | {format_ci(t, 'f1_weighted')} | {_fmt(t.get('f1_malignant'))} | "
              f"{_fmt(t.get('qwk'))} | {_fmt(t.get('ece'))} |")
    w("")
    w("### Beside the published study and the baselines\n")
    w("The published full-slice / nodule-crop study reported these on its own split (not comparable case for case):\n")
    w("| model | published weighted F1 | ours | published weighted AUPRC | ours |")
    w("| --- | --- | --- | --- | --- |")
    for n, ref in PUBLISHED.items():
        t = specs.get(n, {}).get("metrics", {}).get("test", {})
        w(f"| {n} | {ref['f1_weighted']:.2f} | {_fmt(t.get('f1_weighted'), 2)} | {ref['auprc_weighted']:.2f} | "
          f"{_fmt(t.get('auprc_weighted'), 2)} |")
    w("")
    if diam:
        w(f"**Diameter baseline** (the readers' own mean diameter alone, which no image model sees): test AUROC "
          f"{diam['auroc']:.3f} [{diam['ci95']['auroc'][0]:.3f}, {diam['ci95']['auroc'][1]:.3f}] on {diam['n']} "
          "nodules.\n")
        best = max((s["metrics"]["test"]["auroc"] for n, s in specs.items() if n.endswith("binary")), default=None)
        if best is not None and best < diam["auroc"]:
            w(f"**The image models do not yet reach this baseline** (best binary AUROC {best:.3f}): treat their "
              "malignancy estimates as weaker than the nodule's measured size.\n")
    size = size_only_text(specs)
    if size:
        w(size + "\n")
    w("**Against one radiologist.** For nodules read by two or more radiologists, each reader in turn is the "
      "predictor and the median of the others the truth; the model is scored on the very same pairs. Intervals "
      "resample whole patients, as every other interval in this card does.\n")
    w("| model | pairs | single reader | model |")
    w("| --- | --- | --- | --- |")
    for n, s in specs.items():
        r = s["metrics"]["test"].get("readers")
        if not r or not r.get("n_pairs"):
            continue
        if "reader_auroc" in r:
            w(f"| {n} | {r['n_pairs']} | AUROC {format_ci(r, 'reader_auroc')} | AUROC {format_ci(r, 'model_auroc')} |")
        else:
            w(f"| {n} | {r['n_pairs']} | QWK {format_ci(r, 'reader_qwk')}, exact {_fmt(r['reader_exact'])} | "
              f"QWK {format_ci(r, 'model_qwk')}, exact {_fmt(r['model_exact'])} |")
    w("")
    if cam:
        w("## Does the map point at the nodule? (Grad-CAM, test split)\n")
        w("| model | CAM layer | view | n | peak inside the outline (centre prior) | mass inside the outline + "
          f"{cam.get('margin_mm', 3):g} mm (centre prior) | outline + margin share of the view (chance) |")
        w("| --- | --- | --- | --- | --- | --- | --- |")
        for n, r in cam.get("models", {}).items():
            for key in ("centred", "shifted"):
                b = r[key]
                w(f"| {n} | `{r.get('layer', 'last')}` | {key} | {b['n']} | {b['peak_inside']:.1%} "
                  f"({b['centre_prior']['peak_inside']:.1%}) | {b['mass_inside']:.1%} "
                  f"({b['centre_prior']['mass_inside']:.1%}) | {b['mask_area']:.1%} |")
        w(f"\n{cam.get('method', '')}\n")
        if isinstance(nod := cam.get("models", {}).get("nodule"), dict):
            w("The nodule model's heads read only its own outline widened by one grid cell, so its map lies there by "
              "design: its figures measure how well that outline finds the nodule and follows it when it moves. In "
              f"the shifted view {nod['shifted'].get('nodule_cut_by_view', 0)} of its {nod['shifted']['n']} test "
              "nodules lost part of their outline at the view's edge.\n")
    if retrieval:
        w("## Similar-case retrieval\n")
        w(f"Index `{retrieval.get('index', '')}`: {retrieval['n']} library nodules embedded with "
          f"`{retrieval.get('model', 'nodule-binary')}` (penultimate layer, L2-normalised, FAISS inner product). "
          f"Precision@5 (same binary label) for test queries against the train library: "
          f"**{retrieval['precision_at_5_test_vs_train']:.3f}** (chance {retrieval['chance_precision_at_5']:.3f}).\n")
    if screen:
        w("## Backbone screen (validation split only)\n")
        w(_budget(screen["setup"]) + "\n")
        w("| backbone | pretrained | val AUROC | val malignant F1 | best epoch | minutes | images/s |")
        w("| --- | --- | --- | --- | --- | --- | --- |")
        for r in screen["results"]:
            w(f"| {r['arch']} | {r['pretrained']} | {_fmt(r['val_auroc'])} | {_fmt(r.get('val_f1_malignant'))} | "
              f"{r['best_epoch']} | {r['seconds'] / 60:.1f} | {r['images_per_second']:.0f} |")
        w("")
    if cv:
        w(f"## {cv['k']}-fold patient-level cross-validation ({cv['setup'].get('view')}-{cv['setup'].get('task')})\n")
        w(_budget(cv["setup"]) + (f" Run on {cv['run_on']}." if cv.get("run_on") else "") + "\n")
        if note := earlier_calibration(cv, "The ECE column"):
            w(note)
        w("| fold | n test | AUROC | malignant F1 | weighted F1 | ECE |")
        w("| --- | --- | --- | --- | --- | --- |")
        for r in cv["folds"]:
            w(f"| {r['fold']} | {r['n_test']} | {_fmt(r['auroc'])} | {_fmt(r['f1_malignant'])} | "
              f"{_fmt(r['f1_weighted'])} | {_fmt(r['ece'])} |")
        sm = cv["summary"]
        w(f"| mean ± sd | | {sm['auroc']['mean']:.3f} ± {sm['auroc']['sd']:.3f} | "
          f"{sm['f1_malignant']['mean']:.3f} ± {sm['f1_malignant']['sd']:.3f} | "
          f"{sm['f1_weighted']['mean']:.3f} ± {sm['f1_weighted']['sd']:.3f} | {sm['ece']['mean']:.3f} |\n")
    if search:
        search_section(w, search, specs)
    if ablation:
        ablation_section(w, ablation, specs.get(f"{ablation['setup'].get('view')}-{ablation['setup'].get('task')}"))
    tta_section(w, folder)
    class_bias_section(w, folder)
    ordinal_calls_section(w, folder)
    operating_points_section(w, folder)
    outliner_section(w, folder)
    nodule_model_section(w, folder)
    finder_section(w, folder)
    w("## Per model\n")
    for n, s in specs.items():
        tr = s.get("training", {})
        w(f"### {n}\n")
        if s.get("kind") == "fusion":
            f = s["fusion"]
            w(f"Late fusion of {', '.join(s['components'])}: weights {', '.join(f'{v:.2f}' for v in f['weights'])} "
              "on the views' calibrated logits plus a class bias, fitted on the validation split.\n")
            key = "auroc" if s["task"] == "binary" else "qwk"
            for comp, members in (s.get("members") or {}).items():
                w(members_text(comp, members, folder, key))
            if s.get("without_members"):
                alone, test = s["without_members"], s["metrics"].get("test") or {}
                ci = alone.get("test_difference_ci95")
                w(f"With each view's own network alone, the same fusion, fitted the same way, scores "
                  f"{_fmt(alone.get('val'))} on validation and {_fmt(alone.get('test'))} on test "
                  f"({'AUROC' if key == 'auroc' else 'kappa'}), against "
                  f"{_fmt(tr.get('val_score'))} and {_fmt(test.get(key))} with the ensemble"
                  + (f" (test difference {test.get(key, 0) - alone.get('test', 0):+.3f}, patient bootstrap 95% "
                     f"interval [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci and test.get(key) is not None else "")
                  + ". The members were chosen on validation; this test comparison came after the choice and did not "
                  "change it.\n")
            if f.get("features"):
                w(fusion_features_text(f, tr))
        else:
            histology = s.get("task") == "histology"  # one image per case, not the slices of a nodule
            unit = "images" if histology else "nodules"
            aggregate = "one image per case" if histology else s["preprocessing"].get("aggregate", "")
            w(f"`{s['arch']}` ({'ImageNet-pretrained' if tr.get('pretrained') else 'from scratch'}), view "
              f"`{s['view']}`, input {s['input_size']} px, {aggregate}; temperature "
              f"{s['temperature']:.2f}. Trained on {tr.get('device', '?')} for {tr.get('train_seconds', 0) / 60:.1f} "
              f"min ({tr.get('images_per_second', 0):.0f} images/s; up to {tr.get('epochs')} epochs of "
              f"{tr.get('epoch_samples')} samples, best epoch {tr.get('best_epoch')}); "
              f"train/val/test {tr.get('n_train')}/{tr.get('n_val')}/{tr.get('n_test')} {unit}.\n")
            if tr.get("trained_on"):
                w(f"{tr['trained_on'][0].upper()}{tr['trained_on'][1:]}.\n")
        if n in figs:
            w(f"![confusion]({figs[n]['confusion']}) ![reliability]({figs[n]['reliability']})\n")
    w("## Known limits\n")
    w("- Labels are subjective ratings by 1-4 radiologists, not biopsy results; score 3 (indeterminate) is the "
      "largest class and is grouped with benign in `binary`.\n")
    w("- One public dataset (LIDC-IDRI, scans from 2000s scanners), 2D slices only; no external validation.\n")
    w("- The histology model is trained on a small set of screenshots of mixed provenance (not HU) and is a "
      "teaching example only.\n")
    w("- Calibration was fitted on the validation split of this data; probabilities will drift on other data.\n")
    off = [n for n, s in specs.items() if s["metrics"]["test"].get("reliability_malignant")
           and with_malignant_ece(s["metrics"]["test"])["ece_malignant"] > MALIGNANT_ECE_LIMIT]
    if off:
        w(f"- The malignant probability of {', '.join(off)} is off on test by more than {MALIGNANT_ECE_LIMIT} "
          "(ECE of the malignant probability; see the calibration table above), although its top-class ECE is "
          "within it; the app says so beside that view's estimate.\n")
    beyond = [n for n, s in specs.items() if (band := s["metrics"]["test"].get("ece_if_calibrated"))
              and s["metrics"]["test"]["ece"] > band["p95"]]
    if beyond:
        w(f"- The top-class ECE of {', '.join(beyond)} is above the 95th percentile a perfectly calibrated model "
          "would show on as many test cases (see 'How much of the ECE is chance'): their class probabilities are "
          "less reliable than the calibration suggests" + class_bias_clause(beyond, folder) + ".\n")
    if cam and any(r["shifted"]["peak_inside"] < 0.2 for r in cam.get("models", {}).values()):
        w("- The Grad-CAM maps are coarse: EfficientNet-Lite's last feature map is 1/32 of the input (2 x 2 at 64 px, "
          "4 x 4 at 128 px), so each model's map is taken on an earlier layer chosen on validation. Even so they "
          "put little more "
          "of their mass on the nodule than chance (table above): read them as a rough indication of the region "
          "the model used, not as the nodule's outline.\n")
    w("- Training times above were measured either on a shared 2-core CPU while other jobs ran or on one H100 "
      "running 16 trainings at once (the 'trained on' column); the uncontended CPU throughput of the 64 px setup is "
      "in the backbone screen table.\n")
    path = folder / "README.md"
    path.write_text("\n".join(L) + "\n")
    return path
