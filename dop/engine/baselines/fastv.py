"""FastV (Chen et al., ECCV'24, ``pkunlp-icler/FastV``): after layer K, keep the R visual tokens the
last prompt token attended most at layer K-1.

Score (released inplace code, ``baselines.md`` 2.1): the attention map of layer K-1, averaged over
heads, row of the **last** token, restricted to the image rows. The paper text describes the mean
attention a token receives from all tokens; the released code uses the last row, and so do we.
Layer K-1's attention is recomputed from its q/k on its input (``ctx.attention_probs``), so any
attention backend works. Dropped rows leave every op from layer K on (KV cache included); kept rows
keep their original positions (as FastV sets ``position_ids = keep_indexs``).

Knob: R, the visual tokens kept from layer K on (per sample: ``min(R, its visual tokens)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dop.engine.baselines.base import (
    Method,
    MethodError,
    check_int,
    last_rows,
    num_layers_of,
    topk_rows,
    uniform_schedule,
)
from dop.ops import VISION


def fastv_scores(probs: torch.Tensor) -> torch.Tensor:
    """(B, heads, 1, T) attention of the last row -> (B, T) head-mean score."""
    return probs.float().mean(dim=1)[:, 0]


class _FastVSelector:
    def __init__(self, K: int, keep: int) -> None:
        self.K, self.R = K, keep

    def before_layer(self, ctx) -> None:
        if ctx.layer_idx != self.K - 1:
            return
        allowed = ctx.groups[VISION] & ctx.keep("kv")
        score = fastv_scores(ctx.attention_probs(last_rows(ctx.valid)))
        kept = topk_rows(score, allowed, self.R)
        ctx.drop(allowed & ~kept, from_layer=self.K)


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
        return [_FastVSelector(self._check_depth(num_layers_of(model)), self._keep(knob))]
