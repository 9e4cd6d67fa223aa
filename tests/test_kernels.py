"""The fused clamp → 1×1 conv (→ ReLU) CPU kernel and its use by the eager fast path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldnbench.inference import (ClampChannels, FusedClampConv, fuse_clamp_conv, model_notes, prepare_model)
from ldnbench.kernels import ClampConvKernel, compile_kernel
from ldnbench.models import build_model

CL = torch.channels_last


@pytest.fixture(scope="module")
def kernel() -> ClampConvKernel:
    k, why = compile_kernel()
    if k is None and why.startswith("no C compiler"):
        pytest.skip(why)
    assert k is not None, why  # a compiler that cannot build the kernel is a failure, not a skip
    return k


def _bounds(k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randn(k, generator=g)
    sign = torch.rand(k, generator=g) < 0.7  # most channels clamp from below, some from above (a < 0)
    inf = torch.full((k,), float("inf"))
    return torch.where(sign, t, -inf), torch.where(sign, inf, t)


@pytest.mark.parametrize("n,c,k,h,w,out,relu,pool", [
    (1, 96, 37, 7, 5, 64, False, 1),     # odd K, 35 rows: neither a multiple of the 6-row tile nor of the 48-row block
    (2, 160, 160, 9, 11, 128, True, 1),  # batch 2, the whole tensor (no prefix), ReLU
    (1, 300, 257, 16, 13, 192, True, 1),  # 208 rows over several blocks, three weight panels
    (2, 64, 64, 9, 15, 64, False, 2),    # a transition: 2x2 average pool between clamp and conv, odd sizes (floor)
    (1, 200, 130, 20, 26, 128, True, 2),  # pooled rows over several blocks, of a channel prefix
])
def test_kernel_matches_clamp_then_conv(kernel, n, c, k, h, w, out, relu, pool):
    g = torch.Generator().manual_seed(k)
    buf = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    x = buf[:, :k]  # a channel prefix of a channels-last block buffer, as a dense layer reads it
    lo, hi = _bounds(k, g)
    weight = torch.randn(out, k, 1, 1, generator=g) / k ** 0.5
    bias = torch.randn(out, generator=g)
    clamped = torch.clamp(x, lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1))
    ref = F.conv2d(F.avg_pool2d(clamped, 2) if pool == 2 else clamped, weight, bias)
    ref = F.relu(ref) if relu else ref
    got = kernel(x, lo, hi, kernel.pack(weight), bias, relu, pool)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    if relu:
        assert (got >= 0).all()


def test_kernel_accepts_only_pixel_rows_and_packs_only_panels(kernel):
    x = torch.randn(1, 8, 4, 4)
    assert not kernel.accepts(x)  # NCHW: channels are not contiguous
    assert kernel.accepts(x.contiguous(memory_format=CL))
    assert kernel.accepts(x.contiguous(memory_format=CL)[:, :5])
    assert not kernel.accepts(x.contiguous(memory_format=CL)[:, :, :, :3])  # a column crop breaks the row stride
    assert not kernel.accepts(x.double().contiguous(memory_format=CL))
    with pytest.raises(ValueError, match="multiple of 64"):
        kernel.pack(torch.randn(19, 8, 1, 1))
    with pytest.raises(ValueError, match="unsupported input"):
        kernel(x, torch.zeros(8), torch.ones(8), kernel.pack(torch.randn(64, 8, 1, 1)), torch.zeros(64))
    xc = x.contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="float32 CPU"):  # never reads memory of another type or size
        kernel(xc, torch.zeros(8).double(), torch.ones(8), kernel.pack(torch.randn(64, 8, 1, 1)), torch.zeros(64))
    with pytest.raises(ValueError, match="float32 CPU"):
        kernel(xc, torch.zeros(8), torch.ones(8), kernel.pack(torch.randn(64, 8, 1, 1)), torch.zeros(19))


def test_a_compiler_that_fails_gives_a_reason_not_an_exception():
    k, why = compile_kernel("/bin/false")
    assert k is None and "could not build the kernel" in why


def _module(kernel: ClampConvKernel, relu: bool, pool: nn.AvgPool2d | None = None) -> FusedClampConv:
    g = torch.Generator().manual_seed(1)
    lo, hi = _bounds(24, g)
    conv = nn.Conv2d(24, 64, 1)
    return FusedClampConv(ClampChannels(lo, hi), conv, kernel, relu=relu, pool=pool).eval()


@pytest.mark.parametrize("pooled", [False, True])
def test_fused_module_falls_back_where_the_kernel_does_not_apply(kernel, pooled):
    m = _module(kernel, relu=True, pool=nn.AvgPool2d(2) if pooled else None)
    x = torch.randn(2, 24, 5, 6)
    ref = F.relu(m.conv(m.pool(m.clamp(x)) if pooled else m.clamp(x)))
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref.detach(), rtol=1e-4, atol=1e-4)  # NCHW: the original ops
        torch.testing.assert_close(m(x.contiguous(memory_format=CL)), ref.detach(), rtol=1e-4, atol=1e-4)
    assert m(x.contiguous(memory_format=CL)).requires_grad  # grad mode, trainable weights: the original ops
    xg = x.contiguous(memory_format=CL).requires_grad_()
    m(xg).sum().backward()  # with autograd: the original ops, so gradients flow
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert copy.deepcopy(m).kernel is m.kernel  # a prepared model can be copied; the library is shared
    m64 = copy.deepcopy(m).double()  # buffers of another type: the original ops, never the kernel
    with torch.inference_mode():
        torch.testing.assert_close(m64(x.double().contiguous(memory_format=CL)), ref.detach().double(),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m64.float()(x.contiguous(memory_format=CL)), ref.detach(), rtol=1e-4, atol=1e-4)


def _ldn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("ldn121", 19).eval()
    g = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial clamps
        bn.running_mean.normal_(0, 0.2, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.data.uniform_(-0.5, 1.5, generator=g)
        bn.bias.data.normal_(0, 0.2, generator=g)
    return model


def test_fuse_clamp_conv_fuses_every_ldn_pair_and_keeps_the_logits(kernel):
    plain = prepare_model(_ldn(), fused_kernel=False)
    example = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    fused, count = fuse_clamp_conv(plain, kernel, example)
    # 54 dense-layer bottlenecks (their ReLU moved in too), 3 transitions (their average pool moved in too),
    # the ladder's and SPP's 1x1s with 64k outputs
    assert count == sum(isinstance(m, FusedClampConv) for m in fused.modules()) and count >= 54
    assert sum(isinstance(m, FusedClampConv) and m.relu for m in fused.modules()) == 54
    assert sum(isinstance(m, FusedClampConv) and m.pool is not None for m in fused.modules()) == 3  # transitions
    assert not any(isinstance(m, FusedClampConv) for m in plain.modules())  # the input model is untouched
    x = torch.randn(1, 3, 128, 192, generator=torch.Generator().manual_seed(4)).contiguous(memory_format=CL)
    with torch.inference_mode():
        ref, got = plain(x), fused(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())
    assert (got.argmax(1) == ref.argmax(1)).float().mean() > 0.999


def test_fuse_clamp_conv_refuses_a_fusion_that_moves_the_output(kernel):
    class Reordered(nn.Module):  # registers clamp → Identity → conv → ReLU, but runs the ReLU first
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.clamp = ClampChannels(torch.full((8,), -1.0), torch.full((8,), float("inf")))
            self.ident = nn.Identity()
            self.conv = nn.Conv2d(8, 64, 1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.conv(self.clamp(self.relu(self.stem(x)))).mean(1, keepdim=True) - 0.5

    with pytest.warns(RuntimeWarning, match="kept the ops apart"):
        _, count = fuse_clamp_conv(Reordered().eval(), kernel, torch.randn(1, 3, 16, 16))
    assert count == 0


def test_prepare_model_uses_the_kernel_only_where_it_was_measured_faster(kernel):
    model = _ldn(1)
    net = prepare_model(model)
    notes = model_notes(net)
    assert notes["fused_clamp_conv"] == (sum(isinstance(m, FusedClampConv) for m in net.modules()))
    assert (notes["fused_clamp_conv"] > 0) == kernel.avx512, notes  # AVX-512 only; either way the logits hold
    plain = prepare_model(model, fused_kernel=False)
    assert model_notes(plain) == {}
    x = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=CL)
    with torch.inference_mode():
        ref, got = plain(x), net(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())


def test_benchmark_script_runs_and_prints_both_ratios(kernel, capsys, benchmark_script):
    assert benchmark_script("bench_fused_kernel").main(["--size", "64x128", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "fused/unfused" in out and out.count("fused/unfused") == 2 and "max |dlogit|" in out
    assert "'fused_clamp_conv': " in out
