"""DivPrune: max-min diversity subset of the projected visual tokens (Alvar et al., CVPR'25).

Official code ``vbdi/divprune`` (``LLaVA/llava/model/llava_arch.py::DivPrune``): on the LLM input
embeddings of the visual tokens (projector output), distance = 1 - cosine; the first token is the one
whose nearest neighbour is farthest, then greedily the candidate farthest (max over candidates of the
min distance) from the chosen set; kept tokens in original order, dropped before decoder layer 0.
Text-agnostic, no attention. ``SUBSET_RATIO`` = k / N; here the knob is ``k`` itself. No deviation.

Qwen2-VL / Qwen2.5-VL: the same selection per image on the merger-output tokens (the LLM's visual
tokens, ``dop.engine.baselines.vision_access``); the other visual rows are dropped before decoder layer 0.

LLaVA-NeXT: the same selection per image over all its packed patch rows (the LLM's input embeddings,
every crop at once; newline rows are not candidates), ``dop.engine.baselines.vision_access_next``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from dop.engine.baselines.reducer import ImageTokens, ReducerMethod, VisionContext


def divprune_select(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) ascending indices of a greedy max-min (cosine distance) subset of each (N, D) row."""
    out = []
    for x in tokens:
        xn = F.normalize(x.float(), dim=-1)
        dist = 1.0 - xn @ xn.T
        chosen = []
        for i in range(k):
            if i == 0:  # second-smallest per column = distance to the nearest other token
                scores = dist.topk(2, dim=0, largest=False).values[1] if len(x) > 1 else dist[0]
            else:
                scores = dist[chosen].min(dim=0).values
            chosen.append(int(scores.argmax()))
        out.append(torch.tensor(sorted(chosen), dtype=torch.long, device=tokens.device))
    return torch.stack(out) if out else tokens.new_zeros(0, k, dtype=torch.long)


class DivPrune(ReducerMethod):
    name: ClassVar[str] = "divprune"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {}
    crop_wise: ClassVar[bool] = False  # LLaVA-NeXT: one subset over all the image's packed patch rows

    def attn_layers(self, model) -> list[int]:
        return []

    def select(self, ctx: VisionContext, k: int) -> torch.Tensor:
        return divprune_select(ctx.projected, k)

    def select_image(self, img: ImageTokens, k: int) -> torch.Tensor:
        return divprune_select(img.tokens[None], k)[0]
