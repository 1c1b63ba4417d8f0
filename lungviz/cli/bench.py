"""Speed benchmark on real cases: prediction, Grad-CAM, LIME (fast vs stock), retrieval, nodule search, cold start,
and the speed a user of the app feels (:func:`felt_bench`: upload to first estimate, a slider step on a 100-slice
series, the first page of a fresh server).

Medians of repeated runs with warm caches (models loaded once), except ``cold_start_s``, which times a fresh
Python process from import to its first prediction, and ``first_page_s``, a fresh ``streamlit run``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from lungviz import paths
from lungviz.cli.serve import app_server, chromium_path
from lungviz.errors import LungvizError
from lungviz.retrieval import LIBRARY_INDEX

INDEX_NAME = LIBRARY_INDEX


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def bench_cases(n: int) -> list:
    """``n`` real test-split nodules (middle slice as context), for timing."""
    from lungviz.data.lidc import import_slices
    from lungviz.data.splits import Split

    cases, _ = import_slices(paths.lidc_slices_dir())
    split_file = paths.weights_dir() / "splits" / "holdout.json"
    if split_file.is_file():
        cases = Split.load(split_file).select(cases, "test")
    if not cases:
        raise LungvizError("no real cases found for the benchmark; check the data folder (LUNGVIZ_DATA).")
    step = max(1, len(cases) // max(n, 1))
    return cases[::step][:n]


def locate_bench(folder: Path, repeats: int, progress: bool = True) -> dict:
    """Searching whole 512 x 512 DICOM slices for nodules: one slice (the median over each real series' first
    nodule slice) and every slice of each real series with its neighbours (a progress bar per series), scaled to
    100 slices."""
    from tqdm import tqdm

    from lungviz.data.dicom import find_nodules, read_patient
    from lungviz.inference.finder import load_finder, scan, scan_series, series_volume

    root = paths.lidc_dicom_dir()
    try:
        finder = load_finder(folder)
    except LungvizError:
        return {}
    slices, series_s, series_n = [], {}, {}
    for patient in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        series, marks, _ = read_patient(patient)
        nodules, _ = find_nodules(series, marks)
        slices += [series[int(round(nd.centre_z_index))] for nd in nodules[:1]]
        vol, sp, gap = series_volume(series)
        with tqdm(total=len(vol), desc=f"series {patient.name}", unit="slice", disable=not progress) as bar:
            res = scan_series(finder, vol, True, sp, gap, progress=lambda done, total: bar.update(1))
        series_s[patient.name], series_n[patient.name] = res.seconds, len(vol)
    if not slices:
        return {}
    times = [_median_ms(lambda s=s: scan(finder, s.hu, True, float(np.mean(s.pixel_spacing_mm))),
                        max(3, repeats // 4)) for s in slices]
    per_100 = {k: 100.0 * series_s[k] / series_n[k] for k in series_s}
    return {"locate_ms": float(np.median(times)), "locate_ms_per_slice": times,
            "locate_slice_shape": list(slices[0].hu.shape),
            "locate_series_s": series_s, "locate_series_slices": series_n,
            "locate_series_s_per_100_slices": float(np.max(list(per_100.values()))),
            "locate_series_s_per_100_slices_by_series": per_100}


COLD_START = """
import time, sys
t0 = time.perf_counter()
import numpy as np
from lungviz.inference.predict import load_models, predict
from lungviz.retrieval import load_index
from lungviz.data.io import load_image
from lungviz.data.upload import from_loaded
from pathlib import Path
folder = Path(sys.argv[1])
models = load_models(folder)
index = load_index(folder, "{index}") if (folder / "{index}.faiss").is_file() else None
case = from_loaded(load_image(sys.argv[2]))
predict(models, case.context, case.nodule_crop, case.spacing_mm)
print(time.perf_counter() - t0)
"""


def cold_start_seconds(folder: Path, image_path: Path) -> float:
    """Wall time of a new process: imports, loading every model and the index, and one prediction."""
    code = COLD_START.format(index=INDEX_NAME)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, str(folder), str(image_path)], capture_output=True, text=True,
                         cwd=str(paths.REPO_ROOT), timeout=300)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise LungvizError(f"the cold-start run failed: {res.stderr.strip().splitlines()[-1:]}")
    return wall


#: What the user feels, in seconds: upload to first estimate (warm caches), one slider step on a 100-slice series,
#: the first page of a fresh server (issue 27).
FELT_TARGETS_S = {"upload_to_estimate_s": 3.0, "slider_step_s": 1.0, "first_page_s": 5.0}
SERIES_SLICES = 100


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    return _median_ms(fn, repeats) / 1000.0


def upload_to_estimate(models, data: bytes, name: str, finder=None) -> object:
    """What the Inspect page does between an upload and its estimate, with the models loaded: decode the file, find
    the nodule candidates on a whole slice (the centre starts at the best), cut the views and predict."""
    from lungviz.data.io import load_image
    from lungviz.data.upload import from_loaded, is_whole_slice
    from lungviz.inference.finder import scan
    from lungviz.inference.predict import predict

    loaded = load_image(data, name)
    centre = None
    if is_whole_slice(loaded.pixels):
        cands = scan(finder, loaded.pixels, loaded.is_hu, loaded.pixel_spacing_mm, top_k=5)[0] if finder else []
        h, w = loaded.pixels.shape
        centre = (cands[0].y, cands[0].x) if cands else (h / 2.0, w / 2.0)
    case = from_loaded(loaded, None, centre)
    return predict(models, case.context, case.nodule_crop, case.spacing_mm)


def padded_series(series: list, n: int = SERIES_SLICES) -> list:
    """A real series repeated to ``n`` slices (a 100-slice series from a shorter real one), z stepping on evenly."""
    step = float(abs(series[1].z_mm - series[0].z_mm)) if len(series) > 1 else 2.5
    return [replace(series[k % len(series)], z_mm=float(series[0].z_mm) + k * (step or 2.5)) for k in range(n)]


def slider_step(series: list, k: int, outlines: dict, centre_rc: tuple[float, float], window: str = "lung") -> str:
    """What the Inspect page draws when the series slider moves to slice ``k`` (the slices are decoded once per
    upload, the outlines mapped once per pick): the slice in its window, cut around the nodule, the model's outline
    drawn, shown at 384 px and encoded for the browser."""
    from lungviz.data.preprocess import SLICE_CROP_PX, crop_around, resize
    from lungviz.data.upload import display_image
    from lungviz.inference.outline import outline_overlay
    from lungviz.present.report import data_uri

    crop = resize(crop_around(display_image(series[k].hu, True, window), centre_rc, SLICE_CROP_PX, fill=0.0), 384)
    mask = outlines.get(k)
    if mask is not None:
        edge = resize((crop_around(mask.astype(np.float32), centre_rc, SLICE_CROP_PX, fill=0.0) > 0.5)
                      .astype(np.float32), 384) > 0.5
        crop = outline_overlay(crop, edge)
    return data_uri(crop)


def picker_step(series: list, k: int, window: str = "lung") -> str:
    """What the nodule picker redraws when its slice slider moves: the lung mask of the new slice and the whole
    slice in its window, encoded for the plotly figure."""
    from lungviz.data.upload import display_image
    from lungviz.inference.lungmask import lung_mask, mask_overlay
    from lungviz.present.report import data_uri

    sl = series[k]
    lung = lung_mask(sl.hu, True, float(np.mean(sl.pixel_spacing_mm)))
    return data_uri(mask_overlay(display_image(sl.hu, True, window), lung))


def first_page_seconds(folder: Path, timeout_s: float = 120.0) -> dict:
    """A fresh ``streamlit run`` of the app: seconds until its health endpoint answers, until the Inspect page's
    first run has drawn its upload box in headless Chromium, and until that run has finished (the models loaded);
    the last two need Playwright and Chromium."""
    t0 = time.perf_counter()
    with app_server({"LUNGVIZ_WEIGHTS": str(folder)}, timeout_s=timeout_s) as (url, health_s):
        out: dict = {"server_health_s": health_s}
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            return out
        if not chromium_path().is_file():
            return out
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium_path()),
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(url, wait_until="domcontentloaded")
                page.locator('[data-testid="stFileUploader"]').first.wait_for(timeout=timeout_s * 1000)
                out["first_page_s"] = time.perf_counter() - t0
                page.wait_for_timeout(200)  # then the rest of the first run: the models load into the server
                page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_s * 1000)
                out["first_run_done_s"] = time.perf_counter() - t0
            finally:
                browser.close()
    return out


def felt_bench(folder: Path, repeats: int) -> dict:
    """The speed the user feels (issue 27): upload to first estimate with warm caches (a real LIDC slice PNG and a
    real whole DICOM slice), a slider step on a real series repeated to 100 slices (the series view's slider, and
    the picker's, which also re-follows the nodule from the new slice), and the first page of a fresh server."""
    from lungviz.data.dicom import find_nodules, read_patient
    from lungviz.inference.finder import load_finder
    from lungviz.inference.nodule import assess_series
    from lungviz.inference.predict import load_models
    from lungviz.present.dicom_export import source_outlines

    models = load_models(folder)
    try:
        finder = load_finder(folder)
    except LungvizError:
        finder = None
    case = bench_cases(1)[0]
    png = Path(case.image_paths[case.n_slices // 2])
    out: dict = {"felt_targets_s": FELT_TARGETS_S}
    out["upload_to_estimate_png_s"] = _median_s(lambda: upload_to_estimate(models, png.read_bytes(), png.name),
                                                repeats)
    root = paths.lidc_dicom_dir()
    read = [read_patient(p) for p in sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    with_nodule = [(series, nodules[0]) for series, marks, _ in read if (nodules := find_nodules(series, marks)[0])]
    if with_nodule:
        series, nodule = with_nodule[0]
        sl = series[int(round(nodule.centre_z_index))]
        if Path(sl.name).is_file():  # a real whole DICOM slice through the nodule
            data, name = Path(sl.name).read_bytes(), Path(sl.name).name
            out["upload_to_estimate_dicom_slice_s"] = _median_s(
                lambda: upload_to_estimate(models, data, name, finder), repeats)
        # the same series repeated to 100 slices (its nodule spans 13 slices: the outline is drawn on them)
        big = padded_series(series)
        mid, centre = int(round(nodule.centre_z_index)), nodule.centre_rc
        outlines: dict = {}
        if models.nodule is not None:
            outlines = source_outlines(assess_series(models.nodule, big, mid, centre), big, mid, centre)
            out["series_followed_slices"] = len(outlines)
        steps = [(mid + d) % len(big) for d in range(-5, 5)]  # through the nodule and beyond it
        out["series_slices"] = len(big)
        out["slider_step_s"] = float(np.median([_median_s(lambda j=j: slider_step(big, j, outlines, centre),
                                                          max(3, repeats)) for j in steps]))
        out["picker_step_s"] = float(np.median([_median_s(lambda j=j: picker_step(big, j), max(3, repeats // 2))
                                                for j in steps[:3]]))
        if models.nodule is not None:
            out["picker_step_refollow_s"] = float(np.median([_median_s(
                lambda j=j: assess_series(models.nodule, big, j, centre), 1) for j in steps[4:7]]))
    out.update(first_page_seconds(folder))
    out["upload_to_estimate_s"] = max(v for key, v in out.items() if key.startswith("upload_to_estimate_"))
    return out


def run_bench(repeats: int = 20, n_cases: int = 5, folder: Path | None = None, lime_cases: int = 12,
              only: str = "all") -> dict:
    """Time every step the app runs for one case; returns the figures docs/app.md reports. ``only="locate"``
    times the nodule finder alone."""
    import torch

    if only == "locate":
        torch.set_num_threads(1)
        return {"device": "cpu" if not torch.cuda.is_available() else "cuda", "torch_threads": 1,
                **locate_bench(folder or paths.weights_dir(), repeats)}

    from lungviz.explain import LIME_STABLE_SAMPLES, bundle_cam, lime_map, segment, stock_lime, top_k_overlap
    from lungviz.inference.predict import load_models, predict, retrieval_query
    from lungviz.retrieval import load_index, set_server_threads

    folder = folder or paths.weights_dir()
    set_server_threads(1)
    models = load_models(folder)
    cases = bench_cases(n_cases)
    contexts = [(c.load_slice(c.n_slices // 2), c.pixel_spacing_mm) for c in cases]
    predict_ms = [_median_ms(lambda ctx=ctx, sp=sp: predict(models, ctx, None, sp), repeats) for ctx, sp in contexts]
    preds = [predict(models, ctx, None, sp) for ctx, sp in contexts]
    cam_ms: dict[str, list[float]] = {}
    for pred in preds:
        for view, image in pred.images.items():
            b = models.nodule if view == "nodule" else models.bundle(view, "binary")
            if b is None:
                continue
            for method in ("gradcam", "gradcampp"):
                ms = _median_ms(lambda b=b, im=image, m=method: bundle_cam(b, im, m), max(5, repeats // 2))
                cam_ms.setdefault(f"{method}_{view}", []).append(ms)
    # LIME on the nodule view: fast (and stable) vs stock lime with defaults, same model, image and superpixels;
    # top-5 overlaps are means over the cases and over the three stock runs (pairs of them for stock vs stock).
    b = models.nodule or next(iter(models.bundles.values()))
    lime_views = [predict(models, c.load_slice(c.n_slices // 2), None, c.pixel_spacing_mm).images[b.spec.view]
                  for c in bench_cases(lime_cases)]
    lime_t: dict[str, list[float]] = {"fast": [], "stable": [], "stock": []}
    lime_ov: dict[str, list[float]] = {"fast": [], "stable": [], "stock": []}
    kw = {"calibration": b.calibration}
    for image in lime_views:
        seg = segment(image)
        t0 = time.perf_counter()
        fast = lime_map(b.model, image, b.mean, b.std, segments=seg, seed=0, **kw)
        lime_t["fast"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stable = lime_map(b.model, image, b.mean, b.std, segments=seg, seed=0, num_samples=LIME_STABLE_SAMPLES, **kw)
        lime_t["stable"].append(time.perf_counter() - t0)
        stocks = []
        for seed in (1, 2, 3):  # three stock runs: each fast run is compared with all three, and they with each other
            t0 = time.perf_counter()
            stocks.append(stock_lime(b.model, image, b.mean, b.std, seg, seed=seed, **kw).top_segments(5))
            lime_t["stock"].append(time.perf_counter() - t0)
        for name, res in (("fast", fast), ("stable", stable)):
            lime_ov[name] += [top_k_overlap(res.top_segments(5), s, 5) for s in stocks]
        lime_ov["stock"] += [top_k_overlap(stocks[i], stocks[j], 5) for i, j in ((0, 1), (0, 2), (1, 2))]
    out: dict = {
        "device": "cpu" if not torch.cuda.is_available() else "cuda",
        "torch_threads": torch.get_num_threads(),
        "n_cases": len(cases),
        "repeats": repeats,
        "predict_ms": float(np.median(predict_ms)),
        "predict_ms_per_case": predict_ms,
        "models_in_predict": sorted(models.networks),
        "gradcam_ms": float(np.median([v for k, vs in cam_ms.items() if k.startswith("gradcam_") for v in vs])),
        "gradcampp_ms": float(np.median([v for k, vs in cam_ms.items() if k.startswith("gradcampp_") for v in vs])),
        "cam_ms_by_view": {k: float(np.median(v)) for k, v in cam_ms.items()},
        "lime_s": float(np.median(lime_t["fast"])),
        "lime_stock_s": float(np.median(lime_t["stock"])),
        "lime_speedup": float(np.median(lime_t["stock"]) / max(np.median(lime_t["fast"]), 1e-9)),
        "lime_overlap_vs_stock": float(np.mean(lime_ov["fast"])),
        "lime_overlap_stock_vs_stock": float(np.mean(lime_ov["stock"])),
        "lime_stable_samples": LIME_STABLE_SAMPLES,
        "lime_stable_s": float(np.median(lime_t["stable"])),
        "lime_stable_overlap_vs_stock": float(np.mean(lime_ov["stable"])),
        "lime_cases": len(lime_views),
    }
    if (folder / f"{INDEX_NAME}.faiss").is_file():
        index = load_index(folder, INDEX_NAME)

        def query(ctx: np.ndarray, sp: float | None) -> np.ndarray:
            return retrieval_query(models, index.model, ctx, None, sp)

        queries = [query(ctx, sp) for ctx, sp in contexts]
        out["retrieval_ms"] = float(np.median([_median_ms(lambda q=q: index.search(q, 5), repeats) for q in queries]))
        out["embed_ms"] = float(np.median([_median_ms(lambda c=c, s=s: query(c, s), repeats) for c, s in contexts]))
        out["index_size"] = len(index)
    out.update(locate_bench(folder, repeats))
    first = cases[0].image_paths[cases[0].n_slices // 2]
    out["cold_start_s"] = cold_start_seconds(folder, Path(first))
    out.update(felt_bench(folder, repeats))
    return out
