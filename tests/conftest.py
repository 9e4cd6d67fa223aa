import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest or DataLoader workers run in parallel.
torch.set_num_threads(2)


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()
