"""Label agreement of an ldnbench checkpoint with labels computed elsewhere (e.g. a reference forward).

Runs the library inference path that `ldnbench eval` uses (``load_checkpoint`` -> ``to_input`` with the
checkpoint's normalisation -> ``prepare_model`` (BN folded, channels-last) -> ``predict``, fp32) on one
HxWx3 uint8 image (.npy or .png) and compares with an HxW label array (.npy). With ``--reference-logits``
(CxHxW .npy) it also reports the largest logit difference of the plain eval forward.

    python benchmarks/label_agreement.py CHECKPOINT IMAGE REFERENCE_LABELS [--reference-logits LOGITS]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ldnbench.checkpoints import load_checkpoint
from ldnbench.data.io import read_rgb
from ldnbench.data.transforms import to_input
from ldnbench.inference import predict, prepare_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("image")
    p.add_argument("reference_labels")
    p.add_argument("--reference-logits", default=None)
    a = p.parse_args()
    model, meta = load_checkpoint(a.checkpoint)
    img = np.load(a.image) if a.image.endswith(".npy") else read_rgb(a.image)
    x = to_input(img, meta.normalization)
    pred = predict(prepare_model(model, "cpu"), x[0]).numpy()
    ref = np.load(a.reference_labels)
    print(f"{meta.model_name} ({meta.provenance.get('source')}), {img.shape[0]}x{img.shape[1]}: label agreement "
          f"{100 * (pred == ref).mean():.4f} % ({int((pred != ref).sum())} of {ref.size} pixels differ)")
    if a.reference_logits:
        with torch.no_grad():
            ours = model(x)[0].numpy()
        theirs = np.load(a.reference_logits)
        print(f"  plain eval forward: max |logit difference| {np.abs(ours - theirs).max():.2e} "
              f"(largest |logit| {np.abs(theirs).max():.1f})")


if __name__ == "__main__":
    main()
