from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ldnbench.data.labels import LabelMapping
from ldnbench.data.transforms import to_input
from ldnbench.errors import UserError
from ldnbench.evaluate import evaluate
from ldnbench.metrics import SegMetrics

# The toy dataset and model live in a script so that torchrun workers can import them too.
TOY = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    import torch
    from torch import nn
    from ldnbench.data.base import Sample
    from ldnbench.data.labels import LabelSpace

    SPACE = LabelSpace("toy4", ("sky", "road", "car", "person"), ((0, 0, 0),) * 4,
                       categories=("flat", "thing"), class_category=(0, 0, 1, 1), instance_classes=(2, 3),
                       avg_instance_size=(float("nan"), float("nan"), 40.0, 20.0), instance_categories=(1,))

    class ToyDataset(torch.utils.data.Dataset):
        label_space = SPACE

        def __init__(self, n, log_dir=None):
            self.n, self.log_dir = n, log_dir

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if self.log_dir:
                with open(os.path.join(self.log_dir, f"access-{os.getpid()}.txt"), "a") as f:
                    f.write(f"{i}\\n")
            rng = np.random.default_rng(i)
            h, w = 24 + 4 * i, 40 - 2 * i
            label = rng.integers(0, 4, (h // 4, w // 2)).repeat(4, 0).repeat(2, 1).astype(np.uint8)
            label[rng.random((h, w)) < 0.05] = 255
            inst = np.zeros((h, w), np.int32)
            inst[label == 2] = 7
            inst[label == 3] = 1 + (np.arange(w) // 8)[None].repeat(h, 0)[label == 3]
            image = np.stack([label * 50 + rng.integers(0, 40, (h, w))] * 3, -1).astype(np.uint8)
            return Sample(image, label, f"toy{i}", inst)

    class ToyNet(nn.Module):
        num_classes = 4

        def __init__(self, num_classes=4):
            super().__init__()
            torch.manual_seed(0)
            self.num_classes = num_classes
            self.conv = nn.Conv2d(3, num_classes, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    def run(log_dir=None, **kw):
        from ldnbench.evaluate import evaluate
        return evaluate(ToyNet(), ToyDataset(5, log_dir), progress=False, **kw)

    if __name__ == "__main__":
        import torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        res = run(sys.argv[1], scales=(1.0, 0.75), flip=True)
        with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump({"metrics": res.metrics.to_dict(), "confusion": res.metrics.confusion.tolist(),
                       "world": res.world_size}, f)
        dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy_eval.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_eval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.path = path
    return mod


def test_evaluate_equals_a_manual_loop(toy):
    ds, model = toy.ToyDataset(5), toy.ToyNet()
    model.train()
    res = evaluate(model, ds, progress=False)
    assert model.training, "the caller's train/eval mode is restored"
    m = SegMetrics(ds.label_space)
    with torch.no_grad():
        model.eval()
        for i in range(len(ds)):
            s = ds[i]
            m.update(model(to_input(s.image)).argmax(1)[0], s.label, s.instances)
    ref = m.compute()
    # fast=False runs the model's own layout: operation for operation the manual loop, so exactly equal
    plain = evaluate(model, ds, progress=False, fast=False)
    assert np.array_equal(plain.metrics.confusion, ref.confusion)
    assert plain.metrics.to_dict() == ref.to_dict()
    # the default fast path (BN folded, channels-last) reorders float sums: labels agree on >= 99.9 %
    # of pixels on every instruction set, each flipped pixel moving one count between two cells
    flips = np.abs(res.metrics.confusion - ref.confusion).sum() / 2
    assert flips <= 0.001 * ref.confusion.sum()
    assert res.num_images == 5 and res.world_size == 1 and not math.isnan(res.metrics.iiou)
    assert set(res.timings) == {"load", "inference", "metrics", "total", "per_image"}
    assert list(res.class_table()["class"]) == ["sky", "road", "car", "person"]
    rec = res.to_record(model="toynet", dataset="toy", split="val")
    assert rec["kind"] == "eval" and rec["metrics"]["num_images"] == 5 and rec["eval_settings"]["scales"] == [1.0]
    assert "ms/image" in res.format_table()
    assert evaluate(model, ds, progress=False, max_images=2).num_images == 2


def test_class_count_mismatch_needs_a_mapping(toy):
    ds, model = toy.ToyDataset(2), toy.ToyNet(6)
    with pytest.raises(UserError, match="predicts 6 classes .* toy4 has 4"):
        evaluate(model, ds, progress=False)
    res = evaluate(model, ds, mapping=LabelMapping("six", "toy4", (5, 0, 2, 3)), progress=False)
    assert res.num_images == 2


def test_multiscale_settings_reach_inference(toy):
    ds, model = toy.ToyDataset(3), toy.ToyNet()
    single = evaluate(model, ds, progress=False)
    ms = evaluate(model, ds, scales=(0.5, 1.0, 1.5), flip=True, progress=False)
    assert ms.settings.scales == (0.5, 1.0, 1.5) and ms.settings.flip
    assert not np.array_equal(single.metrics.confusion, ms.metrics.confusion)


@pytest.mark.slow
def test_two_process_gloo_run_equals_single_process(toy, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(toy.path), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    accessed = sorted(int(line) for p in tmp_path.glob("access-*.txt") for line in p.read_text().split())
    assert accessed == [0, 1, 2, 3, 4], "every sample evaluated exactly once, no padding duplicates"
    assert len(list(tmp_path.glob("access-*.txt"))) == 2
    single = toy.run(scales=(1.0, 0.75), flip=True)
    for rank in (0, 1):
        dist_res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert dist_res["world"] == 2
        assert dist_res["confusion"] == single.metrics.confusion.tolist()
        ours = single.metrics.to_dict()
        assert dist_res["metrics"]["num_images"] == ours["num_images"] == 5
        assert dist_res["metrics"]["class_iiou"] == pytest.approx(ours["class_iiou"], abs=1e-12)
        assert dist_res["metrics"]["miou"] == pytest.approx(ours["miou"], abs=1e-15)
        assert dist_res["metrics"]["cat_iiou"] == pytest.approx(ours["cat_iiou"], abs=1e-12)
