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

Qwen2-VL / Qwen2.5-VL (no [CLS] token; ``dop.engine.baselines.vision_access``), per image on the
merger-output tokens: ``dominant`` tokens (all patches) by the received attention of the last
(full-attention) vision block; the contextual merge as above with that block's keys (pre-rotary, all
heads, mean over each token's 2x2 patches) as the metric, merging merger outputs. Each contextual
token takes its target's row (position); the other visual rows are dropped before decoder layer 0.

LLaVA-NeXT (``dop.engine.baselines.vision_access_next``): per crop as officially (dominant by that crop's
[CLS] attention at the feature layer, head mean: the same ranking as the head sum), the Qwen-style
row variant above on the crop's packed patch rows with the feature layer's keys (heads concatenated;
official: layer 22's head-mean keys, = the feature layer on CLIP-L) and merging projected rows; the
crops' [CLS] tokens are not kept (no row for them in the packed prompt).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dop.engine.baselines.reducer import (
    ImageTokens,
    ReducerMethod,
    VisionContext,
    complement,
    feature_layer_index,
    scaled_layer,
    topk_sorted,
)
from dop.engine.baselines.vision_context import tower_layers


def split_budget(k: int, dominant_ratio: float) -> tuple[int, int]:
    dominant = min(k, max(1 if k else 0, round(k * dominant_ratio)))
    return dominant, k - dominant


def contextual_merge(rest: torch.Tensor, rest_metric: torch.Tensor, contextual: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (c,) (uniform stride over the ``R`` rows of ``rest`` (..., R, C)) and their (..., c, C)
    merged tokens: each other token joins its most metric-similar target; target = its token + mean
    of the joined ones. Leading dims (images) are batched: every image has the same ``R``."""
    R = rest.shape[-2]
    m = rest_metric / rest_metric.norm(dim=-1, keepdim=True)
    step = max(1, R // contextual)
    targets = torch.arange(0, R, step, device=rest.device)[:contextual]
    is_t = torch.zeros(R, dtype=torch.bool)
    is_t[targets.cpu()] = True
    others = (~is_t).nonzero()[:, 0].to(rest.device)  # from R and the stride only: no device sync
    assign = (m[..., others, :] @ m[..., targets, :].transpose(-1, -2)).argmax(dim=-1)
    onehot = torch.nn.functional.one_hot(assign, len(targets)).to(rest.dtype)  # (..., others, c)
    counts = onehot.sum(-2).clamp(min=1).unsqueeze(-1)
    return targets, rest[..., targets, :] + onehot.transpose(-1, -2) @ rest[..., others, :] / counts


def visionzip_tokens(hidden: torch.Tensor, cls_attention: torch.Tensor, metric: torch.Tensor,
                     dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dominant+contextual, C) tokens and (n, dominant-1) kept patch indices (0-based patches).

    ``hidden`` (n, 1+N, C) with [CLS] first, ``cls_attention`` (n, heads, N), ``metric`` (n, 1+N, c).
    All images at once: each has ``dominant`` dominant rows and ``1+N-dominant`` others."""
    n, T, C = hidden.shape
    score = cls_attention.sum(dim=1)
    top = score.argsort(dim=-1, descending=True, stable=True)[:, :max(dominant - 1, 0)] + 1
    chosen = torch.cat([top.new_zeros(n, 1), top], dim=1)[:, :dominant]
    dom_rows, rest_rows = chosen.sort(dim=-1).values, complement(chosen, T)  # ascending, as a boolean mask
    tokens = _rows(hidden, dom_rows)
    if contextual > 0 and rest_rows.shape[1]:
        merged = contextual_merge(_rows(hidden, rest_rows), _rows(metric, rest_rows), contextual)[1]
        tokens = torch.cat([tokens, merged], dim=1)
    return tokens, (chosen[:, 1:] - 1).sort(dim=-1).values


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def visionzip_rows(tokens: torch.Tensor, score: torch.Tensor, metric: torch.Tensor, dominant: int,
                   contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image without [CLS] (Qwen-VL): (k,) ascending kept rows and their (k, D) contents; the
    ``dominant`` top-``score`` rows as they are, and ``contextual`` merged tokens at their targets' rows."""
    dom = topk_sorted(score[None], dominant)[0]
    rows, content = dom, tokens[dom]
    rest = complement(dom[None], len(tokens))[0]
    if contextual > 0 and len(rest):
        targets, merged = contextual_merge(tokens[rest], metric[rest], contextual)
        rows, content = torch.cat([rows, rest[targets]]), torch.cat([content, merged])
    order = rows.argsort()
    return rows[order], content[order]


class VisionZip(ReducerMethod):
    name: ClassVar[str] = "visionzip"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {"dominant_ratio": 54 / 64, "key_layer": 22, "key_layer_of": 24}

    def key_layer(self, model) -> int:
        return scaled_layer(int(self.hparams["key_layer"]), int(self.hparams["key_layer_of"]), len(tower_layers(model)))

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

    def reduce_image(self, img: ImageTokens, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        dominant, contextual = split_budget(k, float(self.hparams["dominant_ratio"]))
        return visionzip_rows(img.tokens, img.score, img.keys, dominant, contextual)
