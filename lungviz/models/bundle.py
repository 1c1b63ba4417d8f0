"""Model bundles: fp16 safetensors weights and a typed JSON spec that drives all preprocessing."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lungviz.calibration import Calibration
from lungviz.errors import LungvizError
from lungviz.files import atomic_write, replacing
from lungviz.models.networks import LungvizNet, LungvizSegNet, NoduleNet, create_model, resolve_device

log = logging.getLogger(__name__)

#: Largest finite float16 value; tensors beyond it stay float32 in a bundle.
_FP16_MAX = float(torch.finfo(torch.float16).max)
_BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelSpec:
    """What a bundle's JSON holds: the model, its data and preprocessing, calibration, metrics and provenance.

    Unknown keys are kept in ``extra`` and written back at the top level, so a round trip loses nothing.
    """

    arch: str
    classes: list[str]
    view: str
    task: str
    input_size: int
    mean: list[float]
    std: list[float]
    in_chans: int = 3
    interpolation: str = "bilinear"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    split_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.classes)

    @classmethod
    def from_model(cls, model: LungvizNet, *, classes: Sequence[str], view: str, task: str, **kwargs: Any) -> ModelSpec:
        """A spec whose architecture and data config (input size, mean, std, interpolation) come from ``model``."""
        cfg = model.data_config
        base: dict[str, Any] = {
            "arch": model.arch,
            "in_chans": model.in_chans,
            "input_size": int(cfg["input_size"][-1]),
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
            "interpolation": str(cfg.get("interpolation", "bilinear")),
        }
        return cls.from_dict({**base, "classes": list(classes), "view": view, "task": task, **kwargs})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Read a spec dict (e.g. a bundle JSON); keys that are not fields go to ``extra``."""
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [n for n in ("arch", "classes", "view", "task", "input_size", "mean", "std") if n not in data]
        if missing:
            raise LungvizError(f"the model description lacks {', '.join(missing)}.")
        known = {k: v for k, v in data.items() if k in names}
        known["classes"] = [str(c) for c in known["classes"]]
        known["mean"] = [float(v) for v in known["mean"]]
        known["std"] = [float(v) for v in known["std"]]
        extra = {**dict(data.get("extra", {})), **{k: v for k, v in data.items() if k not in names and k != "extra"}}
        return cls(**known, extra=extra)

    @property
    def cam_layer(self) -> str | None:
        """Dotted name of the Grad-CAM target layer chosen for this model (None = its last feature layer)."""
        layer = self.extra.get("cam_layer")
        return str(layer) if layer else None

    @property
    def prior_adjust(self) -> list[float] | None:
        """The prior correction added to the logits (``calibration``), None when there is none."""
        prior = self.extra.get("prior_adjust")
        return None if prior is None else [float(v) for v in prior]

    @property
    def estimate(self) -> dict[str, Any]:
        """The nodule model's estimate by its factors (model, call point, test figures); empty for another model."""
        return dict(self.extra.get("estimate") or {})

    @property
    def head_temperatures(self) -> dict[str, float]:
        """The nodule model's temperature per head (empty for another model)."""
        return {str(k): float(v) for k, v in (self.extra.get("head_temperatures") or {}).items()}

    @property
    def weights_sha256(self) -> str | None:
        """The SHA-256 of the weights file, as written by :func:`save_bundle`."""
        sha = self.extra.get("weights_sha256")
        return str(sha) if sha else None

    @property
    def dataset(self) -> str:
        """``lidc`` or ``histology``."""
        return str(self.extra.get("dataset") or "lidc")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the fields, then ``extra``'s keys at the top level."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
        return {**out, **self.extra}


@dataclass
class Bundle:
    """A loaded model bundle: the model in eval mode on its device and its typed spec (:class:`ModelSpec`)."""

    model: LungvizNet
    spec: ModelSpec
    name: str
    folder: Path
    device: torch.device

    @property
    def arch(self) -> str:
        """The architecture name."""
        return self.spec.arch

    @property
    def classes(self) -> list[str]:
        """Class names, in logit order."""
        return list(self.spec.classes)

    @property
    def input_size(self) -> int:
        """Side of the square model input in pixels."""
        return int(self.spec.input_size)

    @property
    def in_chans(self) -> int:
        """Number of input channels."""
        return int(self.spec.in_chans)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean."""
        return tuple(self.spec.mean)

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalisation standard deviation."""
        return tuple(self.spec.std)

    @property
    def view(self) -> str:
        """The model view (``slice`` or ``nodule``)."""
        return self.spec.view

    @property
    def task(self) -> str:
        """The task the model was trained for."""
        return self.spec.task

    @property
    def temperature(self) -> float:
        """Calibration temperature dividing the logits (1.0 when uncalibrated)."""
        return float(self.spec.temperature)

    @property
    def calibration(self) -> Calibration:
        """How the logits become calibrated probabilities and a call (:mod:`lungviz.calibration`)."""
        return Calibration.from_spec(self.spec.to_dict())

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Preprocessing parameters (window, contrast, field of view...)."""
        return dict(self.spec.preprocessing)

    @property
    def cam_layer(self) -> str | None:
        """Dotted name of the Grad-CAM target layer chosen for this model (None = its last feature layer)."""
        return self.spec.cam_layer


def spec_dict(spec: ModelSpec | Mapping[str, Any]) -> dict[str, Any]:
    """A spec as its JSON dict, whether a bundle's :class:`ModelSpec` or a spec read from a file."""
    return spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)


def _check_name(name: str) -> None:
    """Bundle names become file names: letters, digits, dot, dash and underscore only."""
    if not _BUNDLE_NAME.match(name):
        raise LungvizError(f"'{name}' is not a valid model name; use letters, digits, '.', '-' and '_' only.")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    """JSON encoder for numpy scalars/arrays, tensors and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _to_storage(tensor: torch.Tensor, fp16: bool) -> torch.Tensor:
    """A contiguous CPU copy; floating tensors become float16 when they fit its range."""
    t = tensor.detach().to("cpu")
    if fp16 and t.is_floating_point() and (t.numel() == 0 or float(t.abs().max()) <= _FP16_MAX):
        t = t.to(torch.float16)
    return t.contiguous().clone()


@torch.no_grad()
def round_to_storage(model: nn.Module, fp16: bool = True) -> None:
    """Round the weights in place to what :func:`save_bundle` stores, so that calibration and every figure
    measured afterwards describe the shipped weights rather than their float32 originals."""
    for tensor in model.state_dict().values():  # the state dict's tensors share storage with the model's
        if tensor.is_floating_point():
            tensor.copy_(_to_storage(tensor, fp16).to(tensor.device, tensor.dtype))


def save_bundle(
    model: LungvizNet, spec: Mapping[str, Any] | ModelSpec, folder: Path, name: str, fp16: bool = True
) -> dict[str, Any]:
    """Write ``<name>.safetensors`` and ``<name>.json`` (the spec plus ``weights_file`` and ``weights_sha256``).

    Returns the spec as written. Nothing is invented: the spec must already say how to rebuild the model.
    """
    _check_name(name)
    data = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    if not isinstance(model, LungvizNet | LungvizSegNet | NoduleNet):
        raise LungvizError("only models built by lungviz.models.create_model can be saved as bundles.")
    if data.get("arch") != model.arch:
        raise LungvizError(f"the spec says arch '{data.get('arch')}' but the model is '{model.arch}'.")
    if len(data.get("classes") or []) != model.num_classes:
        raise LungvizError(
            f"the spec lists {len(data.get('classes') or [])} classes; the model has {model.num_classes}."
        )
    if int(data.get("in_chans", 3)) != model.in_chans:
        raise LungvizError(f"the spec says {data.get('in_chans', 3)} input channels; the model has {model.in_chans}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.safetensors"
    tensors = {k: _to_storage(v, fp16) for k, v in model.state_dict().items()}
    with replacing(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "arch": model.arch})
    return _write_spec(folder, name, {**data, "weights_file": weights.name, "weights_sha256": file_sha256(weights)})


def _write_spec(folder: Path, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``<name>.json`` atomically; returns the spec as written."""
    text = json.dumps(dict(spec), indent=2, default=_json_default)
    atomic_write(Path(folder) / f"{name}.json", text + "\n")
    return json.loads(text)


def update_spec(folder: Path, name: str, **changes: Any) -> dict[str, Any]:
    """Set top-level fields of bundle ``name``'s spec (e.g. ``cam_layer``); the weights are not touched."""
    return _write_spec(folder, name, {**read_spec(folder, name), **changes})


def read_spec(folder: Path, name: str) -> dict[str, Any]:
    """The JSON spec of bundle ``name`` in ``folder``."""
    _check_name(name)
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise LungvizError(f"model '{name}' was not found (no {path.name} in {folder}).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LungvizError(f"the description of model '{name}' is unreadable: {err}", source=path) from err
    if not isinstance(data, dict):
        raise LungvizError(f"the description of model '{name}' is not a JSON object.", source=path)
    return data


def weights_path(folder: Path, name: str, spec: Mapping[str, Any]) -> Path:
    """The weights file a bundle's spec names, which must be a file of the bundle's own folder: a spec naming an
    absolute path, another folder (``..``) or a link that leads out of the folder is refused, so that an edited or
    copied spec cannot make the app read files elsewhere."""
    given = spec.get("weights_file", f"{name}.safetensors")
    if not isinstance(given, str) or not given.strip():
        raise LungvizError(f"the description of model '{name}' names no weights file.")
    folder = Path(folder)
    if "/" in given or "\\" in given or given in (".", "..") or Path(given).is_absolute():
        raise LungvizError(f"the description of model '{name}' names weights outside its folder ('{given}'); a "
                           "bundle's weights must be a file beside its description.", source=folder)
    path = folder / given
    if path.exists() and path.resolve().parent != folder.resolve():
        raise LungvizError(f"the weights of model '{name}' ({given}) are a link to a file outside the model folder; "
                           "copy the file into the folder instead.", source=folder)
    return path


def load_bundle(folder: Path, name: str, device: str | torch.device | None = None) -> Bundle:
    """Load bundle ``name`` from ``folder``: checks the weights' SHA-256, reads safetensors only, fp16 -> fp32."""
    spec = read_spec(folder, name)
    for key in ("arch", "classes"):
        if key not in spec:
            raise LungvizError(f"the description of model '{name}' lacks '{key}'.")
    weights = weights_path(folder, name, spec)
    if not weights.is_file():
        raise LungvizError(f"the weights of model '{name}' are missing ({weights.name} not found).", source=folder)
    expected = spec.get("weights_sha256")
    if expected and file_sha256(weights) != expected:
        raise LungvizError(f"the weights of model '{name}' are corrupted (checksum mismatch); re-download or retrain.")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise LungvizError(f"the weights of model '{name}' could not be read: {err}", source=weights) from err
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model = create_model(
        str(spec["arch"]), len(spec["classes"]), pretrained=False, in_chans=int(spec.get("in_chans", 3))
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise LungvizError(f"the weights of model '{name}' do not match its architecture: {err}") from err
    dev = resolve_device(device)
    model.to(dev).eval()
    return Bundle(model=model, spec=ModelSpec.from_dict(spec), name=name, folder=Path(folder), device=dev)


def list_bundles(folder: Path | None = None) -> list[dict[str, Any]]:
    """The JSON specs of the bundles in ``folder`` (default: the shipped weights), each with ``bundle`` = its name."""
    if folder is None:
        from lungviz.paths import weights_dir

        folder = weights_dir()
    folder = Path(folder)
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            spec = read_spec(folder, path.stem)
        except LungvizError as err:
            log.warning("skipping %s: %s", path.name, err)
            continue
        if "weights_file" in spec and "arch" in spec:
            out.append({**spec, "bundle": path.stem})
    return out
