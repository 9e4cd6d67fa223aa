"""BatchNorm machinery of training: synchronised BatchNorm for any backend, and exact statistics.

:func:`convert_sync_batchnorm` swaps every ``BatchNorm2d`` for one that all-reduces its batch
statistics under an initialised process group (CPU/gloo and CUDA/NCCL alike) while keeping the
models' rule that a checkpointed segment's recomputation does not update the running statistics
again; :func:`recompute_bn_stats` sets the running statistics to exact averages over a dataset.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ldnbench.models.layers import BatchNorm2d


class _SyncBNFunction(torch.autograd.Function):
    """BatchNorm with given global statistics; backward all-reduces the two gradient sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count: float):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count = count
        y = xhat * weight.view(shape) + bias.view(shape)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        shape = (1, -1) + (1,) * (dy.dim() - 2)
        dims = [d for d in range(dy.dim()) if d != 1]
        dyf = dy.float()
        sum_dy, sum_dy_xhat = dyf.sum(dims), (dyf * xhat).sum(dims)
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both)
        c = sum_dy.numel()
        mean_dy, mean_dy_xhat = both[:c] / ctx.count, both[c:] / ctx.count
        dx = (dyf - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * (invstd * weight).view(shape)
        return dx.to(dy.dtype), sum_dy_xhat, sum_dy, None, None, None


def _sync_bn_class():
    class SyncBatchNorm2d(BatchNorm2d):
        """Synchronised BatchNorm for any backend (gloo/CPU too) that keeps ``update_stats``.

        In training under an initialised process group the batch statistics are all-reduced over
        all processes, so DDP on N processes normalises exactly like one process with the whole
        global batch; otherwise it is the model's ordinary BatchNorm2d.
        """

        def forward(self, x):
            if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return super().forward(x)
            c = x.shape[1]
            dims = [d for d in range(x.dim()) if d != 1]
            with torch.no_grad():
                stats = torch.cat([x.sum(dims, dtype=torch.float64), x.float().square().sum(dims, dtype=torch.float64),
                                   torch.tensor([x.numel() // max(c, 1)], dtype=torch.float64, device=x.device)])
                dist.all_reduce(stats)
                n = stats[-1].clamp_min(2)
                mean = stats[:c] / n
                var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
                if self.track_running_stats and self.update_stats:
                    self.num_batches_tracked += 1
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                    self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).to(self.running_var.dtype))
                invstd = (var + self.eps).rsqrt().float()
            return _SyncBNFunction.apply(x, self.weight, self.bias, mean.float(), invstd, float(n))

    return SyncBatchNorm2d


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` by a synchronised one working on CPU and CUDA (same state dict keys)."""
    cls = _sync_bn_class()
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, cls) and child.affine:
            # on the child's device and dtype: load_state_dict copies values, not devices
            new = cls(child.num_features, eps=child.eps, momentum=child.momentum,
                      track_running_stats=child.track_running_stats, device=child.weight.device,
                      dtype=child.weight.dtype)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child)
    return module




@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor | None], device: torch.device,
                       autocast=nullcontext) -> int:
    """Set every BatchNorm's running mean/var to exact averages over ``batches`` (paper section 5.1).

    The model runs in train mode, as in training (every BN normalises with its batch statistics);
    each BN's input is accumulated per channel in float64 over all pixels of all batches, and the
    running mean/var become the mean and the unbiased variance of those inputs: the exact
    statistics of the training-time activations, independent of how the set is cut into batches.
    Under torch.distributed the sums are all-reduced, so every process gets the same statistics.
    Returns the number of images seen (over all processes).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    acc = {bn: torch.zeros(3, bn.num_features, dtype=torch.float64, device=device) for bn in bns}

    def hook(bn, args):
        x = args[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        a = acc[bn]
        a[0] += x.sum(dims, dtype=torch.float64)
        a[1] += x.float().square().sum(dims, dtype=torch.float64)
        a[2] += x.numel() // x.shape[1]

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    was_training = model.training
    model.train()
    images = 0
    try:
        for x in batches:
            if x is None:  # this process's slice of the short last batch is empty
                continue
            with autocast():
                model(x.to(device, non_blocking=True))
            images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        flat = torch.cat([acc[bn].view(-1) for bn in bns] + [torch.tensor([images], dtype=torch.float64, device=device)])
        dist.all_reduce(flat)
        images = int(flat[-1].item())
        offset = 0
        for bn in bns:
            k = acc[bn].numel()
            acc[bn] = flat[offset:offset + k].view(3, -1)
            offset += k
    for bn in bns:
        s, sq, n = acc[bn]
        n = n.clamp_min(2)
        mean = s / n
        var = ((sq - n * mean * mean) / (n - 1)).clamp_min(0)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
        bn.num_batches_tracked.zero_()
    return images
