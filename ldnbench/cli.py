"""Command-line interface: parses options and calls library functions, nothing else.

Every command lives in one section below, grouped by the library module it calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ldnbench import __version__
from ldnbench.errors import UserError
from ldnbench.train_config import DEFAULT_EVAL_AT, EVAL_AT, TrainConfig

#: The training options that `cross` passes on to every training run it starts.
CROSS_TRAIN_OPTIONS = ("epochs", "batch_size", "crop", "scale", "lr", "pretrained", "max_iters", "seed", "workers",
                       "model_options")


class _Group(click.Group):
    """Turns :class:`UserError` into one line on stderr and a non-zero exit (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ldnbench")
def main() -> None:
    """Train, evaluate, compare and dissect Ladder-style DenseNet segmentation models."""


# --- options declared once: click options from a config dataclass's fields ----------------------
def _click_type(annotation: str):
    for name, typ in (("int", int), ("float", float)):
        if annotation.startswith((name, f"tuple[{name}")):
            return typ
    return str


def config_options(cls, names: tuple[str, ...] | None = None, defaults: dict | None = None):
    """Decorator: one click option per field of dataclass ``cls`` that carries CLI metadata
    (``ldnbench.train._cli``), with the field's help and, shown, its default. ``names`` selects
    fields; ``defaults`` shows other defaults (a command that sets them itself). Every option's value
    is None unless given, so presets and the dataclass fill the rest (see :func:`config_values`)."""
    import dataclasses

    def decorate(f):
        for fld in reversed(dataclasses.fields(cls)):
            how = fld.metadata.get("cli")
            if how is None or (names is not None and fld.name not in names):
                continue
            how = dict(how)
            shown = (defaults or {}).get(fld.name, fld.default)
            help_text = fld.metadata["help"]
            if "[default:" not in help_text and shown not in (None, dataclasses.MISSING):
                if "/" in how.get("flag", ""):
                    on, off = how["flag"].split("/")
                    help_text += f" [default: {on if shown else off}]"
                elif "flag" not in how:
                    help_text += f" [default: {' '.join(map(str, shown)) if isinstance(shown, tuple) else shown}]"
            kwargs: dict = {"default": None, "help": help_text}
            decl = how.pop("flag", None) or how.pop("multiple", None) or f"--{fld.name.replace('_', '-')}"
            if "multiple" in fld.metadata["cli"]:
                kwargs.update(multiple=True, metavar="KEY=VALUE")
            elif "flag" in fld.metadata["cli"]:
                kwargs["is_flag"] = True
            else:
                if "choices" in how:
                    kwargs["type"] = click.Choice(list(how.pop("choices")))
                else:
                    kwargs["type"] = _click_type(str(fld.type))
                if "flag_value" in how:
                    kwargs.update(is_flag=False, flag_value=how.pop("flag_value"))
            how.pop("none_word", None)
            kwargs["required"] = how.pop("required", False)
            kwargs.update(how)
            f = click.option(decl, fld.name, **kwargs)(f)
        return f

    return decorate


def config_values(cls, values: dict) -> dict:
    """Click values of :func:`config_options` -> field overrides (None = not given): tuples for
    ``nargs``, ``KEY=VALUE`` lists parsed, ``none`` for fields that accept the word."""
    import dataclasses

    from ldnbench.train_config import parse_options

    out = {}
    for fld in dataclasses.fields(cls):
        how = fld.metadata.get("cli")
        if how is None or fld.name not in values:
            continue
        v = values[fld.name]
        if "multiple" in how:
            v = parse_options(v) if v else None
        elif v is not None and "nargs" in how:
            v = tuple(v)
        out[fld.name] = v
    return out


# --- models: zoo, flops (ldnbench.models) ------------------------------------------------------
@main.command("zoo")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "latex", "markdown", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--imagenet-compatible", is_flag=True,
              help="Count the layout that loads full torchvision ImageNet weights instead of the paper's.")
@click.option("--peers", is_flag=True, help="Also list the torchvision peer models (tv-*, 21 classes).")
def zoo_cmd(fmt: str, imagenet_compatible: bool, peers: bool) -> None:
    """Every registered model: params, GMAC and GFLOP at 1x3x1024x1024 beside the paper's numbers."""
    from ldnbench.models.zoo import format_rows, zoo_rows

    click.echo(format_rows(zoo_rows(imagenet_compatible=imagenet_compatible, peers=peers), fmt))


@main.command("flops")
@click.option("--model", "model_name", default=None, help="Model name or alias (see `ldnbench zoo`).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Count the model a checkpoint describes (its layout options and classes), e.g. a converted one.")
@click.option("--height", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--width", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="[default: 19, or the checkpoint's]")
@click.option("--imagenet-compatible", is_flag=True, help="Count the layout that loads ImageNet weights.")
def flops_cmd(model_name: str | None, checkpoint: str | None, height: int, width: int, num_classes: int | None,
              imagenet_compatible: bool) -> None:
    """Params, GMAC and GFLOP of one model for one HxW image, and which operators were counted."""
    from ldnbench.models import model_complexity, resolve_model_name
    from ldnbench.models.zoo import format_complexity

    options: dict = {}
    if checkpoint:
        from ldnbench.checkpoints import read_checkpoint

        meta = read_checkpoint(checkpoint).meta
        if meta is None:
            raise UserError(f"{checkpoint} is a bare state dict and does not say which model it holds; pass "
                            f"--model (and its options) instead, or convert it with `ldnbench convert`", 2)
        if model_name and resolve_model_name(model_name) != meta.model_name:
            raise UserError(f"checkpoint {checkpoint} holds a {meta.model_name} model, not {model_name}", 2)
        model_name, options = meta.model_name, dict(meta.model_options)
        num_classes = num_classes or meta.num_classes
    if not model_name:
        raise UserError("pass --model NAME or --checkpoint FILE", 2)
    options["imagenet_compatible"] = imagenet_compatible or bool(options.get("imagenet_compatible"))
    c = model_complexity(resolve_model_name(model_name), height, width, num_classes=num_classes or 19, **options)
    click.echo(format_complexity(c))


# --- convert: other codebases' checkpoints (ldnbench.convert) ------------------------------------
@main.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--from", "source", required=True, type=click.Choice(["ldn", "torchvision"]),
              help="ldn: the paper's released checkpoints (ivankreso/LDN); torchvision: its segmentation models "
                   "(SRC may also be a weights name such as DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1).")
@click.option("--model", "model_name", default=None,
              help="Zoo name to convert into [default: read off the file, e.g. ldn121-64to4, tv-deeplabv3-resnet50].")
@click.option("--label-space", default=None,
              help="Label space of the logits [default: cityscapes19 for ldn, voc21 for torchvision's 21 classes].")
def convert_cmd(src: str, dst: str, source: str, model_name: str | None, label_space: str | None) -> None:
    """Convert checkpoint SRC into the ldnbench checkpoint DST that every command reads with no extra flag."""
    from ldnbench.convert import convert

    report = convert(src, dst, source, model_name, label_space)
    click.echo(report.format())
    click.echo(f"wrote {dst}")


# --- datasets: datasets, datasets check, synth (ldnbench.data) -----------------------------------
@main.group("datasets", invoke_without_command=True)
@click.pass_context
def datasets_cmd(ctx: click.Context) -> None:
    """List the dataset adapters (label space, splits, expected folder); see `datasets check`."""
    if ctx.invoked_subcommand is None:
        from ldnbench.data.check import list_datasets

        click.echo(list_datasets())


@datasets_cmd.command("check")
@click.argument("name")
@click.option("--root", type=click.Path(file_okay=False), help="Dataset folder [default: ./datasets/NAME].")
@click.option("--split", help="Check only this split [default: all splits found].")
@click.option("--full", is_flag=True, help="Read every label and image; print the per-class pixel histogram.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def datasets_check_cmd(name: str, root: str | None, split: str | None, full: bool, as_json: bool) -> None:
    """Verify the layout of dataset NAME: pairs per split, label values, unpaired or corrupt files.

    Exits with status 1 when the folder is wrong or any file has a problem.
    """
    import json

    from ldnbench.data.check import check_dataset, format_report

    report = check_dataset(name, root=root, split=split, full=full, progress=full and not as_json)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else format_report(report))
    if report.problems:
        sys.exit(1)


@main.command("synth")
@click.option("--root", default="datasets/synthetic", show_default=True, type=click.Path(file_okay=False),
              help="Writes ROOT/cityscapes, ROOT/vistas and ROOT/kitti.")
@click.option("--size", default="160x80", show_default=True, help="WxH of the Cityscapes-like images.")
@click.option("--n", "n", default=150, show_default=True, type=click.IntRange(min=1), help="Images per dataset.")
@click.option("--seed", default=0, show_default=True, type=int)
def synth_cmd(root: str, size: str, n: int, seed: int) -> None:
    """Generate synthetic street scenes in the Cityscapes, Vistas v1.2 and KITTI formats."""
    from ldnbench.data.synthetic import generate

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must look like 160x80 (width x height), got {size!r}", 2) from None
    counts = generate(root, size=(w, h), n=n, seed=seed)
    for name, per_split in counts.items():
        splits = ", ".join(f"{k} {v}" for k, v in sorted(per_split.items()))
        click.echo(f"{name:<11} {splits:<20} -> ldnbench datasets check {name} --root {root}/{name}")



# --- evaluation: eval, score (ldnbench.evaluate) -------------------------------------------------
def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"--scales {text!r} is not a comma-separated list of numbers, e.g. 0.5,1,2", 2) from None
    if not scales or any(s <= 0 for s in scales):
        raise UserError(f"--scales {text!r}: every scale must be positive", 2)
    return scales


#: Shared by the commands that run model inference on CPU (see ldnbench.inference.reuse_freed_memory).
_heap_reuse_option = click.option(
    "--heap-reuse/--no-heap-reuse", default=True, show_default=True,
    help="CPU: keep freed large buffers in the heap instead of page-faulting fresh ones (glibc).")


#: Inference precision of every command that reports a number; fp32 unless asked (ldnbench.runtime).
_precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
    help="Inference precision; bf16/fp16 autocast only when asked (fp16 needs CUDA).")


#: The resolution protocol (ldnbench.data.resize): one declaration for every command that reads images.
_resize_option = click.option(
    "--resize", type=click.IntRange(min=8), default=None, metavar="W",
    help="Resize images to width W, aspect kept (antialiased bilinear; labels nearest) [default: full resolution].")
_eval_at_option = click.option(
    "--eval-at", type=click.Choice(list(EVAL_AT)), default=DEFAULT_EVAL_AT, show_default=True,
    help="With --resize: score at the labels' original resolution (logits upsampled before the argmax; the "
         "benchmark protocol) or against labels resized the same way (the paper's Table 1/7 protocol).")
#: Which runtime executes the model: eager PyTorch or an exported ONNX graph (ldnbench.deploy).
_backend_option = click.option(
    "--backend", type=click.Choice(["torch", "onnxruntime", "openvino", "tensorrt"]), default="torch",
    show_default=True, help="Run the model in PyTorch or as its exported ONNX graph (fp32; tensorrt: CUDA, untested).")


@main.command("eval")
@click.option("--model", "model_name", default=None, help="Model name or alias (default: read from the checkpoint).")
@click.option("--checkpoint", required=True, type=click.Path(), help="Trainer checkpoint (last.pt/best.pt) or state dict.")
@click.option("--dataset", required=True, help="Dataset adapter to evaluate on (see `ldnbench datasets`).")
@click.option("--split", default="val", show_default=True)
@click.option("--root", type=click.Path(), default=None, help="Dataset root (default ./datasets/<dataset>).")
@click.option("--ms", is_flag=True, help="Multi-scale test at scales 0.5,0.75,1,1.5,2 (softmax averaged).")
@click.option("--scales", default=None, help="Custom comma-separated scales, e.g. 0.75,1,1.25 (overrides --ms).")
@click.option("--flip", is_flag=True, help="Also average horizontally flipped passes.")
@click.option("--sliding", type=click.IntRange(min=32), default=None,
              help="Tile size for sliding-window inference on very large images (1/3 overlap).")
@click.option("--label-space", default=None, help="Label space of a bare state dict (default: the dataset's).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@_precision_option
@_heap_reuse_option
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Data-loading processes.")
@_resize_option
@_eval_at_option
@click.option("--per-image", is_flag=True,
              help="Also record per-image rows (mIoU over the classes present, pixel accuracy, class IoUs) and write "
                   "them as <record>.per_image.csv.")
@click.option("--out", type=click.Path(), default=None,
              help="Result record path (.json) or folder [default: results/eval/<model>-<dataset>-<split>-<run>.json].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_backend_option
def eval_cmd(model_name, checkpoint, dataset, split, root, ms, scales, flip, sliding, label_space, device, precision,
             heap_reuse, max_images, workers, resize, eval_at, per_image, out, quiet, backend):
    """Evaluate a checkpoint on a dataset split: per-class table and a JSON result record.

    Under torchrun every process evaluates a disjoint share of the images; rank 0 prints and writes.
    """
    from pathlib import Path

    from ldnbench.checkpoints import load_checkpoint
    from ldnbench.data.spaces import get_mapping
    from ldnbench.data.registry import get_dataset
    from ldnbench.evaluate import PerImageMetrics, evaluate, per_image_frame
    from ldnbench.inference import MS_SCALES, reuse_freed_memory
    from ldnbench.report.records import write_record
    from ldnbench.deploy import backend_version, check_backend, deployed_model
    from ldnbench.runtime import Distributed, check_precision, resolve_device

    dev = resolve_device(device)
    check_precision(precision, dev)
    check_backend(backend, dev, precision)  # a missing extra fails before anything is loaded
    ds = get_dataset(dataset, root, split)
    if heap_reuse and dev.type == "cpu":
        reuse_freed_memory()
    model, meta = load_checkpoint(checkpoint, model_name, label_space or ds.label_space.name)
    space = meta.label_space
    mapping = None if space in (None, ds.label_space.name) else get_mapping(space, ds.label_space)
    scale_list = _parse_scales(scales) if scales else (MS_SCALES if ms else (1.0,))
    accumulators = [PerImageMetrics(ds.label_space)] if per_image else []
    net = deployed_model(model, backend, device=str(dev), normalization=meta.normalization)  # the model itself for torch
    with Distributed(dev) as d:
        res = evaluate(net, ds, mapping=mapping, scales=scale_list, flip=flip, sliding=sliding, device=dev,
                       precision=precision, progress=not quiet, num_workers=workers, max_images=max_images,
                       normalization=meta.normalization, resize=resize, eval_at=eval_at, accumulators=accumulators,
                       fast=backend == "torch")  # an exported graph is already BN-folded
    if not d.is_main:
        return
    rec = res.to_record(model=model.name, model_options=meta.model_options, dataset=dataset, root=ds.root, split=split,
                        checkpoint=str(checkpoint), model_label_space=space or ds.label_space.name,
                        normalization=meta.normalization.to_dict(), provenance=meta.provenance,
                        backend=backend, backend_version=backend_version(backend))
    path = Path(out) if out else Path("results") / "eval"
    if path.suffix != ".json":
        path = path / f"{model.name}-{dataset}-{split}-{rec['run_id']}.json"
    click.echo(res.format_table())
    if backend != "torch":
        click.echo(f"backend: {rec['backend_version']}, exported graphs (one per input shape) run in fp32")
    write_record(path, rec)
    click.echo(f"wrote {path}")
    if per_image:
        from ldnbench.fileio import atomic_write_text

        csv = path.with_suffix(".per_image.csv")
        atomic_write_text(csv, per_image_frame(res.extra["per_image"], ds.label_space.classes)
                          .to_csv(index=False, float_format="%.6g"))
        click.echo(f"wrote {csv}")


@main.command("score")
@click.option("--dataset", required=True, help="Dataset adapter holding the ground truth (e.g. cityscapes).")
@click.option("--root", type=click.Path(), default=None, help="Dataset root (default ./datasets/<dataset>).")
@click.option("--split", default="val", show_default=True)
@click.option("--pred", "pred_dir", required=True, type=click.Path(),
              help="Folder of prediction PNGs, searched recursively; <sample id>*.png (Cityscapes: city_seq_frame*.png).")
@click.option("--pred-format", type=click.Choice(["labelIds", "trainIds"]), default=None,
              help="labelIds: Cityscapes label ids 0..33 (what the official tool takes; default for Cityscapes); "
                   "trainIds: class indices of the dataset's label space, 255 = void.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the metrics as JSON here.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Decoding/accumulating threads.")
@click.option("--resize", type=click.IntRange(min=8), default=None, metavar="W",
              help="Score against labels resized to width W (nearest; the paper's reduced-resolution protocol); "
                   "predictions must then be W wide.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score_cmd(dataset, root, split, pred_dir, pred_format, json_out, workers, resize, quiet):
    """Score a folder of prediction PNGs with the official Cityscapes metric definitions."""
    from ldnbench.data.registry import get_dataset
    from ldnbench.fileio import atomic_write_json
    from ldnbench.report.records import jsonable
    from ldnbench.score import score_predictions

    from ldnbench.data.resize import apply_resize

    ds = apply_resize(get_dataset(dataset, root, split), resize, "resized")
    res = score_predictions(ds, pred_dir, pred_format=pred_format, workers=workers, progress=not quiet)
    if res.extra:
        shown = ", ".join(str(p) for p in res.extra[:3]) + (" ..." if len(res.extra) > 3 else "")
        click.echo(f"warning: {len(res.extra)} PNG(s) in {pred_dir} match no {dataset} {split} sample and were "
                   f"ignored: {shown}", err=True)
    click.echo(res.metrics.format_table())
    click.echo(f"scored {res.metrics.num_images} images in {res.seconds:.1f} s")
    if json_out:
        atomic_write_json(json_out, jsonable(res.to_json()))
        click.echo(f"wrote {json_out}")



@main.command("predict")
@click.option("--checkpoint", required=True, type=click.Path(), help="Trainer checkpoint (last.pt/best.pt) or state dict.")
@click.option("--model", "model_name", default=None, help="Model name or alias (default: read from the checkpoint).")
@click.option("--label-space", default=None, help="Label space of a bare state dict.")
@click.option("--dataset", default=None, help="Predict a dataset split: files <sample id>.png (what `score` reads).")
@click.option("--root", type=click.Path(), default=None, help="Dataset root (default ./datasets/<dataset>).")
@click.option("--split", default="val", show_default=True)
@click.option("--images", type=click.Path(), default=None,
              help="Or predict every JPEG/PNG below this folder (relative paths kept, suffix .png).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(["labelIds", "trainIds", "color", "overlay"]), default=None,
              help="labelIds (Cityscapes/KITTI/WildDash label ids, for the official server), trainIds (class indices, "
                   "255 void), color (palette) or overlay [default: labelIds where the dataset has label ids, else trainIds].")
@click.option("--ms", is_flag=True, help="Multi-scale test at scales 0.5,0.75,1,1.5,2 (softmax averaged).")
@click.option("--scales", default=None, help="Custom comma-separated scales (overrides --ms).")
@click.option("--flip", is_flag=True, help="Also average horizontally flipped passes.")
@click.option("--sliding", type=click.IntRange(min=32), default=None, help="Tile size for sliding-window inference.")
@_resize_option
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@_precision_option
@_heap_reuse_option
@click.option("--overwrite", is_flag=True, help="Predict again images whose output exists [default: skip them].")
@click.option("--gallery", "gallery_record", type=click.Path(dir_okay=False), default=None,
              help="An `eval --per-image` record of the same dataset/split: also draw OUT/gallery.png of its worst and "
                   "best images.")
@click.option("--gallery-n", type=click.IntRange(min=1), default=4, show_default=True,
              help="Worst and best images in the gallery.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_backend_option
def predict_cmd(checkpoint, model_name, label_space, dataset, root, split, images, out, fmt, ms, scales, flip, sliding,
                resize, device, precision, heap_reuse, overwrite, gallery_record, gallery_n, quiet, backend):
    """Write one prediction PNG per image at its original resolution (resumable; torchrun: each image once)."""
    from ldnbench.inference import MS_SCALES, reuse_freed_memory
    from ldnbench.predict import run_predict

    if gallery_record and not dataset:
        raise UserError("--gallery needs --dataset (the ground truth is drawn beside the predictions)", 2)
    if gallery_record and fmt == "overlay":
        raise UserError("--gallery needs labelIds, trainIds or color predictions, not overlay", 2)
    if heap_reuse and str(device).startswith("cpu"):
        reuse_freed_memory()
    scale_list = _parse_scales(scales) if scales else (MS_SCALES if ms else (1.0,))
    res = run_predict(checkpoint, out, dataset=dataset, root=root, split=split, images=images, fmt=fmt,
                      model_name=model_name, label_space=label_space, scales=scale_list, flip=flip, sliding=sliding,
                      resize=resize, device=device, precision=precision, overwrite=overwrite, progress=not quiet,
                      backend=backend)
    if res.rank != 0:
        return
    click.echo(f"{len(res.written)} prediction(s) written, {len(res.skipped)} already there (skipped) in {res.out} "
               f"({res.format}, {res.label_space}, {res.seconds:.1f} s)")
    if gallery_record:
        from ldnbench.data.registry import get_dataset
        from ldnbench.report.gallery import draw_gallery

        path = draw_gallery(gallery_record, get_dataset(dataset, root, split), res.out, Path(out) / "gallery.png",
                            n=gallery_n, pred_format=res.format)
        click.echo(f"wrote {path}")


# --- deployment: onnx (ldnbench.deploy) ----------------------------------------------------------
@main.command("onnx")
@click.option("--checkpoint", required=True, type=click.Path(), help="Trainer checkpoint (last.pt/best.pt) or state dict.")
@click.option("--model", "model_name", default=None, help="Model name or alias (default: read from the checkpoint).")
@click.option("--label-space", default=None, help="Label space of a bare state dict (e.g. cityscapes19).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--height", type=click.IntRange(min=1), default=1024, show_default=True, help="Input height.")
@click.option("--width", type=click.IntRange(min=1), default=2048, show_default=True, help="Input width.")
@click.option("--dynamic", is_flag=True, help="Symbolic batch/height/width (--height/--width: the verification size).")
@click.option("--input-dtype", type=click.Choice(["uint8", "float32"]), default="uint8", show_default=True,
              help="Element type of the RGB 0..255 input.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.999, show_default=True,
              help="Exit 1 when fewer pixels than this get PyTorch's label in ONNX Runtime.")
def onnx_cmd(checkpoint, model_name, label_space, out, height, width, dynamic, input_dtype, min_agreement):
    """Export a checkpoint as a self-contained ONNX graph (RGB 0..255 in, logits out) and verify it."""
    from ldnbench.deploy import check_backend, export_onnx, load_model_for_export

    check_backend("onnxruntime")  # exporting verifies in ONNX Runtime: a missing extra fails first
    model, norm, _ = load_model_for_export(checkpoint, model_name, label_space)
    res = export_onnx(model, out, size=(height, width), dynamic=dynamic, normalization=norm,
                      input_dtype=input_dtype, min_agreement=min_agreement)
    click.echo(res.summary())


# --- training: train (ldnbench.train) ------------------------------------------------------------


@main.command("train")
@config_options(TrainConfig)
@_resize_option
@_eval_at_option
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Launch N local processes with torchrun (DDP).")
def train_cmd(nproc, resize, eval_at, **values):
    """Train a model with the paper's recipe; resumable, single process or DDP under torchrun."""
    from ldnbench.launch import launch
    from ldnbench.train import train

    given = config_values(TrainConfig, values)
    val_split = given.pop("val_split", None)
    config = TrainConfig.preset(given.pop("model"), given.pop("dataset"), resize=resize, eval_at=eval_at, **given)
    if val_split is not None:
        config.val_split = None if val_split.lower() == "none" else val_split
    if nproc is not None:
        sys.exit(launch(config, nproc))
    result = train(config)
    if result.rank != 0:
        return
    click.echo(f"run record: {result.record_path}")
    click.echo(f"checkpoints: {result.last_checkpoint}" + (f", {result.best_checkpoint}" if result.best_checkpoint else ""))
    if result.final_metrics and result.final_metrics.get("miou") is not None:
        click.echo(f"final mIoU: {100 * result.final_metrics['miou']:.1f}%")



# --- studies and reports: cross, prune, export, demo (ldnbench.studies, ldnbench.report) ---------


@main.command("export")
@click.option("--results", default="results", show_default=True, help="Folder searched for result records (*.json).")
@click.option("--format", "formats", default="csv,latex,markdown", show_default=True,
              help="Comma list of csv, latex, markdown.")
@click.option("--out", default="leaderboards", show_default=True, help="Folder for tables and figures.")
@click.option("--group-by", default="dataset", show_default=True, type=click.Choice(["dataset", "model", "none"]),
              help="One table per dataset, per model, or a single table.")
@click.option("--with-paper/--no-paper", default=True, show_default=True,
              help="Show the paper's published rows beside your own (marked 'published').")
@click.option("--figures/--no-figures", default=True, show_default=True, help="Also draw figures (PNG and PDF).")
def export_cmd(results, formats, out, group_by, with_paper, figures):
    """Collect result records into leaderboards (CSV with provenance, LaTeX, Markdown) and figures."""
    from ldnbench.report.tables import export

    res = export(results, out, formats, group_by=group_by, with_paper=with_paper, figures=figures)
    for b in res.bad:
        click.echo(f"skipped {b.path}: {b.reason}", err=True)
    if not res.files:
        click.echo(f"no accuracy or benchmark records under {results}; nothing to export")
    for f in res.files:
        click.echo(f"wrote {f}")


@main.command("prune")
@click.option("--model", default="ldn121", show_default=True, help="Model name or alias the checkpoint was trained as.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="last.pt/best.pt of a training run.")
@click.option("--dataset", default="cityscapes", show_default=True, help="Dataset to evaluate on.")
@click.option("--root", default=None, help="Dataset folder [default: datasets/<dataset>].")
@click.option("--split", default="val", show_default=True)
@click.option("--fractions", default="0,0.1,...,1", show_default=True,
              help="Pruned fractions of each block's tail ('...' continues the step).")
@click.option("--blocks", default="last2", show_default=True,
              help="Backbone blocks to prune: lastN, all, or names (denseblock3,denseblock4 / layer3,layer4).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--max-images", type=int, default=None, help="Evaluate on the first N images only (quick look).")
@click.option("--out", default="results", show_default=True, help="Folder for the study's record, CSV and figures.")
@_resize_option
@_eval_at_option
def prune_cmd(model, checkpoint, dataset, root, split, fractions, blocks, device, max_images, out, resize, eval_at):
    """Accuracy after switching off the backbone tail, without retraining (paper Fig. 5)."""
    from ldnbench.studies.prune import PruneConfig, parse_fractions, run_prune

    cfg = PruneConfig(model=model, checkpoint=checkpoint, dataset=dataset, root=root, split=split,
                      fractions=tuple(parse_fractions(fractions)), blocks=blocks, device=device,
                      max_images=max_images, out=out, resize=resize, eval_at=eval_at)
    res = run_prune(cfg, progress=click.echo, command=sys.argv)
    click.echo(f"csv: {res.csv}\nrecord: {res.record}")
    for f in res.figures:
        click.echo(f"figure: {f}")


@main.command("cross")
@click.option("--train", "train_sets", required=True,
              help="Comma list of training sets; '+' joins datasets into one (e.g. vistas,cityscapes,cityscapes+vistas).")
@click.option("--eval", "eval_sets", required=True, help="Comma list of evaluation datasets (e.g. cityscapes,kitti).")
@click.option("--model", default="ldn121", show_default=True)
@click.option("--roots", multiple=True, metavar="NAME=DIR", help="Dataset folder per name (repeatable or comma list).")
@click.option("--results", default="results", show_default=True,
              help="Where finished runs are looked up and the study is written (results/cross/...).")
@click.option("--train-split", default="train", show_default=True)
@click.option("--eval-split", default="val", show_default=True)
@click.option("--eval-limit", type=int, default=None, help="Evaluate on the first N images of each set only.")
@click.option("--device", default="cpu", show_default=True)
@config_options(TrainConfig, names=CROSS_TRAIN_OPTIONS)
@click.option("--resize", "resize", multiple=True, metavar="[NAME=]W",
              help="Image width after resizing, aspect kept, for training and evaluation: NAME=W per dataset "
                   "(repeatable, e.g. --resize vistas=2048 --resize cityscapes=1024), a bare W for all.")
@_eval_at_option
def cross_cmd(train_sets, eval_sets, model, roots, results, train_split, eval_split, eval_limit, device, resize,
              eval_at, **values):
    """Train on each training set, evaluate on every eval set: the cross-dataset mIoU matrix (paper Table 7)."""
    from ldnbench.data.resize import parse_resize
    from ldnbench.errors import UserError as _UserError
    from ldnbench.studies.cross import CrossConfig, describe_protocol, format_matrix, parse_names, parse_roots, run_cross

    opts = config_values(TrainConfig, values)
    cfg = CrossConfig(train=parse_names(train_sets), eval=parse_names(eval_sets), model=model,
                      roots=parse_roots(roots), results=results, train_split=train_split, eval_split=eval_split,
                      eval_limit=eval_limit, device=device, train_options={k: v for k, v in opts.items() if v is not None},
                      resize=parse_resize(resize), eval_at=eval_at)
    res = run_cross(cfg, progress=click.echo)
    click.echo(f"\nmIoU (%) — rows: training set, columns: evaluation set; {describe_protocol(cfg.resize, eval_at)}\n"
               + format_matrix(res.matrix) + "\n")
    for f in res.files:
        click.echo(f"wrote {f}")
    if res.missing:
        raise _UserError(f"{len(res.missing)} cell(s) missing ({'; '.join(f'{t} -> {e}: {w}' for (t, e), w in res.missing.items())}); "
                         "fix the cause and rerun: finished cells are kept")


@main.command("demo")
@click.option("--out", default="demo", show_default=True, help="Folder for datasets, runs, records, tables, figures.")
@click.option("--budget", default="small", show_default=True, type=click.Choice(["small", "tiny"]),
              help="small: real LDN121, a few minutes on 2 CPU cores; tiny: narrow model, a smoke test.")
@click.option("--device", default="cpu", show_default=True)
def demo_cmd(out, budget, device):
    """Everything on synthetic data: datasets, training, cross matrix, pruning, leaderboards, figures."""
    from ldnbench.demo import run_demo

    res = run_demo(out, budget, device=device, progress=click.echo)
    click.echo("\n" + res.summary())


# --- benchmarks: bench memory, bench speed (ldnbench.bench) --------------------------------------


@main.group("bench")
def bench() -> None:
    """Training-memory and inference-speed benchmarks (paper Tables 4, 11, 12)."""


def _bench_outputs(record: dict, rows: list[dict], out: str | None, json_out: str | None,
                   quiet: bool = False) -> None:
    from pathlib import Path

    from ldnbench.fileio import atomic_write_json
    from ldnbench.report.records import write_record

    path = Path(out) if out else Path("results") / "bench" / f"{record['run_id']}.json"
    write_record(path, record)
    if json_out:
        atomic_write_json(json_out, rows)
    if not quiet:
        click.echo(f"record: {path}" + (f"\njson: {json_out}" if json_out else ""))


@bench.command("memory")
@click.option("--model", default="ldn121", show_default=True, help="Model name or alias (see `ldnbench zoo`).")
@click.option("--down", type=int, default=None, help="Replace the model's downsampling factor d of d→u (e.g. 32).")
@click.option("--up", type=int, default=None, help="Replace the model's output subsampling u of d→u (e.g. 4).")
@click.option("--crop", type=int, default=768, show_default=True, help="Square training crop side.")
@click.option("--batch-size", type=int, default=6, show_default=True)
@click.option("--policies", default="all", show_default=True,
              help="'all' or a comma list of checkpointing policies (none, 3x3, cat-1x1, ...).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--steps", type=int, default=2, show_default=True, help="Timed training steps per policy.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed steps first (memory still counts).")
@click.option("--find-max-batch", is_flag=True, help="CUDA: also search the largest batch that fits.")
@click.option("--num-classes", type=int, default=19, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads in each worker (default: torch's).")
@click.option("--mmap-threshold", type=click.IntRange(min=0), default=2**20, show_default=True,
              help="CPU: glibc MALLOC_MMAP_THRESHOLD_ (bytes) of the workers, so freed tensors leave RSS; "
                   "0 keeps glibc's dynamic default.")
@click.option("--huge-pages/--no-huge-pages", default=True, show_default=True,
              help="CPU: transparent huge pages for the workers' large tensors (far fewer page faults).")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Train in the channels-last memory format (weights and input batch).")
@click.option("--json", "json_out", default=None, metavar="OUT",
              help="Also write the rows [{policy, peak_mb, images_per_s, max_batch}] to OUT.")
@click.option("--out", default=None, help="Result record path [default: results/bench/<run id>.json].")
def bench_memory_cmd(model, down, up, crop, batch_size, policies, device, steps, warmup, find_max_batch,
                     num_classes, threads, mmap_threshold, huge_pages, channels_last, json_out, out):
    """Peak training memory and images/s per checkpointing policy, each in a fresh process."""
    from ldnbench import bench as B

    cfg = B.MemoryConfig(model=B.resolve_bench_model(model, down, up), num_classes=num_classes, crop=crop,
                         batch_size=batch_size, steps=steps, warmup=warmup, device=device,
                         find_max_batch=find_max_batch, threads=threads,
                         malloc_mmap_threshold=mmap_threshold or None, huge_pages=huge_pages,
                         channels_last=channels_last)
    run_id = None

    def save(partial):  # after every policy: an interrupted long run keeps what it measured
        nonlocal run_id
        rec = B.memory_record(partial, command=sys.argv, run_id=run_id)
        run_id = rec["run_id"]
        _bench_outputs(rec, [r.json_row() for r in partial.rows], out, json_out, quiet=True)

    result = B.bench_memory(cfg, policies, progress=lambda m: click.echo(m, err=True), on_row=save)
    click.echo(f"{cfg.model}: training memory at {crop}x{crop}, batch {batch_size}, {device}")
    click.echo(B.format_memory_table(result))
    _bench_outputs(B.memory_record(result, command=sys.argv, run_id=run_id), [r.json_row() for r in result.rows],
                   out, json_out)
    if any(r.error for r in result.rows):
        raise UserError("some policies failed (see the table); the others were recorded.", 1)


@bench.command("speed")
@click.option("--model", default="ldn121", show_default=True, help="Model name or alias (see `ldnbench zoo`).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Time the model of this checkpoint (its layout, classes and weights) instead of --model.")
@click.option("--size", default="1024x2048", show_default=True, help="Input HEIGHTxWIDTH (or one side).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@_precision_option
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Channels-last memory format for weights and input.")
@click.option("--compare", default="", metavar="NAMES",
              help="Comma list of zoo models to time in the same run, e.g. the torchvision peers "
                   "tv-deeplabv3-resnet50,tv-fcn-resnet50,tv-lraspp-mobilenet-v3-large (random weights).")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="Fold BatchNorms that read only a conv's output into that conv (every timed model).")
@click.option("--fused-kernel/--no-fused-kernel", default=True, show_default=True,
              help="torch rows on an AVX-512 CPU: clamp -> 1x1 conv pairs in one pass by ldnbench's C kernel.")
@_heap_reuse_option
@click.option("--runs", type=int, default=5, show_default=True, help="Timed forwards per model.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed forwards first per model.")
@click.option("--num-classes", type=int, default=19, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
@click.option("--json", "json_out", default=None, metavar="OUT", help="Also write the rows as a JSON list to OUT.")
@click.option("--out", default=None, help="Result record path [default: results/bench/<run id>.json].")
@click.option("--backend", "backends", default="torch", show_default=True, metavar="NAMES",
              help="Comma list of runtimes timed for every model: torch, onnxruntime, openvino, tensorrt (CUDA).")
@click.option("--interleave/--sequential", default=True, show_default=True,
              help="Time all models x backends in alternating rounds (all in memory; drift of a shared machine "
                   "hits every row alike), or one after the other (one model in memory at a time).")
def bench_speed_cmd(model, checkpoint, size, batch_size, device, precision, channels_last, compare, fold_bn,
                    fused_kernel, heap_reuse, runs, warmup, num_classes, threads, json_out, out, backends, interleave):
    """Inference latency (median, IQR), FPS and GFLOP/s, beside torchvision models."""
    from ldnbench import bench as B

    from ldnbench.deploy import resolve_backends

    names = tuple(B.resolve_compare(compare))  # first: a typo must fail before anything is built
    cfg = B.SpeedConfig(model=B.resolve_bench_model(model), num_classes=num_classes, size=B.parse_size(size),
                        batch_size=batch_size, device=device, precision=precision, channels_last=channels_last,
                        compare=names, fold_bn=fold_bn, fused_kernel=fused_kernel, heap_reuse=heap_reuse, runs=runs,
                        warmup=warmup,
                        threads=threads, checkpoint=checkpoint, backends=tuple(resolve_backends(backends)),
                        interleave=interleave)
    result = B.bench_speed(cfg, progress=lambda m: click.echo(m, err=True))
    click.echo(B.format_speed_table(result))
    _bench_outputs(B.speed_record(result, command=sys.argv), [r.json_row() for r in result.rows], out, json_out)
