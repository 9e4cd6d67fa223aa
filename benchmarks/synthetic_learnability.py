"""Is the synthetic data learnable, and is the domain shift visible?

Trains a tiny LDN (DenseNet-121 layout with growth 8 and 2 layers per block, ~0.5 M parameters) on
one synthetic dataset for a few epochs with plain cross-entropy, then reports mIoU on the
val split of all three synthetic datasets. Not a test (it takes minutes); run it by hand:

    ldnbench synth --root /tmp/synth
    python benchmarks/synthetic_learnability.py --root /tmp/synth --train vistas --epochs 6
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ldnbench.data.registry import get_dataset
from ldnbench.data.transforms import EvalTransform, TrainTransform, TransformedDataset, collate
from ldnbench.models import build_model


def miou(model: torch.nn.Module, ds) -> tuple[float, float]:
    """(mIoU over classes present in the ground truth, pixel accuracy)."""
    c = ds.label_space.num_classes
    cm = np.zeros((c, c), np.int64)
    model.eval()
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = EvalTransform()(ds[i])
            p = model(x[None]).argmax(1)[0]
            m = y < 255
            cm += np.bincount(c * y[m].numpy() + p[m].numpy(), minlength=c * c).reshape(c, c)
    iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
    return float(iou[cm.sum(1) > 0].mean()), float(np.diag(cm).sum() / cm.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="datasets/synthetic")
    ap.add_argument("--train", default="vistas", choices=["cityscapes", "vistas", "kitti"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train = get_dataset(args.train, root=f"{args.root}/{args.train}", split="train")
    model = build_model("ldn121-32to4", train.label_space.num_classes, growth_rate=8, block_config=(2, 2, 2, 2),
                        num_init_features=16, spp_out=64, up_widths=(64, 64, 64), checkpointing="none")
    loader = torch.utils.data.DataLoader(TransformedDataset(train, TrainTransform((64, 128), scale=(0.75, 1.5))),
                                         batch_size=8, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for x, y in loader:
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        print(f"epoch {epoch}: loss {total / len(loader):.3f} ({time.time() - t0:.0f} s)", flush=True)
    for name in ("cityscapes", "vistas", "kitti"):
        m, acc = miou(model, get_dataset(name, root=f"{args.root}/{name}", split="val"))
        print(f"train {args.train} -> eval {name} val: mIoU {100 * m:.1f}%  pixel acc {100 * acc:.1f}%")


if __name__ == "__main__":
    main()
