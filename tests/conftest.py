import pytest
import torch

# Every test uses tiny tensors: one thread avoids OpenMP spin-waiting when the 2 cores are shared
# (a 64 px training step took 30 s with 2 threads on busy cores, 0.3 s with 1).
torch.set_num_threads(1)


@pytest.fixture
def benchmark_script():
    """``benchmark_script(name)``: ``benchmarks/<name>.py`` imported as a module (the scripts are not
    part of the package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()


class AutocastProbe(torch.nn.Module):
    """A 1x1-conv segmentation model (``num_classes`` outputs) that records, per forward, whether
    CPU autocast was on: to show which precision a code path really ran in. ``seen`` is shared by
    the copies that evaluation makes (``prepare_model`` deep-copies the model)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.conv = torch.nn.Conv2d(3, num_classes, 1)
        self.seen: list[bool] = []
        seen = self.seen
        self._record = lambda on: seen.append(on)  # functions survive deepcopy as the same object

    def forward(self, x):
        self._record(torch.is_autocast_enabled("cpu"))
        return self.conv(x)


@pytest.fixture
def autocast_probe():
    return AutocastProbe
