"""LLaVA-PruMerge+, fixed-k variant (Shang et al., arXiv 2403.15388; code ``42Shawn/LLaVA-PruMerge``,
``clip_encoder.py::token_prune_merge_advanced_plus``).

Official algorithm: q/k of the last CLIP layer (hooks on ``q_proj``/``k_proj``), one head over the
full width, ``cls_attn = softmax(q k^T / sqrt(C))[0, 1:]``; the IQR outliers (> Q3 + 1.5 IQR) of
``cls_attn`` are kept, plus spatially uniform samples; every kept token adds the ``cls_attn``-weighted
sum of its 32 most key-similar other tokens; one extra token = ``cls_attn``-weighted sum of all
non-kept tokens. Merging is on vision-tower features of the feature layer (before the projector).

Fixed-k variant for budgets (the adaptive count would make ``k`` image dependent): of the ``k``
tokens, 1 is the extra token, ``min(#IQR outliers, k-1)`` are the outliers with the highest
``cls_attn``, and the rest are evenly spaced (in raster order) among the remaining patches (the
official code uses a fixed stride grid whose size depends on the adaptive ratio). Kept tokens are
in spatial order (official: outliers by score, then samples).

Qwen2-VL / Qwen2.5-VL (no [CLS] token; ``dop.engine.baselines.vision_access``), per image on the
merger-output tokens: ``cls_attn`` is the received attention of the last (full-attention) vision
block (mean over heads and query rows, summed over each token's 2x2 patches, a distribution over the
image's tokens); keys are that block's (pre-rotary, all heads, mean over the token's patches). The
extra token takes the row (position) of the highest-scoring non-kept token; the other visual rows are
dropped before decoder layer 0.

LLaVA-NeXT (``dop.engine.baselines.vision_access_next``): per crop, the Qwen-style row variant above on the
crop's packed patch rows, with ``cls_attn`` = that crop's [CLS] attention at the feature layer (head
mean; official PruMerge+: the last layer, one head over the full width) and the feature layer's keys;
merging is on projected rows.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from dop.engine.baselines.reducer import (
    ImageTokens,
    ReducerMethod,
    VisionContext,
    complement,
    evenly_spaced,
    iqr_outliers,
)
from dop.engine.baselines.vision_context import tower_layers


def prumerge_select(cls_attn: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k-1) kept patches: IQR outliers (top by score, at most k-1) + evenly spaced others."""
    out = []
    m = max(k - 1, 0)
    for s in cls_attn:
        outl = iqr_outliers(s)
        n_attn = min(int(outl.sum()), m)
        top = s.float().masked_fill(~outl, float("-inf")).argsort(descending=True, stable=True)[:n_attn]
        rest = complement(top.unsqueeze(0), len(s))[0]
        out.append(torch.cat([top, evenly_spaced(rest, m - n_attn)]).sort().values)
    return torch.stack(out)


def prumerge_tokens(feats: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, idx: torch.Tensor,
                    neighbours: int = 32) -> torch.Tensor:
    """(n, m+1, C): each kept feature + weighted sum of its ``neighbours`` most key-similar other tokens,
    then the cls_attn-weighted sum of the non-kept tokens. ``keys`` (n, N, c) of the patches; all
    images at once (each keeps the same ``m``)."""
    n, N, C = feats.shape
    m = idx.shape[1]
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn.gather(1, idx.unsqueeze(-1).expand(-1, -1, kn.shape[-1])) @ kn.transpose(1, 2)  # (n, m, N)
    sim.scatter_(2, idx.unsqueeze(-1), float("-inf"))  # never the token itself
    nbrs = min(neighbours, N - 1)
    nb = sim.topk(nbrs, dim=-1).indices.flatten(1)  # (n, m * nbrs)
    w = cls_attn.gather(1, nb).view(n, m, nbrs, 1).to(feats.dtype)
    near = feats.gather(1, nb.unsqueeze(-1).expand(-1, -1, C)).view(n, m, nbrs, C)
    kept = feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, C)) + (near * w).sum(2)
    rest = complement(idx, N)
    extra = (feats.gather(1, rest.unsqueeze(-1).expand(-1, -1, C))
             * cls_attn.gather(1, rest).unsqueeze(-1).to(feats.dtype)).sum(1, keepdim=True)
    return torch.cat([kept, extra], dim=1)


class PruMergePlus(ReducerMethod):
    name: ClassVar[str] = "prumerge_plus"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {"neighbours": 32, "qk_layer": -1}

    def qk_layer(self, model) -> int:
        return int(self.hparams["qk_layer"]) % len(tower_layers(model))

    def attn_layers(self, model) -> list[int]:
        return [self.qk_layer(model)]

    def reduce(self, ctx: VisionContext, k: int) -> torch.Tensor:
        q, kk = ctx.qk_full(self.qk_layer(ctx.model))
        C = ctx.features.shape[-1]
        cls_attn = torch.softmax((q[:, :1].float() @ kk.float().transpose(-1, -2)) * C ** -0.5, dim=-1)[:, 0, 1:]
        idx = prumerge_select(cls_attn, k)
        self.last_selection = idx
        tokens = prumerge_tokens(ctx.features, kk[:, 1:], cls_attn, idx, int(self.hparams["neighbours"]))
        return ctx.project(tokens)

    def reduce_image(self, img: ImageTokens, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = prumerge_select(img.score[None], k)[0]
        tokens = prumerge_tokens(img.tokens[None], img.keys[None], img.score[None], idx[None],
                                 int(self.hparams["neighbours"]))[0]
        rest = complement(idx[None], len(img.tokens))[0]
        rows = torch.cat([idx, rest[img.score[rest].argmax()].view(1)])  # the extra token's row
        order = rows.argsort()
        return rows[order], tokens[order]
