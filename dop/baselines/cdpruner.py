"""CDPruner: conditional DPP over the projected visual tokens (Zhang et al., NeurIPS'25;
code ``Theia-4869/CDPruner``, ``llava_arch.py::encode_images``, ``clip_encoder.py``).

1. similarity S = cosine between the **projected** (post-projector) visual tokens;
2. relevance r = mean over instruction segments of the negated cosine between CLIP text embeddings
   and the patch embeddings (``post_layernorm`` + ``visual_projection``), min-max normalised;
3. kernel L = diag(r) S diag(r); fast greedy MAP inference of the DPP (Chen et al., 2018:
   incremental Cholesky, ``k`` steps); kept indices in spatial order.

LLaVA has no CLIP text tower: set ``text_tower`` (``TextGuidedReducer``); without it ``check_model``
fails before anything runs. The instruction is split into 77-token segments as in the official code;
here each segment is wrapped in CLIP's start/end tokens so that every segment is pooled at an end
token (``TextGuidedReducer.encode_text``); check this against the official segmenting before comparing
numbers on instructions longer than 77 tokens. Otherwise no deviation (the official optional
theta-weighting is commented out there too).

LLaVA-1.5 only: the relevance needs a CLIP text tower in the vision tower's joint space, and
Qwen-VL's vision tower is not CLIP (``check_model`` names the reason). LLaVA-NeXT is refused too: its tower is the
same CLIP-L/336, so the text tower would fit, but scoring each crop's packed rows against the
instruction (images -> samples in ``dop.baselines.vision_access_next``) is not implemented yet.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from dop.baselines.reducer import LLAVA_ONLY, TextGuidedReducer, VisionContext, check_reducible

_LLAVA_ONLY_WHY = ("; CDPruner's relevance compares patches with the instruction in CLIP's joint image-text "
                   "space, and Qwen-VL's vision tower is not a CLIP encoder: no CLIP text tower shares its "
                   "feature space"
                   "; on LLaVA-NeXT (the same CLIP-L/336 tower, so its text tower would fit) the per-crop "
                   "text relevance over the packed rows is not implemented yet")


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the greedy MAP of a DPP with (N, N) PSD ``kernel`` (k steps)."""
    N = kernel.shape[0]
    L = kernel.double()
    cis = L.new_zeros(k, N)
    di2s = torch.diagonal(L).clone()
    chosen = []
    for i in range(k):
        j = int(di2s.argmax())
        chosen.append(j)
        eis = (L[j] - cis[:i, j] @ cis[:i]) / di2s[j].clamp(min=1e-12).sqrt()
        cis[i] = eis
        di2s = di2s - eis ** 2
        di2s[chosen] = float("-inf")
    return torch.tensor(sorted(chosen), dtype=torch.long, device=kernel.device)


def cdpruner_relevance(patch_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) min-max normalised mean negated cosine of patches (N, P) to text segments (S, P)."""
    rel = -(patch_embeds.float() @ text_embeds.float().T).mean(dim=-1)
    return (rel - rel.min()) / (rel.max() - rel.min()).clamp(min=1e-12)


def cdpruner_select(projected: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    out = []
    for x, r in zip(projected, relevance, strict=True):
        xn = F.normalize(x.float(), dim=-1)
        out.append(dpp_greedy(r[:, None] * (xn @ xn.T) * r[None, :], k))
    return torch.stack(out)


class CDPruner(TextGuidedReducer):
    name: ClassVar[str] = "cdpruner"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {"text_tower": None, "text_tokenizer": None}
    text_segments: ClassVar[bool] = True

    def check_model(self, model) -> None:
        check_reducible(model, self.name, LLAVA_ONLY, why=_LLAVA_ONLY_WHY)
        super().check_model(model)

    def attn_layers(self, model) -> list[int]:
        return []

    def select(self, ctx: VisionContext, k: int) -> torch.Tensor:
        patches = self.patch_embeds(ctx)
        rel = torch.stack([cdpruner_relevance(p, t) for p, t in zip(patches, ctx.texts, strict=True)])
        return cdpruner_select(ctx.projected, rel, k)
