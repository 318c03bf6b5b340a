"""The adapter protocol: model-family facts the engine needs, and nothing else.

An adapter finds the decoder layers and the module whose forward receives ``input_ids``, and maps
each sample's ``input_ids`` to token groups. Groups are boolean masks over the sequence; padding is
in no group (design.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dop.errors import DopError
from dop.flops import text_config
from dop.ops import INSTRUCTION, PROMPT_GROUPS, SYSTEM, VISION


class AdapterError(DopError, ValueError):
    """The model or its inputs do not fit what the adapter expects."""


class Adapter:
    """Base adapter for MLLMs whose image features are scattered into the LM sequence.

    Subclasses set ``family`` (registered by model_type in ``dop.adapters.ADAPTERS``) and override what differs (layer path, the image
    token ids). The default group rule (design.md §3): ``vision`` = positions whose id is an image
    (or video) placeholder id; ``system`` = non-padding positions before the first of them;
    ``instruction`` = every other non-padding position (after the last image, and text between
    images). Without image tokens a sample is all ``instruction``.
    """

    family: str = "base"
    layer_path: tuple[str, ...] = ("model", "language_model", "layers")
    # Config fields holding placeholder ids, tried in order; all found ones count as vision.
    vision_token_fields: tuple[str, ...] = ("image_token_id", "image_token_index", "video_token_id")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self._layers = self._find_layers()

    # --- structure ---------------------------------------------------------------------------
    def _find_layers(self) -> nn.ModuleList:
        obj: object = self.model
        for name in self.layer_path:
            obj = getattr(obj, name, None)
            if obj is None:
                raise AdapterError(
                    f"{type(self.model).__name__}: no decoder layers at {'.'.join(self.layer_path)} "
                    f"(adapter {self.family!r})"
                )
        if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
            raise AdapterError(f"{type(self.model).__name__}: {'.'.join(self.layer_path)} is not a layer list")
        return obj

    def decoder_layers(self) -> nn.ModuleList:
        return self._layers

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def text_config(self):
        return text_config(self.config)

    def input_module(self) -> nn.Module:
        """The module whose forward sees ``input_ids``, ``attention_mask`` and the cache."""
        inner = getattr(self.model, "model", None)
        return inner if isinstance(inner, nn.Module) else self.model

    @property
    def group_names(self) -> tuple[str, ...]:
        return PROMPT_GROUPS

    # --- token groups -------------------------------------------------------------------------
    def vision_token_ids(self) -> list[int]:
        ids = []
        for field in self.vision_token_fields:
            value = getattr(self.config, field, None)
            if isinstance(value, int) and value >= 0 and value not in ids:
                ids.append(value)
        if not ids:
            raise AdapterError(
                f"{type(self.model).__name__}: config has none of {self.vision_token_fields} "
                f"to find the image tokens"
            )
        return ids

    def vision_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.vision_token_ids(), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def token_groups(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{group: (B, T) bool}`` for a prompt batch; groups are disjoint, padding in none."""
        if input_ids.dim() != 2:
            raise AdapterError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask[:, -input_ids.shape[1]:].bool()
        )
        vision = self.vision_mask(input_ids) & valid
        # Positions before the first vision token of each sample form the system group.
        seen = vision.long().cumsum(dim=1) > 0
        has_vision = vision.any(dim=1, keepdim=True)
        system = valid & ~seen & has_vision
        instruction = valid & ~vision & ~system
        return {SYSTEM: system, VISION: vision, INSTRUCTION: instruction}

    # --- token budgets ---------------------------------------------------------------------------
    def budget_units(self, image_sizes: Sequence[tuple[int, int]]) -> float:
        """How many times a token budget's ``k`` a sample with images of these (height, width)
        sizes gets: one per image (a ``k``-token budget keeps ``k`` tokens' worth per image)."""
        return float(len(image_sizes))

    @property
    def reference_rows(self) -> int | None:
        """The visual rows of the input a token budget's ``k`` is stated for (LLaVA-1.5: one image,
        576 on the 7B), or None where the count depends on the image (Qwen-VL)."""
        return None

    def check_inputs(self, kwargs: dict) -> None:
        """Fail early, naming the field, when a prefill's inputs cannot be grouped or run."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise AdapterError(
                "input_ids is required: the engine finds token groups from input_ids "
                "(inputs_embeds alone cannot be grouped)"
            )
        has_images = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos",
                                                             "mm_encoder_outputs", "inputs_embeds"))
        n_vision = int(self.vision_mask(input_ids).sum())
        if n_vision and not has_images:
            raise AdapterError(
                f"images missing: input_ids hold {n_vision} image tokens but pixel_values is None"
            )
