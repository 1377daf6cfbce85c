"""bnkit layers: drop-in BatchNorm and the BN family, all over one functional core."""
from .act import BatchNormAct
from .base import NormBase
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm
from .ghost import GhostBatchNorm
from .inplace_abn import InPlaceABN, InPlaceABNSync, load_inplace_abn_state_dict
from .layernorm import ChannelLayerNorm
from .recurrent import BNLSTM, BNLSTMCell, RecurrentBatchNorm
from .registry import available_norms, get_norm, register_norm, unregister_norm
from .renorm import BatchRenorm, renorm_schedule

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchRenorm",
    "ChannelLayerNorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "InPlaceABN",
    "InPlaceABNSync",
    "NormBase",
    "RecurrentBatchNorm",
    "available_norms",
    "get_norm",
    "load_inplace_abn_state_dict",
    "register_norm",
    "renorm_schedule",
    "unregister_norm",
]

try:  # SyncBatchNorm needs torch.distributed; the package imports without it
    from .sync import SyncBatchNorm  # noqa: F401
except ImportError:
    pass
else:
    __all__.append("SyncBatchNorm")
