"""The whole FlowAR generator as one module: the backbone plus the flow head ``flownet``.

Its state dict uses the authors' key names, less their persistent buffers (the unused training
mask and the RoPE frequencies, which are recomputed here).
"""

from __future__ import annotations

from torch import nn

from ecar_export.families.flowar.backbone import Backbone
from ecar_export.families.flowar.config import FlowARConfig
from ecar_export.families.flowar.head import FlowHead


class FlowAR(Backbone):
    """Backbone attributes at the top level and the head under ``flownet``, as in the authors' checkpoints."""

    def __init__(self, config: FlowARConfig) -> None:
        super().__init__(config)
        self.flownet = FlowHead(config)
        self.apply(_init_linear)

    @property
    def backbone_parameters(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("flownet."))


def _init_linear(module: nn.Module) -> None:
    """The reference initialisation of every linear layer: xavier-uniform weight, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
