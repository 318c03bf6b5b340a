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

LLaVA-1.5 only: Qwen-VL's vision tower is not CLIP, so there is no text tower in its feature space
(``check_model`` names the reason). LLaVA-NeXT is refused too: its tower is the
same CLIP-L/336, so the text tower would fit, but scoring each crop's packed rows against the
instruction (images -> samples in ``dop.baselines.vision_access_next``) is not implemented yet.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dop.baselines.reducer import (
    LLAVA_ONLY,
    TextGuidedReducer,
    VisionContext,
    check_reducible,
    complement,
    topk_sorted,
)

_LLAVA_ONLY_WHY = ("; TRIM scores patches against the question in CLIP's joint image-text space, and "
                   "Qwen-VL's vision tower is not a CLIP encoder: no CLIP text tower shares its feature space"
                   "; on LLaVA-NeXT (the same CLIP-L/336 tower, so its text tower would fit) the per-crop "
                   "text relevance over the packed rows is not implemented yet")


def trim_scores(patch_embeds: torch.Tensor, text_embeds: list[torch.Tensor]) -> torch.Tensor:
    """(n, N) softmax over patches of the negated patch-text cosine (first text segment)."""
    sim = torch.stack([p @ t[0] for p, t in zip(patch_embeds, text_embeds, strict=True)])
    return torch.softmax(-sim.float(), dim=-1)


def trim_tokens(features: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k, C) = top k-1 patches (spatial order) + the mean of the others; and their indices."""
    idx = topk_sorted(scores, k - 1)
    kept = features.gather(1, idx.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    rest = complement(idx, features.shape[1])
    pooled = torch.stack([features[b, rest[b]].mean(0) for b in range(len(features))]).unsqueeze(1)
    return torch.cat([kept, pooled], dim=1), idx


class TRIM(TextGuidedReducer):
    name: ClassVar[str] = "trim"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {"text_tower": None, "text_tokenizer": None}

    def check_model(self, model) -> None:
        check_reducible(model, self.name, LLAVA_ONLY, why=_LLAVA_ONLY_WHY)
        super().check_model(model)

    def reduce(self, ctx: VisionContext, k: int) -> torch.Tensor:
        scores = trim_scores(self.patch_embeds(ctx), ctx.texts)
        tokens, self.last_selection = trim_tokens(ctx.features, scores, k)
        return ctx.project(tokens)
