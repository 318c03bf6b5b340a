"""LLaVA-1.5 (``LlavaForConditionalGeneration``), LLaVA-NeXT and LLaVA-OneVision.

All three scatter image features at ``config.image_token_index`` positions. LLaVA-NeXT's image
token count varies with the image size (anyres) and its per-row newline features carry the image
token id too, so the same rule finds them; nothing here knows a count.
"""

from __future__ import annotations

from dop.adapters.base import Adapter


class LlavaAdapter(Adapter):
    family = "llava"


class LlavaNextAdapter(Adapter):
    family = "llava_next"


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    vision_token_fields = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
