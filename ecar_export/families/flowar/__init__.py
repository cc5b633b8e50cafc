"""FlowAR (Ren et al. 2024): scale-wise autoregression over continuous tokens with a flow-matching head.

A torch re-implementation for export that matches the authors' code numerically, its config and
presets, the reference sampling loop, the KL-16 decoder and the converter from the authors' ``.pth``
checkpoints and MAR's ``kl16.ckpt``.
"""

from ecar_export.families.flowar.config import FLOWAR_H, FLOWAR_L, FLOWAR_S, PRESETS, FlowARConfig
from ecar_export.families.flowar.model import FlowAR

__all__ = ["FLOWAR_H", "FLOWAR_L", "FLOWAR_S", "PRESETS", "FlowAR", "FlowARConfig"]
