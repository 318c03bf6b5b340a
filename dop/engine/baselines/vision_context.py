"""What a pre-LLM reducer sees of the vision tower: its encoder layers, the feature layer, and
``VisionContext`` (one projector call's captured features and attention inputs). Below ``reducer`` and
the per-family vision access, which all read the tower through it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dop.engine.baselines.base import MethodError


def tower_layers(model: nn.Module) -> nn.ModuleList:
    """The CLIP-like encoder layers of the model's vision tower."""
    tower = model.model.vision_tower
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


def feature_layer_index(model: nn.Module) -> int:
    """The encoder layer whose output is ``hidden_states[vision_feature_layer]`` (-2 -> L-2)."""
    n = len(tower_layers(model))
    f = int(model.config.vision_feature_layer)
    return f % (n + 1) - 1


class VisionContext:
    """Everything captured for one projector call (``n`` images, ``N`` patches each).

    ``features`` (n, N, C): the projector input (patch features of the feature layer); ``cls_hidden``
    (n, C): the [CLS] hidden state there; ``attn_inputs``: layer -> (n, 1+N, C) ``self_attn`` input;
    ``attn_qk``: layer -> the tower's own ``q_proj``/``k_proj`` outputs there (n, 1+N, C each), so keys
    are not projected a second time; ``texts``: per image, text embeddings (segments, P) for
    text-guided methods. ``projected`` (n, N, D), the projector output of every patch, is computed on
    first use only: a method that picks or merges in vision space projects just its ``k`` tokens.
    """

    def __init__(self, model: nn.Module, features: torch.Tensor, projected: torch.Tensor | None = None,
                 cls_hidden: torch.Tensor | None = None, attn_inputs: dict[int, torch.Tensor] | None = None,
                 texts: list[Any] | None = None, _project: Any = None,
                 attn_qk: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.model, self.features, self.cls_hidden = model, features, cls_hidden
        self.attn_inputs = dict(attn_inputs or {})
        self.attn_qk = dict(attn_qk or {})
        self.texts, self._project, self._projected = texts, _project, projected

    @property
    def projected(self) -> torch.Tensor:
        if self._projected is None:
            self._projected = self.project(self.features)
        return self._projected

    @property
    def has_projected(self) -> bool:
        """Whether every patch has been projected already (then gathering beats projecting again)."""
        return self._projected is not None

    @property
    def feature_layer(self) -> int:
        return feature_layer_index(self.model)

    @property
    def num_layers(self) -> int:
        return len(tower_layers(self.model))

    def _attn(self, layer: int) -> nn.Module:
        if layer not in self.attn_inputs:
            raise MethodError(f"vision layer {layer} was not captured; list it in attn_layers()")
        return tower_layers(self.model)[layer].self_attn

    def _k(self, layer: int) -> torch.Tensor:
        """(n, 1+N, C) ``k_proj`` output of ``layer``: the tower's own when captured."""
        attn = self._attn(layer)
        return self.attn_qk[layer][1] if layer in self.attn_qk else attn.k_proj(self.attn_inputs[layer])

    def cls_attention(self, layer: int | None = None) -> torch.Tensor:
        """(n, heads, N): softmax [CLS] row of ``layer`` (default: the feature layer) over all 1+N keys,
        restricted to the patch columns, from that layer's keys and its ``q_proj`` of the [CLS] row."""
        layer = self.feature_layer if layer is None else layer
        attn, x = self._attn(layer), self.attn_inputs[layer]
        n, t, _ = x.shape
        hd = attn.head_dim
        q = attn.q_proj(x[:, :1]).view(n, 1, -1, hd).transpose(1, 2)  # (n, H, 1, hd)
        k = self._k(layer).view(n, t, -1, hd).transpose(1, 2)  # (n, H, T, hd)
        w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
        return w[:, :, 0, 1:]

    def keys(self, layer: int) -> torch.Tensor:
        """(n, heads, 1+N, head_dim): the keys of ``layer`` ([CLS] first)."""
        attn, x = self._attn(layer), self.attn_inputs[layer]
        n, t, _ = x.shape
        return self._k(layer).view(n, t, -1, attn.head_dim).transpose(1, 2)

    def qk_full(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 1+N, C) un-split ``q_proj``/``k_proj`` outputs of ``layer`` (PruMerge's single-head view)."""
        attn, x = self._attn(layer), self.attn_inputs[layer]
        if layer in self.attn_qk:
            return self.attn_qk[layer]
        return attn.q_proj(x), attn.k_proj(x)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Run the multimodal projector on vision-space tokens (n, m, C) -> (n, m, D)."""
        return self._project(feats)

    def gather(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(n, m, X) rows ``index`` (n, m) of ``tokens`` (n, N, X)."""
        return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
