"""TRIM: keep the patches most relevant to the question under CLIP + one pooled token
(Song et al., COLING'25; code ``FreedomIntelligence/TRIM``, ``clip_encoder.py::token_reduction``).

Official algorithm: patch features of the feature layer -> CLIP ``post_layernorm`` ->
``visual_projection``; similarity with the CLIP text embedding of the question (``CLIPTextModel
WithProjection``); **negated**, softmax over patches; the IQR outliers (> Q3 + 1.5 IQR) are kept and
one extra token = mean of the other patch features is appended (features in vision space, before
the projector).

LLaVA has no CLIP text tower: set ``text_tower`` (see ``TextGuidedReducer``); without it
``check_model`` fails before anything runs. Fixed-k variant for budgets: the top ``k - 1`` patches by
that score + the pooled token (the IQR count would make ``k`` image dependent; the training-free
baseline tables use ratio = k / 576). The question is truncated to CLIP's 77 tokens, as in TRIM.

LLaVA-NeXT (its tower is the same CLIP-L/336 as LLaVA-1.5's, so the same text tower fits; the prompt
keeps every placeholder and rows are dropped before layer 0, ``dop.engine.baselines.vision_access_next``).
The official TRIM code has no LLaVA-NeXT path (its ``token_reduction`` runs on whatever batch the
tower gets; on NeXT's crops it would keep a pooled token per crop and break the spatial packing), so
dop decides:

- the image's sample is known from ``reduce_inputs`` (``vision_access_next.image_samples``: each
  image's packed-row count from transformers' packing, matched against each sample's placeholders);
- per crop, each patch's score is the negated cosine of its CLIP embedding (that crop's vision-tower
  features -> the tower's ``post_layernorm`` -> ``visual_projection``) with the sample's text
  embedding, softmax over the crop's candidate rows (the same ranking as the official softmax over
  all the crop's patches); a crop keeps its top share;
- **one** pooled token per image, not per crop: while ``k`` is below the image's patch rows, ``k - 1``
  patch rows are split over the crops (as for the other reducers) and the image's **last packed row**
  (its final ``image_newline`` row, after all its patch rows, as the LLaVA-1.5 pooled token follows
  the kept patches) carries the projector applied to the mean vision feature of the image's other
  patch rows (unpadded patches only: padded ones have no row). So exactly ``k`` rows per image reach
  layer 0 and the FLOPs schedule stays exact. ``last_selection`` lists the ``k`` kept packed rows,
  the pooled row included. With ``k`` at or above the patch rows nothing is pooled (all patch rows,
  then newline rows in order, as for every reducer).

Qwen-VL is refused: its vision tower is not CLIP, so there is no text tower in its feature space
(``check_model`` names the reason).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dop.engine.baselines.reducer import (
    CLIP_TOWER_TYPES,
    TextGuidedReducer,
    VisionContext,
    check_reducible,
    complement,
    topk_sorted,
)
from dop.engine.baselines.vision_access import ImageTokens

_LLAVA_ONLY_WHY = ("; TRIM scores patches against the question in CLIP's joint image-text space, and "
                   "Qwen-VL's vision tower is not a CLIP encoder: no CLIP text tower shares its feature space")


def trim_scores(patch_embeds: torch.Tensor, text_embeds: list[torch.Tensor]) -> torch.Tensor:
    """(n, N) softmax over patches of the negated patch-text cosine (first text segment)."""
    text = torch.stack([t[0] for t in text_embeds])  # (n, P): each image's sample's first segment
    sim = (patch_embeds @ text.unsqueeze(-1)).squeeze(-1)
    return torch.softmax(-sim.float(), dim=-1)


def trim_tokens(features: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k, C) = top k-1 patches (spatial order) + the mean of the others; and their indices."""
    idx = topk_sorted(scores, k - 1)
    C = features.shape[-1]
    kept = features.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))
    rest = complement(idx, features.shape[1])
    pooled = features.gather(1, rest.unsqueeze(-1).expand(-1, -1, C)).mean(1, keepdim=True)
    return torch.cat([kept, pooled], dim=1), idx


class TRIM(TextGuidedReducer):
    name: ClassVar[str] = "trim"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {"text_tower": None, "text_tokenizer": None}
    pooled_token: ClassVar[bool] = True  # LLaVA-NeXT: one pooled row per image (vision_access_next)

    def check_model(self, model) -> None:
        check_reducible(model, self.name, CLIP_TOWER_TYPES, why=_LLAVA_ONLY_WHY)
        super().check_model(model)

    def next_relevance(self, model: nn.Module, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(crops, N) negated cosine of each patch's CLIP embedding to the (first) text segment."""
        return -(self.clip_embeds(model, features).float() @ text[0].float())

    def reduce_image(self, img: ImageTokens, k: int) -> tuple[torch.Tensor, None]:
        """LLaVA-NeXT, one crop: its top ``k`` candidate rows by softmax(negated cosine) (ascending)."""
        return topk_sorted(torch.softmax(img.relevance.float(), dim=-1)[None], k)[0], None

    def reduce(self, ctx: VisionContext, k: int) -> torch.Tensor:
        scores = trim_scores(self.patch_embeds(ctx), ctx.texts)
        tokens, self.last_selection = trim_tokens(ctx.features, scores, k)
        return ctx.project(tokens)
