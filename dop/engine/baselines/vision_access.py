"""Qwen2-VL / Qwen2.5-VL vision-tower access for the pre-LLM reducers (``dop.engine.baselines.reducer``).

On Qwen the prompt is not shortened: the tower's merger output (``model.model.visual``'s
``pooler_output``, ``(tokens of all images, D)``, the rows the LLM gets at the ``<|image_pad|>``
positions) is split per image by ``image_grid_thw`` and the spatial merge size; the method picks
``k`` rows per image (``ReducerMethod.reduce_image``), may rewrite their content (merging methods;
the shape is unchanged), and an engine selector (``before_layer``) drops the other visual rows
before decoder layer 0. Kept rows keep their original M-RoPE positions (as the Qwen ports of
VisionZip and CDPruner do), so ``model.generate`` and the rope indices need nothing special.

What a method sees per image (``ImageTokens``):

- ``tokens`` (N, D): the merger output rows of the image (the LLM's visual tokens);
- ``score`` (N,): Qwen's vision blocks have no [CLS] token, so "[CLS] attention" is replaced by the
  **received attention** of the score block (the last block on Qwen2-VL; the last of
  ``fullatt_block_indexes`` on Qwen2.5-VL, whose other blocks attend within windows): softmax
  attention recomputed from that block's ``qkv`` (with its rotary embedding) on its captured input,
  within the image's own rows, averaged over heads and query rows, then summed over the 2x2
  patches of each merged token (a distribution over the image's tokens);
- ``keys`` (N, C): that block's keys (before rotary, all heads concatenated), averaged over each
  token's patches (the key-similarity metric of VisionZip and PruMerge+).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

from dop.engine.baselines.base import MethodError
from dop.ops import VISION

QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class ImageTokens:
    """One image's visual tokens, as the LLM gets them (merger output order: (t, h, w) raster)."""

    index: int  # image number in the call (order of image_grid_thw)
    tokens: torch.Tensor  # (N, D) merger output
    score: torch.Tensor  # (N,) received attention of the score block, summed over each token's patches
    keys: torch.Tensor  # (N, C) score block keys (pre-rotary), mean over each token's patches
    grid: tuple[int, int, int]  # (t, h, w) in merged tokens
    features: torch.Tensor | None = None  # (N, C) vision features before the projector (LLaVA-NeXT crops)
    # LLaVA-NeXT, text-guided methods (TRIM, CDPruner): the image's sample's CLIP text embeddings
    # (segments, P) and the method's relevance of these rows (``TextGuidedReducer.next_relevance``)
    text: torch.Tensor | None = None
    relevance: torch.Tensor | None = None  # (N,)


def is_qwen(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in QWEN_MODEL_TYPES


def _visual(model: nn.Module) -> nn.Module:
    return model.model.visual


def check_qwen_tower(model: nn.Module, method: str) -> None:
    try:
        visual = _visual(model)
        visual.blocks[0].attn.qkv, visual.merger, int(visual.spatial_merge_size)  # noqa: B018
    except (AttributeError, IndexError, TypeError) as e:
        raise MethodError(f"method {method!r}: Qwen-VL vision tower not found at model.model.visual "
                          f"(blocks[i].attn.qkv, merger, spatial_merge_size): {e}") from e
    score_block_index(model)


def score_block_index(model: nn.Module) -> int:
    """The block whose received attention scores tokens: the last full-attention block."""
    depth = len(_visual(model).blocks)
    full = getattr(model.config.vision_config, "fullatt_block_indexes", None)
    if model.config.model_type == "qwen2_5_vl":
        full = [int(i) for i in (full or []) if 0 <= int(i) < depth]
        if not full:
            raise MethodError("Qwen2.5-VL vision config has no full-attention block (fullatt_block_indexes)")
        return max(full)
    return depth - 1


def merged_tokens_per_image(model: nn.Module, grid_thw: torch.Tensor) -> list[int]:
    """LLM tokens per image: t*h*w patches / merge_size**2 (from ``image_grid_thw``)."""
    return (grid_thw.prod(-1) // int(_visual(model).spatial_merge_size) ** 2).tolist()


def group_order(model: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """(G,) for each merge group in the tower's row order, its row in the merger output.

    Qwen2-VL keeps raster order; Qwen2.5-VL permutes groups into attention windows and the tower
    un-permutes its merger output (``window_index``)."""
    visual = _visual(model)
    if model.config.model_type == "qwen2_5_vl":
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                           window_size=visual.window_size, patch_size=visual.patch_size)
        return index.to(grid_thw.device)
    return torch.arange(sum(merged_tokens_per_image(model, grid_thw)), device=grid_thw.device)


def received_attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       chunk: int = 256, qkv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) attention each row receives (mean over heads and query rows) and (S, C) pre-rotary keys
    from the block's ``attn.qkv`` of its attention input ``x`` (S, C), all rows one image: ``qkv``
    (S, 3C) when the block's own projection was captured, else projected here."""
    S = x.shape[0]
    qkv = attn.qkv(x) if qkv is None else qkv
    q, k, _ = qkv.reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    keys = k.reshape(S, -1)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    q, k = rotary(q, k, cos, sin)
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, S, hd)
    total = x.new_zeros(S, dtype=torch.float32)
    for a in range(0, S, chunk):
        w = torch.softmax((q[:, a:a + chunk] @ k.transpose(-1, -2)) * attn.scaling, dim=-1)
        total += w.sum(dim=(0, 1))
    return total / (q.shape[0] * S), keys


def image_tokens(model: nn.Module, pooled: torch.Tensor, grid_thw: torch.Tensor, attn_input: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor], qkv: torch.Tensor | None = None
                 ) -> list[ImageTokens]:
    """Per image: merger output, received-attention score and keys (``ImageTokens``); ``qkv``: the score
    block's own ``qkv`` output over all images' rows (not projected again). Images have different
    sizes, so the received attention runs image by image."""
    visual = _visual(model)
    attn = visual.blocks[score_block_index(model)].attn
    unit = int(visual.spatial_merge_size) ** 2
    cos, sin = position_embeddings
    patches = grid_thw.prod(-1).tolist()
    scores, keys, lo = [], [], 0
    for n in patches:  # the tower's row order keeps each image's rows together
        s, kk = received_attention(attn, attn_input[lo:lo + n], cos[lo:lo + n], sin[lo:lo + n],
                                   qkv=None if qkv is None else qkv[lo:lo + n])
        scores.append(s.view(-1, unit).sum(-1))
        keys.append(kk.float().view(-1, unit, kk.shape[-1]).mean(1))
        lo += n
    order = group_order(model, grid_thw)
    score = torch.empty_like(torch.cat(scores))
    score[order] = torch.cat(scores)
    key = torch.empty_like(torch.cat(keys))
    key[order] = torch.cat(keys)
    m = int(visual.spatial_merge_size)
    out, lo = [], 0
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        n = t * (h // m) * (w // m)
        out.append(ImageTokens(i, pooled[lo:lo + n], score[lo:lo + n], key[lo:lo + n], (t, h // m, w // m)))
        lo += n
    return out


class QwenVisualReducer:
    """Tower hooks + the engine selector that keeps ``k`` visual rows per image from layer 0 on.

    ``method.reduce_image(img, k)`` returns the (k,) ascending kept token indices of one image and
    their (k, D) new contents (``None``: unchanged); after each tower call ``method.last_selection``
    is the list of kept indices per image (all of an image's tokens when ``k`` covers them)."""

    inputs_hint = "pixel_values and image_grid_thw"  # what the model must be given (error messages)

    def __init__(self, model: nn.Module, method: Any, k: int) -> None:
        self.model, self.method, self.k, self.name = model, method, int(k), method.name
        self.keep: torch.Tensor | None = None  # (visual rows of the call,) bool, consumed at layer 0
        self.selection: list[torch.Tensor] = []
        self._cap: dict[str, Any] = {}
        self._handles: list[Any] = []

    # --- hooks ------------------------------------------------------------------------------
    def __enter__(self) -> QwenVisualReducer:
        visual = _visual(self.model)
        block = visual.blocks[score_block_index(self.model)]
        self._handles = [
            self.model.model.register_forward_pre_hook(self._check_call, with_kwargs=True),
            block.attn.register_forward_pre_hook(self._grab_attn, with_kwargs=True),
            block.attn.qkv.register_forward_hook(self._grab_qkv),
            visual.register_forward_hook(self._reduce, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._cap, self.keep = [], {}, None

    def _check_call(self, module, args, kwargs) -> None:
        if kwargs.get("pixel_values_videos") is not None:
            raise MethodError(f"method {self.name!r} on Qwen-VL reduces images only; videos are not supported")
        if kwargs.get("pixel_values") is not None:
            self.keep = None

    def _grab_attn(self, module, args, kwargs) -> None:
        self._cap["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._cap["pos"] = kwargs["position_embeddings"]

    def _grab_qkv(self, module, args, output) -> None:  # the block's own projection: not repeated
        self._cap["qkv"] = output

    def _reduce(self, module, args, kwargs, output):
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        pooled = output.pooler_output
        sizes = merged_tokens_per_image(self.model, grid)
        keep = torch.ones(pooled.shape[0], dtype=torch.bool, device=pooled.device)
        self.selection = [torch.arange(n, device=pooled.device) for n in sizes]
        if all(self.k >= n for n in sizes):
            self.keep, self.method.last_selection = keep, self.selection
            return None
        new = pooled.clone()
        with torch.no_grad():
            images = image_tokens(self.model, pooled, grid, self._cap["x"], self._cap["pos"], self._cap.get("qkv"))
            lo = 0
            for img, n in zip(images, sizes, strict=True):
                if self.k < n:
                    keep[lo:lo + n] = False
                    idx, content = self.method.reduce_image(img, self.k) if self.k else (grid.new_zeros(0), None)
                    if idx.numel() != self.k or (idx.numel() and (idx.diff() <= 0).any()):
                        raise MethodError(f"method {self.name!r} kept {idx.tolist()} of image {img.index}; "
                                          f"expected {self.k} ascending indices")
                    keep[lo + idx] = True
                    if content is not None:
                        new[lo + idx] = content.to(new.dtype)
                    self.selection[img.index] = idx
                lo += n
        self.keep, self.method.last_selection = keep, self.selection
        output.pooler_output = new
        return output

    # --- the engine selector ----------------------------------------------------------------
    def before_layer(self, ctx) -> None:
        if ctx.layer_idx != 0:
            return
        vision = ctx.groups[VISION] & ctx.valid
        n = int(vision.sum())
        keep, self.keep = self.keep, None
        if n == 0:
            return
        if keep is None or keep.numel() != n:
            got = "no image features" if keep is None else f"{keep.numel()} image features"
            raise MethodError(f"method {self.name!r}: the prompt has {n} visual rows but the vision tower gave "
                              f"{got} in this call (pass {self.inputs_hint}, not precomputed features)")
        drop = torch.zeros_like(vision)
        drop[vision] = ~keep.to(vision.device)  # row-major: the order Qwen scatters image features in
        ctx.drop(drop, from_layer=0)
