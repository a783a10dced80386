"""DMD / DMD2 distillation: configuration, the training loop, EMA, checkpoints, torch.distributed.

>>> from dmdcopy.distill import DistillConfig
>>> DistillConfig(batch_size=16).generator_lr
2e-06
"""

from dmdcopy.distill.callbacks import DeltaECallback
from dmdcopy.distill.config import DistillConfig
from dmdcopy.distill.dist import init_from_env, process_group_from_env
from dmdcopy.distill.distiller import Callback, Distiller, FakeScoreRecord, GeneratorRecord
from dmdcopy.distill.ema import EMA
from dmdcopy.io.run_checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint, read_entry

__all__ = [
    "EMA",
    "Callback",
    "DeltaECallback",
    "DistillConfig",
    "Distiller",
    "FakeScoreRecord",
    "GeneratorRecord",
    "init_from_env",
    "latest_checkpoint",
    "list_checkpoints",
    "process_group_from_env",
    "read_checkpoint",
    "read_entry",
]
