"""Train the reference CIFAR-10 models on a CPU or a GPU (same script, ``--device``).

    python benchmarks/reference_models/train.py --arch vgg      --data-dir ../shared/data   # 96/384/384, 25 epochs
    python benchmarks/reference_models/train.py --arch vgg-tanh --data-dir ../shared/data
    python benchmarks/reference_models/train.py --arch resnet9  --data-dir ../shared/data   # 30 epochs
    python benchmarks/reference_models/train.py --arch resnet9-whitened --data-dir ../shared/data  # 112/224/448, 28
    python benchmarks/reference_models/train.py --arch vgg --widths 64 256 256 --semi --data-dir ../shared/data
    ... --device cuda

The defaults are the schedules ``sweep.py`` chose on the validation split, except ``resnet9-whitened``'s 28 epochs
and widths, set from the CPU's training speed to fit 90 minutes on a machine without AMX (the committed
``resnet9-whitened`` is wider and longer, ``--widths 144 288 576 --epochs 32``, which fits 90 minutes only with
AMX: benchmarks/README.md) (each card holds its command; a card
written on the H200 by ``sweep.py`` holds the sweep run's arguments without its ``--name`` / ``--out``).

Recipe (after the airbench speed runs, our own implementation): batch 1024, Nesterov SGD (momentum 0.85) on the
mean label-smoothed (0.2) cross-entropy, a triangular learning-rate schedule (0.2 → 1 at 23% of the steps →
0.07), BatchNorm shifts at 64× the learning rate with the same per-step weight decay, a lookahead average
pulled in every 5 steps, random translations (reflect padding; ±4 px by default), alternating horizontal
flips (each image flipped on every other epoch, from a random start) and a 12×12 cutout; ``--mixup α`` adds
mixup (Zhang et al., ICLR 2018: each batch mixed with a shuffled copy of itself by one Beta(α, α) weight, the
two label-smoothed losses weighted as their images) to every model the call trains. The whitening filters of
the VGG and of the whitened ResNet-9 come from the training images' 2×2 patches; their whitening bias trains for
the first 3 epochs only, at 64× the learning rate like the BatchNorm shifts (``--whiten-bias-lr-scale 1``: airbench94's
1×). On a CPU, bf16 autocast and channels-last memory make training 2.3–2.6× faster than
float32 (``--no-bf16`` / ``--no-channels-last`` to compare; figures in benchmarks/README.md).

Semi-supervised (``--semi``): curriculum labelling (Cascante-Bonilla et al., AAAI 2021). Round 0 trains on the
labelled images alone — that model is also the labelled-only baseline, saved as ``<name>-labelled<N>`` (``--name``,
default the arch). Each next round predicts the unlabelled images (flip-averaged), keeps the most confident ``r/R``
of every predicted class as pseudo-labels, and trains a fresh model on the labelled plus pseudo-labelled images. The
unlabelled images' labels are never used in training; the pseudo-label accuracy is logged for information.
``--round-min-steps`` makes every round's model train at least that many steps (an early round of ~10,000 images at
10 epochs is otherwise under 100 steps); ``--labelled-model`` takes round 0 from an earlier run of the same
arguments instead of training it again (checked against them; its wall time counts in the card).

``--method fixmatch`` replaces the rounds by FixMatch (Sohn et al., NeurIPS 2020) continued from the round-0 model
(``train_fixmatch``): every step the model labels the weak views (translate, flip) of 7 unlabelled images per
labelled one and trains on their RandAugment-style strong views (``cifar_data.strong_augment``) where its
confidence reaches ``--fixmatch-threshold`` of the label-smoothed target's 1 − ε + ε/C. Of its defaults, the
learning rate × 0.05 was chosen on the validation split, the threshold 0.6 by hand from the round-0 model's
confidences on training images, the 1,400 steps by the 90-minute budget (benchmarks/README.md);
``--fixmatch-weight 0`` is the control (the same steps on the labelled images alone).

Every model is written as ``<name>.safetensors`` with a JSON card (data, split, recipe, device, wall time,
images/s, validation and untouched test accuracy: plain, flip-averaged, flip- and translate-averaged; the command).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES, PatchWhitenedNet, load_reference_model, make_model
from cifar_data import cifar10_splits, cutout, strong_augment, translate_and_flip
from cpu_speed import cpu_description


@dataclasses.dataclass(frozen=True)
class Recipe:
    epochs: int = 20
    batch: int = 1024
    lr: float = 1.5  # for the mean loss over a batch of 1024
    weight_decay: float = 2e-3  # per-step decay of the weights at the peak learning rate
    momentum: float = 0.85
    bias_lr_scale: float = 64.0
    whiten_bias_lr_scale: float = 64.0  # the committed models'; airbench94 trains the whitening bias at 1× the rate
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    lookahead_every: int = 5
    min_steps: int = 0  # small sets (the labelled-only model) train for at least this many steps
    translate: int = 2  # pixels of random translation
    cutout: int = 0  # side of the square cut out of every training image (0: none)
    mixup: float = 0.0  # Beta(α, α) of mixup's mixing weight, one per batch (0: no mixup)


def triangle(step: int, total: int, start: float = 0.2, peak_at: float = 0.23, end: float = 0.07) -> float:
    """Piecewise-linear learning-rate factor: ``start`` → 1 at ``peak_at · total`` → ``end`` at ``total``."""
    peak = max(1, round(peak_at * total))
    if step < peak:
        return start + (1 - start) * step / peak
    return 1 + (end - 1) * (step - peak) / max(1, total - peak)


class Lookahead:
    """Slow weights pulled towards the fast ones every few steps; the fast weights restart from them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        for key, value in model.state_dict().items():
            if key in self.slow:
                self.slow[key].lerp_(value, 1 - decay)
                value.copy_(self.slow[key])


def mix_batch(x: torch.Tensor, partner: torch.Tensor, weight: float) -> torch.Tensor:
    """Mixup's images ``weight · x + (1 − weight) · x[partner]``; ``x`` ``(B, ...)``, ``partner`` ``(B,)``."""
    return x.lerp(x[partner], 1 - weight)


def mixed_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, partner: torch.Tensor, weight: float, smoothing: float
) -> torch.Tensor:
    """Mixup's loss (Zhang et al., ICLR 2018) for a batch whose images were mixed as ``weight · x + (1 − weight) ·
    x[partner]``: ``weight · CE(logits, y) + (1 − weight) · CE(logits, y[partner])``, each label-smoothed; ``logits``
    ``(B, C)``, ``y`` class indices ``(B,)`` or class probabilities ``(B, C)``, ``partner`` ``(B,)``. A scalar (the
    batch mean)."""
    loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    return weight * loss + (1 - weight) * F.cross_entropy(logits, y[partner], label_smoothing=smoothing)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255)


VIEWS = ("plain", "flip", "flip+translate")  # the keys of test_time_views, cheapest first


def test_time_views(model: torch.nn.Module, images: torch.Tensor, *, translate: bool = True) -> dict[str, torch.Tensor]:
    """Float logits ``(N, C)`` of float images ``(N, 3, H, W)`` under the test-time views: ``"plain"`` (one
    forward), ``"flip"`` (mean with the mirror image) and, with ``translate``, ``"flip+translate"`` — the flip
    view, half and half with the mean flip view of the image shifted by one pixel up-left and by one down-right
    (reflect padding): the airbench speed runs' test-time augmentation (Jordan, 2024), six forwards in all."""
    plain = model(images).float()
    views = {"plain": plain, "flip": (plain + model(images.flip(-1)).float()) / 2}
    if translate:
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        h, w = images.shape[-2:]
        shifted = [
            test_time_views(model, view, translate=False)["flip"] for view in (padded[..., :h, :w], padded[..., 2:, 2:])
        ]
        views["flip+translate"] = (views["flip"] + (shifted[0] + shifted[1]) / 2) / 2
    return views


def predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    device: torch.device,
    *,
    tta: bool,
    bf16: bool,
    translate: bool = False,
    batch: int = 2000,
) -> torch.Tensor:
    """Softmax probabilities ``(N, 10)`` (float32, CPU) for uint8 images ``(N, 3, 32, 32)`` under one view of
    ``test_time_views``: ``tta`` the flip view, ``translate`` (with ``tta``) the flip-and-translate view."""
    if translate and not tta:
        raise ValueError("translate=True needs tta=True")
    model.eval()
    view = "flip+translate" if translate else "flip" if tta else "plain"
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), batch):
            xb = to_float(x[i : i + batch].to(device))
            logits = test_time_views(model, xb, translate=translate)[view] if tta else model(xb).float()
            out.append(torch.softmax(logits, 1).cpu())
    return torch.cat(out)


def accuracy(model, x, y, device, *, tta: bool, bf16: bool, translate: bool = False) -> float:
    """Fraction of uint8 images ``x`` ``(N, 3, 32, 32)`` whose predicted class (``predict``'s views) is ``y``."""
    return float((predict(model, x, device, tta=tta, bf16=bf16, translate=translate).argmax(1) == y).float().mean())


def view_accuracies(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, *, bf16: bool, batch: int = 2000
) -> dict[str, float]:
    """``accuracy`` of every view of ``test_time_views`` (``"plain"``, ``"flip"``, ``"flip+translate"``) on uint8
    images ``x`` ``(N, 3, 32, 32)`` and labels ``y`` ``(N,)``, from one pass of six forwards per image."""
    model.eval()
    correct = dict.fromkeys(VIEWS, 0)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), batch):
            views = test_time_views(model, to_float(x[i : i + batch].to(device)))
            labels = y[i : i + batch].to(device)
            for view, logits in views.items():
                correct[view] += int((logits.argmax(1) == labels).sum())
    return {view: count / len(y) for view, count in correct.items()}


def sgd_with_schedule(
    model: torch.nn.Module, recipe: Recipe, total: int, whiten_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """Nesterov SGD over ``model``'s trainable parameters with the recipe's triangular schedule over ``total``
    steps: BatchNorm shifts at ``bias_lr_scale`` times the learning rate, a ``PatchWhitenedNet``'s whitening bias
    (trained for its first ``whiten_steps`` steps only) at ``whiten_bias_lr_scale`` times it, every group with the
    same per-step weight decay."""
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    whiten_bias = [model.whiten.bias] if isinstance(model, PatchWhitenedNet) else []
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in biases + whiten_bias)]
    lr, bias_lr, whiten_lr = recipe.lr, recipe.lr * recipe.bias_lr_scale, recipe.lr * recipe.whiten_bias_lr_scale
    groups = [
        dict(params=others, lr=lr, weight_decay=recipe.weight_decay / lr),
        dict(params=biases, lr=bias_lr, weight_decay=recipe.weight_decay / bias_lr),
        dict(params=whiten_bias, lr=whiten_lr, weight_decay=recipe.weight_decay / whiten_lr),
    ]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [
            lambda s: triangle(s, total),
            lambda s: triangle(s, total),
            lambda s: triangle(s, total) if s < whiten_steps else 0.0,
        ],
    )
    return optimizer, schedule


def train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    device: torch.device,
    seed: int,
    bf16: bool = True,
    channels_last: bool = True,
    label: str = "",
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 0,
) -> dict:
    """Train ``model`` in place on uint8 images ``x`` ``(N, 3, 32, 32)`` and labels ``y``: class indices ``(N,)`` or
    class probabilities ``(N, C)`` (soft targets, label-smoothed like the indices).

    Returns ``{"seconds", "images_per_second", "steps", "epochs", "losses"}`` (losses: mean per epoch). Every draw
    is seeded by ``seed``: the augmentations' from a generator, mixup's weights from the global generator.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, PatchWhitenedNet):
        sample = x[torch.randperm(len(x), generator=generator)[:5000]]
        model.init_whitening(to_float(sample))
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    batch = min(recipe.batch, len(x))
    steps_per_epoch = len(x) // batch
    epochs = max(recipe.epochs, math.ceil(recipe.min_steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    optimizer, schedule = sgd_with_schedule(model, recipe, total, recipe.whiten_bias_epochs * steps_per_epoch)
    lookahead = Lookahead(model)
    flip_start = torch.rand(len(x), generator=generator) < 0.5
    mixing = torch.distributions.Beta(recipe.mixup, recipe.mixup) if recipe.mixup else None  # global RNG, seeded
    x_device, y_device = x.to(device), y.to(device)
    losses, step = [], 0
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)[: steps_per_epoch * batch]
        epoch_loss = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            flip = flip_start[idx] ^ bool(epoch % 2)
            xb = translate_and_flip(to_float(x_device[idx.to(device)]), flip, generator, shift=recipe.translate)
            if recipe.cutout:
                xb = cutout(xb, recipe.cutout, generator)
            yb = y_device[idx.to(device)]
            if recipe.mixup:
                weight = float(mixing.sample())
                partner = torch.randperm(len(idx), generator=generator).to(device)
                xb = mix_batch(xb, partner, weight)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb)
            if recipe.mixup:
                loss = mixed_cross_entropy(logits.float(), yb, partner, weight, recipe.label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            epoch_loss += loss.detach()
            if step % recipe.lookahead_every == 0:
                lookahead.update(model, decay=0.95**recipe.lookahead_every * (step / total) ** 3)
        losses.append(float(epoch_loss) / steps_per_epoch)
        row = {
            "model": label,
            "epoch": epoch + 1,
            "of": epochs,
            "loss": round(losses[-1], 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if val is not None and eval_every and (epoch + 1) % eval_every == 0:  # counted in the wall time
            row["val_accuracy"] = round(accuracy(model, *val, device, tta=False, bf16=bf16), 4)
        print(json.dumps(row), flush=True)
    lookahead.update(model, decay=1.0)
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    return {
        "seconds": round(seconds, 1),
        "images_per_second": round(total * batch / seconds, 1),
        "steps": total,
        "epochs": epochs,
        "losses": [round(v, 4) for v in losses],
    }


@dataclasses.dataclass(frozen=True)
class FixMatch:
    """FixMatch's settings (Sohn et al., NeurIPS 2020): ``unlabelled_ratio`` unlabelled images per labelled one in
    a batch (μ), the confidence ``threshold`` (τ) as a fraction of the probability the recipe's label-smoothed
    target puts on its class (1 − ε + ε/C = 0.82 for ε = 0.2, C = 10: what a trained model's softmax approaches,
    not a hard ceiling), the unlabelled loss's ``weight`` (λ_u), the strong view's cutout side and the factor on
    the recipe's learning rate and weight decay."""

    steps: int = 1400
    unlabelled_ratio: int = 7
    threshold: float = 0.6
    weight: float = 1.0
    cutout: int = 16
    lr_scale: float = 0.05  # the recipe's learning rate and per-step weight decay times this


@contextlib.contextmanager
def frozen_running_statistics(norms: list[torch.nn.BatchNorm2d]):
    """Train-mode BatchNorm layers normalise by their batch's statistics without updating their running ones
    (``num_batches_tracked`` still counts, unused with a set momentum)."""
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum


def fixmatch_loss(
    logits_labelled: torch.Tensor,
    labels: torch.Tensor,
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    threshold: float,
    weight: float,
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch's loss ``CE(labelled) + weight · mean_u[ 1(max p_weak ≥ threshold) · CE(strong, argmax p_weak) ]``
    (both cross-entropies label-smoothed by ``smoothing``; the mean over the whole unlabelled batch), where
    ``p_weak = softmax(logits_weak)`` is taken as a constant. ``logits_labelled`` ``(B, C)``, ``labels`` ``(B,)``,
    ``logits_weak`` and ``logits_strong`` ``(U, C)``. Returns ``(loss, mask (U,) bool, pseudo-labels (U,))``."""
    confidence, pseudo = torch.softmax(logits_weak.detach().float(), 1).max(1)
    mask = confidence >= threshold
    unlabelled = F.cross_entropy(logits_strong.float(), pseudo, label_smoothing=smoothing, reduction="none")
    loss = F.cross_entropy(logits_labelled.float(), labels, label_smoothing=smoothing)
    return loss + weight * (unlabelled * mask).mean(), mask, pseudo


def train_fixmatch(
    model: torch.nn.Module,
    x_labelled: torch.Tensor,
    y_labelled: torch.Tensor,
    x_unlabelled: torch.Tensor,
    recipe: Recipe,
    fixmatch: FixMatch,
    *,
    device: torch.device,
    seed: int,
    bf16: bool = True,
    channels_last: bool = True,
    label: str = "",
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 0,
    y_unlabelled: torch.Tensor | None = None,
) -> dict:
    """Continue training ``model`` (the labelled-only model) in place by FixMatch for ``fixmatch.steps`` steps: each
    batch of ``recipe.batch`` images (fewer when the sets are small) holds labelled images (the recipe's translate,
    flip and cutout) and ``unlabelled_ratio`` times as many unlabelled ones; each unlabelled image's weak view
    (translate and flip) is labelled by the model itself in the same step (in train mode: the only forward that
    updates BatchNorm's running statistics), and its strong view (``strong_augment``) is trained on that label
    when the weak view's confidence reaches the threshold; labelled and strong views are normalised by their own
    batch statistics. The recipe's optimiser and triangular schedule over the FixMatch steps, its learning rate
    and per-step weight decay times ``lr_scale``; the whitening filters and bias stay as round 0 left them. Images
    uint8 ``(N, 3, 32, 32)``; ``y_unlabelled`` (optional) is only logged (the accuracy of the kept pseudo-labels),
    never trained on. ``eval_every``: a log row (and validation accuracy, with ``val``) every that many steps.

    Returns ``{"seconds", "images_per_second", "steps", "mask_rate", "pseudo_label_accuracy", "log"}``: seconds of
    the loop (validation included), labelled plus unlabelled images per second (each unlabelled image is
    forwarded twice), ``mask_rate`` the mean over the last tenth of the steps of the fraction of unlabelled images
    kept, ``pseudo_label_accuracy`` (only with ``y_unlabelled``) the mean over those steps of each step's accuracy
    of its kept pseudo-labels; the log rows hold the same two means over the steps since the previous row.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    n_labelled = min(recipe.batch // (1 + fixmatch.unlabelled_ratio), len(x_labelled))
    n_unlabelled = min(fixmatch.unlabelled_ratio * n_labelled, len(x_unlabelled)) if fixmatch.weight else 0
    if n_labelled == 0 or (n_unlabelled == 0 and fixmatch.weight):
        raise ValueError("FixMatch needs labelled and unlabelled images in every batch")
    total = fixmatch.steps
    scaled = dataclasses.replace(
        recipe, lr=recipe.lr * fixmatch.lr_scale, weight_decay=recipe.weight_decay * fixmatch.lr_scale
    )
    optimizer, schedule = sgd_with_schedule(model, scaled, total, whiten_steps=0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    lookahead = Lookahead(model)
    n_classes = model.head.out_features
    threshold = fixmatch.threshold * (1 - recipe.label_smoothing + recipe.label_smoothing / n_classes)

    def stream(n: int, size: int):
        while True:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n - size + 1, size):
                yield order[i : i + size]

    labelled_batches = stream(len(x_labelled), n_labelled)
    unlabelled_batches = stream(len(x_unlabelled), n_unlabelled) if fixmatch.weight else None
    x_labelled, y_labelled, x_unlabelled = x_labelled.to(device), y_labelled.to(device), x_unlabelled.to(device)
    y_unlabelled = y_unlabelled.to(device) if y_unlabelled is not None else None

    def layout(xb: torch.Tensor) -> torch.Tensor:
        return xb.contiguous(memory_format=torch.channels_last) if channels_last else xb

    def flips(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator) < 0.5

    def known_mean(values: list[float]) -> float | None:  # steps that kept no image have no accuracy (NaN)
        known = [v for v in values if v == v]
        return round(sum(known) / len(known), 4) if known else None

    log, kept, right, last_row = [], [], [], 0
    start = time.perf_counter()
    for step in range(1, total + 1):
        model.train()
        il = next(labelled_batches).to(device)
        iu = next(unlabelled_batches).to(device) if fixmatch.weight else None
        xl = translate_and_flip(to_float(x_labelled[il]), flips(n_labelled), generator, shift=recipe.translate)
        if recipe.cutout:
            xl = cutout(xl, recipe.cutout, generator)
        if fixmatch.weight == 0:  # the control: the same steps on the labelled images alone
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits_labelled = model(layout(xl))
            loss = F.cross_entropy(logits_labelled.float(), y_labelled[il], label_smoothing=recipe.label_smoothing)
        else:
            xu = to_float(x_unlabelled[iu])
            weak = translate_and_flip(xu, flips(n_unlabelled), generator, shift=recipe.translate)
            strong = strong_augment(
                translate_and_flip(xu, flips(n_unlabelled), generator, shift=recipe.translate),
                generator,
                fixmatch.cutout,
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    logits_weak = model(layout(weak))  # BatchNorm's running statistics follow the weak views only
                with frozen_running_statistics(norms):  # each part normalised by its own batch statistics
                    logits_labelled, logits_strong = model(layout(xl)), model(layout(strong))
            loss, mask, pseudo = fixmatch_loss(
                logits_labelled,
                y_labelled[il],
                logits_weak,
                logits_strong,
                threshold,
                fixmatch.weight,
                recipe.label_smoothing,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % recipe.lookahead_every == 0:
            lookahead.update(model, decay=0.95**recipe.lookahead_every * (step / total) ** 3)
        if fixmatch.weight:
            kept.append(float(mask.float().mean()))
            if y_unlabelled is not None:
                truth = y_unlabelled[iu]
                right.append(float((pseudo[mask] == truth[mask]).float().mean()) if mask.any() else float("nan"))
        if eval_every and (step % eval_every == 0 or step == total):
            row = {
                "model": label,
                "step": step,
                "of": total,
                "loss": round(float(loss.detach()), 4),
                "seconds": round(time.perf_counter() - start, 1),
            }
            if kept:
                row["mask_rate"] = known_mean(kept[last_row:])
            if right:
                row["pseudo_label_accuracy"] = known_mean(right[last_row:])
            if val is not None:
                row["val_accuracy"] = round(accuracy(model, *val, device, tta=False, bf16=bf16), 4)
            log.append(row)
            print(json.dumps(row), flush=True)
            last_row = step
    lookahead.update(model, decay=1.0)
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    tail = max(1, total // 10)
    result = {
        "seconds": round(seconds, 1),
        "images_per_second": round(total * (n_labelled + n_unlabelled) / seconds, 1),
        "steps": total,
        "log": log,
    }
    if kept:
        result["mask_rate"] = known_mean(kept[-tail:])
    if right:
        result["pseudo_label_accuracy"] = known_mean(right[-tail:])
    return result


def pseudo_labels(probs: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and labels of the most confident ``fraction`` of each predicted class; ``probs``: ``(N, C)``."""
    confidence, predicted = probs.max(1)
    keep = []
    for c in predicted.unique():
        members = torch.nonzero(predicted == c).flatten()
        n = max(1, round(fraction * len(members)))
        keep.append(members[confidence[members].argsort(descending=True)[:n]])
    kept = torch.cat(keep).sort().values
    return kept, predicted[kept]


def card(name: str, arch: str, result: dict, model, val, test, device, bf16: bool, args, **extra) -> dict:
    round_large_weights(model)
    val_views = view_accuracies(model, *val, device, bf16=bf16)
    test_views = view_accuracies(model, *test, device, bf16=bf16)
    return {
        "name": name,
        "arch": arch,
        "widths": list(args.widths) if args.widths else None,
        "data": "CIFAR-10 (JPEG q75 re-encoding, ../shared/data/cifar10_{train,test}.npz)",
        "split": f"seeded stratified 45,000 train / 5,000 validation (seed {args.split_seed}); test set untouched",
        **extra,
        "recipe": dataclasses.asdict(args.recipe),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        **({"cpu": cpu_description()} if device.type == "cpu" else {}),
        "bf16_autocast": bf16,
        "channels_last": not args.no_channels_last,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **result,
        # from main()'s start (after the interpreter and imports): data, training, evaluation; with --labelled-model
        # this process only, where "seconds" includes the loaded round 0's training
        "seconds_launch_to_card": round(time.perf_counter() - args.started, 1),
        "val_accuracy": round(val_views["plain"], 4),
        "val_accuracy_flip_tta": round(val_views["flip"], 4),
        "val_accuracy_flip_translate_tta": round(val_views["flip+translate"], 4),
        "test_accuracy": round(test_views["plain"], 4),
        "test_accuracy_flip_tta": round(test_views["flip"], 4),
        "test_accuracy_flip_translate_tta": round(test_views["flip+translate"], 4),
        "command": args.command,
    }


def round_large_weights(model: torch.nn.Module) -> None:
    """Round every weight tensor of more than 4,096 values to bfloat16 in place: the file is half the size and the
    accuracies in the card are those of exactly the stored weights (bf16 autocast rounds them anyway)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 4096:
                p.copy_(p.to(torch.bfloat16).float())


def save(model: torch.nn.Module, info: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.to(torch.bfloat16) if v.numel() > 4096 and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(tensors, str(out / f"{info['name']}.safetensors"), metadata={"arch": info["arch"]})
    (out / f"{info['name']}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k not in ("recipe", "losses", "rounds", "log")}), flush=True)


def load_round_zero(path: Path, args, device: torch.device, copy_to: Path) -> tuple[torch.nn.Module, dict]:
    """The labelled-only model saved by an earlier ``--semi`` run, on ``device``, and its card, refused unless that
    run had this run's ``ROUND_ZERO_ARGUMENTS`` and device type (its command, as recorded in the card, is parsed
    again). Its weights and card are copied to ``copy_to`` (card renamed, ``copied_from`` added) when elsewhere."""
    info = json.loads(path.with_suffix(".json").read_text())
    if info.get("unlabelled_images") != 0 or "method" in info:
        raise ValueError(f"{path}: not a round-0 (labelled-only) model: its card names unlabelled images or a method")
    earlier = build_parser().parse_args(shlex.split(info["command"])[2:])
    differ = {k: (getattr(earlier, k), getattr(args, k)) for k in ROUND_ZERO_ARGUMENTS}
    differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
    if not earlier.semi or differ:
        raise ValueError(f"{path}: its round-0 run differs from this run in (theirs, ours) {differ or '--semi'}")
    if (info["device"] == "cpu") != (device.type == "cpu"):
        raise ValueError(f"{path}: trained on {info['device']}, this run is on {device}: the wall times would mix")
    if copy_to.resolve() != path.resolve():
        copy_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy_to)
        info = {**info, "name": copy_to.stem, "copied_from": str(path)}
        copy_to.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return load_reference_model(path).to(device), info


RUNS = Path(__file__).resolve().parents[2] / "reference_model_runs"  # ignored by git; never the committed weights/


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vgg", choices=sorted(ARCHITECTURES))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument(
        "--out", default=str(RUNS), help="folder for weights and cards (default %(default)s; committed: weights/)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: 25 (vgg, vgg-tanh), 30 (resnet9), 28 (resnet9-whitened), 10 per round (--semi)",
    )
    parser.add_argument("--widths", type=int, nargs="*", default=None, help="channel widths (default: the arch's)")
    parser.add_argument("--translate", type=int, default=4)
    parser.add_argument("--cutout", type=int, default=12)
    parser.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        help="mixup's Beta(α, α) (0: none); every model the call trains, round 0 only with --method fixmatch",
    )
    parser.add_argument(
        "--whiten-bias-lr-scale",
        type=float,
        default=64.0,
        help="the whitening bias's learning rate as a multiple of the recipe's (default %(default)s, as the BatchNorm "
        "shifts; airbench94: 1)",
    )
    parser.add_argument("--name", default=None, help="file name of the weights and card (default: the arch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--semi", action="store_true", help="curriculum labelling with --labels-per-class labels")
    parser.add_argument("--labels-per-class", type=int, default=100)
    parser.add_argument(
        "--method",
        default=None,
        choices=["curriculum", "fixmatch"],
        help="(--semi) curriculum labelling (--rounds rounds of pseudo-labels) or FixMatch continued from the round-0 "
        "model (--rounds 0 stops after round 0 either way)",
    )
    parser.add_argument("--fixmatch-steps", type=int, default=None, help="(--semi --method fixmatch) steps (1400)")
    parser.add_argument(
        "--fixmatch-threshold",
        type=float,
        default=None,
        help="(--semi --method fixmatch) confidence threshold, a fraction of the label-smoothed target's 1 - ε + ε/C "
        "(0.6)",
    )
    parser.add_argument(
        "--fixmatch-weight",
        type=float,
        default=None,
        help="(--semi --method fixmatch) weight of the unlabelled loss (1); 0 is the control: the same steps and "
        "schedule on the labelled images alone",
    )
    parser.add_argument(
        "--fixmatch-lr-scale",
        type=float,
        default=None,
        help="(--semi --method fixmatch) factor on the learning rate and weight decay (0.05)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-steps", type=int, default=400, help="(--semi) fewest steps of the labelled-only model")
    parser.add_argument(
        "--round-min-steps", type=int, default=0, help="(--semi) fewest steps of each pseudo-labelled round's model"
    )
    parser.add_argument(
        "--labelled-model",
        default=None,
        help="(--semi) the round-0 model of an earlier run of the same arguments (its .safetensors; the card beside "
        "it), used instead of training it again; its seconds count in the wall time",
    )
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="train on a seeded random N images (smoke runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="validation accuracy every N epochs in the log (0: none); with --method fixmatch, every N steps of "
        "FixMatch (0: 50)",
    )
    return parser


DEFAULT_EPOCHS = {"resnet9": 30, "resnet9-whitened": 28}  # the others 25; --semi 10 per round

# the arguments a round-0 model must share with the run that loads it (--labelled-model)
ROUND_ZERO_ARGUMENTS = ("arch", "widths", "epochs", "translate", "cutout", "seed", "split_seed", "labels_per_class")
ROUND_ZERO_ARGUMENTS += ("min_steps", "no_bf16", "no_channels_last", "limit", "mixup", "whiten_bias_lr_scale")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.started = time.perf_counter()
    args.command = shlex.join(["python", "benchmarks/reference_models/train.py", *argv])
    if not args.semi and (args.labelled_model or args.round_min_steps):
        parser.error("--labelled-model and --round-min-steps need --semi")
    if args.rounds < 0:
        parser.error("--rounds must be >= 0")
    if not math.isfinite(args.whiten_bias_lr_scale) or args.whiten_bias_lr_scale <= 0:
        parser.error("--whiten-bias-lr-scale must be a finite number > 0")
    if not math.isfinite(args.mixup) or args.mixup < 0:
        parser.error("--mixup must be a finite number >= 0 (0: no mixup)")
    settings = {
        "steps": args.fixmatch_steps,
        "threshold": args.fixmatch_threshold,
        "lr_scale": args.fixmatch_lr_scale,
        "weight": args.fixmatch_weight,
    }
    given = {k: v for k, v in settings.items() if v is not None}
    if args.method is not None and not args.semi:
        parser.error("--method needs --semi")
    if given and args.method != "fixmatch":
        parser.error("the --fixmatch-* flags need --semi --method fixmatch")
    if args.method == "fixmatch" and args.round_min_steps:
        parser.error("--round-min-steps is for curriculum labelling's rounds, not --method fixmatch")
    args.fixmatch = FixMatch(**given)
    if args.fixmatch.steps < 1 or not 0 <= args.fixmatch.threshold <= 1:
        parser.error("--fixmatch-steps must be >= 1 and --fixmatch-threshold in [0, 1]")
    if not math.isfinite(args.fixmatch.lr_scale) or args.fixmatch.lr_scale <= 0:
        parser.error("--fixmatch-lr-scale must be a finite number > 0")
    if not math.isfinite(args.fixmatch.weight) or args.fixmatch.weight < 0:
        parser.error("--fixmatch-weight must be a finite number >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = not args.no_bf16
    epochs = args.epochs or (10 if args.semi else DEFAULT_EPOCHS.get(args.arch, 25))
    args.recipe = Recipe(
        epochs=epochs,
        min_steps=args.min_steps if args.semi else 0,
        translate=args.translate,
        cutout=args.cutout,
        mixup=args.mixup,
        whiten_bias_lr_scale=args.whiten_bias_lr_scale,
    )
    (x, y), val, test = cifar10_splits(args.data_dir, seed=args.split_seed)
    if args.limit:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[: args.limit]
        subset_generator = torch.Generator().manual_seed(args.seed)
        sub_val = torch.randperm(len(val[1]), generator=subset_generator)[:500]
        sub_test = torch.randperm(len(test[1]), generator=subset_generator)[:500]
        x, y = x[keep], y[keep]
        val, test = (val[0][sub_val], val[1][sub_val]), (test[0][sub_test], test[1][sub_test])
    out = Path(args.out)

    def finish(model: torch.nn.Module, name: str, result: dict, **extra) -> dict:
        info = card(name, args.arch, result, model, val, test, device, bf16, args, **extra)
        save(model, info, out)
        return info

    if not args.semi:
        model = make_model(args.arch, args.widths)
        result = train(
            model,
            x,
            y,
            args.recipe,
            device=device,
            seed=args.seed,
            bf16=bf16,
            channels_last=not args.no_channels_last,
            label=args.arch,
            val=val,
            eval_every=args.eval_every,
        )
        finish(model, args.name or args.arch, result)
        return
    generator = torch.Generator().manual_seed(args.seed)
    labelled = (
        torch.cat(
            [
                torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=generator)][
                    : args.labels_per_class
                ]
                for c in range(10)
            ]
        )
        .sort()
        .values
    )
    unlabelled = torch.ones(len(y), dtype=torch.bool)
    unlabelled[labelled] = False
    unlabelled = torch.nonzero(unlabelled).flatten()
    common = dict(
        device=device,
        seed=args.seed,
        bf16=bf16,
        channels_last=not args.no_channels_last,
        val=val,
        eval_every=args.eval_every,
    )
    prefix = args.name or args.arch
    base = f"{prefix}-labelled{len(labelled)}"
    if args.labelled_model:
        teacher, base_info = load_round_zero(Path(args.labelled_model), args, device, out / f"{base}.safetensors")
    else:
        teacher = make_model(args.arch, args.widths)
        result = train(teacher, x[labelled], y[labelled], args.recipe, label=base, **common)
        base_info = finish(teacher, base, result, labelled_images=len(labelled), unlabelled_images=0)
    if args.rounds == 0:
        return
    if args.method == "fixmatch":
        result = train_fixmatch(
            teacher,
            x[labelled],
            y[labelled],
            x[unlabelled],
            args.recipe,
            args.fixmatch,
            label="fixmatch",
            y_unlabelled=y[unlabelled],
            **{**common, "eval_every": args.eval_every or 50},
        )
        finish(
            teacher,
            f"{prefix}-{'fixmatch' if args.fixmatch.weight else 'continued'}{len(labelled)}",
            {
                **result,
                "seconds": round(base_info["seconds"] + result["seconds"], 1),
                "fixmatch_seconds": result["seconds"],
            },
            method="FixMatch (Sohn et al., NeurIPS 2020), continued from the labelled-only model"
            if args.fixmatch.weight
            else "control: FixMatch's steps and schedule on the labelled images alone, from the labelled-only model",
            fixmatch=dataclasses.asdict(args.fixmatch),
            labelled_model=args.labelled_model,
            labelled_only={
                k: base_info[k] for k in ("name", "val_accuracy", "test_accuracy", "test_accuracy_flip_tta")
            },
            labelled_images=len(labelled),
            unlabelled_images=len(unlabelled),
        )
        return
    round_recipe = dataclasses.replace(args.recipe, min_steps=args.round_min_steps)
    rounds, seconds = [], base_info["seconds"]
    for r in range(1, args.rounds + 1):
        probs = predict(teacher, x[unlabelled], device, tta=True, bf16=bf16)
        kept, labels = pseudo_labels(probs, r / args.rounds)
        torch.manual_seed(args.seed)  # the same student whether round 0 was trained here or loaded
        student = make_model(args.arch, args.widths)
        xs = torch.cat([x[labelled], x[unlabelled[kept]]])
        ys = torch.cat([y[labelled], labels])
        result = train(student, xs, ys, round_recipe, label=f"semi round {r}", **common)
        seconds += result["seconds"]
        rounds.append(
            {
                "round": r,
                "pseudo_labelled": len(kept),
                "pseudo_label_accuracy": round(float((labels == y[unlabelled[kept]]).float().mean()), 4),
                "seconds": result["seconds"],
                "steps": result["steps"],
                "epochs": result["epochs"],
                "val_accuracy": round(accuracy(student, *val, device, tta=False, bf16=bf16), 4),
            }
        )
        print(json.dumps(rounds[-1]), flush=True)
        teacher = student
    result = {**result, "seconds": round(seconds, 1), "rounds": rounds}
    name = f"{prefix}-semi{len(labelled)}"
    finish(
        teacher,
        name,
        result,
        method="curriculum labelling",
        round_min_steps=args.round_min_steps,
        labelled_model=args.labelled_model,
        labelled_only={k: base_info[k] for k in ("name", "val_accuracy", "test_accuracy", "test_accuracy_flip_tta")},
        labelled_images=len(labelled),
        unlabelled_images=len(unlabelled),
    )


if __name__ == "__main__":
    main()
