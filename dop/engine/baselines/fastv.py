"""FastV (Chen et al., ECCV'24, ``pkunlp-icler/FastV``): after layer K, keep the R visual tokens the
last prompt token attended most at layer K-1.

Score (released inplace code, ``baselines.md`` 2.1): the attention map of layer K-1, averaged over
heads, row of the **last** token, restricted to the image rows. The paper text describes the mean
attention a token receives from all tokens; the released code uses the last row, and so do we.
Layer K-1's attention row is read from that layer's own keys while it runs (``ctx.watch_attention``:
its k projection is not repeated, only the last row's q), so any attention backend works. Dropped rows leave every op from layer K on (KV cache included); kept rows
keep their original positions (as FastV sets ``position_ids = keep_indexs``).

Knob: R, the visual tokens kept from layer K on (per sample: ``min(R, its visual tokens)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dop import flops
from dop.engine.baselines.base import (
    Method,
    MethodError,
    check_int,
    last_rows,
    topk_rows,
    uniform_schedule,
)
from dop.ops import VISION


def fastv_scores(probs: torch.Tensor) -> torch.Tensor:
    """(B, heads, 1, T) attention of the last row -> (B, T) head-mean score."""
    return probs.float().mean(dim=1)[:, 0]


class _FastVSelector:
    """Watches layer K-1's attention of the last row while that layer runs; drops at layer K."""

    def __init__(self, K: int, keep: int) -> None:
        self.K, self.R = K, keep
        self.pending = None  # (probe of layer K-1, its candidate rows)

    def before_layer(self, ctx) -> None:
        if ctx.layer_idx == self.K - 1:
            allowed = ctx.groups[VISION] & ctx.keep("kv")
            self.pending = (ctx.watch_attention(last_rows(ctx.valid)), allowed)
        elif ctx.layer_idx == self.K and self.pending is not None:
            (probe, allowed), self.pending = self.pending, None
            kept = topk_rows(fastv_scores(probe.probs), allowed, self.R)
            ctx.drop(allowed & ~kept)


class FastV(Method):
    name = "fastv"
    knob = "keep"  # visual tokens kept from layer K on
    paper_convention = "fastv"
    defaults = {"K": 2}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        check_int("K", self.hparams["K"], 1, method=self.name)

    def _check_depth(self, num_layers: int) -> int:
        K = self.hparams["K"]
        if K >= num_layers:
            raise MethodError(f"fastv: K={K} must be below the model's {num_layers} decoder layers")
        return K

    def _keep(self, knob: Any) -> int:
        return check_int("knob (kept visual tokens)", knob, 0, method=self.name)

    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        K, R = self._check_depth(num_layers), self._keep(knob)
        return uniform_schedule(groups, num_layers, {K: {VISION: min(R, int(groups.get(VISION, 0)))}})

    def selectors(self, model: nn.Module, knob: Any) -> list[Any]:
        return [_FastVSelector(self._check_depth(flops.num_layers(model)), self._keep(knob))]
