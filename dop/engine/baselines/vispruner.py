"""VisPruner: important tokens by [CLS] attention + diverse tokens by iterative de-duplication
(Zhang et al., ICCV'25; code ``Theia-4869/VisPruner``, ``llava_arch.py::encode_images``).

1. ``int(k * r)`` important patches: highest head-mean [CLS] attention of the feature layer.
2. The other patches, in descending-attention order, are de-duplicated on the L2-normalised
   vision-tower features (before the projector, as in the official code): split into even/odd
   positions, score each even one by its max cosine to the odd half, drop the ``min(8, R - T_div)``
   most similar even ones; repeat until ``k - int(k * r)`` remain.
3. Keep important + diverse (spatial order); their projected tokens go to the LLM.

``important_ratio`` r: argparse default 0.5 (the README's 64-token example uses 0.75). No deviation.

Qwen2-VL / Qwen2.5-VL (no [CLS] token): important tokens by the received attention of the last
(full-attention) vision block (mean over heads and query rows, summed over each token's 2x2
patches); de-duplication on the merger-output tokens (``dop.engine.baselines.vision_access``); the other
visual rows are dropped before decoder layer 0.

LLaVA-NeXT (``dop.engine.baselines.vision_access_next``): as in the official code, per crop with that
crop's own [CLS] attention, de-duplicating on the crop's vision-tower features; ``k`` per image is
split evenly over the crops (official: ``visual_token_num`` per crop), candidates are the packed
patch rows (after unpad; no newline rows), the other visual rows are dropped before layer 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dop.engine.baselines.reducer import ImageTokens, ReducerMethod, VisionContext


def vispruner_select(cls_attention: torch.Tensor, features: torch.Tensor, k: int, ratio: float,
                     per_step: int = 8) -> torch.Tensor:
    """(n, k) ascending kept patches from (n, heads, N) [CLS] attention and (n, N, C) features."""
    n, N, _ = features.shape
    n_imp = int(k * ratio)
    n_div = k - n_imp
    order = cls_attention.mean(dim=1).argsort(dim=-1, descending=True, stable=True)
    important, residual = order[:, :n_imp], order[:, n_imp:]
    if n_div <= 0:  # r = 1: FasterVLM (the official loop would fail on an empty odd half)
        residual = residual[:, :0]
    normed = features / features.norm(dim=-1, keepdim=True)
    rows = torch.arange(n, device=features.device).unsqueeze(-1)
    while True:
        R = residual.shape[1]
        r = min(per_step, R - n_div)
        if r <= 0:
            break
        tok = normed[rows.expand(-1, R), residual]
        a, b = tok[:, ::2], tok[:, 1::2]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]
        evens = residual[:, ::2]
        residual = torch.cat([evens.gather(1, distinct), residual[:, 1::2]], dim=-1)
    return torch.cat([important, residual], dim=-1).sort(dim=-1).values


class VisPruner(ReducerMethod):
    name: ClassVar[str] = "vispruner"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {"important_ratio": 0.5}

    def select(self, ctx: VisionContext, k: int) -> torch.Tensor:
        return vispruner_select(ctx.cls_attention(), ctx.features, k, float(self.hparams["important_ratio"]))

    def select_image(self, img: ImageTokens, k: int) -> torch.Tensor:
        ratio = float(self.hparams["important_ratio"])
        feats = img.tokens if img.features is None else img.features  # LLaVA-NeXT: pre-projector, as officially
        return vispruner_select(img.score[None, None], feats[None].float(), k, ratio)[0]
