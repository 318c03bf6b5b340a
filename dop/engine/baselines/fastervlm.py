"""FasterVLM: keep the patches the [CLS] token attends to most (Zhang et al., arXiv 2412.01818).

Official code ``Theia-4869/FasterVLM`` (``clip_encoder.py`` returns ``attentions[select_layer][:, :, 0,
1:]``; ``llava_arch.py::encode_images`` averages over heads and keeps the top ``visual_token_num``).

Here: the [CLS] row of the feature layer's attention (the layer whose output LLaVA projects, -2) is
recomputed from that layer's ``q_proj``/``k_proj`` on its captured input (softmax over [CLS] + all
patches, [CLS] column dropped), averaged over heads; the top-``k`` patches are kept in spatial order
and their projected tokens go to the LLM. The tower itself keeps its SDPA attention. No deviation
from the paper except that the score is recomputed instead of read from an eager attention map
(numerically the same).

Qwen2-VL / Qwen2.5-VL (no [CLS] token): the top-``k`` merger-output tokens of each image by the
received attention of the last (full-attention) vision block, averaged over heads and query rows
and summed over each token's 2x2 patches (``dop.engine.baselines.vision_access``); the other visual rows
are dropped before decoder layer 0.

LLaVA-NeXT (``dop.engine.baselines.vision_access_next``): as in the official code, each crop's patches are
ranked by that crop's own [CLS] attention (head mean, feature layer); ``k`` per image is split evenly
over the crops (official: ``visual_token_num`` per crop), candidates are the packed patch rows (after
unpad; no newline rows), the other visual rows are dropped before layer 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dop.engine.baselines.reducer import ImageTokens, ReducerMethod, VisionContext, topk_sorted


def fastervlm_select(cls_attention: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) kept patches from an (n, heads, N) [CLS] attention: head-mean, top-k, ascending."""
    return topk_sorted(cls_attention.mean(dim=1), k)


class FasterVLM(ReducerMethod):
    name: ClassVar[str] = "fastervlm"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {}

    def select(self, ctx: VisionContext, k: int) -> torch.Tensor:
        return fastervlm_select(ctx.cls_attention(), k)

    def select_image(self, img: ImageTokens, k: int) -> torch.Tensor:
        return fastervlm_select(img.score[None, None], k)[0]
