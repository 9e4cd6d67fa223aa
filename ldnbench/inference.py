"""Whole-image, multi-scale + flip and sliding-window inference for any model of the zoo contract.

The model takes a normalised Nx3xHxW float tensor of any size and returns logits at the input
resolution (in ``eval()`` mode). :func:`predict` returns the label map at the input resolution;
with several scales and/or flips it averages the softmax probabilities of every pass.
"""

from __future__ import annotations

import copy as _copy
import ctypes
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ldnbench.kernels import PANEL, ClampConvKernel, compile_kernel
from ldnbench.models.layers import bn_scale_shift
from ldnbench.runtime import autocast

#: The multi-scale test of the paper's era: scales relative to the input, each also flipped.
MS_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


def reuse_freed_memory() -> bool:
    """Make glibc keep freed large blocks in the heap for reuse (process-wide); True if applied.

    By default every buffer over 32 MB (each activation of a megapixel forward) is a fresh ``mmap``
    whose pages the kernel zero-fills on first touch, and is unmapped again when freed. On the 2-core
    VM of the README that page-fault work was a third of an LDN121 forward at 1024×2048 (3.1 s →
    2.0 s with reuse). The price is that the process keeps its peak heap resident. A no-op returning
    False where glibc's ``mallopt`` is missing (macOS, musl) or refuses.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    # newer glibc caps the threshold at 32 MiB (HEAP_MAX_SIZE / 2): take the largest it accepts
    if not any(mallopt(m_mmap_threshold, v) for v in (1 << 30, 1 << 25)):
        return False
    return bool(mallopt(m_trim_threshold, 1 << 30))  # and do not hand the heap's top back either


def prepare_model(model: nn.Module, device: str | torch.device = "cpu", *, channels_last: bool = True,
                  fold_bn: bool = True, clamp_preactivations: bool = True, pool_first: bool = True,
                  fused_kernel: bool = True, example_size: int = 128) -> nn.Module:
    """An eval-only copy of ``model`` on ``device`` for fast inference: BatchNorms folded into the
    convolutions that feed them (:func:`fold_batchnorm`), BN→ReLU→1×1 triples into a clamp and that
    convolution (:func:`fold_preactivation`), average pools moved before the 1×1 convolutions they
    follow (:func:`pool_before_pointwise`), and channels-last weights (CPU and CUDA convolutions are
    faster in that layout; ``clamp_preactivations=False`` keeps the triples). On a CPU with AVX-512,
    ``fused_kernel`` runs each clamp with its 1×1 convolution in one pass (:func:`fuse_clamp_conv`) when
    a C compiler can build the kernel. The original model is left untouched; ``model_notes(net)``
    says what was done."""
    device = torch.device(device)
    net = _copy.deepcopy(model).to(device).eval()
    if fold_bn:
        try:
            # a private generator: preparing a model must not move the caller's random stream
            example = torch.randn(1, 3, example_size, example_size, generator=torch.Generator().manual_seed(0))
            example = example.to(device)
            net, _ = fold_batchnorm(net, example, copy=False)
            if clamp_preactivations:
                net, _ = fold_preactivation(net, example)
        except RuntimeError as e:  # folding changed the outputs (degenerate statistics): keep the plain model
            warnings.warn(f"{e}; running the model with its BatchNorms unfolded", RuntimeWarning, stacklevel=2)
            net = _copy.deepcopy(model).to(device).eval()
    if pool_first:  # after the folds, which look for BN→ReLU→conv as neighbours
        net, _ = pool_before_pointwise(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if fused_kernel and device.type == "cpu" and next(_clamp_conv_pairs(net), None) is not None:
        kernel, how = compile_kernel()
        if kernel is not None and not kernel.avx512:
            kernel, how = None, f"{how}: not used, measured faster than oneDNN only with AVX-512"
        fused = 0
        if kernel is not None:
            example = torch.randn(1, 3, example_size, example_size, generator=torch.Generator().manual_seed(0))
            net, fused = fuse_clamp_conv(net, kernel, example)
        net.ldnbench_notes = {"fused_clamp_conv": fused, "kernel": how}
    return net


def model_notes(net: nn.Module) -> dict:
    """What :func:`prepare_model` did beyond folding (``{}`` for a model it did not prepare)."""
    return dict(getattr(net, "ldnbench_notes", {}))


def _forward(model: nn.Module, x: torch.Tensor, mapping, channels_last: bool, precision: str) -> torch.Tensor:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(precision, x.device):
        out = model(x)
    if isinstance(out, (tuple, list)):  # a model left in train mode returns (logits, aux)
        raise ValueError("predict() needs the model in eval() mode")
    if out.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"model returned {tuple(out.shape[-2:])} logits for a {tuple(x.shape[-2:])} input; "
                         "the model contract requires logits at input resolution")
    out = out.float()
    return mapping.logits(out) if mapping is not None else out


def _window_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / stride) + 1
    return [min(i * stride, size - tile) for i in range(n)]


def _probs(model: nn.Module, x: torch.Tensor, mapping, sliding: tuple[int, float] | None,
           channels_last: bool, precision: str, out_size: tuple[int, int]) -> torch.Tensor:
    """Softmax probabilities at ``out_size``, by whole image or by overlapping tiles.

    Whole image: logits are resized first, then softmaxed (at scale 2 this keeps one C x H x W map
    instead of two 4x larger ones). Tiles: tile probabilities are averaged, then resized.
    """
    h, w = x.shape[-2:]
    if sliding is None or (h <= sliding[0] and w <= sliding[0]):
        logits = _forward(model, x, mapping, channels_last, precision)
        if (h, w) != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits.softmax(1)
    tile, overlap = sliding
    stride = max(1, int(tile * (1 - overlap)))
    total = None
    hits = torch.zeros(1, 1, h, w, device=x.device)
    for y in _window_starts(h, tile, stride):
        for x0 in _window_starts(w, tile, stride):
            crop = x[..., y:y + tile, x0:x0 + tile]
            p = _forward(model, crop, mapping, channels_last, precision).softmax(1)
            if total is None:
                total = torch.zeros(x.shape[0], p.shape[1], h, w, device=x.device)
            total[..., y:y + tile, x0:x0 + tile] += p
            hits[..., y:y + tile, x0:x0 + tile] += 1
    probs = total.div_(hits)
    if (h, w) != out_size:
        probs = F.interpolate(probs, size=out_size, mode="bilinear", align_corners=False)
    return probs


@torch.inference_mode()
def predict_probs(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                  sliding: int | tuple[int, float] | None = None, *, mapping=None, channels_last: bool = True,
                  precision: str = "fp32", out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """NxCxHxW class probabilities averaged over ``scales`` x (flip) passes. See :func:`predict`.

    Each pass's logits are resized bilinearly to the input size (or ``out_size``) and then softmaxed.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"expected a normalised float Nx3xHxW image, got {tuple(image.shape)} {image.dtype}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {tuple(scales)}")
    if isinstance(sliding, int):
        sliding = (sliding, 1 / 3)
    h, w = image.shape[-2:]
    out_size = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))
    acc = None
    n = 0
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            p = _probs(model, xi, mapping, sliding, channels_last, precision, out_size)
            if flipped:
                p = p.flip(-1)
            acc = p if acc is None else acc.add_(p)
            n += 1
    return acc.div_(n)


def predict(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
            sliding: int | tuple[int, float] | None = None, *, mapping=None, channels_last: bool = True,
            precision: str = "fp32", out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Label map (HxW, or NxHxW for a batch; uint8 when C<=255, else int64) at the input resolution,
    or at ``out_size`` (H, W): the logits are upsampled bilinearly before the argmax (evaluating a
    reduced-resolution input against full-resolution labels, see :mod:`ldnbench.data.resize`).

    ``image``: normalised float 3xHxW or Nx3xHxW (see :func:`ldnbench.data.transforms.to_input`) on
    the model's device; the model must be in ``eval()`` mode. ``scales``: input resize factors
    (:data:`MS_SCALES` for the usual multi-scale test); ``flip`` adds horizontally flipped passes;
    softmax probabilities of all passes are averaged. ``sliding``: tile size (or ``(tile,
    overlap)``, default overlap 1/3) to process images larger than the tile by overlapping windows.
    ``mapping``: a :class:`~ldnbench.data.labels.LabelMapping` applied to every pass's logits.
    ``precision``: ``fp32`` (default), or ``bf16``/``fp16`` autocast when asked for by name (see
    :mod:`ldnbench.runtime`). For the fastest passes give a model
    prepared by :func:`prepare_model` (BN folded, channels-last).
    """
    single = image.dim() == 3
    if tuple(scales) == (1.0,) and not flip and sliding is None:
        # one pass at full size: the argmax of the logits is the argmax of the probabilities
        with torch.inference_mode():
            x = image.unsqueeze(0) if single else image
            if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
                raise ValueError(f"expected a normalised float Nx3xHxW image, got {tuple(x.shape)} {x.dtype}")
            scores = _forward(model, x, mapping, channels_last, precision)
            if out_size is not None and tuple(out_size) != tuple(scores.shape[-2:]):
                scores = F.interpolate(scores, size=tuple(out_size), mode="bilinear", align_corners=False)
    else:
        scores = predict_probs(model, image, scales, flip, sliding, mapping=mapping,
                               channels_last=channels_last, precision=precision, out_size=out_size)
    labels = scores.argmax(1)
    if scores.shape[1] <= 255:
        labels = labels.to(torch.uint8)
    return labels[0] if single else labels


# ------------------------------------------------------------------ eval-time BatchNorm folding
def _storage_key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


class _UseCounter(TorchDispatchMode):
    """Counts, per tensor storage, how many aten ops read it.

    Every result is kept alive until the probe ends, so that no address is reused by another tensor.
    """

    def __init__(self):
        super().__init__()
        self.uses: dict[int, int] = {}
        self.keep: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor):
                ptr = a.untyped_storage().data_ptr()
                self.uses[ptr] = self.uses.get(ptr, 0) + 1
        out = func(*args, **(kwargs or {}))
        self.keep.append(out)
        return out


def fold_batchnorm(model: nn.Module, example: torch.Tensor, atol: float = 1e-3, *,
                   copy: bool = True) -> tuple[nn.Module, int]:
    """An eval-only copy of ``model`` (``copy=False``: ``model`` itself) in which every BatchNorm whose
    input is the output of a Conv2d, read by nothing else, is folded into that convolution (weights
    scaled, bias added); returns (model, number of folded BatchNorms).

    Pairs are found by running ``example`` once and watching the tensors (so it works for any
    architecture: the LDN's 1x1 bottleneck → BN of the 3x3 unit, torchvision's conv → bn). Pre-activation
    BNs that read concatenations or sums stay. The copy's output is checked against the original on
    ``example``.
    """
    model = (_copy.deepcopy(model) if copy else model).eval()
    calls: dict[nn.Module, list] = {}

    def hook(mod, inp, out):
        calls.setdefault(mod, []).append((_storage_key(inp[0]), _storage_key(out)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    counter = _UseCounter()
    fp32 = autocast("fp32", example.device)  # the check compares float32 outputs, never TF32 ones
    try:
        with torch.inference_mode(), fp32, counter:
            reference = model(example)
    finally:
        for h in handles:
            h.remove()
    conv_by_out = {c[0][1]: m for m, c in calls.items() if isinstance(m, nn.Conv2d) and len(c) == 1}
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    folded = 0
    for bn, c in calls.items():
        if not isinstance(bn, nn.BatchNorm2d) or len(c) != 1 or bn.running_var is None:
            continue
        conv = conv_by_out.get(c[0][0])
        if conv is None or counter.uses.get(c[0][0][0], 0) != 1 or id(bn) not in parents:
            continue
        with torch.no_grad():
            scale, shift = bn_scale_shift(bn)
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias.detach().clone())
        parent, name = parents[id(bn)]
        setattr(parent, name, nn.Identity())
        folded += 1
    counter.keep.clear()
    with torch.inference_mode(), autocast("fp32", example.device):
        out = model(example)
    ref, got = (reference["out"], out["out"]) if isinstance(reference, dict) else (reference, out)
    err = (ref - got).abs().max().item()
    if not err <= atol * max(1.0, ref.abs().max().item()):
        raise RuntimeError(f"BatchNorm folding changed the output by {err:.3g}; run without folding")
    return model, folded


class ClampChannels(nn.Module):
    """``clamp(x, lo, hi)`` with per-channel bounds: what a folded BN→ReLU leaves before its 1×1 conv."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor):
        super().__init__()
        self.register_buffer("lo", lo.view(1, -1, 1, 1))
        self.register_buffer("hi", hi.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


class FusedClampConv(nn.Module):
    """``clamp → [2×2 average pool →] 1×1 conv (→ ReLU)`` by :class:`~ldnbench.kernels.ClampConvKernel` in
    one pass over the input; any input the kernel does not take (another layout or dtype, autograd,
    tracing) runs the original ops."""

    def __init__(self, clamp: ClampChannels, conv: nn.Conv2d, kernel: ClampConvKernel, relu: bool = False,
                 pool: nn.AvgPool2d | None = None):
        super().__init__()
        self.clamp, self.pool, self.conv, self.relu, self.kernel = clamp, pool, conv, relu, kernel
        self.stride = 1 if pool is None else 2
        self.register_buffer("lo", clamp.lo.detach().flatten().float().contiguous())
        self.register_buffer("hi", clamp.hi.detach().flatten().float().contiguous())
        self.register_buffer("packed", kernel.pack(conv.weight))
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.kernel.accepts(x) and min(x.shape[-2:]) >= self.stride and self.packed.dtype == torch.float32
                and self.packed.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad))
                and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            return self.kernel(x, self.lo, self.hi, self.packed, self.bias, self.relu, self.stride)
        x = self.clamp(x)
        y = self.conv(x if self.pool is None else self.pool(x))
        return F.relu(y) if self.relu else y


def _is_fusable_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1 and m.out_channels % PANEL == 0 and m.padding_mode == "zeros")


def _is_2x2_average(m: nn.Module) -> bool:
    return (isinstance(m, nn.AvgPool2d) and _pair(m.kernel_size) == (2, 2) and _pair(m.stride) == (2, 2)
            and _pair(m.padding) == (0, 0) and not m.ceil_mode and m.divisor_override is None)


def _clamp_conv_pairs(model: nn.Module):
    """(parent, clamp name, pool name or None, conv name, ReLU name or None) of ClampChannels → Identity →
    [2×2 average pool →] 1×1 conv (stride 1, no padding, a multiple of 64 outputs) registered one after
    another in a module, with the ReLU that follows the conv after Identities only (a dense layer's
    folded ``norm2``, then ``relu2``)."""
    for parent in model.modules():
        kids = list(parent.named_children())
        for i in range(len(kids) - 2):
            (n0, clamp), (n1, ident) = kids[i:i + 2]
            if not (isinstance(clamp, ClampChannels) and isinstance(ident, nn.Identity)):
                continue
            j, pool = i + 2, None
            if _is_2x2_average(kids[j][1]) and j + 1 < len(kids):
                pool, j = kids[j][0], j + 1
            if not _is_fusable_conv(kids[j][1]):
                continue
            conv, j = kids[j][0], j + 1
            while j < len(kids) and isinstance(kids[j][1], nn.Identity):
                j += 1
            relu = kids[j][0] if j < len(kids) and isinstance(kids[j][1], nn.ReLU) else None
            yield parent, n0, pool, conv, relu


def fuse_clamp_conv(model: nn.Module, kernel: ClampConvKernel, example: torch.Tensor,
                    atol: float = 1e-3) -> tuple[nn.Module, int]:
    """Replace every clamp → [2×2 average pool →] 1×1 conv (→ ReLU) of a folded model
    (:func:`fold_preactivation`, :func:`pool_before_pointwise`) by one :class:`FusedClampConv`; returns
    (model, number fused), or the model unchanged with a warning if the outputs on ``example`` moved
    (e.g. a module whose forward does not run its children in the order they were registered)."""
    if next(_clamp_conv_pairs(model), None) is None:
        return model, 0
    fused = _copy.deepcopy(model).eval()
    pairs = list(_clamp_conv_pairs(fused))
    for parent, n_clamp, n_pool, n_conv, n_relu in pairs:
        pool = getattr(parent, n_pool) if n_pool is not None else None
        module = FusedClampConv(getattr(parent, n_clamp), getattr(parent, n_conv), kernel,
                                relu=n_relu is not None, pool=pool)
        setattr(parent, n_conv, module)
        for name in (n_clamp, n_pool, n_relu):
            if name is not None:
                setattr(parent, name, nn.Identity())
    err = _output_change(model, fused, example.contiguous(memory_format=torch.channels_last), atol)
    if err is not None:
        warnings.warn(f"the fused clamp-conv kernel changed the output by {err:.3g}; kept the ops apart",
                      RuntimeWarning, stacklevel=2)
        return model, 0
    return fused, len(pairs)


def _output_change(model: nn.Module, candidate: nn.Module, example: torch.Tensor, atol: float) -> float | None:
    """The largest output difference of ``candidate`` against ``model`` (put in eval mode) on ``example``
    in float32, or None when it is within ``atol`` of the output's scale."""
    with torch.inference_mode(), autocast("fp32", example.device):
        ref, got = model.eval()(example), candidate(example)
    ref, got = (ref["out"], got["out"]) if isinstance(ref, dict) else (ref, got)
    err = (ref - got).abs().max().item()
    return None if err <= atol * max(1.0, ref.abs().max().item()) else err


def _plain_sequentials(model: nn.Module):
    # only Sequentials that run their children in order: reordering a custom forward's children means nothing
    return (m for m in model.modules() if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward)


def pool_before_pointwise(model: nn.Module) -> tuple[nn.Module, int]:
    """Swap every 1×1 convolution (stride 1, no padding) that a plain ``Sequential`` runs right before a
    non-overlapping average pool (kernel = stride, no padding, floor mode), in place; returns
    (model, number of swaps).

    Both are linear and the conv is per pixel, so ``pool(conv(x)) == conv(pool(x))`` (bias included)
    up to rounding, and the conv then runs on k² times fewer pixels: a DenseNet transition-down
    (BN-ReLU-1×1-pool) computes 4× fewer MACs, 7.2 of LDN121's 133.4 GMAC at 1024×2048 in all three.
    Complexity counts (``ldnbench zoo``) stay those of the architecture as defined.
    """
    count = 0
    for seq in _plain_sequentials(model):
        items = list(seq._modules.items())
        swaps = 0
        for i in range(len(items) - 1):
            if _pool_commutes_with(items[i][1], items[i + 1][1]):
                items[i], items[i + 1] = items[i + 1], items[i]
                swaps += 1
        if swaps:  # reorder the registry itself: names (and so state-dict keys) stay, the run order swaps
            seq._modules.clear()
            seq._modules.update(items)
            count += swaps
    return model, count


def _pool_commutes_with(conv: nn.Module, pool: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(pool, nn.AvgPool2d)
            and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.padding_mode == "zeros" and _pair(pool.kernel_size) == _pair(pool.stride)
            and _pair(pool.padding) == (0, 0) and not pool.ceil_mode and pool.divisor_override is None)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _preactivation_triples(model: nn.Module):
    """(parent, names) of BatchNorm2d → ReLU → 1×1 Conv2d registered one after another in a module
    (a Sequential, or e.g. a dense layer's ``norm1, relu1, conv1``)."""
    for parent in model.modules():
        kids = list(parent.named_children())
        for (n0, bn), (n1, relu), (n2, conv) in zip(kids, kids[1:], kids[2:]):
            if (isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None and isinstance(relu, nn.ReLU)
                    and isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
                    and conv.groups == 1 and conv.in_channels == bn.num_features):
                yield parent, (n0, n1, n2)


def fold_preactivation(model: nn.Module, example: torch.Tensor, atol: float = 1e-3) -> tuple[nn.Module, int]:
    """Fold every eval-mode BN → ReLU → 1×1 conv into a per-channel clamp and that conv; returns
    (model, number of triples folded), or ``model`` unchanged with a warning if the outputs moved.

    With the BN as ``a·x + s``: ``relu(a·x + s) = a·max(x, -s/a) + s`` for ``a > 0`` and
    ``a·min(x, -s/a) + s`` for ``a < 0``, so ``conv(relu(bn(x))) = conv'(clamp(x, lo, hi))`` with the
    scale in the weights and ``W·s`` in the bias: one pass over the (often strided) input instead of
    a multiply-add and a ReLU. Only 1×1 convolutions without padding qualify (a padded border would
    see the bias). Checked against the unfolded model on ``example`` (``model`` is put in eval mode).
    """
    if next(_preactivation_triples(model), None) is None:
        return model, 0
    folded = _copy.deepcopy(model).eval()
    count = 0
    for parent, (n_bn, n_relu, n_conv) in list(_preactivation_triples(folded)):
        bn, conv = getattr(parent, n_bn), getattr(parent, n_conv)
        with torch.no_grad():
            a, s = bn_scale_shift(bn)
            t = -s / torch.where(a == 0, torch.ones_like(a), a)
            inf = torch.full_like(a, float("inf"))
            lo = torch.where(a > 0, t, -inf)
            hi = torch.where(a < 0, t, inf)
            w = conv.weight.flatten(1)  # out × in
            bias = w @ torch.where(a == 0, s.clamp_min(0), s)  # a == 0: the channel is the constant relu(s)
            if conv.bias is not None:
                bias = bias + conv.bias
            conv.weight.mul_(a.view(1, -1, 1, 1))
            conv.bias = nn.Parameter(bias.detach().clone())
        setattr(parent, n_bn, ClampChannels(lo, hi))
        setattr(parent, n_relu, nn.Identity())
        count += 1
    err = _output_change(model, folded, example, atol)
    if err is not None:
        warnings.warn(f"folding BN-ReLU into 1x1 convolutions changed the output by {err:.3g}; kept them apart",
                      RuntimeWarning, stacklevel=2)
        return model, 0
    return folded, count
