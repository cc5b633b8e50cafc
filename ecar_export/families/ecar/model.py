"""The ECAR model: tokenizer + autoregressive backbone + per-token flow head (DESIGN §3).

``backbone_graph``, ``flow_step`` and ``decode_tokens`` are exactly the graphs of the
contract (:mod:`runtime.graphs`); the sampler below walks ECAR's request plan
(:func:`ecar_export.families.ecar.contract.request_plan`) with them, feeding the stage constants a build
writes, so the exported graphs and the torch reference cannot drift apart. All schedule
arithmetic comes from :mod:`ecar_export.families.ecar.schedule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ecar_export.families.ecar import contract as ecar_contract
from ecar_export.families.ecar import schedule
from ecar_export.families.ecar.backbone import Backbone
from ecar_export.families.ecar.config import ECARConfig
from ecar_export.families.ecar.flow_head import FlowHead
from ecar_export.tokenizer import make_tokenizer
from runtime.errors import InvalidRequestError
from runtime.graphs import Call, Kind
from runtime.request import RequestInputs, RequestState, walk


@dataclass
class SampleResult:
    images: torch.Tensor  # float [B, ch, H, W] in [0, 1]
    latents: torch.Tensor  # float [B, N_S, C]: the final token grid (model scale), the decoder's input


class ECAR(nn.Module):
    def __init__(self, config: ECARConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = make_tokenizer(config)
        self.backbone = Backbone(config)
        self.head = FlowHead(config)
        self.stages = schedule.stages(config)
        full = config.latent_size
        for st in self.stages:
            self.register_buffer(f"down_{st.index}", _f32(schedule.down_matrix(full, st.grid)), persistent=False)
            if st.prev_grid is not None:
                self.register_buffer(f"up_{st.index}", _f32(st.up()), persistent=False)
                self.register_buffer(f"fresh_{st.index}", _f32(st.fresh()), persistent=False)

    def _matrix(self, kind: str, stage: int) -> torch.Tensor:
        matrix = getattr(self, f"{kind}_{stage}")
        assert isinstance(matrix, torch.Tensor)
        return matrix

    # ------------------------------------------------------------ latent layout
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, ch, H, W] in [0, 1] -> scaled latent tokens [B, N_S, C]."""
        latents = self.tokenizer.encode(images)
        if self.config.latent_shift:
            latents = latents - self.config.latent_shift
        latents = latents * self.config.latent_scale
        return latents.flatten(2).transpose(1, 2)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ``decoder`` graph: tokens [B, N_S, C] -> images [B, ch, H, W] in [0, 1]."""
        side, channels = self.config.latent_size, self.config.latent_channels
        latents = tokens.transpose(1, 2).reshape(-1, channels, side, side) * (1.0 / self.config.latent_scale)
        if self.config.latent_shift:
            latents = latents + self.config.latent_shift
        return self.tokenizer.decode(latents)

    # --------------------------------------------------------- exported graphs
    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Class conditioning of the 2B guidance rows: the labels, then the null class."""
        null = torch.full_like(labels, self.config.null_class)
        return self.backbone.class_embed(torch.cat([labels, null]))

    def backbone_graph(
        self,
        labels: torch.Tensor,
        prev: torch.Tensor,
        noise: torch.Tensor,
        up: torch.Tensor,
        fresh: torch.Tensor,
        renoise: torch.Tensor,
        positions: torch.Tensor,
        level: torch.Tensor,
        past_kv: torch.Tensor,
        kv_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``backbone`` graph, every stage: -> z [2B, N, D], start state x = P_s [B, N, C], emitted kv.

        ``prev`` [B, P, C] is the previous stage's end state; the stage itself is data
        (:func:`ecar_export.families.ecar.contract.stage_inputs`), so one traced graph serves every stage.
        """
        cond = self.condition(labels)
        start = schedule.renoise_with(prev, noise, up, fresh, renoise[0], renoise[1])
        upsampled = up @ prev
        tokens = self.backbone.stage_tokens(cond, torch.cat([upsampled, upsampled]), positions, level)
        z, kv = self.backbone.forward_cached(tokens, cond, past_kv, kv_tokens)
        return z, start, kv

    def stage_feeds(self, stage: int) -> dict[str, torch.Tensor]:
        """The backbone's stage constants of a 1-based stage as tensors (the very arrays a build writes)."""
        constants = ecar_contract.constants(self.config).get(Kind.BACKBONE, stage)
        return {name: torch.from_numpy(np.array(value)) for name, value in constants.items()}

    def flow_step(
        self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, cfg: torch.Tensor
    ) -> torch.Tensor:
        """The ``flow_step`` graph: x [B, N, C], z [2B, N, D] (cond rows, then uncond) -> x after one Euler step.

        The head is per token: the grid is cut into token rows, [B·N, C] and [2B·N, D], and put back.
        """
        rows = x.reshape(-1, x.shape[-1])
        u = self.head(torch.cat([rows, rows]), z.reshape(-1, z.shape[-1]), t).reshape(2, -1, x.shape[-1])
        return schedule.euler_step(rows, schedule.guide(u[0], u[1], cfg), dt).reshape(x.shape)

    # ---------------------------------------------------------------- training
    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, head_repeats: int = 4) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.encode_tokens(images)
        return self.training_loss_tokens(tokens, labels, head_repeats)

    def training_loss_tokens(self, tokens: torch.Tensor, labels: torch.Tensor, head_repeats: int = 4) -> torch.Tensor:
        """Flow-matching loss of all stages in one block-causal sequence (teacher forcing)."""
        rows = tokens.shape[0]
        drop = torch.rand(rows) < self.config.class_dropout
        cond = self.backbone.class_embed(torch.where(drop, self.config.null_class, labels))
        starts: list[torch.Tensor] = []
        ends: list[torch.Tensor] = []
        upsampled: list[torch.Tensor | None] = []
        eps: torch.Tensor | None = None
        clean_prev: torch.Tensor | None = None
        for st in self.stages:
            clean = self._matrix("down", st.index) @ tokens
            eta = torch.randn_like(clean)
            if eps is None or clean_prev is None:
                eps, up = eta, None
                upsampled.append(None)
                starts.append(schedule.start_state(None, eps, None, st.t_start))
            else:
                up = self._matrix("up", st.index)
                eps = schedule.chain_noise(eps, eta, up, self._matrix("fresh", st.index), st.factor)
                upsampled.append(up @ ends[-1])
                starts.append(schedule.start_state(clean_prev, eps, up, st.t_start))
            ends.append(schedule.end_state(clean, eps, st.tau))
            clean_prev = clean
        z = self.backbone.forward_prefix(cond, upsampled)
        losses = []
        for st, start, end in zip(self.stages, starts, ends):
            lo, hi = self.backbone.offsets[st.index], self.backbone.offsets[st.index + 1]
            lam = torch.rand(head_repeats, rows, 1, 1)
            x_t = schedule.interpolate(start, end, lam)  # [R, B, N_s, C]
            t = st.t_start - lam * (st.t_start - st.tau)
            target = schedule.velocity(start, end, st.t_start, st.tau).expand_as(x_t)
            z_s = z[:, lo:hi].expand(head_repeats, -1, -1, -1)
            u = self.head(
                x_t.reshape(-1, x_t.shape[-1]),
                z_s.reshape(-1, z_s.shape[-1]),
                t.expand(-1, -1, hi - lo, 1).reshape(-1),
            )
            losses.append(torch.mean((u - target.reshape(u.shape)) ** 2))
        return torch.stack(losses).mean()

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        seed: int | Sequence[int] = 0,
        cfg: float | None = None,
        use_cache: bool = True,
    ) -> SampleResult:
        """Generate images; noise per sample from :func:`ecar_export.families.ecar.schedule.draw_noise`.

        Walks the request plan as the runtime does. ``use_cache=False``
        recomputes the whole prefix under the block-causal mask at every stage instead of using
        the KV cache (a slow path that proves the fast one).
        """
        label_tensor = self._check_labels(labels)
        config = self.config
        plan = ecar_contract.request_plan(config)
        inputs = RequestInputs.draw(plan, label_tensor.numpy(), schedule.noise_keys(seed, len(label_tensor)), cfg)
        specs = {spec.name: spec for spec in ecar_contract.graph_specs(config)}
        state: RequestState[torch.Tensor] = RequestState(plan, specs, ecar_contract.constants(config), inputs, _tensor)
        ends: list[torch.Tensor] = []

        def run(call: Call, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            if call.graph == Kind.BACKBONE:
                if use_cache:
                    return self.backbone_graph(**feeds)
                if call.stage > 1:
                    ends.append(state.prev)
                z, x = self._stage_forward_uncached(call.stage - 1, feeds["labels"], ends, feeds["noise"])
                return z, x, feeds["past_kv"][:0]
            if call.graph == Kind.FLOW_STEP:
                return (self.flow_step(**feeds),)
            return (self.decode_tokens(feeds["x"]),)

        walk(state, plan.calls(), run)
        return SampleResult(images=state.image, latents=state.latents)

    def _stage_forward_uncached(
        self, stage: int, labels: torch.Tensor, ends: list[torch.Tensor], noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.condition(labels)
        upsampled: list[torch.Tensor | None] = [None]
        for s in range(1, stage + 1):
            up = self._matrix("up", s) @ ends[s - 1]
            upsampled.append(torch.cat([up, up]))
        lo = self.backbone.offsets[stage]
        z = self.backbone.forward_prefix(cond, upsampled)[:, lo:]
        if stage == 0:
            return z, noise
        st = self.stages[stage]
        start = schedule.renoise(
            ends[-1], noise, self._matrix("up", stage), self._matrix("fresh", stage), st.factor, st.tau_prev
        )
        return z, start

    def _check_labels(self, labels: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        values = labels.tolist() if isinstance(labels, (np.ndarray, torch.Tensor)) else list(labels)
        if not values:
            raise InvalidRequestError("labels must not be empty")
        for value in values:
            if (
                isinstance(value, (bool, np.bool_))
                or not isinstance(value, (int, np.integer))
                or not 0 <= value < self.config.num_classes
            ):
                raise InvalidRequestError(
                    f"label {value!r} is invalid: labels are integers in [0, {self.config.num_classes - 1}]"
                )
        return torch.tensor([int(v) for v in values], dtype=torch.int64)


def _f32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A host array of the request as a tensor (the walk's ``convert``; copies read-only arrays)."""
    return torch.from_numpy(array if array.flags.writeable else np.array(array))
