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

LLaVA-NeXT (the same CLIP-L/336 tower as LLaVA-1.5, so the same text tower fits; the prompt keeps
every placeholder and rows are dropped before layer 0, ``dop.engine.baselines.vision_access_next``). The
official LLaVA-NeXT path (``Theia-4869/CDPruner`` ``llava_arch.py``: ``encode_images`` on all crops
of the batch at once, then ``spatial`` packing without ``unpad``) does, per crop: similarity =
cosine of that crop's projected patches; relevance = mean over segments of the negated cosine of
the crop's CLIP patch embeddings to the text, **min-max normalised over the whole tower batch** (all
crops of the image at the official batch size 1, padded patches included); DPP greedy MAP of
``visual_token_num`` patches per crop. dop does the same, with these differences:

- the image's sample comes from ``reduce_inputs`` (``vision_access_next.image_samples``), so the
  min-max runs over each image's own crops (= official at batch size 1; with batches the official
  code mixes images, and sends one text for the batch);
- ``k`` is per image, split over its crops by ``crop_quotas`` (official: the same count per crop);
- candidates are the crop's packed patch rows: padded patches (removed by transformers' unpad) are
  in the min-max but cannot be kept, so the DPP runs on the kernel restricted to them (official: no
  unpad, padded patches are candidates and no ``image_newline`` row is sent); kept rows keep their
  original positions (official: re-numbered);
- no ``+1e-6`` in the min-max numerator (as on LLaVA-1.5 here; official adds it, so the least
  relevant patch gets a tiny, not zero, weight).

Qwen-VL is refused: the relevance needs a CLIP text tower in the vision tower's joint space, and
Qwen-VL's vision tower is not CLIP (``check_model`` names the reason).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dop.engine.baselines.reducer import CLIP_TOWER_TYPES, TextGuidedReducer, VisionContext, check_reducible
from dop.engine.baselines.vision_access import ImageTokens

_LLAVA_ONLY_WHY = ("; CDPruner's relevance compares patches with the instruction in CLIP's joint image-text "
                   "space, and Qwen-VL's vision tower is not a CLIP encoder: no CLIP text tower shares its "
                   "feature space")


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the greedy MAP of a DPP with (N, N) PSD ``kernel`` (k steps); a batch
    (n, N, N) of kernels gives (n, k), all at once."""
    if kernel.dim() == 2:
        return dpp_greedy(kernel[None], k)[0]
    n, N, _ = kernel.shape
    L = kernel.double()
    cis = L.new_zeros(n, k, N)
    di2s = torch.diagonal(L, dim1=-2, dim2=-1).clone()
    chosen = torch.zeros(n, k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        j = di2s.argmax(dim=1)
        chosen[:, i] = j
        row = L.gather(1, j.view(n, 1, 1).expand(-1, 1, N))[:, 0]  # (n, N)
        cj = cis[:, :i].gather(2, j.view(n, 1, 1).expand(-1, i, 1))  # (n, i, 1)
        eis = (row - (cj * cis[:, :i]).sum(1)) / di2s.gather(1, j[:, None]).clamp(min=1e-12).sqrt()
        cis[:, i] = eis
        di2s = (di2s - eis ** 2).scatter(1, chosen[:, : i + 1], float("-inf"))
    return chosen.sort(dim=1).values


def cdpruner_relevance(patch_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) min-max normalised mean negated cosine of patches (N, P) to text segments (S, P)."""
    rel = -(patch_embeds.float() @ text_embeds.float().T).mean(dim=-1)
    return (rel - rel.min()) / (rel.max() - rel.min()).clamp(min=1e-12)


def cdpruner_select(projected: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) kept tokens of each image: DPP greedy MAP with kernel diag(r) S diag(r), all images at once."""
    xn = F.normalize(projected.float(), dim=-1)
    return dpp_greedy(relevance[:, :, None] * (xn @ xn.transpose(1, 2)) * relevance[:, None, :], k)


class CDPruner(TextGuidedReducer):
    name: ClassVar[str] = "cdpruner"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {"text_tower": None, "text_tokenizer": None}
    text_segments: ClassVar[bool] = True

    def check_model(self, model) -> None:
        check_reducible(model, self.name, CLIP_TOWER_TYPES, why=_LLAVA_ONLY_WHY)
        super().check_model(model)

    def next_relevance(self, model: nn.Module, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(crops, N) relevance of all the image's crops' patches, min-max normalised over the image."""
        emb = self.clip_embeds(model, features)
        return cdpruner_relevance(emb.flatten(0, 1), text).view(emb.shape[:2])

    def reduce_image(self, img: ImageTokens, k: int) -> tuple[torch.Tensor, None]:
        """LLaVA-NeXT, one crop: DPP greedy MAP over its candidate rows (projected rows' cosine, the
        image-normalised relevance)."""
        return cdpruner_select(img.tokens[None], img.relevance[None], k)[0], None

    def attn_layers(self, model) -> list[int]:
        return []

    def select(self, ctx: VisionContext, k: int) -> torch.Tensor:
        patches = self.patch_embeds(ctx)
        rel = torch.stack([cdpruner_relevance(p, t) for p, t in zip(patches, ctx.texts, strict=True)])
        return cdpruner_select(ctx.projected, rel, k)
