"""Input resizing (Qwen2-VL / Qwen2.5-VL): the image is shrunk until it yields at most ``k`` visual
tokens; DOP's ``n_v`` front end for Qwen2.5-VL (paper-notes.md section 3) and a baseline.

Qwen's processor turns an image of ``H x W`` pixels into ``(H / 28) x (W / 28)`` LLM tokens (14 px
patches, 2 x 2 merged), so fewer tokens means a smaller image. This works on an *encoded* batch, so
it composes with any prompt the processor made: each image is rebuilt from its flattened patches,
resized to the largest ``28``-multiple size with the same aspect ratio and at most ``k`` tokens
(``smart_resize``'s rule with ``max_pixels = k * 28^2``), re-patchified in the processor's layout,
and its run of ``<|image_pad|>`` placeholders (with ``image_grid_thw``, ``attention_mask`` and
``mm_token_type_ids``) is rewritten; the padding side of the batch is kept. Deviation: the resize
is bicubic (antialiased) on the normalised tensor, where the processor resizes the 8-bit image with
PIL before normalising; the two differ by interpolation-kernel and rounding detail only.

Knob: ``k``, the visual tokens per image at most (an image already at or below ``k`` is untouched);
FLOPs count ``k`` per image, an upper bound when the aspect ratio leaves fewer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dop.engine.baselines.base import Method, MethodError, check_int, uniform_schedule
from dop.ops import VISION

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def target_grid(h: int, w: int, k: int, merge: int) -> tuple[int, int]:
    """(h', w') patch grid, multiples of ``merge``, same aspect as (h, w), ``h' w' / merge^2 <= k``."""
    tokens = h * w // merge**2
    if tokens <= k:
        return h, w
    beta = math.sqrt(tokens / k)
    hm, wm = max(1, math.floor(h / merge / beta)), max(1, math.floor(w / merge / beta))
    return hm * merge, wm * merge


def unpatchify(rows: torch.Tensor, gh: int, gw: int, merge: int, channels: int, temporal: int,
               patch: int) -> torch.Tensor:
    """(C, gh * patch, gw * patch) image from the processor's (gh * gw, C * T * P * P) rows (frame 0)."""
    x = rows.reshape(gh // merge, gw // merge, merge, merge, channels, temporal, patch, patch)[:, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6)  # (C, gh/m, m, P, gw/m, m, P)
    return x.reshape(channels, gh * patch, gw * patch)


def patchify(image: torch.Tensor, merge: int, temporal: int, patch: int) -> torch.Tensor:
    """The processor's layout: (C, H, W) -> (gh * gw, C * T * P * P), the frame repeated ``T`` times."""
    C, H, W = image.shape
    gh, gw = H // patch, W // patch
    x = image.reshape(C, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], temporal, patch, patch)
    return x.reshape(gh * gw, C * temporal * patch * patch)


class InputResize(Method):
    name: ClassVar[str] = "resize"
    kind: ClassVar[str] = "pre_llm"
    knob: ClassVar[str] = "keep"
    paper_convention: ClassVar[str | None] = "fastv"
    defaults: ClassVar[dict] = {}

    def check_model(self, model: nn.Module) -> None:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in MODEL_TYPES:
            raise MethodError(f"method 'resize' (input resizing) supports model types {list(MODEL_TYPES)} "
                              f"(Qwen2-VL, Qwen2.5-VL: any image size); got {mtype!r}")

    def knob_values(self, groups: Mapping[str, int], num_layers: int) -> list[Any]:
        """1..the visual rows: an image cannot shrink to no tokens (``reduce_inputs`` needs ``k >= 1``)."""
        return list(range(1, int(groups.get(VISION, 0)) + 1))

    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        k = min(check_int("knob (visual tokens)", knob, 0, method=self.name), int(groups.get(VISION, 0)))
        return uniform_schedule({**groups, VISION: k}, num_layers, {})

    def reduce_inputs(self, model: nn.Module, inputs: Mapping[str, Any], knob: Any) -> Mapping[str, Any]:
        self.check_model(model)
        k = check_int("knob (visual tokens)", knob, 1, method=self.name)
        out = {key: v for key, v in inputs.items() if key != "instruction"}
        if "pixel_values_videos" in out or out.get("pixel_values") is None:
            raise MethodError("method 'resize': needs image inputs (pixel_values, image_grid_thw), no videos")
        visual = model.model.visual
        vc = model.config.vision_config
        merge, patch, temporal = int(visual.spatial_merge_size), int(vc.patch_size), int(vc.temporal_patch_size)
        channels = out["pixel_values"].shape[1] // (temporal * patch * patch)
        grids, pixels, counts = [], [], []
        start = 0
        for t, gh, gw in out["image_grid_thw"].tolist():
            n = t * gh * gw
            rows = out["pixel_values"][start : start + n]
            start += n
            nh, nw = target_grid(gh, gw, k, merge)
            if t != 1 or (nh, nw) == (gh, gw):
                grids.append([t, gh, gw])
                pixels.append(rows)
                counts.append(n // merge**2)
                continue
            image = unpatchify(rows.float(), gh, gw, merge, channels, temporal, patch)
            small = F.interpolate(image[None], size=(nh * patch, nw * patch), mode="bicubic",
                                  align_corners=False, antialias=True)[0]
            pixels.append(patchify(small, merge, temporal, patch).to(rows.dtype))
            grids.append([1, nh, nw])
            counts.append(nh * nw // merge**2)
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(grids, dtype=out["image_grid_thw"].dtype,
                                             device=out["image_grid_thw"].device)
        return self._rewrite_prompt(model, out, counts)

    @staticmethod
    def _rewrite_prompt(model: nn.Module, out: dict, counts: list[int]) -> dict:
        """Each image's placeholder run gets its new count; per-token tensors follow; padding kept."""
        ids = out["input_ids"]
        if out.get("attention_mask") is None:
            out["attention_mask"] = torch.ones_like(ids)
        mask = out["attention_mask"]
        token = int(model.config.image_token_id)
        per_token = [key for key, v in out.items() if torch.is_tensor(v) and v.shape == ids.shape]
        right = bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any())
        image = 0
        rows: dict[str, list[torch.Tensor]] = {key: [] for key in per_token}
        for b in range(ids.shape[0]):
            keep = mask[b].bool().clone()
            runs: list[list[int]] = []
            for p in ((ids[b] == token) & keep).nonzero()[:, 0].tolist():
                if runs and p == runs[-1][-1] + 1:
                    runs[-1].append(p)
                else:
                    runs.append([p])
            for run in runs:
                if image >= len(counts) or len(run) < counts[image]:
                    raise MethodError(f"method 'resize': the prompt's image placeholder runs do not match "
                                      f"image_grid_thw ({len(counts)} images)")
                keep[run[counts[image]:]] = False
                image += 1
            for key in per_token:
                rows[key].append(out[key][b][keep])
        if image != len(counts):
            raise MethodError(f"method 'resize': {image} placeholder runs for {len(counts)} images")
        width = max(len(r) for r in rows["input_ids"])
        pad = model.config.get_text_config().pad_token_id
        for key in per_token:
            fill = int(pad) if key == "input_ids" and pad is not None else 0
            new = out[key].new_full((ids.shape[0], width), fill)
            for b, r in enumerate(rows[key]):
                new[b, slice(0, len(r)) if right else slice(width - len(r), width)] = r
            out[key] = new
        return out

    @contextmanager
    def apply(self, model: nn.Module, knob: Any) -> Iterator[Any]:
        self.check_model(model)  # the work is all in reduce_inputs: nothing to install
        yield self

