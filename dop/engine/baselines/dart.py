"""DART (Wen et al., EMNLP'25, ``ZichenWen1/DART``): keep the least duplicated visual tokens.

At layer K (``pruned_layer``, default 2), per sample:

1. Pivots: the ``pivot_image_tokens`` visual rows and ``pivot_text_tokens`` instruction rows (text
   after the image) with the largest L1 norm of their **keys at layer K-1** (that layer's k_proj on
   its normed input, with RoPE at the row's position, like the cached keys DART reads).
2. For each pivot in turn (by position), the ``budget // (pivots)`` visual rows least cosine-similar
   to it, on layer K-1's output hidden states after the final norm (DART passes ``model.norm``), among
   the visual rows not selected yet (visual pivots count as selected).
3. Kept visual rows = visual pivots + selections (about ``budget + pivot_image_tokens``, as in DART);
   the others leave every op from layer K on, the rest keeps original positions.

DART iterates the pivots in Python ``set`` order; we use position order (the same for small ints).
Knob: ``budget`` (DART's ``max_num_trunction``); distinct values are multiples of the pivot count.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dop.engine.baselines.base import Method, MethodError, check_int, uniform_schedule
from dop.ops import INSTRUCTION, VISION


def layer_keys(layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(B, T, kv_heads * head_dim) keys of ``layer`` on its input ``hidden``, RoPE applied."""
    attn = layer.self_attn
    B, T, _ = hidden.shape
    k = attn.k_proj(layer.input_layernorm(hidden)).view(B, T, -1, attn.head_dim)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    rotate_half = sys.modules[type(attn).__module__].rotate_half
    cos, sin = (t.expand(B, -1, -1).unsqueeze(1) for t in position_embeddings)
    k = k * cos + rotate_half(k) * sin
    return k.transpose(1, 2).reshape(B, T, -1)


def dart_select(keys: torch.Tensor, states: torch.Tensor, vision: torch.Tensor, text: torch.Tensor,
                budget: int, pivot_image: int, pivot_text: int) -> torch.Tensor:
    """(B, T) bool kept visual rows (DART steps 1-3) from keys and hidden states (B, T, *)."""
    keep = torch.zeros_like(vision)
    per_pivot = budget // (pivot_image + pivot_text)
    norms = keys.float().abs().sum(-1)
    for b in range(keys.shape[0]):
        vis, txt = vision[b].nonzero()[:, 0], text[b].nonzero()[:, 0]
        img_piv = vis[norms[b, vis].topk(min(pivot_image, len(vis))).indices]
        txt_piv = txt[norms[b, txt].topk(min(pivot_text, len(txt))).indices]
        chosen = set(img_piv.tolist())
        for p in sorted(chosen | set(txt_piv.tolist())):
            cand = torch.tensor([i for i in vis.tolist() if i not in chosen], dtype=torch.long)
            if len(cand) == 0 or per_pivot == 0:
                break
            neg_cos = -F.cosine_similarity(states[b, p].float()[None], states[b, cand].float(), dim=-1)
            chosen |= set(cand[neg_cos.topk(min(per_pivot, len(cand))).indices].tolist())
        keep[b, sorted(chosen)] = True
    return keep


def final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    for module in model.modules():
        if getattr(module, "layers", None) is layers and isinstance(getattr(module, "norm", None), nn.Module):
            return module.norm
    return None


class _DARTSelector:
    def __init__(self, K: int, budget: int, pivots: tuple[int, int], norm: nn.Module | None) -> None:
        self.K, self.budget, self.pivots, self.norm = K, budget, pivots, norm
        self.keys = None

    def before_layer(self, ctx) -> None:
        if ctx.layer_idx == self.K - 1:
            self.keys = layer_keys(ctx.layer, ctx.hidden, ctx.position_embeddings)
        elif ctx.layer_idx == self.K:
            states = self.norm(ctx.hidden) if self.norm is not None else ctx.hidden
            vision = ctx.groups[VISION] & ctx.keep("kv")
            keep = dart_select(self.keys, states, vision, ctx.groups[INSTRUCTION] & ctx.keep("kv"),
                               self.budget, *self.pivots)
            ctx.drop(vision & ~keep)
            self.keys = None


class DART(Method):
    name = "dart"
    knob = "budget"  # max_num_trunction: about budget + pivot_image_tokens visual rows kept
    paper_convention = "fastv"
    defaults = {"pruned_layer": 2, "pivot_image_tokens": 4, "pivot_text_tokens": 4}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        check_int("pruned_layer", self.hparams["pruned_layer"], 1, method=self.name)
        check_int("pivot_image_tokens", self.hparams["pivot_image_tokens"], 0, method=self.name)
        check_int("pivot_text_tokens", self.hparams["pivot_text_tokens"], 0, method=self.name)
        if self.hparams["pivot_image_tokens"] + self.hparams["pivot_text_tokens"] == 0:
            raise MethodError("dart: needs at least one pivot (pivot_image_tokens + pivot_text_tokens > 0)")

    def _K(self, num_layers: int) -> int:
        K = self.hparams["pruned_layer"]
        if K >= num_layers:
            raise MethodError(f"dart: pruned_layer={K} must be below the model's {num_layers} decoder layers")
        return K

    def kept(self, n_vision: int, n_text: int, budget: Any) -> int:
        """Visual rows DART keeps for one sample with these group sizes."""
        budget = check_int("knob (budget)", budget, 0, method=self.name)
        p_img, p_txt = self.hparams["pivot_image_tokens"], self.hparams["pivot_text_tokens"]
        per_pivot = budget // (p_img + p_txt)
        pivots = min(p_img, n_vision) + min(p_txt, n_text)
        return min(n_vision, min(p_img, n_vision) + (pivots * per_pivot if per_pivot else 0))

    def knob_values(self, groups: Mapping[str, int], num_layers: int) -> list[Any]:
        step = self.hparams["pivot_image_tokens"] + self.hparams["pivot_text_tokens"]
        return list(range(0, int(groups.get(VISION, 0)) + step, step))

    def nominal_knob(self, tokens: float, groups: Mapping[str, int], num_layers: int, images: int = 1,
                     reference_rows: float | None = None) -> Any:
        """DART's scripts set ``max_num_trunction`` to the token count (about that many rows kept)."""
        return int(round(tokens))

    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        keep = self.kept(int(groups.get(VISION, 0)), int(groups.get(INSTRUCTION, 0)), knob)
        return uniform_schedule(groups, num_layers, {self._K(num_layers): {VISION: keep}})

    def selectors(self, model: nn.Module, knob: Any) -> list[Any]:
        from dop.adapters import get_adapter

        check_int("knob (budget)", knob, 0, method=self.name)
        layers = get_adapter(model).decoder_layers()
        pivots = (self.hparams["pivot_image_tokens"], self.hparams["pivot_text_tokens"])
        return [_DARTSelector(self._K(len(layers)), knob, pivots, final_norm(model, layers))]
