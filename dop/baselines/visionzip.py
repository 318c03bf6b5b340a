"""VisionZip: dominant tokens by [CLS] attention + contextual tokens merged on keys (Yang et al., CVPR'25).

Official code ``dvlab-research/VisionZip`` (``visionzip/utils.py``, ``clip_encoder.py``); it patches
``CLIPAttention`` for the whole process, which dop does not: the [CLS] row and the keys are recomputed
from the captured inputs of the two layers it reads.

Algorithm (on vision-tower features of the LLaVA feature layer, *before* the projector, as in the
paper; the kept/merged vision tokens are then projected):

1. dominant: the [CLS] row of the feature layer's attention, **summed** over heads; the top
   ``dominant - 1`` patches plus the [CLS] token itself (so ``dominant`` counts the [CLS]).
2. contextual: on the remaining tokens, the head-mean keys of layer 22 of 24 (scaled to the tower's
   depth, ``scaled_layer``) are L2-normalised; ``contextual`` targets are taken with a uniform stride;
   every other remaining token joins its most similar target; target = its hidden + mean of joined.
3. output ``[dominant ; contextual]`` (dominant in spatial order, [CLS] first).

Paper defaults on LLaVA-1.5: 162+30 / 108+20 / 54+10 for 192 / 128 / 64, i.e. ``dominant = round(k *
54/64)``; ``dominant_ratio`` applies the same split to any ``k``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dop.baselines.reducer import ReducerMethod, VisionContext, feature_layer_index, scaled_layer


def split_budget(k: int, dominant_ratio: float) -> tuple[int, int]:
    dominant = min(k, max(1 if k else 0, round(k * dominant_ratio)))
    return dominant, k - dominant


def visionzip_tokens(hidden: torch.Tensor, cls_attention: torch.Tensor, metric: torch.Tensor,
                     dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dominant+contextual, C) tokens and (n, dominant-1) kept patch indices (0-based patches).

    ``hidden`` (n, 1+N, C) with [CLS] first, ``cls_attention`` (n, heads, N), ``metric`` (n, 1+N, c)."""
    n, T, C = hidden.shape
    score = cls_attention.sum(dim=1)
    top = score.argsort(dim=-1, descending=True, stable=True)[:, :max(dominant - 1, 0)] + 1
    chosen = torch.cat([top.new_zeros(n, 1), top], dim=1)[:, :dominant]
    is_dom = torch.zeros(n, T, dtype=torch.bool, device=hidden.device)
    is_dom.scatter_(1, chosen, True)
    out = []
    for b in range(n):
        dom = hidden[b][is_dom[b]]
        rest, rest_metric = hidden[b][~is_dom[b]], metric[b][~is_dom[b]]
        if contextual > 0 and len(rest):
            m = rest_metric / rest_metric.norm(dim=-1, keepdim=True)
            step = max(1, len(rest) // contextual)
            targets = torch.arange(0, len(rest), step, device=hidden.device)[:contextual]
            is_t = torch.zeros(len(rest), dtype=torch.bool, device=hidden.device)
            is_t[targets] = True
            assign = (m[~is_t] @ m[targets].T).argmax(dim=-1)
            onehot = torch.nn.functional.one_hot(assign, len(targets)).to(rest.dtype)  # (others, c)
            counts = onehot.sum(0).clamp(min=1).unsqueeze(-1)
            ctx = rest[targets] + onehot.T @ rest[~is_t] / counts
            dom = torch.cat([dom, ctx], dim=0)
        out.append(dom)
    return torch.stack(out), (chosen[:, 1:] - 1).sort(dim=-1).values


class VisionZip(ReducerMethod):
    name: ClassVar[str] = "visionzip"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {"dominant_ratio": 54 / 64, "key_layer": 22, "key_layer_of": 24}

    def key_layer(self, model) -> int:
        from dop.baselines.reducer import _tower_layers

        return scaled_layer(int(self.hparams["key_layer"]), int(self.hparams["key_layer_of"]), len(_tower_layers(model)))

    def attn_layers(self, model) -> list[int]:
        return [feature_layer_index(model), self.key_layer(model)]

    def reduce(self, ctx: VisionContext, k: int) -> torch.Tensor:
        dominant, contextual = split_budget(k, float(self.hparams["dominant_ratio"]))
        contextual = min(contextual, ctx.features.shape[1] + 1 - dominant)
        dominant = k - contextual
        hidden = torch.cat([ctx.cls_hidden.unsqueeze(1), ctx.features], dim=1)
        metric = ctx.keys(self.key_layer(ctx.model)).mean(dim=1)
        tokens, self.last_selection = visionzip_tokens(hidden, ctx.cls_attention(), metric, dominant, contextual)
        return ctx.project(tokens)
