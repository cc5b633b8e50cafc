"""A request on the torch model, walked as the runtime walks a build: the reference of every model family.

The walk is the runtime's own (:func:`runtime.request.walk` over the family's request plan, inputs
gathered from the request's slots and the stage constants, noise from :meth:`RequestInputs.draw`), with
each graph call answered by the torch function the graph is exported from
(:attr:`ecar_export.families.Family.graph_function`). So a build and its torch model, given the same
labels, seed and guidance, compute the same request; benchmarks swap in compiled functions
(``functions``) to time torch's own compiler on exactly the calls the runtime makes.

Examples::

    from ecar_export import presets
    from ecar_export.torch_walk import TorchWalk

    walk = TorchWalk(presets.load("flowar-s"))
    result = walk.generate([207, 360], seed=0)   # result.images: [2, 3, 256, 256] in [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ecar_export import families
from runtime import noise
from runtime.graphs import Call, Kind
from runtime.plan import RequestPlan
from runtime.request import RequestInputs, RequestState, walk
from runtime.stage_constants import StageConstants

GraphFunction = Callable[..., Any]


@dataclass
class WalkResult:
    images: torch.Tensor  # [B, ch, H, W] in [0, 1], as the runtime's pipeline returns them (before uint8)
    latents: torch.Tensor  # [B, N_S, C]: the last stage's tokens, the decoder's input


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array if array.flags.writeable else np.array(array))


class TorchWalk:
    """The torch model of any family behind the runtime's request walk (module doc).

    ``functions``: the function each graph kind calls (default: the family's ``graph_function``, eager, looked
    up on first use); its arguments are the graph's inputs in the spec's order. ``plan``: the request plan
    (default: the family's for the model's config).
    """

    def __init__(
        self,
        model: nn.Module,
        functions: Mapping[Kind, GraphFunction] | None = None,
        plan: RequestPlan | None = None,
    ) -> None:
        self.family = families.of(model)
        config = families.config_of(model)
        self.model = model
        self.plan = plan if plan is not None else self.family.request_plan(config)
        self.specs = {spec.name: spec for spec in self.family.graph_specs(config, False)}
        self.constants = StageConstants(self.family.stage_constants(config))
        self.functions: dict[Kind, GraphFunction] = dict(functions or {})

    @staticmethod
    def eager_functions(model: nn.Module) -> dict[Kind, GraphFunction]:
        """Every graph's torch function, eager (to wrap, e.g. in ``torch.compile``)."""
        family = families.of(model)
        return {kind: family.graph_function(model, kind) for kind in (Kind.BACKBONE, Kind.FLOW_STEP, Kind.DECODER)}

    def function(self, kind: Kind) -> GraphFunction:
        if kind not in self.functions:
            self.functions[kind] = self.family.graph_function(self.model, kind)
        return self.functions[kind]

    def generate(self, labels: Sequence[int] | np.ndarray, seed: int = 0, cfg: float | None = None) -> WalkResult:
        """A request as ``Pipeline.generate`` makes it: noise from ``seed``'s keys, weights from ``cfg``."""
        label_array = np.asarray(labels, np.int64)
        return self.run(RequestInputs.draw(self.plan, label_array, noise.noise_keys(seed, len(label_array)), cfg))

    @torch.no_grad()
    def run(self, inputs: RequestInputs, decode: bool = True) -> WalkResult:
        """Walk one request of given inputs; ``decode=False`` stops before the decoder (``images`` is then empty)."""
        state: RequestState[torch.Tensor] = RequestState(self.plan, self.specs, self.constants, inputs, _tensor)

        def run_call(call: Call, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            spec = self.specs[call.graph]
            outputs = self.function(Kind(call.graph))(*(feeds[name] for name in spec.input_names()))
            return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)

        calls = [call for call in self.plan.calls() if decode or call.graph != Kind.DECODER]
        walk(state, calls, run_call)
        return WalkResult(images=state.image if decode else torch.empty(0), latents=state.latents)
