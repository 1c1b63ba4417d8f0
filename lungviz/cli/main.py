"""``python -m lungviz predict | locate | bench``: predictions and explanations, the nodule finder, the speed benchmark.

Bad input exits with status 2 and one clear line on stderr; an unexpected fault exits 1, also with one line (never a
traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lungviz import RESEARCH_NOTICE
from lungviz.errors import LungvizError

EXPLAIN_METHODS = ("gradcam", "gradcampp", "lime")


def _centre(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        r, c = (float(v) for v in text.split(","))
    except ValueError as err:
        raise LungvizError(f"--centre must be ROW,COLUMN in pixels (e.g. 256,310), got '{text}'.") from err
    if not (np.isfinite(r) and np.isfinite(c)):
        raise LungvizError(f"--centre must be two finite numbers of pixels (ROW,COLUMN), got '{text}'.")
    return r, c


def _one_line(text: str) -> str:
    """``text`` on one line: line breaks inside it (a file name may hold one) become spaces."""
    return " ".join(text.splitlines())


def _save_png(image: np.ndarray, path: Path) -> str:
    from PIL import Image

    arr = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    try:
        Image.fromarray(arr).save(path)
    except OSError as err:
        raise LungvizError(f"cannot write {path}: {err.strerror or err}.") from err
    return str(path)


def cmd_predict(args: argparse.Namespace) -> dict:
    """Predict one case from files; optionally write explanation overlays."""
    from lungviz.data.io import load_image, read_series
    from lungviz.data.upload import from_loaded, from_series

    # Read and check the inputs before the heavy imports, so bad input is answered at once.
    centre = _centre(args.centre)
    source = Path(args.slice) if args.slice else None
    series, index = None, 0
    if source is not None and (source.is_dir() or source.suffix.lower() == ".zip"):
        series = read_series(source)
        index = len(series) // 2 if args.index is None else args.index
        case = from_series(series, index, centre, load_image(args.nodule) if args.nodule else None)
        case.notes.append(f"Slice {index + 1} of {len(series)} of the series was used (--index {index}; "
                          "0 = most inferior).")
    else:
        if args.index is not None:
            raise LungvizError("--index applies to a DICOM series given as --slice (a folder or a zip), "
                               "not to a single image.")
        slice_img = load_image(args.slice) if args.slice else None
        case = from_loaded(slice_img, load_image(args.nodule) if args.nodule else None, centre)
    from lungviz.inference.predict import load_models, predict
    from lungviz.present.report import spec_version

    models = load_models(Path(args.weights) if args.weights else None)
    followed = None
    if series is not None and models.nodule is not None and case.nodule_crop is None:
        from lungviz.inference.nodule import assess_series

        followed = assess_series(models.nodule, series, index, case.centre_rc)  # every slice the nodule reaches
    pred = predict(models, case.context, case.nodule_crop, case.spacing_mm, assessment=followed)
    out: dict = {"inputs": case.names, "notes": case.notes, **pred.to_dict(),
                 "models": {k: spec_version(s)[:12] for k, s in models.provenance.items()},
                 "notice": RESEARCH_NOTICE}
    if args.explain:
        if not args.out:
            raise LungvizError("--explain needs --out DIR for the overlay images.")
        from lungviz.explain import bundle_cam, lime_map, lime_overlay, overlay

        folder = Path(args.out)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LungvizError(f"--out {folder} cannot be used as a folder for the overlay images: "
                               f"{err.strerror or err}.") from err
        files = {}
        for view, image in pred.images.items():
            bundle = models.nodule if view == "nodule" else models.bundle(view, "binary")
            if bundle is None:
                continue
            if args.explain == "lime":
                res = lime_map(bundle.model, image, bundle.mean, bundle.std, calibration=bundle.calibration)
                files[view] = _save_png(lime_overlay(image, res), folder / f"{view}-lime.png")
            else:
                heat = bundle_cam(bundle, image, args.explain)
                files[view] = _save_png(overlay(image, heat, 0.4), folder / f"{view}-{args.explain}.png")
            _save_png(image, folder / f"{view}-input.png")
        out["explanations"] = {"method": args.explain, "files": files}
    return out


def cmd_locate(args: argparse.Namespace) -> dict:
    """Rank nodule candidates on a whole slice (image, DICOM slice), one slice of a DICOM series (--slice, with its
    neighbours as the third dimension) or a whole series (every slice, with a progress bar)."""
    import time

    from lungviz.data.io import read_series
    from lungviz.inference.finder import (
        load_finder,
        read_search_slice,
        scan,
        scan_series,
        series_context,
        series_volume,
    )

    path = Path(args.image)
    is_series = path.exists() and (path.is_dir() or path.suffix.lower() == ".zip")
    if is_series and args.slice is None:
        series = read_series(path)
        finder = load_finder(Path(args.weights) if args.weights else None)
        vol, sp, gap = series_volume(series)
        from tqdm import tqdm

        bar = tqdm(total=len(vol), desc="searching the series", unit="slice", file=sys.stderr,
                   disable=not sys.stderr.isatty())
        res = scan_series(finder, vol, True, sp, gap, progress=lambda done, total: bar.update(1))
        bar.close()
        best = res.findings(args.top_k)  # each candidate followed over consecutive slices, once
        out = {"input": path.name, "shape": list(vol.shape), "is_hu": True, "pixel_spacing_mm": sp,
               "slice_gap_mm": gap, "candidates": [f.to_dict() for f in best if f.candidate.score >= args.min_score],
               "scan": {"seconds": round(res.seconds, 3), "slices": len(vol),
                        "slices_with_lung": int(sum(res.lung_found))}, "notice": RESEARCH_NOTICE}
        if best:
            out.update(slice_index=best[0].slice_index, n_slices=len(vol))
        if not any(res.lung_found):
            from lungviz.inference.lungmask import NO_LUNG_MESSAGE

            out["notes"] = [NO_LUNG_MESSAGE.replace("this slice", "any slice of this series")]
        return out
    target = read_search_slice(args.image, args.slice)
    finder = load_finder(Path(args.weights) if args.weights else None)
    context = series_context(read_series(path), target.slice_index)[0] if target.slice_index is not None else None
    t0 = time.perf_counter()
    cands, info = scan(finder, target.pixels, target.is_hu, target.spacing_mm, top_k=args.top_k,
                       min_score=args.min_score, context=context)
    out: dict = {"input": target.name, "shape": list(target.pixels.shape), "is_hu": target.is_hu,
                 "pixel_spacing_mm": target.spacing_mm, "candidates": [c.to_dict() for c in cands],
                 "scan": {**info, "seconds": round(time.perf_counter() - t0, 3)}, "notice": RESEARCH_NOTICE}
    if target.slice_index is not None:
        out.update(slice_index=target.slice_index, n_slices=target.n_slices)
    notes = [info["message"]] if info.get("message") else []
    if not target.spacing_mm:
        from lungviz.data.preprocess import DEFAULT_SPACING_MM

        notes.append(f"pixel spacing unknown: sizes assume {DEFAULT_SPACING_MM} mm per pixel and no mm positions "
                     "are given")
    if notes:
        out["notes"] = notes
    return out


def _print_human(result: dict) -> None:
    from lungviz.present.report import nodule_model_notes, prob_pct

    if "candidates" in result:
        print(result.get("notice", RESEARCH_NOTICE))
        if result.get("slice_index") is not None:
            print(f"{result['input']}: slice {result['slice_index'] + 1} of {result['n_slices']} "
                  f"(--slice {result['slice_index']}; 0 = most inferior)")
        for i, c in enumerate(result["candidates"], 1):
            where = ""
            if "slice_index" in c:  # counted from 1, as above
                seen = (f" (seen on {c['first_slice'] + 1}-{c['last_slice'] + 1})"
                        if c.get("last_slice", c.get("first_slice")) != c.get("first_slice") else "")
                where = f"slice {c['slice_index'] + 1}{seen}, "
            print(f"{i:>2}. {where}x {c['x']:.0f}, y {c['y']:.0f} px   diameter {c['diameter_mm']:.1f} mm   "
                  f"score {c['score']:.2f}")
        if not result["candidates"]:
            print("no candidates found")
        for note in result.get("notes", []):
            print(f"note: {note}")
        return
    print(result.get("notice", RESEARCH_NOTICE))
    for view, tasks in result.get("views", {}).items():
        if "binary" in tasks:
            b = tasks["binary"]
            print(f"{view:>7}: malignant {prob_pct(b['probabilities'][1])} (call: {b['prediction']}; malignant from "
                  f"{prob_pct(b.get('calls_malignant_from', 0.5))})", end="")
        if "score" in tasks:
            probs = tasks["score"]["probabilities"]
            print(f"   score 1-5: {', '.join(prob_pct(p) for p in probs)} (call: {tasks['score']['prediction']})",
                  end="")
        print()
    print(f"flag: {result.get('flag')}" + (f" ({'; '.join(result['reasons'])})" if result.get("reasons") else ""))
    for line in nodule_model_notes(result.get("nodule_model")):
        print(line)
    for note in result.get("notes", []):
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lungviz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict one case from image files")
    p.add_argument("--slice", help="slice image: a nodule-centred crop or a whole slice (PNG/JPG/TIFF/NPY/DICOM), "
                   "or a DICOM series (folder or zip) with --index")
    p.add_argument("--index", type=int, help="slice of a DICOM series given as --slice (0 = most inferior; default "
                   "the middle one)")
    p.add_argument("--nodule", help="optional zoomed nodule crop")
    p.add_argument("--centre", help="nodule centre ROW,COLUMN in a whole slice (default: the image centre)")
    p.add_argument("--explain", choices=EXPLAIN_METHODS, help="write explanation overlays to --out")
    p.add_argument("--out", help="folder for explanation images")
    p.add_argument("--weights", help="model folder (default: the shipped weights/)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    lo = sub.add_parser("locate", help="find nodule candidates on a whole slice")
    lo.add_argument("image", help="whole slice (PNG/JPG/TIFF/NPY/DICOM) or a DICOM series folder or zip")
    lo.add_argument("--slice", type=int, help="slice index in a DICOM series (0 = most inferior; default: search "
                    "every slice and list the series' best candidates)")
    lo.add_argument("--top-k", type=int, default=10, help="candidates to list")
    lo.add_argument("--min-score", type=float, default=0.0, help="leave out candidates scored below this")
    lo.add_argument("--weights", help="model folder (default: the shipped weights/)")
    lo.add_argument("--json", action="store_true", help="print one JSON object")
    b = sub.add_parser("bench", help="speed benchmark on real cases (CPU)")
    b.add_argument("--repeats", type=int, default=20)
    b.add_argument("--cases", type=int, default=5, help="number of real test cases to time")
    b.add_argument("--weights", help="model folder (default: the shipped weights/)")
    b.add_argument("--only", choices=("all", "locate"), default="all", help="locate: time the nodule finder alone "
                   "(one slice, and every slice of each real series)")
    b.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "predict":
            if not args.slice and not args.nodule:
                raise LungvizError("give --slice (and optionally --nodule).")
            result = cmd_predict(args)
        elif args.command == "locate":
            if args.top_k < 1 or not 0.0 <= args.min_score <= 1.0:
                raise LungvizError("--top-k must be at least 1 and --min-score between 0 and 1.")
            result = cmd_locate(args)
        else:
            from lungviz.cli.bench import run_bench

            if args.repeats < 1 or args.cases < 1:
                raise LungvizError("--repeats and --cases must be at least 1.")
            result = run_bench(args.repeats, args.cases, Path(args.weights) if args.weights else None,
                               only=args.only)
    except LungvizError as err:
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:  # a fault in lungviz, not in the input: still one line, never a traceback
        print(f"error: lungviz stopped on an unexpected problem ({type(err).__name__}: {_one_line(str(err))[:300]}); "
              "please report it.", file=sys.stderr)
        return 1
    if args.json or args.command == "bench":
        print(json.dumps(result, indent=1))
    else:
        _print_human(result)
    return 0
