from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldnbench.data.labels import LabelMapping
from ldnbench.inference import MS_SCALES, predict, predict_probs


class PointwiseNet(nn.Module):
    """Per-pixel 1x1 conv: a model whose output at a pixel depends only on that pixel."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, x):
        return self.conv(x)


class CoarseNet(nn.Module):
    """Follows the model contract: pads to a multiple of 4, predicts at 1/4, upsamples, crops back."""

    pad_multiple = 4

    def __init__(self, num_classes: int = 5):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)
        self.num_classes = num_classes

    def forward(self, x):
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 4, 0, -h % 4))
        y = self.conv(F.avg_pool2d(x, 4))
        return F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False)[..., :h, :w]


def _image(h=37, w=53, n=1, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_single_scale_is_argmax_at_input_resolution():
    model = CoarseNet().eval()
    x = _image()
    out = predict(model, x[0], channels_last=False)  # the model's own layout: exactly model(x)
    assert out.shape == (37, 53) and out.dtype == torch.uint8
    assert torch.equal(out, model(x)[0].argmax(0).to(torch.uint8))
    batch = predict(model, _image(n=2))
    assert batch.shape == (2, 37, 53)


def test_multiscale_flip_averages_softmax_of_every_pass():
    model = CoarseNet().eval()
    x = _image()
    expected = 0
    for s in MS_SCALES:
        xs = F.interpolate(x, size=(round(37 * s), round(53 * s)), mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = model(xs.flip(-1) if flip else xs)
            logits = F.interpolate(logits, size=(37, 53), mode="bilinear", align_corners=False)
            p = logits.softmax(1)
            expected = expected + (p.flip(-1) if flip else p)
    expected = expected / (2 * len(MS_SCALES))
    with torch.no_grad():
        probs = predict_probs(model, x, MS_SCALES, flip=True, channels_last=False)
        assert torch.allclose(probs, expected, atol=1e-5)
        labels = predict(model, x, MS_SCALES, flip=True, channels_last=False)
    assert torch.equal(labels[0], expected[0].argmax(0).to(torch.uint8))
    assert not torch.equal(labels[0], predict(model, x)[0])  # multi-scale really changes the output


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    model = PointwiseNet().eval()
    x = _image(50, 70)
    whole = predict_probs(model, x)
    tiled = predict_probs(model, x, sliding=(32, 0.25))
    assert torch.allclose(whole, tiled, atol=1e-6)
    # tiles and the whole image may round differently (other kernel blocking): labels agree, not bits
    assert (predict(model, x, sliding=32) == predict(model, x)).float().mean() >= 0.999


def test_mapping_selects_destination_logits():
    model = PointwiseNet(5).eval()
    x = _image()
    mapping = LabelMapping("src", "dst", (3, 1))
    out = predict(model, x, mapping=mapping, channels_last=False)
    logits = model(x)[0][[3, 1]]
    assert torch.equal(out[0], logits.argmax(0).to(torch.uint8))
    assert set(out.unique().tolist()) <= {0, 1}


def test_bad_inputs():
    model = PointwiseNet().eval()
    with pytest.raises(ValueError, match="Nx3xHxW"):
        predict(model, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="positive"):
        predict(model, _image(), scales=(0.0,))
    with pytest.raises(ValueError, match="eval"):
        predict(_TrainModeNet().train(), _image())


class _TrainModeNet(PointwiseNet):
    def forward(self, x):
        return (self.conv(x), [])


def test_prepare_model_is_a_faster_layout_of_the_same_function():
    from ldnbench.inference import prepare_model
    from ldnbench.models import build_model

    model = build_model("ldn121", 5).eval()
    for m in model.modules():  # non-trivial statistics, so that folding has something to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = prepare_model(model)
    x = _image(96, 128)
    with torch.inference_mode():
        ref, got = model(x), fast(x)
    assert (ref - got).abs().max() <= 1e-3 * ref.abs().max()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) < \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    # BN folding reorders float sums: labels may flip on near-ties, by design, on any instruction set
    assert (predict(fast, x[0]) == predict(model, x[0])).float().mean() >= 0.999


def test_precision_by_name_only(monkeypatch, autocast_probe):
    """fp32 unless bf16 is asked for, even on a device that computes bf16 natively."""
    import ldnbench.runtime as runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    model = autocast_probe()
    predict(model, _image()[0])
    predict(model, _image()[0], scales=(0.5, 1.0), flip=True)
    predict(model, _image()[0], precision="bf16")
    assert model.seen == [False, False, False, False, False, True]


def test_reuse_freed_memory_keeps_freed_buffers_resident(tmp_path):
    """Process-wide malloc setting: checked in fresh interpreters, with and without it."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, torch\n"
        "from ldnbench.inference import reuse_freed_memory\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "applied = reuse_freed_memory() if sys.argv[1] == 'on' else None\n"
        "base = rss()\n"
        "x = torch.ones(80 * 2**20 // 4)\n"
        "del x\n"
        "print(applied, rss() - base)\n")
    if not __import__("os").path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    on = subprocess.run([sys.executable, str(script), "on"], capture_output=True, text=True, check=True).stdout.split()
    off = subprocess.run([sys.executable, str(script), "off"], capture_output=True, text=True, check=True).stdout.split()
    if on[0] != "True":
        pytest.skip("glibc mallopt not available here")
    assert int(on[1]) >= 70   # the freed 80 MB stay in the heap for the next tensor
    assert int(off[1]) < 20   # by default they go back to the kernel
