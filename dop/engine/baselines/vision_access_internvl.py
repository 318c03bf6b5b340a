"""InternVL vision-tower access for the pre-LLM reducers (``dop.engine.baselines.reducer``).

transformers' ``InternVLModel`` runs every tile of an image (the dynamic-resolution tiles and the
thumbnail, ``pixel_values`` (tiles, 3, H, W)) through InternViT on its own, drops each tile's [CLS]
token (``vision_feature_select_strategy="default"``), pixel-shuffles the tile's ``s x s`` patch grid
(``downsample_ratio`` 0.5: each 2 x 2 block of patches becomes one row of 4x the width) and projects
the rows; the LLM gets them, tile after tile, at the ``<IMG_CONTEXT>`` placeholders between
``<img>`` and ``</img>``. As on Qwen-VL and LLaVA-NeXT (``vision_access``, ``vision_access_next``)
the prompt is **not** shortened: the method keeps ``k`` of each image's visual rows and an engine
selector drops the others before decoder layer 0, kept rows at their original positions.

What a method sees per tile (``ImageTokens``; one tile = one "crop" as on LLaVA-NeXT):

- ``tokens`` (R, D): the projected rows of the tile (R = (s/2)^2, e.g. 256);
- ``score`` (R,): the tile's **[CLS] attention** at the feature layer (``vision_feature_layer``; -1 =
  the last layer), softmax over the tile's 1+N keys recomputed from that layer's ``q_proj``/``k_proj``
  (with its ``q_norm``/``k_norm``) on its captured input, head mean, then summed over the 4 patches
  pixel shuffle merged into each row;
- ``keys`` (R, C): that layer's keys (all heads concatenated) averaged over each row's 4 patches;
- ``features`` (R, 4C): the pixel-shuffled vision features of each row (the projector's input), on
  which VisPruner de-duplicates, as it does on the vision-tower features elsewhere.

Which patches a row merges comes from running the model's own ``pixel_shuffle`` on index-coded
patches (``shuffle_map``); the shuffle arithmetic is never re-implemented here.

Images and tiles. ``generate`` encodes the images before ``model.model`` runs, so the tower hooks do
not see the prompt; the selection is made at decoder layer 0, where it is: each maximal run of
visual positions of a sample is one image (``<img>``/``</img>`` separate images), its length / R its
tile count. ``k`` per image is split as evenly as possible over its tiles (remainder to the first
tiles, ``vision_access_next.crop_quotas``), each tile's share picked by ``method.reduce_image`` [dop:
no official InternVL port of these reducers exists; this is the per-crop rule of their LLaVA-NeXT
ports]. A merging method's new contents overwrite the kept rows' layer-0 input (``LayerContext.
replace``) where every operation of layer 0 keeps them. ``method.last_selection``: per image, the
kept row indices within the image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dop.engine.baselines.base import MethodError
from dop.engine.baselines.vision_access import ImageTokens, QwenVisualReducer
from dop.engine.baselines.vision_access_next import crop_quotas
from dop.ops import VISION, OpType

INTERNVL_MODEL_TYPES = ("internvl",)


def is_internvl(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in INTERNVL_MODEL_TYPES


def _tower_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.vision_tower.encoder.layer


def feature_layer(model: nn.Module) -> int:
    """The tower layer whose output the features are: -1 -> the last, f -> f - 1 (hidden_states[f])."""
    n = len(_tower_layers(model))
    return int(model.config.vision_feature_layer) % (n + 1) - 1


def check_internvl_tower(model: nn.Module, method: str) -> None:
    """The InternVL parts the reducers need: one feature layer with a [CLS] token to drop, the tower's
    attention projections, the pixel shuffle and the projector."""
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise MethodError(f"method {method!r}: a list vision_feature_layer {cfg.vision_feature_layer} is not "
                          "supported (one feature layer only)")
    if cfg.vision_feature_select_strategy != "default":
        raise MethodError(f"method {method!r}: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} "
                          "is not supported (only 'default': a [CLS] token)")
    try:
        inner = model.model
        attn = _tower_layers(model)[feature_layer(model)].attention
        attn.q_proj, attn.k_proj, attn.q_norm, attn.k_norm, inner.multi_modal_projector, inner.pixel_shuffle  # noqa: B018
    except (AttributeError, IndexError) as e:
        raise MethodError(f"method {method!r}: InternVL vision tower not found at model.model.vision_tower."
                          f"encoder.layer[i].attention (q_proj, k_proj, q_norm, k_norm) with "
                          f"model.model.pixel_shuffle / multi_modal_projector: {e}") from e


def shuffle_map(model: nn.Module, patches: int) -> torch.Tensor:
    """(R, m) the patch indices (raster order of the tile's ``patches``) merged into each row, in the
    order of the row's channel blocks; from the model's own ``pixel_shuffle`` on index-coded patches."""
    side = int(round(patches ** 0.5))
    if side * side != patches:
        raise MethodError(f"InternVL tile with {patches} patches is not a square grid")
    coded = torch.arange(patches, dtype=torch.float64).view(1, side, side, 1)
    out = model.model.pixel_shuffle(coded, scale_factor=float(model.config.downsample_ratio))
    return out.reshape(-1, out.shape[-1]).round().long()


def tile_tokens(model: nn.Module, attn_input: torch.Tensor, features: torch.Tensor,
                projected: torch.Tensor) -> list[ImageTokens]:
    """Per tile: projected rows, [CLS]-attention score and keys per row, pixel-shuffled features.

    ``attn_input`` (tiles, 1+N, C): the feature layer's attention input (after ``layernorm_before``);
    ``features`` (tiles, R, 4C) / ``projected`` (tiles, R, D): the projector's input / output."""
    attn = _tower_layers(model)[feature_layer(model)].attention
    n, t, _ = attn_input.shape
    hd = attn.head_dim
    q = attn.q_norm(attn.q_proj(attn_input[:, :1])).view(n, 1, -1, hd).transpose(1, 2)  # (n, H, 1, hd)
    k_flat = attn.k_norm(attn.k_proj(attn_input))  # (n, T, H*hd)
    k = k_flat.view(n, t, -1, hd).transpose(1, 2)
    cls = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)[:, :, 0, 1:]
    patch_score = cls.mean(dim=1)  # (n, N)
    rows = shuffle_map(model, t - 1).to(attn_input.device)  # (R, m)
    if rows.shape[0] != projected.shape[1]:
        raise MethodError(f"InternVL: {projected.shape[1]} rows per tile, but pixel shuffle of {t - 1} patches "
                          f"gives {rows.shape[0]}")
    score = patch_score[:, rows].sum(-1)  # (n, R)
    keys = k_flat[:, 1:].float()[:, rows].mean(2)  # (n, R, C)
    side = int(round(rows.shape[0] ** 0.5))
    return [ImageTokens(index=i, tokens=projected[i], score=score[i], keys=keys[i], grid=(1, side, side),
                        features=features[i]) for i in range(n)]


def image_runs(vision: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of visual positions, sample after sample (row-major: the order in
    which the model scatters image rows), one run per image."""
    runs = []
    for row in vision:
        pos = row.nonzero().squeeze(-1)
        if pos.numel() == 0:
            continue
        breaks = (pos.diff() > 1).nonzero().squeeze(-1) + 1
        edges = [0, *breaks.tolist(), pos.numel()]
        runs += [b - a for a, b in zip(edges[:-1], edges[1:])]
    return runs


class InternVisualReducer(QwenVisualReducer):
    """Tower hooks + the engine selector that keeps ``k`` visual rows per image from layer 0 on
    (InternVL). The hooks keep the feature layer's attention input and the projector's input and
    output of the call; the selection is made at layer 0 (see the module docstring)."""

    inputs_hint = "pixel_values"

    def __enter__(self) -> InternVisualReducer:
        inner = self.model.model
        layer = _tower_layers(self.model)[feature_layer(self.model)]
        self._tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._handles = [
            inner.register_forward_pre_hook(self._check_call, with_kwargs=True),
            layer.attention.register_forward_pre_hook(self._grab_attn, with_kwargs=True),
            inner.multi_modal_projector.register_forward_hook(self._grab_projector),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tiles = None
        super().__exit__(*exc)

    def _check_call(self, module, args, kwargs) -> None:
        if kwargs.get("pixel_values") is not None:  # a direct forward encodes its images after this hook
            self._tiles = None

    def _grab_attn(self, module, args, kwargs) -> None:
        self._cap["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _grab_projector(self, module, args, output) -> None:
        self._tiles = (self._cap.get("x"), args[0], output)

    # --- the engine selector ----------------------------------------------------------------
    def before_layer(self, ctx) -> None:
        if ctx.layer_idx != 0:
            return
        vision = ctx.groups[VISION] & ctx.valid
        n = int(vision.sum())
        tiles, self._tiles = self._tiles, None
        if n == 0:
            return
        if tiles is None:
            raise MethodError(f"method {self.name!r}: the prompt has {n} visual rows but the vision tower gave no "
                              f"image features in this call (pass {self.inputs_hint}, not precomputed features)")
        attn_x, features, projected = tiles
        count, per_tile = int(projected.shape[0]), int(projected.shape[1])
        if n != count * per_tile:
            raise MethodError(f"method {self.name!r}: the prompt has {n} visual rows but the vision tower gave "
                              f"{count} tile(s) of {per_tile} rows")
        runs = image_runs(vision)
        if any(r % per_tile for r in runs):
            raise MethodError(f"method {self.name!r}: images of {runs} visual rows are not whole tiles of {per_tile}")
        device = vision.device
        self.selection = [torch.arange(r, device=device) for r in runs]
        if all(self.k >= r for r in runs):
            self.method.last_selection = self.selection
            return
        keep = torch.ones(n, dtype=torch.bool, device=device)
        new = projected.reshape(n, -1).clone()
        changed = torch.zeros(n, dtype=torch.bool, device=device)
        with torch.no_grad():
            images = tile_tokens(self.model, attn_x, features, projected)
            lo, first = 0, 0
            for i, r in enumerate(runs):
                count_i = r // per_tile
                if self.k < r:
                    kept = []
                    for t, q in enumerate(crop_quotas(self.k, [per_tile] * count_i)):
                        if q == 0:
                            continue
                        if q >= per_tile:
                            kept.append(torch.arange(per_tile, device=device) + t * per_tile)
                            continue
                        idx, content = self.method.reduce_image(images[first + t], q)
                        if idx.numel() != q or (idx.numel() and (idx.diff() <= 0).any()):
                            raise MethodError(f"method {self.name!r} kept {idx.tolist()} of tile {t} of image {i}; "
                                              f"expected {q} ascending indices")
                        rows = idx.to(device) + t * per_tile
                        kept.append(rows)
                        if content is not None:
                            new[lo + rows] = content.to(new.dtype)
                            changed[lo + rows] = True
                    chosen = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=device)
                    keep[lo:lo + r] = False
                    keep[lo + chosen] = True
                    self.selection[i] = chosen
                lo += r
                first += count_i
        self.method.last_selection = self.selection
        if bool(changed.any()):
            rows = torch.zeros_like(vision)
            rows[vision] = changed
            kept_all = ctx.keep(OpType.Q) & ctx.keep(OpType.KV) & ctx.keep(OpType.MLP)
            rows &= kept_all  # rows a policy prunes at layer 0 keep their unmerged content
            values = ctx.hidden.clone()
            values[vision] = new.to(values.dtype)
            ctx.replace(rows, values)
        drop = torch.zeros_like(vision)
        drop[vision] = ~keep
        ctx.drop(drop, from_layer=0)
