"""Deployment: self-contained ONNX export and ONNX Runtime / OpenVINO backends.

The exported graph takes what a camera or a PNG gives: RGB ``N×3×H×W`` in 0..255, ``uint8`` (or
float32 with ``input_dtype="float32"``). The checkpoint's input normalisation, the padding to the
model's multiple and the crop back to the input size are inside the graph, so a deployment needs
nothing from ldnbench; the output is float32 logits ``N×C×H×W`` at the input size.

A backend is used from ldnbench as a model of the zoo contract (:class:`DeployedModel`): normalised
float ``N×3×H×W`` in, logits at the input size out, so :func:`ldnbench.inference.predict` and
:func:`ldnbench.evaluate.evaluate` run it unchanged (scales, flips and tiles included). It maps the
normalised input back to 0..255 float and feeds the float32-input graph; the graph's own
normalisation is therefore what is evaluated. One static graph is exported per input shape, on first
use (static graphs are the faster ones for both runtimes, and every zoo model exports statically).

Every runtime is pinned to fp32 (OpenVINO's CPU plugin would otherwise pick bf16 on CPUs that have
it), so a backend's numbers follow the precision rule of :mod:`ldnbench.runtime`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldnbench.data.transforms import IMAGENET, Normalization
from ldnbench.errors import UserError
from ldnbench.fileio import current_umask

#: ``--backend`` choices; ``tensorrt`` is ONNX Runtime's TensorRT execution provider (CUDA, untested here).
BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
#: Python modules of the ``deploy`` extra, by what needs them.
_EXTRA_MODULES = {"export": ("onnx", "onnxscript"), "onnxruntime": ("onnxruntime",), "tensorrt": ("onnxruntime",),
                  "openvino": ("openvino",)}
#: Export stops (exit 1) when fewer pixels than this share get the PyTorch label.
MIN_AGREEMENT = 0.999


def require(what: str) -> None:
    """Import the modules ``what`` needs (``export``, ``onnxruntime``, ``openvino``) or raise one clear UserError."""
    for mod in _EXTRA_MODULES[what]:
        try:
            importlib.import_module(mod)
        except ImportError:
            raise UserError(f"{what} needs the Python package {mod}, which is not installed; install the deploy "
                            f"extra with: pip install 'ldnbench[deploy]'") from None


def backend_version(backend: str) -> str:
    """``torch 2.14.1``, ``onnxruntime 1.32.0``, ``openvino 2026.4.1``: what a record states."""
    if backend == "torch":
        return f"torch {torch.__version__.split('+')[0]}"
    mod = "onnxruntime" if backend in ("onnxruntime", "tensorrt") else backend
    require(backend)
    version = importlib.import_module(mod).__version__.split("-")[0]
    return f"{mod} {version}" + (" (TensorRT EP)" if backend == "tensorrt" else "")


def resolve_backends(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Comma list of backend names -> list (UserError exit 2 naming the valid ones)."""
    names = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise UserError(f"unknown backend {', '.join(map(repr, unknown)) or '(none given)'}; valid: "
                        f"{', '.join(BACKENDS)}", 2)
    return list(dict.fromkeys(names))


def check_backend(backend: str, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
    """Refuse, before any work, a backend that cannot run here: missing extra, wrong device, not fp32."""
    resolve_backends([backend])
    if backend == "torch":
        return
    if precision != "fp32":
        raise UserError(f"the {backend} backend runs fp32 graphs only; drop --precision {precision} or use "
                        "--backend torch", 2)
    cuda = str(device).startswith("cuda")
    if backend == "tensorrt" and not cuda:
        raise UserError("the tensorrt backend (ONNX Runtime's TensorRT execution provider) needs --device cuda; "
                        "it is untested", 2)
    if backend == "openvino" and cuda:
        raise UserError("the openvino backend runs on the CPU; use --device cpu", 2)
    require("export")
    require(backend)


# ------------------------------------------------------------------ normalisation and the raw-input graph
class RawInputModel(nn.Module):
    """What is exported: RGB 0..255 (uint8 or float) ``N×3×H×W`` -> normalised -> ``model`` -> logits.

    ``model`` follows the zoo contract (pads to its multiple, returns logits at the input size).
    """

    def __init__(self, model: nn.Module, normalization: Normalization):
        super().__init__()
        self.model = model
        n = normalization
        # one multiply-add: x * (max_value / (255 std)) - mean / std
        self.register_buffer("scale", (n.max_value / (255 * torch.tensor(n.std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(n.mean) / torch.tensor(n.std)).view(1, 3, 1, 1))
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float() * self.scale + self.shift)


def to_raw(x: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """Normalised float -> float RGB 0..255 (the inverse of :class:`RawInputModel`'s first step)."""
    back = 255 / normalization.max_value
    std = torch.tensor(normalization.std, device=x.device).view(1, 3, 1, 1) * back
    mean = torch.tensor(normalization.mean, device=x.device).view(1, 3, 1, 1) * back
    return x.float() * std + mean


def export_ready(model: nn.Module) -> nn.Module:
    """An eval copy of ``model`` as exported: BatchNorms folded into their convolutions, average pools
    before the 1x1 convolutions they follow, NCHW weights (:func:`~ldnbench.inference.prepare_model`)."""
    from ldnbench.inference import prepare_model

    # BN→ReLU stay BatchNormalization+Relu: ONNX Runtime would run the folded form's clamp as separate
    # Max and Min passes (LDN121 at 1024x2048: 1312 against 1202 ms); OpenVINO fuses either form
    return prepare_model(model, "cpu", channels_last=False, fold_bn=True, clamp_preactivations=False)


def _unsupported(e: BaseException, name: str) -> UserError:
    """One sentence naming the operator the exporter could not translate (or its first error line)."""
    text = str(e)
    ops = re.findall(r"(?:aten|prims)[.:]+[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", text)
    if ops:
        return UserError(f"{name} cannot be exported to ONNX: the exporter has no translation for operator "
                         f"{ops[0]}; export another model or replace that operator")
    summary = text.split("## Exception summary", 1)[-1].strip().splitlines()
    first = next((line.strip() for line in summary if line.strip()), type(e).__name__)
    return UserError(f"{name} cannot be exported to ONNX: {first[:300]}")


def _dynamic_error(e: BaseException, name: str) -> UserError:
    lines = [line.strip(" -") for line in str(e).splitlines() if line.strip(" -")]
    why = next((line for line in lines if "satisfy the generated guard" in line), lines[0] if lines else type(e).__name__)
    return UserError(f"{name} cannot be exported with dynamic height/width, its graph depends on the input size "
                     f"({why[:300]}); export it at a fixed --height/--width instead")


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs a failed shape guard as a multi-line error; the user gets our one sentence instead."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch._guards", "torch.fx.experimental.symbolic_shapes",
                                              "torch._dynamo", "torch.export", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_program(model: nn.Module, size: tuple[int, int], *, dynamic: bool = False, input_dtype: str = "uint8",
                   normalization: Normalization | None = None, name: str | None = None, batch: int = 1):
    """``torch.onnx.export(dynamo=True)`` of :class:`RawInputModel` (``model`` already :func:`export_ready`).

    ``dynamic``: height and width (and batch) are symbolic. Returns the ``ONNXProgram``.
    """
    require("export")
    name = name or getattr(model, "name", type(model).__name__)
    raw = RawInputModel(model, normalization or IMAGENET).eval()
    dtype = {"uint8": torch.uint8, "float32": torch.float32}[input_dtype]
    # a dynamic batch is traced with 2 images: a size-1 dimension would be specialised
    x = torch.randint(0, 256, (2 if dynamic else batch, 3, *size), generator=torch.Generator().manual_seed(0)).to(dtype)
    shapes = None
    if dynamic:
        from torch.export import Dim

        # named ranges, never Dim.AUTO: a model that specialises on its input size must fail here,
        # not produce a graph that is silently wrong at other sizes
        # at least 2 cells at the coarsest level (a size-1 dimension broadcasts, so tracing specialises it)
        low = 2 * getattr(model, "pad_multiple", 32) + 1
        shapes = ({0: Dim("batch", min=1, max=64), 2: Dim("height", min=low, max=8192),
                   3: Dim("width", min=low, max=8192)},)
    import warnings

    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(raw, (x,), dynamic_shapes=shapes, strict=False)
        except Exception as e:  # noqa: BLE001 - torch.export raises many types; the user gets one sentence
            raise (_dynamic_error(e, name) if dynamic else _unsupported(e, name)) from None
        try:
            return torch.onnx.export(program, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                     verbose=False)
        except Exception as e:  # noqa: BLE001
            raise _unsupported(e, name) from None


# ------------------------------------------------------------------ runtimes
class _OrtRunner:
    """An ONNX Runtime session, all graph optimisations on, ``threads`` intra-op threads.

    ``infer`` writes a static graph's logits into one output buffer reused from call to call (IO binding:
    no fresh 100 MB allocation, and its page faults, per megapixel frame); ``__call__`` returns a copy.
    """

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 level: str = "all"):
        require("onnxruntime")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                         "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                         "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise UserError(f"this onnxruntime has no {', '.join(missing)} (available: "
                            f"{', '.join(ort.get_available_providers())}); the TensorRT backend needs onnxruntime-gpu "
                            "built with TensorRT on a CUDA machine (untested)", 1)
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.input = self.session.get_inputs()[0].name
        out = self.session.get_outputs()[0]
        self._out = None
        if providers[0] == "CPUExecutionProvider" and all(isinstance(d, int) for d in out.shape):
            self._out = np.empty(out.shape, np.float32)
            self._binding = self.session.io_binding()
            self._binding.bind_output(out.name, "cpu", 0, np.float32, self._out.shape, self._out.ctypes.data)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits of ``x``; for a static graph a view of the reused output buffer (valid until the next call)."""
        if self._out is None:
            return self.session.run(None, {self.input: x})[0]
        x = np.ascontiguousarray(x)
        self._binding.bind_cpu_input(self.input, x)
        self.session.run_with_iobinding(self._binding)
        return self._out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.infer(x)
        return y.copy() if y is self._out else y


class _OpenVINORunner:
    """OpenVINO's CPU plugin, latency hint, fp32 inference precision (never its bf16 default).

    A 4-D output is requested channels-last (N×H×W×C) and handed out as an N×C×H×W view of it: the
    plugin computes the final resize in that layout, and planar output would cost one reorder of the
    full-resolution logits (~9 % of an LDN121 forward at 1024×2048). Eager torch hands out
    channels-last logits the same way.
    """

    def __init__(self, path: str | Path, threads: int | None = None, *, profiling: bool = False):
        require("openvino")
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        core = ov.Core()
        model = core.read_model(str(path))
        self.nhwc = model.output(0).get_partial_shape().rank.get_length() == 4
        if self.nhwc:
            ppp = PrePostProcessor(model)
            ppp.output(0).model().set_layout(ov.Layout("NCHW"))
            ppp.output(0).tensor().set_layout(ov.Layout("NHWC"))
            model = ppp.build()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                  "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERF_COUNT": profiling}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def infer(self, x: np.ndarray) -> np.ndarray:
        """N×C×H×W logits of ``x`` as a view of the request's output tensor (valid until the next call)."""
        self.request.infer({0: x})
        y = self.request.get_output_tensor(0).data
        return y.transpose(0, 3, 1, 2) if self.nhwc else y

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.infer(x).copy(order="K")  # keeps the channels-last memory order: a plain copy


def make_runner(backend: str, path: str | Path, *, threads: int | None = None, device: str = "cpu"):
    """A callable ``numpy N×3×H×W -> numpy logits`` running the ONNX file ``path`` on ``backend``."""
    if backend == "onnxruntime":
        if str(device).startswith("cuda"):
            return _OrtRunner(path, threads, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        return _OrtRunner(path, threads)
    if backend == "tensorrt":
        if not str(device).startswith("cuda"):
            raise UserError("the tensorrt backend runs on CUDA only; pass --device cuda (untested path)", 2)
        require("tensorrt")
        return _OrtRunner(path, threads, ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    if backend == "openvino":
        if str(device).startswith("cuda"):
            raise UserError("the openvino backend runs on the CPU here; use --device cpu", 2)
        return _OpenVINORunner(path, threads)
    raise UserError(f"backend {backend!r} runs no ONNX graph; valid: {', '.join(BACKENDS[1:])}", 2)


# ------------------------------------------------------------------ parity
@dataclass
class Parity:
    """ONNX graph vs PyTorch on one input: largest logit difference and share of equal argmax labels."""

    size: tuple[int, int]
    max_abs_diff: float
    agreement: float
    max_abs_logit: float = 1.0  # of PyTorch's logits: the scale the difference is relative to

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-12)

    def line(self) -> str:
        return (f"{self.size[0]}x{self.size[1]}: max |dlogit| {self.max_abs_diff:.3g} ({self.relative_diff:.2g} of "
                f"max |logit|), label agreement {100 * self.agreement:.4f} %")


def sample_image(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A deterministic ``1×3×H×W`` uint8 test image: smooth colour gradients plus noise (not a flat field)."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, 1 - (xx + yy) / 2]) * 200
    noise = torch.randint(-40, 40, (3, h, w), generator=g).float()
    return (base + noise).clamp(0, 255).to(torch.uint8).unsqueeze(0)


def _reference_logits(raw_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return raw_model(x).float()


def compare(runner, raw_model: nn.Module, x: torch.Tensor) -> Parity:
    """Run ``x`` (raw 0..255) through the ONNX ``runner`` and the PyTorch ``raw_model``."""
    ref = _reference_logits(raw_model, x)
    got = torch.from_numpy(np.asarray(runner(x.numpy())))
    if got.shape != ref.shape:
        raise UserError(f"the ONNX graph returned {tuple(got.shape)} logits, PyTorch {tuple(ref.shape)}")
    return Parity(tuple(x.shape[-2:]), float((got - ref).abs().max()),
                  float((got.argmax(1) == ref.argmax(1)).float().mean()), float(ref.abs().max()))


@dataclass
class ExportResult:
    path: Path
    model: str
    size: tuple[int, int] | None  # None: dynamic height/width
    input_dtype: str
    opset: int | None
    normalization: Normalization
    parity: list[Parity] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        shape = "N×3×H×W (dynamic)" if self.size is None else f"1×3×{self.size[0]}×{self.size[1]}"
        lines = [f"exported {self.model} to {self.path} (input {self.input_dtype} RGB 0..255 {shape}, "
                 f"opset {self.opset}) in {self.seconds:.1f} s"]
        lines += [f"onnxruntime vs torch at {p.line()}" for p in self.parity]
        return "\n".join(lines)


def export_onnx(model: nn.Module, out: str | Path, *, size: tuple[int, int] = (1024, 2048), dynamic: bool = False,
                normalization: Normalization | None = None, input_dtype: str = "uint8",
                min_agreement: float = MIN_AGREEMENT, name: str | None = None) -> ExportResult:
    """Export ``model`` (zoo contract, eval mode) to a self-contained ONNX file ``out`` and verify it.

    ``size``: the static input height/width, or with ``dynamic`` the first of two verification sizes
    (the second is ~3/4 × 5/4 of it, a size the model must pad). Verification runs the file in ONNX
    Runtime on :func:`sample_image` and compares with PyTorch. Below ``min_agreement`` the file is kept
    as ``<out>.rejected.onnx`` and a UserError (exit 1) says so; ``out`` is written only when it passes.
    """
    require("export")
    require("onnxruntime")
    t0 = time.perf_counter()
    normalization = normalization or IMAGENET
    name = name or getattr(model, "name", type(model).__name__)
    net = export_ready(model)
    program = export_program(net, size, dynamic=dynamic, input_dtype=input_dtype, normalization=normalization,
                             name=name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        program.save(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        runner = _OrtRunner(tmp)
        raw = RawInputModel(net, normalization).eval()
        sizes = [size] + ([(size[0] * 5 // 4 + 5, size[1] * 3 // 4 + 3)] if dynamic else [])
        dtype = {"uint8": torch.uint8, "float32": torch.float32}[input_dtype]
        parity = [compare(runner, raw, sample_image(s).to(dtype)) for s in sizes]
        opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
        res = ExportResult(out, name, None if dynamic else tuple(size), input_dtype, opset, normalization, parity,
                           time.perf_counter() - t0)
        worst = min(p.agreement for p in parity)
        if worst < min_agreement:
            rejected = out.with_name(out.name + ".rejected.onnx")
            os.replace(tmp, rejected)
            raise UserError(f"the exported graph disagrees with PyTorch: label agreement {100 * worst:.3f} % < "
                            f"{100 * min_agreement:.1f} % ({'; '.join(p.line() for p in parity)}); not written to "
                            f"{out}, kept as {rejected} for inspection")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return res


# ------------------------------------------------------------------ a backend as a zoo-contract model
class DeployedModel(nn.Module):
    """A model of the zoo contract run by an ONNX runtime: normalised float ``N×3×H×W`` -> logits.

    The PyTorch model is exported (BN folded, float32 input, the normalisation inside) once per input
    shape on first use into ``workdir`` (a private temp folder by default) and run by ``backend``.
    :meth:`run_raw` takes the deployment input (RGB 0..255) directly. Always fp32; eval mode only.
    """

    def __init__(self, model: nn.Module, backend: str, *, normalization: Normalization | None = None,
                 threads: int | None = None, device: str = "cpu", workdir: str | Path | None = None):
        super().__init__()
        if backend not in BACKENDS[1:]:
            raise UserError(f"backend {backend!r} is not an ONNX runtime; valid: {', '.join(BACKENDS[1:])}", 2)
        require("export")
        require(backend)
        self.backend = backend
        self.version = backend_version(backend)
        self.normalization = normalization or IMAGENET
        self.name = getattr(model, "name", type(model).__name__)
        self.num_classes = getattr(model, "num_classes", None)
        self.threads = threads
        self.device = str(device)
        self._net = [export_ready(model)]  # in a list: not a submodule, so no parameters, no device moves
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="ldnbench-deploy-")
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)
        self._runners: dict[tuple[int, ...], Any] = {}
        self.export_seconds = 0.0

    def __deepcopy__(self, memo):  # prepare_model copies its input; sessions are not copyable (nor need to be)
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("a deployed model runs in eval mode only")
        return super().train(False)

    def runner(self, shape: tuple[int, ...]):
        """The compiled graph for input ``shape`` (exported and compiled on first use)."""
        shape = tuple(int(s) for s in shape)
        if shape not in self._runners:
            t0 = time.perf_counter()
            path = self.workdir / f"{self.name}-{'x'.join(map(str, shape))}.onnx"
            program = export_program(self._net[0], shape[2:], input_dtype="float32",
                                     normalization=self.normalization, name=self.name, batch=shape[0])
            program.save(str(path))
            self._runners[shape] = make_runner(self.backend, path, threads=self.threads, device=self.device)
            self.export_seconds += time.perf_counter() - t0
        return self._runners[shape]

    def run_raw(self, x: torch.Tensor) -> torch.Tensor:
        """RGB 0..255 float ``N×3×H×W`` -> float32 logits at the input size (the deployment contract)."""
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(np.asarray(self.runner(arr.shape)(arr)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_raw(to_raw(x, self.normalization)).to(x.device)


def deployed_model(model: nn.Module, backend: str, **kwargs: Any) -> nn.Module:
    """``model`` itself for ``backend="torch"``, else a :class:`DeployedModel` (same contract)."""
    if backend == "torch":
        return model
    return DeployedModel(model, backend, **kwargs)


# ------------------------------------------------------------------ checkpoints
def load_model_for_export(checkpoint: str | Path, model_name: str | None = None,
                          label_space: str | None = None) -> tuple[nn.Module, Normalization, dict[str, Any]]:
    """(model in eval mode, its input normalisation, its model options) from a checkpoint."""
    from ldnbench.checkpoints import load_checkpoint

    model, meta = load_checkpoint(checkpoint, model_name, label_space)
    return model, meta.normalization, dict(meta.model_options)
