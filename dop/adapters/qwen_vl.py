"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Image features sit at ``<|image_pad|>`` positions between ``<|vision_start|>`` and
``<|vision_end|>``; the markers themselves are text (system before, instruction after). Positions
are 3-D M-RoPE, but the decoder layers receive per-token (cos, sin), which the engine gathers by
sequence index, so nothing M-RoPE-specific is needed here. Qwen3-VL's deepstack adds visual features
between layers on full-length hidden states, which the engine keeps full length.
"""

from __future__ import annotations

from dop.adapters.base import Adapter, AdapterError


class _QwenVLAdapter(Adapter):
    vision_token_fields = ("image_token_id", "video_token_id")

    def check_inputs(self, kwargs: dict) -> None:
        super().check_inputs(kwargs)
        if kwargs.get("pixel_values") is not None and kwargs.get("image_grid_thw") is None:
            raise AdapterError("image_grid_thw is required with pixel_values for Qwen-VL models")


class Qwen2VLAdapter(_QwenVLAdapter):
    family = "qwen2_vl"


class Qwen25VLAdapter(_QwenVLAdapter):
    family = "qwen2_5_vl"


class Qwen3VLAdapter(_QwenVLAdapter):
    family = "qwen3_vl"
