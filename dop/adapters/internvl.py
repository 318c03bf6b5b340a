"""InternVL (transformers' ``InternVLForConditionalGeneration``, e.g. InternVL3-8B-hf).

``<img>`` + ``<IMG_CONTEXT>`` x 256 per tile + ``</img>``: the context tokens
(``config.image_token_id``) are the vision group; the ``<img>`` markers are text.
"""

from __future__ import annotations

from dop.adapters.base import Adapter


class InternVLAdapter(Adapter):
    family = "internvl"
    vision_token_fields = ("image_token_id",)
