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
    """(n, k) ascending indices of a greedy max-min (cosine distance) subset of each (N, D) row.

    All images at once; each step updates the distance to the chosen set with the new token's row
    (the same minimum as recomputing it over the chosen rows, without a host sync)."""
    n, N, _ = tokens.shape
    if n == 0 or k <= 0:
        return tokens.new_zeros(n, max(k, 0), dtype=torch.long)
    xn = F.normalize(tokens.float(), dim=-1)
    dist = 1.0 - xn @ xn.transpose(1, 2)  # (n, N, N)
    # second-smallest per column = distance to the nearest other token
    first = dist.topk(2, dim=1, largest=False).values[:, 1] if N > 1 else dist[:, 0]
    chosen = [first.argmax(dim=1)]
    nearest = _row(dist, chosen[0])  # distance of every token to the chosen set
    for _ in range(1, k):
        j = nearest.argmax(dim=1)
        chosen.append(j)
        nearest = torch.minimum(nearest, _row(dist, j))
    return torch.stack(chosen, dim=1).sort(dim=1).values


def _row(dist: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """(n, N): row ``j[b]`` of each (N, N) ``dist[b]``."""
    return dist.gather(1, j.view(-1, 1, 1).expand(-1, 1, dist.shape[2]))[:, 0]


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
