"""LLaVA-NeXT vision-tower access for the pre-LLM reducers (``dop.engine.baselines.reducer``).

As on Qwen-VL (``dop.engine.baselines.vision_access``), the prompt is **not** shortened: the method picks
``k`` of each image's *packed* visual rows (the rows the LLM gets at its ``<image>`` placeholders)
and an engine selector drops the other visual rows before decoder layer 0; kept rows keep their
original positions.

Packing. LLaVA-NeXT runs every crop of an image (the base image + the anyres crops) through CLIP
on its own (each crop has its own [CLS]), projects the patches, and ``LlavaNextModel.
pack_image_features`` lays them out as: the base crop's patches, then the anyres crops stitched
into one grid, *unpadded* (rows/columns of the letterbox padding removed) with one ``image_newline``
row after each grid row. The reducer wraps ``pack_image_features`` on the model instance (removed on
exit; generate calls ``get_image_features`` before ``model.model`` runs, and this is the one place
that sees both the projected crops and ``image_sizes``) and runs transformers' own packing a second
time on index-coded features (``packing_map``), so for each packed row it knows the (crop, patch)
it came from, or that it is a newline row; the unpad arithmetic is never re-implemented here.

What the official LLaVA-NeXT code of FasterVLM, VisPruner, CDPruner and VisionZip does
(``Theia-4869/{FasterVLM,VisPruner,CDPruner}`` ``llava/model/llava_arch.py``,
``dvlab-research/VisionZip`` ``restore_image_features_sorted``): the tower runs on all crops as one
batch and the method keeps ``T`` patches **per crop**, scored by **that crop's own [CLS]
attention** (head mean; VisionZip: head sum; CDPruner: a DPP on the crop's projected patches with
the text relevance, min-max normalised over the tower batch, see ``dop.engine.baselines.cdpruner``), then the kept patches are laid out base crop first
and the other crops as one raster grid. Their packing is ``spatial`` **without** ``unpad`` (FasterVLM
hard-codes ``'spatial'``; VisPruner/CDPruner do ``mm_patch_merge_type.replace('_unpad', '')``), so no
``image_newline`` row reaches the LLM and padded patches are candidates. ``visual_token_num`` is per
crop (LLaVA-NeXT-7B: 5 crops x 576 = 2880; 640/320/160 = 5 x 128/64/32).

What dop does (``k`` is per image, so FLOPs ``schedule`` = ``k`` visual rows per image):

- candidates: the image's packed **patch** rows (after transformers' unpad: padded patches have no
  row in the stock prompt, so they cannot be kept; official: they could be). Newline rows are not
  candidates (the official ports send none); they are dropped, except that when ``k`` exceeds the
  image's patch rows the first ``k - patches`` newline rows are kept too, so exactly
  ``min(k, packed rows)`` visual rows reach layer 0 (and ``k >= packed rows`` is the stock model);
- per crop: ``k`` is split as evenly as possible over the image's crops (base crop first for the
  remainder; a crop with fewer candidate rows than its share gives the rest to the others), and
  each crop's share is picked by the method's per-image rule (``ReducerMethod.reduce_image``) on
  an ``ImageTokens`` of that crop's candidate rows: ``tokens`` = their projected rows, ``score`` =
  that crop's [CLS] attention at the feature layer (softmax over [CLS] + all the crop's patches,
  head mean, recomputed from the captured ``self_attn`` input with the layer's ``q_proj``/``k_proj``
  as ``VisionContext.cls_attention`` does; the tower keeps its attention backend), ``keys`` = the
  feature layer's keys (heads concatenated), ``features`` = the patches' vision-tower features
  (before the projector). Methods with ``crop_wise = False`` (DivPrune, a diversity subset of the
  LLM's input embeddings) pick ``k`` over all the image's patch rows at once;
- merging methods (VisionZip, PruMerge+) rewrite kept rows' contents in the LLM space (merged
  projected rows, as on Qwen-VL); the official ones merge vision features and project them, and
  VisionZip also appends each crop's [CLS] token, which has no row here.
- kept rows keep their positions in the full packed prompt (official: the shortened prompt is
  re-numbered contiguously).

Text-guided methods (TRIM, CDPruner: ``needs_text``). transformers 5 ``generate`` encodes the images
before ``model.model`` runs, so ``reduce_inputs`` maps images to samples (``image_samples``: each
image's packed-row count, from ``image_size_to_num_patches`` and transformers' packing, matched in
order against each sample's placeholders; the prompt is unchanged). Per image, the method's
``next_relevance`` scores every patch of all its crops (the crops' vision-tower features -> the
tower's ``post_layernorm`` -> the text tower's ``visual_projection``, against the sample's text
embeddings), and each crop's candidate rows get theirs as ``ImageTokens.relevance`` (with
``ImageTokens.text``). A method with ``pooled_token`` (TRIM) keeps ``k - 1`` patch rows and puts the
projected mean of the other patch rows' features on the image's last packed row (a newline row),
so ``k`` rows still reach layer 0.

LLaVA-OneVision is not supported: its SigLIP tower has no [CLS] token (``full`` feature strategy)
and ``anyres_max`` packing bilinearly downsamples large grids, so a packed row is not one patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from dop.engine.baselines.base import MethodError
from dop.engine.baselines.vision_access import ImageTokens, QwenVisualReducer
from dop.engine.baselines.vision_context import VisionContext, feature_layer_index, tower_layers

NEXT_MODEL_TYPES = ("llava_next",)


def is_llava_next(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in NEXT_MODEL_TYPES


@dataclass
class PackedRows:
    """One image's packed rows: for each, the crop (0 = base) and patch it came from; -1 = newline."""

    crop: torch.Tensor  # (rows,) long
    patch: torch.Tensor  # (rows,) long

    @property
    def is_patch(self) -> torch.Tensor:
        return self.crop >= 0


def packing_map(model: nn.Module, crops: list[int], image_sizes: Any, patches: int,
                device: torch.device | None = None) -> list[PackedRows]:
    """Per image, the (crop, patch) of each packed row, from transformers' ``pack_image_features``
    run on index-coded features (value ``crop * patches + patch``; newline = -1)."""
    inner = model.model
    coded = [torch.arange(c * patches, dtype=torch.float64).view(c, patches, 1) for c in crops]
    packed, _ = type(inner).pack_image_features(inner, coded, image_sizes, vision_feature_select_strategy="default",
                                                image_newline=torch.tensor([-1.0], dtype=torch.float64))
    out = []
    for p in packed:
        code = p[:, 0].round().long()
        newline = code < 0
        out.append(PackedRows(torch.where(newline, -1, code // patches).to(device),
                              torch.where(newline, -1, code % patches).to(device)))
    return out


def image_samples(model: nn.Module, input_ids: torch.Tensor, image_sizes: Any) -> torch.Tensor:
    """(images,) the sample of each image (order of ``image_sizes``), for the text-guided methods.

    Image ``i`` has as many ``<image>`` placeholders as packed rows (its crop count from
    ``image_size_to_num_patches``, its rows from transformers' packing, ``packing_map``, both as in
    ``get_image_features``); each sample's placeholders are its images' rows, images in batch order.
    Nothing in the prompt changes."""
    cfg = model.config
    vc = cfg.vision_config
    if image_sizes is None:
        raise MethodError("LLaVA-NeXT: pass image_sizes with pixel_values")
    crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                       patch_size=vc.image_size) for s in image_sizes]
    rows = [len(m.crop) for m in packing_map(model, crops, image_sizes, (vc.image_size // vc.patch_size) ** 2)]
    out, i = [], 0
    for b, n in enumerate((input_ids == cfg.image_token_id).sum(1).tolist()):
        while n > 0 and i < len(rows):
            n -= rows[i]
            out.append(b)
            i += 1
        if n != 0:
            raise MethodError(f"sample {b}: its <image> placeholders do not add up to whole images of "
                              f"{rows} rows (image_sizes and the prompt disagree)")
    if i != len(rows):
        raise MethodError(f"{len(rows)} images in image_sizes but the prompt holds placeholders for {i}")
    return torch.tensor(out, dtype=torch.long)


def crop_quotas(k: int, candidates: list[int]) -> list[int]:
    """``k`` (capped at the candidates) split as evenly as possible over crops with ``candidates``
    rows each (remainder to the first crops; a full crop passes its excess on)."""
    quota = [0] * len(candidates)
    rem = min(k, sum(candidates))
    while rem > 0:
        open_ = [c for c in range(len(candidates)) if quota[c] < candidates[c]]
        share, extra = divmod(rem, len(open_))
        for i, c in enumerate(open_):
            add = min(candidates[c] - quota[c], share + (1 if i < extra else 0))
            quota[c] += add
            rem -= add
    return quota


def check_next_tower(model: nn.Module, method: str) -> None:
    """The LLaVA-NeXT parts the reducers need; the CLIP tower itself is checked as on LLaVA-1.5
    (``reducer.check_reducible``)."""
    inner = getattr(model, "model", None)
    if getattr(inner, "image_newline", None) is None or not hasattr(inner, "pack_image_features"):
        raise MethodError(f"method {method!r}: LLaVA-NeXT model without model.model.image_newline / "
                          "pack_image_features")


class NextVisualReducer(QwenVisualReducer):
    """Tower hooks + the engine selector that keeps ``k`` packed visual rows per image from layer 0 on
    (LLaVA-NeXT). After each image encoding ``method.last_selection`` is, per image, the (k,)
    ascending kept packed-row indices; ``self.packing`` the images' ``PackedRows``."""

    inputs_hint = "pixel_values and image_sizes"

    def __init__(self, model: nn.Module, method: Any, k: int) -> None:
        super().__init__(model, method, k)
        self.packing: list[PackedRows] = []

    def __enter__(self) -> NextVisualReducer:
        inner = self.model.model
        if "pack_image_features" in inner.__dict__:
            raise MethodError(f"method {self.name!r}: a reducer is already installed on this model")
        layer = tower_layers(self.model)[feature_layer_index(self.model)]
        self._handles = [
            inner.register_forward_pre_hook(self._check_call, with_kwargs=True),
            layer.self_attn.register_forward_pre_hook(self._grab_attn, with_kwargs=True),
            layer.self_attn.q_proj.register_forward_hook(self._grab_projection("q")),
            layer.self_attn.k_proj.register_forward_hook(self._grab_projection("k")),
            inner.multi_modal_projector.register_forward_pre_hook(self._grab_features),
        ]
        original = inner.pack_image_features

        def pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
            packed, lens = original(image_features, image_sizes, vision_feature_select_strategy,
                                    image_newline=image_newline)
            return self._reduce(list(image_features), image_sizes, packed), lens

        inner.pack_image_features = pack
        return self

    def __exit__(self, *exc: Any) -> None:
        self.model.model.__dict__.pop("pack_image_features", None)
        super().__exit__(*exc)

    def _check_call(self, module, args, kwargs) -> None:
        if kwargs.get("pixel_values") is not None:
            self.keep = None

    def _grab_attn(self, module, args, kwargs) -> None:
        self._cap["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _grab_projection(self, which: str):  # the tower's own q/k projections: not repeated
        def hook(module, args, output) -> None:
            self._cap[which] = output
        return hook

    def _grab_features(self, module, args) -> None:
        self._cap["features"] = args[0]

    # --- the reduction ----------------------------------------------------------------------
    def _crop_tokens(self, index: int, rows: torch.Tensor, crop_rows: PackedRows, packed: torch.Tensor,
                     ctx: dict[str, torch.Tensor], first_crop: int, text: torch.Tensor | None = None,
                     relevance: torch.Tensor | None = None) -> ImageTokens:
        c, p = crop_rows.crop[rows] + first_crop, crop_rows.patch[rows]
        rel = None if relevance is None else relevance[crop_rows.crop[rows], p]
        return ImageTokens(index=index, tokens=packed[rows], score=ctx["score"][c, p], keys=ctx["keys"][c, p + 1],
                           grid=(1, len(rows), 1), features=ctx["features"][c, p], text=text, relevance=rel)

    def _image_texts(self, n_images: int) -> list[torch.Tensor] | None:
        """Text-guided methods: per image, its sample's text embeddings (``reduce_inputs`` encoded the
        instructions and mapped images to samples, ``image_samples``)."""
        m = self.method
        if not getattr(m, "needs_text", False):
            return None
        samples = getattr(m, "_image_samples", None)
        if m._texts is None or samples is None or len(samples) != n_images:
            raise MethodError(f"method {self.name!r}: no instruction encoded for the {n_images} image(s) of this "
                              "call; run inputs (with inputs['instruction']) through method.reduce_inputs first")
        return [m._texts[int(s)] for s in samples]

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        """(m, C) vision-space tokens -> (m, D) through the model's projector (TRIM's pooled token)."""
        saved = self._cap.get("features")
        try:
            return self.model.model.multi_modal_projector(feats[None])[0]
        finally:
            self._cap["features"] = saved

    def _reduce(self, image_features: list[torch.Tensor], image_sizes: Any, packed: list[torch.Tensor]
                ) -> list[torch.Tensor]:
        crops = [int(f.shape[0]) for f in image_features]
        patches = int(image_features[0].shape[1])
        self.packing = packing_map(self.model, crops, image_sizes, patches, packed[0].device)
        self.selection = [torch.arange(len(p), device=packed[0].device) for p in packed]
        keep = [torch.ones(len(p), dtype=torch.bool, device=packed[0].device) for p in packed]
        if all(self.k >= len(p) for p in packed):
            self.keep, self.method.last_selection = torch.cat(keep), self.selection
            return packed
        out = list(packed)
        with torch.no_grad():
            layer = feature_layer_index(self.model)
            vctx = VisionContext(model=self.model, features=self._cap["features"], projected=torch.cat(image_features),
                                 cls_hidden=None, attn_inputs={layer: self._cap["x"]},
                                 attn_qk={layer: (self._cap["q"], self._cap["k"])})
            keys = vctx.keys(layer)  # (crops, H, 1+N, hd)
            ctx = {"score": vctx.cls_attention(layer).mean(dim=1), "features": self._cap["features"],
                   "keys": keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], -1)}
            texts = self._image_texts(len(packed))
            first = 0
            for i, (rows_map, tokens) in enumerate(zip(self.packing, packed, strict=True)):
                if self.k < len(tokens):
                    text = rel = None
                    if texts is not None:  # per image: all its crops' patches (padded ones too) vs its text
                        text = texts[i]
                        rel = self.method.next_relevance(self.model, ctx["features"][first:first + crops[i]], text)
                    idx, new = self._select_image(i, rows_map, tokens, ctx, first, text, rel)
                    keep[i] = torch.zeros_like(keep[i])
                    keep[i][idx] = True
                    if new is not None:
                        out[i] = tokens.clone()
                        out[i][idx] = new.to(tokens.dtype)
                    self.selection[i] = idx
                first += crops[i]
        self.keep, self.method.last_selection = torch.cat(keep), self.selection
        return out

    def _select_image(self, i: int, rows_map: PackedRows, tokens: torch.Tensor, ctx: dict[str, torch.Tensor],
                      first: int, text: torch.Tensor | None = None, relevance: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k',) ascending kept packed rows of image ``i`` and their new contents (``None``: unchanged).

        ``method.pooled_token`` (TRIM): while ``k`` is below the image's patch rows, ``k - 1`` patch rows
        are picked (split over the crops) and the image's last packed row (its final newline row) gets
        the projected mean of the vision features of its other patch rows."""
        cand = rows_map.is_patch.nonzero().squeeze(-1).to(tokens.device)
        pool = bool(getattr(self.method, "pooled_token", False)) and 0 < self.k < len(cand)
        k_patch = min(self.k, len(cand)) - int(pool)
        if getattr(self.method, "crop_wise", True):
            groups = [cand[rows_map.crop[cand] == c] for c in range(int(rows_map.crop.max()) + 1)]
        else:
            groups = [cand]
        quotas = crop_quotas(k_patch, [len(g) for g in groups])
        kept, contents, changed = [], [], False
        for g, q in zip(groups, quotas, strict=True):
            if q == 0:
                continue
            if q >= len(g):
                kept.append(g)
                contents.append(tokens[g])
                continue
            idx, new = self.method.reduce_image(self._crop_tokens(i, g, rows_map, tokens, ctx, first, text, relevance),
                                                q)
            if idx.numel() != q or (idx.numel() and (idx.diff() <= 0).any()):
                raise MethodError(f"method {self.name!r} kept {idx.tolist()} of a crop of image {i}; "
                                  f"expected {q} ascending indices")
            kept.append(g[idx])
            contents.append(tokens[g[idx]] if new is None else new)
            changed |= new is not None
        if pool:
            newlines = (~rows_map.is_patch).nonzero().squeeze(-1).to(tokens.device)
            if not len(newlines):
                raise MethodError(f"method {self.name!r}: image {i} has no newline row for the pooled token")
            taken = torch.cat(kept) if kept else cand[:0]
            rest = cand[~torch.isin(cand, taken)]
            feats = ctx["features"][rows_map.crop[rest] + first, rows_map.patch[rest]]
            kept.append(newlines[-1:])
            contents.append(self._project(feats.mean(0, keepdim=True)).to(tokens.dtype))
            changed = True
        newline = (~rows_map.is_patch).nonzero().squeeze(-1).to(tokens.device)[:max(self.k - len(cand), 0)]
        rows = torch.cat([*kept, newline])
        order = rows.argsort()
        new_all = torch.cat([*contents, tokens[newline]])[order] if changed else None
        return rows[order], new_all
