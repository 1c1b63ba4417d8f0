"""The one training loop: gradual unfreezing, AdamW, cosine schedule, early stopping; every task and view."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lungviz.models import LungvizNet
from training.augment import AugmentConfig
from training.data import SliceStore, ViewConfig, class_weights, epoch_plan, train_batch

log = logging.getLogger("training")


@dataclass
class LoopConfig:
    """Settings of one training run (a subset of the full :class:`training.config.TrainConfig`)."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    layer_decay: float = 0.6  # each parameter group deeper than the head learns this factor slower
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    stages: tuple[int, ...] = (2, 5)  # epoch at which to unfreeze more: head only, then top, then all
    stage_groups: tuple[int, ...] = (1, 4, 0)  # parameter groups trainable in each stage (0 = all)
    balance: str = "upsample"  # upsample | weighted
    balance_extra: int = 200
    epoch_samples: int = 0  # cap per epoch (0 = the full balanced plan)
    patience: int = 4
    label_smoothing: float = 0.0
    seed: int = 0
    ema: float = 0.0  # > 0: validate and keep an exponential moving average of the weights (decay per step)
    aug: AugmentConfig = field(default_factory=AugmentConfig)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global generator: call before building a model, so that its
    random initialisation (a new head, a decoder, a network trained from scratch) is reproducible too."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _trainable_groups(model: LungvizNet, n: int) -> None:
    groups = model.backbone_groups()
    keep = len(groups) if n == 0 else min(n, len(groups))
    for k, params in enumerate(groups):
        for p in params:
            p.requires_grad_(k < keep)


def stage_of(epoch: int, stages: tuple[int, ...]) -> int:
    """Which unfreezing stage an epoch belongs to."""
    return sum(epoch >= s for s in stages)


def class_loss(cfg: LoopConfig, train_labels: np.ndarray, n_classes: int, device: torch.device) -> nn.Module:
    """The classification loss of a run: cross-entropy, class-weighted when ``cfg.balance`` is "weighted"."""
    weight = None
    if cfg.balance == "weighted":
        weight = torch.from_numpy(class_weights(train_labels, n_classes)).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


class MaskAuxLoss(nn.Module):
    """Class cross-entropy plus ``weight`` x a mask loss: a 1x1-conv head on the feature map of ``layer`` predicts
    the readers' consensus mask (block-averaged to that map's grid), so the features must encode where the nodule
    is and how large. Targets come packed as ``(label, mask cells...)`` (see ``train_batch_with_masks``). The head
    is used in training only; :meth:`close` removes the feature hook from the model."""

    def __init__(self, model: nn.Module, layer: str, channels: int, weight: float, class_loss: nn.Module) -> None:
        super().__init__()
        self.head = nn.Conv2d(channels, 1, kernel_size=1)
        self.weight = float(weight)
        self.class_loss = class_loss
        self._features: list[torch.Tensor] = []
        self._hook = model.get_submodule(layer).register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._features[:] = [output] if torch.is_grad_enabled() else []

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.class_loss(logits, target[:, 0].long())
        cells = self.head(self._features[0].float()).flatten(1)
        return loss + self.weight * nn.functional.binary_cross_entropy_with_logits(cells, target[:, 1:].float())

    def close(self) -> None:
        self._hook.remove()
        self._features.clear()


class AttributeAuxLoss(nn.Module):
    """Class cross-entropy plus ``weight`` x the mean squared error of a linear head that reads the readers'
    characteristics and the nodule's log diameter (standardised) off the pooled features, so they must encode what
    radiologists grade. Targets come packed as ``(label, attributes...)``; the head is used in training only and
    :meth:`close` removes the hook that reads the pooled features."""

    def __init__(self, model: LungvizNet, n_attributes: int, weight: float, class_loss: nn.Module) -> None:
        super().__init__()
        self.head = nn.Linear(model.embed_dim, n_attributes)
        self.weight = float(weight)
        self.class_loss = class_loss
        self._features: list[torch.Tensor] = []
        self._hook = model.head.register_forward_pre_hook(self._keep)

    def _keep(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._features[:] = [inputs[0]] if torch.is_grad_enabled() else []

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.class_loss(logits, target[:, 0].long())
        return loss + self.weight * nn.functional.mse_loss(self.head(self._features[0].float()), target[:, 1:].float())

    def close(self) -> None:
        self._hook.remove()
        self._features.clear()


BatchFn = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def fit(
    model: LungvizNet,
    store: SliceStore | None,
    train_idx: np.ndarray,
    train_labels: np.ndarray,
    vc: ViewConfig | None,
    cfg: LoopConfig,
    device: torch.device,
    validate: Callable[[LungvizNet], float],
    progress: bool = True,
    batch_fn: BatchFn | None = None,
    loss_fn: nn.Module | None = None,
    forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
) -> dict:
    """Train ``model`` in place on ``store`` cases ``train_idx``; keep the weights of the best validation score.

    ``validate(model) -> score`` (higher is better) runs after every epoch and drives early stopping.
    By default a batch is one random slice of each planned case in the ``vc`` view with class labels;
    ``batch_fn(items, rng) -> (inputs, targets)`` replaces that (e.g. patches for the nodule finder) and
    ``loss_fn`` the cross-entropy (e.g. a regression loss), which receives ``forward(model, x)`` (default
    ``model(x)``; e.g. every output of a multi-head model). Returns the history and timing.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_classes = model.num_classes
    model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if loss_fn is None:
        loss_fn = class_loss(cfg, train_labels, n_classes, device)
    plan_kind = "upsample" if cfg.balance == "upsample" else "none"
    steps_per_epoch = math.ceil(len(epoch_plan(train_labels, np.random.default_rng(0), plan_kind, cfg.balance_extra,
                                               cfg.epoch_samples)) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    groups = [{"params": g, "lr": cfg.lr * cfg.layer_decay**k} for k, g in enumerate(model.backbone_groups())]
    loss_fn.to(device)
    if extra := list(loss_fn.parameters()):  # a loss with its own head (MaskAuxLoss) learns at the head's rate
        groups.append({"params": extra, "lr": cfg.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1)))
    )
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    ema = None
    if cfg.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    best, best_state, best_epoch, bad = -math.inf, None, -1, 0
    history: list[dict] = []
    n_images, t_train = 0, 0.0
    for epoch in range(cfg.epochs):
        stage = stage_of(epoch, cfg.stages)
        _trainable_groups(model, cfg.stage_groups[min(stage, len(cfg.stage_groups) - 1)])
        model.train()
        plan = epoch_plan(train_labels, rng, plan_kind, cfg.balance_extra, cfg.epoch_samples)
        t0 = time.perf_counter()
        losses = []
        bar = tqdm(range(0, len(plan), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs} (stage {stage})",
                   unit="batch", disable=not progress, leave=False)
        for start in bar:
            chunk = plan[start : start + cfg.batch_size]
            if batch_fn is None:
                xb, yb = train_batch(store, train_idx[chunk], vc, rng, cfg.aug), train_labels[chunk].astype(np.int64)
            else:
                xb, yb = batch_fn(train_idx[chunk], rng)
            x = torch.from_numpy(xb).to(device)
            if cuda:
                x = x.to(memory_format=torch.channels_last)
            y = torch.from_numpy(yb).to(device)
            with autocast():
                loss = loss_fn(model(x) if forward is None else forward(model, x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(float(loss.detach()))
            n_images += len(chunk)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        t_train += time.perf_counter() - t0
        kept = model if ema is None else ema.module
        score = float(validate(kept))
        row = {"epoch": epoch + 1, "stage": stage, "loss": float(np.mean(losses)), "val_score": score,
               "lr": float(sched.get_last_lr()[0]), "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("epoch %d stage %d loss %.4f val %.4f (%.0f s)", epoch + 1, stage, row["loss"], score, row["seconds"])
        if score > best:
            best, best_epoch, bad = score, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience and stage >= len(cfg.stages):
                log.info("early stop at epoch %d (best %d)", epoch + 1, best_epoch)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"history": history, "best_epoch": best_epoch, "best_val_score": best, "train_seconds": t_train,
            "train_images": n_images, "images_per_second": n_images / max(t_train, 1e-9), "device": str(device)}
