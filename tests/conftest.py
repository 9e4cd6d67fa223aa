import pytest
import torch

# Every test uses tiny tensors: one thread avoids OpenMP spin-waiting when the 2 cores are shared
# (a 64 px training step took 30 s with 2 threads on busy cores, 0.3 s with 1).
torch.set_num_threads(1)


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()
