"""Time ldnbench's metric accumulator and `score` against cityscapesScripts and torchmetrics.

    python benchmarks/bench_metrics.py [--frames 8] [--height 1024 --width 2048] [--threads N]

Generates Cityscapes-like frames (19 classes, ignore pixels, ~40 instances each), then reports per
frame: ``SegMetrics.update`` (in memory, with instances), torchmetrics' ``MulticlassJaccardIndex``
update (IoU only: no iIoU, no categories), the official ``evaluatePair`` (reads PNGs, as the
official tool always does), and ``ldnbench.score.score_predictions`` on the same PNG folder with 2
decoding threads. Also checks that score and the official evaluator give the same mIoU/iIoU, and
prints the decode-floor ratio: score's wall time per frame (2 threads) over the time to decode the
two PNGs it cannot avoid (prediction + 16-bit instanceIds) once on one thread; at most 1 is the goal.
The ratio is also measured in 5 interleaved pairs (score, then the floor) and their median printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_frames(n: int, h: int, w: int, seed: int = 0):
    """(labelIds, instanceIds, predicted labelIds) triples in the Cityscapes encoding."""
    from cityscapesscripts.helpers.labels import labels

    rng = np.random.default_rng(seed)
    valid = np.array([l.id for l in labels if l.id >= 0 and not l.ignoreInEval])
    void = np.array([l.id for l in labels if l.id >= 0 and l.ignoreInEval])
    inst_ids = np.array([l.id for l in labels if l.hasInstances and not l.ignoreInEval])
    frames = []
    for _ in range(n):
        blocks = rng.choice(np.concatenate([valid, valid, void[:3]]), size=(h // 64, w // 64))
        gt = blocks.repeat(64, 0).repeat(64, 1).astype(np.uint8)
        inst = gt.astype(np.int32)
        for k in range(40):
            lid = int(rng.choice(inst_ids))
            y, x = rng.integers(0, h - 200), rng.integers(0, w - 200)
            hh, ww = rng.integers(10, 200), rng.integers(10, 200)
            gt[y:y + hh, x:x + ww] = lid
            inst[y:y + hh, x:x + ww] = lid * 1000 + k
        pred = gt.copy()
        wrong = rng.choice(valid, size=(h // 16, w // 16)).repeat(16, 0).repeat(16, 1)
        mask = (rng.random((h // 16, w // 16)) < 0.2).repeat(16, 0).repeat(16, 1)
        pred[mask] = wrong[mask]
        pred[np.isin(pred, void)] = valid[0]
        frames.append((gt, inst, pred))
    return frames


def per_frame(fn, items, repeat: int = 1) -> tuple[float, float]:
    """(median wall seconds, mean CPU seconds of this process) per call of ``fn(item)``, after a warm-up.

    CPU time is the robust number on a shared machine: other processes stretch wall time, not it.
    """
    fn(items[0])
    times = []
    cpu = time.process_time()
    for _ in range(repeat):
        for it in items:
            t = time.perf_counter()
            fn(it)
            times.append(time.perf_counter() - t)
    return statistics.median(times), (time.process_time() - cpu) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from PIL import Image

    from ldnbench.data.cityscapes import labelid_to_trainid
    from ldnbench.data.spaces import get_label_space
    from ldnbench.data.synthetic import write_cityscapes
    from ldnbench.metrics import SegMetrics

    h, w = args.height, args.width
    import os

    print(f"{args.frames} frames of {h}x{w}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    frames = make_frames(args.frames, h, w)
    space = get_label_space("cityscapes19")
    to_train = labelid_to_trainid().astype(np.int64)
    to_train[to_train < 0] = 255
    to_train = to_train.astype(np.uint8)
    mem = [(torch.from_numpy(to_train[p]), torch.from_numpy(to_train[g]),
            torch.from_numpy(np.where(i >= 1000, i, 0).astype(np.int32))) for g, i, p in frames]

    m = SegMetrics(space)
    t_ours = per_frame(lambda x: m.update(*x), mem, repeat=3)
    m_noinst = SegMetrics(space)
    t_ours_noinst = per_frame(lambda x: m_noinst.update(x[0], x[1]), mem, repeat=3)
    rows = [("ldnbench SegMetrics.update (IoU+iIoU+categories)", t_ours),
            ("ldnbench SegMetrics.update (no instances)", t_ours_noinst)]

    try:
        from torchmetrics.classification import MulticlassJaccardIndex

        tm = MulticlassJaccardIndex(num_classes=19, ignore_index=255, average=None)
        t_tm = per_frame(lambda x: tm.update(x[0].long(), x[1].long()), mem)
        rows.append(("torchmetrics MulticlassJaccardIndex.update (IoU only)", t_tm))
    except ImportError:
        print("torchmetrics not installed (pip install -e '.[bench]'): skipped")

    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    np.in1d = lambda a, b, invert=False: np.isin(np.ravel(a), b, invert=invert)  # removed in NumPy 2.4
    ev.args.quiet, ev.args.JSONOutput = True, False
    with tempfile.TemporaryDirectory() as tmp:
        root, pred_dir = Path(tmp) / "cityscapes", Path(tmp) / "pred"
        pairs = []
        for n, (g, i, p) in enumerate(frames):
            sid = f"frankfurt_{n:06d}_000019"
            write_cityscapes(root, "val", sid, np.zeros((h, w, 3), np.uint8), g, i)
            pf = pred_dir / f"{sid}_pred.png"
            pf.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(p).save(pf)
            pairs.append((str(pf), str(root / "gtFine/val/frankfurt" / f"{sid}_gtFine_labelIds.png")))
        cm, stats = ev.generateMatrix(ev.args), ev.generateInstanceStats(ev.args)
        t_off = per_frame(lambda pg: ev.evaluatePair(pg[0], pg[1], cm, stats, {}, ev.args), pairs)
        rows.append(("cityscapesScripts evaluatePair (PNG files, C ext: %s)" % ev.CSUPPORT, t_off))

        official = ev.evaluateImgLists([p for p, _ in pairs], [g for _, g in pairs], ev.args)
        from ldnbench.data.registry import get_dataset
        from ldnbench.score import score_predictions

        ds = get_dataset("cityscapes", root, "val")
        score_predictions(ds, pred_dir, pred_format="labelIds", workers=2, progress=False)  # warm-up
        t, cpu = time.perf_counter(), time.process_time()
        res = score_predictions(ds, pred_dir, pred_format="labelIds", workers=2, progress=False)
        t_score = ((time.perf_counter() - t) / len(frames), (time.process_time() - cpu) / len(frames))
        rows.append(("ldnbench score (PNG files, 2 decoding threads)", t_score))
        ours = res.metrics
        # where score's time goes, per frame and on one thread
        from ldnbench.score import _decode_pred, get_pred_format

        fmt = get_pred_format("labelIds", space)
        acc = SegMetrics(space, extra_pred_categories=fmt.extra_pred_categories, pred_lut=fmt.lut)
        preds = [_decode_pred(Path(p)) for p, _ in pairs]
        targets = [ds.load_target_combined(i) for i in range(len(frames))]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        from ldnbench.data.io import read_png16

        inst_files = [ds.files[i].instances for i in range(len(frames))]
        parts = [("decode the prediction PNG", per_frame(lambda i: _decode_pred(Path(pairs[i][0])), range(len(frames)))),
                 ("decode the instanceIds PNG", per_frame(lambda i: read_png16(inst_files[i], np.uint16), range(len(frames)))),
                 ("adapter load_target_combined (the instanceIds map, undivided)",
                  per_frame(ds.load_target_combined, range(len(frames)))),
                 ("SegMetrics.update_combined (label-id prediction, instanceIds map)",
                  per_frame(lambda i: acc.update_combined(preds[i], targets[i].values, targets[i].class_of,
                                                          targets[i].instance_from), range(len(frames))))]
        # what this machine's cores give for the decodes alone, in score's two threads
        import threading

        def decode_share(k: int) -> None:
            for i in range(k, len(frames), 2):
                _decode_pred(Path(pairs[i][0]))
                read_png16(inst_files[i], np.uint16)

        t = time.perf_counter()
        workers = [threading.Thread(target=decode_share, args=(k,)) for k in range(2)]
        for th in workers:
            th.start()
        for th in workers:
            th.join()
        decode_two_threads = (time.perf_counter() - t) / len(frames)
        # the goal's ratio from interleaved pairs (score, then the floor), median of 5: this machine's
        # speed drifts from second to second, and a pair measured back to back shares the drift
        pair_ratios = []
        for _ in range(5):
            torch.set_num_threads(threads)
            t = time.perf_counter()
            score_predictions(ds, pred_dir, pred_format="labelIds", workers=2, progress=False)
            s = time.perf_counter() - t
            torch.set_num_threads(1)
            t = time.perf_counter()
            for i in range(len(frames)):
                _decode_pred(Path(pairs[i][0]))
                read_png16(inst_files[i], np.uint16)
            pair_ratios.append(s / (time.perf_counter() - t))
        torch.set_num_threads(threads)
        diff = max(abs(ours.miou - official["averageScoreClasses"]),
                   abs(ours.iiou - official["averageScoreInstClasses"]),
                   abs(ours.cat_iou - official["averageScoreCategories"]),
                   abs(ours.cat_iiou - official["averageScoreInstCategories"]))

    print(f"{'':<58}{'wall ms':>9}{'cpu ms':>9}{'official/this (wall, cpu)':>28}")
    for name, (wall, cpu) in rows:
        print(f"{name:<58}{1000 * wall:>9.1f}{1000 * cpu:>9.1f}{t_off[0] / wall:>14.1f}x{t_off[1] / cpu:>13.1f}x")
    print("score per frame, one thread:" + "".join(f"  {n} {1000 * c:.1f} ms cpu;" for n, (_, c) in parts))
    floor = parts[0][1][0] + parts[1][1][0]
    print(f"decode floor (prediction + instanceIds PNG, one thread, wall) {1000 * floor:.1f} ms/frame; score with 2 "
          f"threads {1000 * t_score[0]:.1f} ms/frame: score / floor = {t_score[0] / floor:.2f} (goal <= 1); "
          f"official / score = {t_off[0] / t_score[0]:.1f}x")
    print(f"score / floor in 5 interleaved pairs: {', '.join(f'{r:.2f}' for r in pair_ratios)}; "
          f"median {statistics.median(pair_ratios):.2f} (goal <= 1)")
    print(f"the same decodes in 2 threads alone: {1000 * decode_two_threads:.1f} ms/frame "
          f"({floor / decode_two_threads:.2f}x the one-thread floor's speed: how far this machine's cores scale)")
    print(f"score vs official: mIoU {ours.miou:.6f} vs {official['averageScoreClasses']:.6f}, "
          f"max |difference| of the 4 means {diff:.1e}")


if __name__ == "__main__":
    main()
