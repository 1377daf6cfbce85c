"""Model tools around BN: fold, recalibrate (precise BN), adapt (AdaBN / prior / TENT),
freeze / unfreeze, convert and inspect, all over one module walker (`walk`).

Convention: freeze, unfreeze and convert return a changed deep copy and leave their argument
alone (inplace=True changes the model itself); recalibrate and adapt update the model in place
and return it, as torch's update_bn and the AdaBN/TENT reference code do (inplace=False for a
copy). `fold` always returns a new model.
"""
from .adapt import Tent, adapt, bn_affine_params, entropy
from .convert import TARGETS, convert
from .fold import BNLeafTracer, FoldReport, find_pairs, fold, fold_weights
from .freeze import freeze, unfreeze
from .inspect import InspectReport, LayerReport, inspect
from .recalibrate import recalibrate
from .walk import bn_layers, is_bn, is_frozen_bn, replace_module, walk

__all__ = ["TARGETS", "BNLeafTracer", "FoldReport", "InspectReport", "LayerReport", "Tent",
           "adapt", "bn_affine_params", "bn_layers", "convert", "entropy", "find_pairs", "fold",
           "fold_weights", "freeze", "inspect", "is_bn", "is_frozen_bn", "recalibrate",
           "replace_module", "unfreeze", "walk"]
