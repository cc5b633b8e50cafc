"""The whole FlowAR model as one module: the backbone, the flow head ``flownet`` and the decoder ``tokenizer``.

The generator's state dict uses the authors' key names, less their persistent buffers (the unused
training mask and the RoPE frequencies, which are recomputed here). The decoder is MAR's KL-16 VAE,
a diffusers ``AutoencoderKL`` under ``tokenizer.vae.`` built by
:class:`ecar_export.tokenizer.KLTokenizer` from the config's layout fields, as ECAR's ``kl``
tokenizer is.

``backbone_graph``, ``flow_step`` and ``decode_tokens`` are the graphs of graph contract 3
(:mod:`ecar_export.families.flowar.graphs` states their inputs and walks a request through them):
functions whose arguments are a graph's inputs in order, with everything that differs between
stages passed in as data, so that one traced graph serves every stage.
"""

from __future__ import annotations

import torch
from torch import nn

from ecar_export.families.flowar.backbone import Backbone
from ecar_export.families.flowar.config import FlowARConfig
from ecar_export.families.flowar.head import FlowHead
from ecar_export.families.flowar.layers import KVCache
from ecar_export.tokenizer import KLTokenizer


class FlowAR(Backbone):
    """Backbone attributes at the top level and the head under ``flownet``, as in the authors' checkpoints; the
    decoder under ``tokenizer`` (``tokenizer=False`` leaves it out: the generator alone, as the authors' ``.pth``
    holds it)."""

    def __init__(self, config: FlowARConfig, tokenizer: bool = True) -> None:
        super().__init__(config)
        self.flownet = FlowHead(config)
        self.apply(_init_linear)
        # after the reference initialisation, so that the generator's weights draw the same numbers with or without it
        self.tokenizer: KLTokenizer | None = KLTokenizer(config) if tokenizer else None

    @property
    def backbone_parameters(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(("flownet.", "tokenizer.")))

    # ------------------------------------------------------------------ graph contract 3
    def backbone_graph(
        self,
        labels: torch.Tensor,
        prev: torch.Tensor,
        noise: torch.Tensor,
        up: torch.Tensor,
        positions: torch.Tensor,
        level: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        kv_tokens: torch.Tensor,
        past_kv: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``backbone`` graph of every stage -> z ``[2B, N, width]``, x ``[B, N, C]``, kv ``[E, L, 2, 2B, H, Dh]``.

        labels ``[B]``; prev ``[B, P, C]`` the previous stage's sampled tokens (stage 1: one zero token);
        noise ``[B, N, C]``; up ``[N, P]`` the stage-input resampling; positions ``[N]`` the stage's rows of
        the three position tables; level ``[1]`` (0: the stage input is the class embedding, one token;
        otherwise ``z_proj(up @ prev)``); rope_cos / rope_sin ``[N, Dh]`` the stage's rotary tables;
        kv_tokens ``[E]`` the tokens whose keys/values are emitted; past_kv ``[T, L, 2, 2B, H, Dh]`` the
        token-major cache of the stages before (keys after RoPE, then values; L = encoder then decoder
        blocks). Rows ``2B`` are the labels' rows, then the null class's, both on the same stage input.
        The stage's start state x is its noise (FlowAR integrates every stage from t = 1).
        """
        cond = self.class_embedding(torch.cat([labels, torch.full_like(labels, self.config.null_class)]))
        resampled = self.z_proj(up @ prev)
        resampled = torch.cat([resampled, resampled])
        x = torch.where(level == 0, cond[:, None].expand_as(resampled), resampled)
        rows = tuple(table[0].index_select(0, positions) for table in self.position_tables())
        past: list[KVCache | None] = [
            (past_kv[:, layer, 0].permute(1, 2, 0, 3), past_kv[:, layer, 1].permute(1, 2, 0, 3))
            for layer in range(past_kv.shape[1])
        ]
        z, caches = self.transform(x, cond, rows, past, (rope_cos, rope_sin))
        cached = past_kv.shape[0]
        emitted = [
            torch.stack(
                [keys[:, :, cached:].index_select(2, kv_tokens), values[:, :, cached:].index_select(2, kv_tokens)]
            )
            for keys, values in caches
        ]  # each [2, 2B, H, E, Dh]
        kv = torch.stack(emitted).permute(4, 0, 1, 2, 3, 5)
        return z, noise, kv

    def flow_step(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        t: torch.Tensor,
        dt: torch.Tensor,
        cfg: torch.Tensor,
        head_rope_cos: torch.Tensor,
        head_rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        """The ``flow_step`` graph: one guided Euler step of a stage, x ``[B, N, C]`` -> x_next ``[B, N, C]``.

        z ``[2B, N, width]`` (conditional rows, then null rows); t, dt, cfg ``[1]``; the head's rotary
        tables ``[N, 64]``. The head sees rows ``[x; x]``: v_c with z's conditional half, v_u with its null
        half, and x_next = x - dt · (v_u + cfg · (v_c - v_u)), dt = t - t_next > 0.
        """
        rows = torch.cat([x, x])
        v = self.flownet(rows, t.expand(rows.shape[0]), z, (head_rope_cos, head_rope_sin))
        v_c, v_u = v.unflatten(0, (2, -1)).unbind(0)
        return x - dt * (v_u + cfg * (v_c - v_u))

    def decode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The ``decoder`` graph: the last stage's tokens x ``[B, N, C]`` -> images ``[B, 3, H, W]`` in [0, 1].

        Tokens are row-major over the ``grid`` x ``grid`` latent grid, channels last (the layout
        ``sampler.sample`` reshapes into its ``[B, C, grid, grid]`` latents), and still times ``latent_scale``:
        they are divided by it before the KL decoder, whose output in [-1, 1] maps to [0, 1].
        """
        if self.tokenizer is None:
            raise RuntimeError("this FlowAR model was built without its decoder (tokenizer=False)")
        side = self.config.grid
        latents = x.transpose(1, 2).reshape(-1, self.config.token_dim, side, side) * (1.0 / self.config.latent_scale)
        return self.tokenizer.decode(latents)


def _init_linear(module: nn.Module) -> None:
    """The reference initialisation of every linear layer: xavier-uniform weight, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
