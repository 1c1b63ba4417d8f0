"""Settings as dataclasses, with every field overridable on the command line (``--field value``)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass
class SplitConfig:
    """Patient-level split files."""

    data: str = ""  # lidc-slices folder; empty = the configured data folder
    seed: int = 42
    out: str = ""  # folder for the split files; empty = weights/splits (shipped with the models)


@dataclasses.dataclass
class OutlierConfig:
    """Outlier screening: pretrained-backbone embeddings, PCA + Isolation Forest, t-SNE."""

    dataset: str = "lidc"  # lidc | histology
    data: str = ""
    arch: str = "tf_efficientnet_lite0"
    view: str = "slice"
    input_size: int = 128
    contamination: float = 0.02
    pca_components: int = 50
    batch_size: int = 64
    seed: int = 0
    limit: int = 0  # screen only the first N cases (0 = all); for quick checks
    out: str = ""  # empty = runs/outliers-<dataset>


def _parse_type(tp: Any) -> Any:
    if tp in (int, float, str):
        return tp
    if tp is bool:
        return lambda s: str(s).lower() in ("1", "true", "yes", "on")
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        inner = typing.get_args(tp)[0]
        return lambda s: tuple(inner(v) for v in str(s).split(","))
    return str


def field_notes(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` on each field's line in the dataclass bodies (base classes first), for --help."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined outside a file: no notes
            continue
        lines: dict[int, list[tokenize.TokenInfo]] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
                lines.setdefault(tok.start[0], []).append(tok)
        for toks in lines.values():
            first, last = toks[0], toks[-1]
            if (len(toks) > 2 and first.type == tokenize.NAME and first.start[1] == 4 and toks[1].string == ":"
                    and last.type == tokenize.COMMENT):
                notes[first.string] = last.string.lstrip("#").strip()
    return notes


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--name`` option per dataclass field, defaulting to the field's default; its help is the field's
    comment in the class body."""
    hints = typing.get_type_hints(cls)
    notes = field_notes(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = f"--{f.name.replace('_', '-')}"
        text = f"{notes[f.name]} (default: {default})" if f.name in notes else f"(default: {default})"
        text = text.replace("%", "%%")  # argparse formats help with %
        if hints[f.name] is bool:  # "--flag" alone means true; "--flag false" also works
            parser.add_argument(flag, dest=f.name, type=_parse_type(bool), nargs="?", const=True, default=default,
                                help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=_parse_type(hints[f.name]), default=default, help=text)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the dataclass from parsed arguments."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def save_config(cfg: Any, path: Path) -> Path:
    """Write the settings as JSON next to what they produced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
    return path


@dataclasses.dataclass
class EvalConfig:
    """Evaluate a shipped bundle on a lidc-slices folder."""

    data: str = ""  # lidc-slices layout folder (histology: class folders); empty = the configured data folder
    task: str = "binary"  # binary | score | histology | characteristics (the nodule model's eight ratings)
    view: str = "nodule"  # nodule | slice (nodule: the nodule model's estimate fused-binary or score nodule-score)
    model: str = ""  # model name (fused-binary, nodule-score, slice-binary, ...); empty = from --view and --task
    weights: str = ""  # bundle folder; empty = weights/
    split: str = ""  # train | val | test restricts to the saved split; empty = every labelled nodule
    predictions: str = ""  # write per-nodule probabilities to this CSV
    json: bool = False  # print one JSON object instead of a short readable summary
    n_boot: int = 1000  # bootstrap resamples for the 95% intervals
    max_slices: int = 0  # 0 = every slice of each nodule


@dataclasses.dataclass
class IndexConfig:
    """The similar-case index (and its thumbnail atlas) over every labelled nodule of the library."""

    model: str = "nodule"
    data: str = ""
    out: str = ""  # empty = weights/
    max_slices: int = 5


@dataclasses.dataclass
class PackConfig:
    """Carry the lidc-slices set to a lent GPU machine in parts (training.devicepack)."""

    data: str = ""  # lidc-slices folder to pack; empty = the configured data folder
    out: str = ".device"  # where pack writes the parts (git-ignored) and unpack reads them
    parts: int = 3  # lossless images are about 100 MB: three parts of about 35 MB each
    quality: int = 0  # 0 = lossless WebP (the pixels come back exactly); 1-100 = lossy WebP at that quality
    dest: str = "/tmp/lungviz-data"  # unpack: the data folder to rebuild (point LUNGVIZ_DATA at it)


@dataclasses.dataclass
class CamlocConfig:
    """Map localisation: does each model's Grad-CAM peak on the nodule, centred and shifted?"""

    data: str = ""  # lidc-slices layout folder; empty = the configured data folder
    split: str = ""  # train | val | test of the models' own split; empty = every nodule in the folder
    models: str = ""  # comma-separated bundle names; empty = the shipped LIDC networks
    weights: str = ""  # bundle folder; empty = weights/
    method: str = "gradcam"  # gradcam | gradcampp
    shift: float = 0.25  # the shifted view moves the nodule's centre this share of the view's side
    seed: int = 0  # seeds each nodule's shift direction
    choose_layer: bool = False  # first choose each model's map layer on validation (written into its spec)
    json: bool = False  # print one JSON object instead of a readable table
    out: str = ""  # also write the report to this file (the shipped record: weights/cam_localisation.json)


@dataclasses.dataclass
class CardConfig:
    """The model card (README.md) and its long tables (MODEL_CARD_TABLES.md) in the weights folder."""

    weights: str = ""  # empty = weights/
    check: bool = False  # regenerate in memory and fail with a short diff when the shipped files differ


@dataclasses.dataclass
class RefreshConfig:
    """Re-measure saved bundles on their own split: calibration refitted on validation, every figure recomputed."""

    model: str = ""  # bundle name; empty = every shipped network trained by train (SHIPPED)
    weights: str = ""  # bundle folder; empty = weights/
    n_boot: int = 1000


