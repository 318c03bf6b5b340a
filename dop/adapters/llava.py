"""LLaVA-1.5 (``LlavaForConditionalGeneration``), LLaVA-NeXT and LLaVA-OneVision.

All three scatter image features at ``config.image_token_index`` positions. LLaVA-NeXT's image
token count varies with the image size (anyres) and its per-row newline features carry the image
token id too, so the same rule finds them; nothing here knows a count.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from dop.adapters.base import Adapter


def _tower_rows(config) -> int:
    """Patch rows of one tower input (an image on LLaVA-1.5, a crop on LLaVA-NeXT)."""
    vc = config.vision_config
    return (int(vc.image_size) // int(vc.patch_size)) ** 2


class LlavaAdapter(Adapter):
    family = "llava"

    @property
    def reference_rows(self) -> int | None:
        return _tower_rows(self.config)


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: token budgets are per crop, as the official ports state them (``visual_token_num``
    per crop; 640/320/160 of 2880 on the 7B = 128/64/32 of each of its 5 crops): a sample gets ``k``
    times its crops over the most crops an image can have (the largest pinpoint grid + the base
    crop), so a full 5-crop image gets ``k`` and a 3-crop one ``3k/5``."""

    family = "llava_next"

    def crops(self, image_size: tuple[int, int]) -> int:
        """Tower inputs of one (height, width) image: its anyres grid + the base crop."""
        return int(image_size_to_num_patches(list(image_size), self.config.image_grid_pinpoints,
                                             int(self.config.vision_config.image_size)))

    @property
    def max_crops(self) -> int:
        side = int(self.config.vision_config.image_size)
        return 1 + max((int(h) // side) * (int(w) // side) for h, w in self.config.image_grid_pinpoints)

    def budget_units(self, image_sizes: Sequence[tuple[int, int]]) -> float:
        return sum(self.crops(s) for s in image_sizes) / self.max_crops

    @property
    def reference_rows(self) -> int | None:
        return self.max_crops * _tower_rows(self.config)


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    vision_token_fields = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
