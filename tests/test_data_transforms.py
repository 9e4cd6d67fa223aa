import numpy as np
import pytest
import torch

from ldnbench.data.base import Sample
from ldnbench.data.transforms import (MEAN_PIXEL, EvalTransform, TrainTransform, TransformedDataset, collate,
                                      normalize)
from ldnbench.errors import UserError


def _sample(h=20, w=30):
    # label = column index class (0..29), image encodes the column too: lets us check alignment
    cols = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    image = np.stack([cols * 4, cols * 4, np.full_like(cols, 7)], -1)
    return Sample(image=image, label=cols.copy(), id="s")


def _denorm(x):
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    return (x * std + mean) * 255


def test_crop_size_dtype_and_image_label_alignment():
    t = TrainTransform(16, scale=(1.0, 1.0), flip=True)
    g = torch.Generator().manual_seed(0)
    flipped = 0
    for _ in range(20):
        img, lab = t(_sample(), generator=g)
        assert img.shape == (3, 16, 16) and img.dtype == torch.float32
        assert lab.shape == (16, 16) and lab.dtype == torch.int64
        red = _denorm(img)[0].round()
        assert torch.equal(red, lab.float() * 4)  # flip/crop applied identically to image and label
        flipped += int(lab[0, 0] > lab[0, -1])
    assert 0 < flipped < 20


def test_padding_with_mean_pixel_and_ignore():
    t = TrainTransform((40, 50), scale=(1.0, 1.0), flip=False)
    img, lab = t(_sample(20, 30), generator=torch.Generator().manual_seed(1))
    pad = lab == 255
    assert pad.sum() == 40 * 50 - 20 * 30
    mean_norm = normalize(torch.tensor(MEAN_PIXEL, dtype=torch.uint8).view(3, 1, 1))
    assert torch.allclose(img[:, pad], mean_norm.view(3, 1).expand(3, int(pad.sum())))
    assert sorted(lab[~pad].unique().tolist()) == list(range(30))
    with pytest.raises(UserError, match="larger than image"):
        TrainTransform((40, 50), scale=(1.0, 1.0), pad=False)(_sample(20, 30))


def test_rescale_uses_nearest_for_labels():
    t = TrainTransform(64, scale=(0.5, 2.0), flip=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        _, lab = t(_sample(), generator=g)
        assert set(lab.unique().tolist()) <= set(range(30)) | {255}


def test_deterministic_under_seeded_dataloader_with_workers():
    data = TransformedDataset([_sample() for _ in range(6)], TrainTransform(12, flip=True))

    def run(seed):
        loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(seed))
        return [b for b in loader]

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))
    assert a[0][0].shape == (3, 3, 12, 12)


def test_eval_transform_and_collate_pad_different_sizes():
    a = EvalTransform()(_sample(20, 30))
    b = EvalTransform()(_sample(10, 12))
    images, labels = collate([a, b])
    assert images.shape == (2, 3, 20, 30) and labels.shape == (2, 20, 30)
    assert (labels[1, 10:] == 255).all() and (labels[1, :, 12:] == 255).all()
    assert (images[1, :, 10:] == 0).all()
    assert torch.equal(labels[0], a[1])


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_rescale_factor_is_applied_to_the_crop(scale):
    # label = column index: a crop row rescaled by s steps 1/s columns per pixel (0.5: 0,2,4..; 2: 0,0,1,1..)
    t = TrainTransform((8, 24), scale=(scale, scale), flip=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        img, lab = t(_sample(20, 30) if scale > 1 else _sample(40, 60), generator=g)
        row = lab[4]
        values = row.unique()
        assert len(values) in ((24,) if scale < 1 else (12, 13))
        assert (values.diff() == (2 if scale < 1 else 1)).all()
        assert (_denorm(img)[0, 4] - row.float() * 4).abs().max() <= 6  # image rescaled with the label
