"""Model tools around BN: fold, recalibrate (precise BN), adapt (AdaBN / prior / TENT),
freeze / unfreeze, convert and inspect, all over one module walker (`walk`).

Convention (torch's, as `SyncBatchNorm.convert_sync_batchnorm`): convert, freeze, unfreeze,
recalibrate and adapt change the model in place and return it (a new object only when the
model is itself a replaced BN layer: use the returned value); pass inplace=False to work on a
deep copy. `fold` always returns a new model, like torch's fusion utilities.
"""
from .adapt import Tent, adapt, bn_affine_params, entropy
from .convert import TARGETS, convert
from .fold import BNLeafTracer, FoldReport, find_pairs, fold, fold_weights
from .freeze import freeze, unfreeze
from .inspect import InspectReport, LayerReport, inspect
from .memory import saved_tensor_bytes
from .recalibrate import recalibrate
from .walk import bn_layers, is_bn, is_frozen_bn, replace_module, walk

__all__ = ["TARGETS", "BNLeafTracer", "FoldReport", "InspectReport", "LayerReport", "Tent",
           "adapt", "bn_affine_params", "bn_layers", "convert", "entropy", "find_pairs", "fold",
           "fold_weights", "freeze", "inspect", "is_bn", "is_frozen_bn",
           "recalibrate", "replace_module", "saved_tensor_bytes", "unfreeze", "walk"]
