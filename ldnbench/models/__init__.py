"""Model zoo: ladder-style DenseNets/ResNets of the paper, built by name.

``build_model(name, num_classes, **options)``, the registry ``MODELS`` (canonical name -> ModelSpec),
``resolve_model_name(name)``; complexity counting in :mod:`ldnbench.models.complexity`,
checkpointing policies in :mod:`ldnbench.models.checkpointing`.
"""

from ldnbench.models.checkpointing import DEFAULT_TRAIN_POLICY, POLICIES
from ldnbench.models.complexity import Complexity, count_macs, count_params, model_complexity
from ldnbench.models.ladder import HeadConfig, LadderNet
from ldnbench.models.peers import PEERS, TorchvisionSegNet
from ldnbench.models.registry import ALIASES, MODELS, ModelSpec, build_model, get_spec, resolve_model_name

__all__ = ["ALIASES", "DEFAULT_TRAIN_POLICY", "MODELS", "POLICIES", "Complexity", "HeadConfig", "LadderNet", "PEERS", "TorchvisionSegNet",
           "ModelSpec", "build_model", "count_macs", "count_params", "get_spec", "model_complexity",
           "resolve_model_name"]
