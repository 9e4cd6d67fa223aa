"""Local multi-process training: ``launch(config, nproc)`` runs :func:`ldnbench.train.train` in
``nproc`` processes through ``torch.distributed.run``; each process reads the config as JSON
(``python -m ldnbench.launch CONFIG.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from ldnbench.errors import UserError
from ldnbench.fileio import atomic_write_json
from ldnbench.train import TrainConfig, check_config, check_out, train



def launch(config: TrainConfig, nproc: int, extra_torchrun_args: list[str] | None = None) -> int:
    """Run ``train(config)`` in ``nproc`` local processes via ``torch.distributed.run``; returns its exit code."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}", 2)
    # Catch what can be caught here, before N processes each print the same error.
    check_config(config)
    check_out(config)
    if config.batch_size % nproc:
        raise UserError(f"batch size {config.batch_size} is not divisible by the {nproc} processes", 2)
    out = config.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "launch-config.json"
    atomic_write_json(cfg_path, dataclasses.asdict(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *(extra_torchrun_args or []), "-m", "ldnbench.launch", str(cfg_path)]
    return subprocess.call(cmd)


def config_from_json(path: str | Path) -> TrainConfig:
    data = json.loads(Path(path).read_text())
    data["scale"] = tuple(data["scale"])
    # JSON has no tuples; model configs are frozen dataclasses of tuples.
    for key in ("model_options", "dataset_options"):
        data[key] = {k: tuple(v) if isinstance(v, list) else v for k, v in data[key].items()}
    return TrainConfig(**data)


def _main(argv: list[str]) -> int:
    """Entry point of the processes started by :func:`launch` (``python -m ldnbench.launch CONFIG.json``)."""
    try:
        train(config_from_json(argv[0]))
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
