"""DART (Wen et al., EMNLP'25, ``ZichenWen1/DART``): keep the least duplicated visual tokens.

At layer K (``pruned_layer``, default 2), per sample:

1. Pivots: the ``pivot_image_tokens`` visual rows and ``pivot_text_tokens`` instruction rows (text
   after the image) with the largest L1 norm of their **keys at layer K-1** (that layer's k_proj on
   its normed input, with RoPE at the row's position, like the cached keys DART reads; read while
   layer K-1 computes them, ``ctx.watch_attention(keys=True)``).
2. For each pivot in turn (by position), the ``budget // (pivots)`` visual rows least cosine-similar
   to it, on layer K-1's output hidden states after the final norm (DART passes ``model.norm``), among
   the visual rows not selected yet (visual pivots count as selected).
3. Kept visual rows = visual pivots + selections (about ``budget + pivot_image_tokens``, as in DART);
   the others leave every op from layer K on, the rest keeps original positions.

DART iterates the pivots in Python ``set`` order; we use position order (the same for small ints).
Knob: ``budget`` (DART's ``max_num_trunction``); distinct values are multiples of the pivot count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dop.adapters import get_adapter
from dop.engine.baselines.base import Method, MethodError, check_int, topk_rows, uniform_schedule
from dop.ops import INSTRUCTION, VISION


def dart_select(keys: torch.Tensor, states: torch.Tensor, vision: torch.Tensor, text: torch.Tensor,
                budget: int, pivot_image: int, pivot_text: int) -> torch.Tensor:
    """(B, T) bool kept visual rows (DART steps 1-3) from keys and hidden states (B, T, *).

    Batched: the pivots of every sample are taken in position order, one pivot per step (a fixed
    number of steps, ``pivot_image + pivot_text``); a sample with fewer pivots skips its last steps."""
    B, T = vision.shape
    per_pivot = budget // (pivot_image + pivot_text)
    norms = keys.float().abs().sum(-1)
    chosen = topk_rows(norms, vision, pivot_image)  # visual pivots count as selected
    if per_pivot == 0:
        return chosen
    pivots = chosen | topk_rows(norms, text, pivot_text)
    steps = pivot_image + pivot_text
    pos = torch.arange(T, device=vision.device).expand(B, T)
    order = torch.where(pivots, pos, torch.full_like(pos, T)).sort(dim=1).values[:, :steps]  # (B, steps)
    states = states.float()
    for step in range(order.shape[1]):
        p = order[:, step]
        present = p < T
        pivot = states.gather(1, p.clamp(max=T - 1)[:, None, None].expand(-1, 1, states.shape[-1]))
        neg_cos = -F.cosine_similarity(pivot, states, dim=-1)  # (B, T)
        cand = vision & ~chosen & present[:, None]
        chosen = chosen | topk_rows(neg_cos, cand, per_pivot)
    return chosen


def final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    for module in model.modules():
        if getattr(module, "layers", None) is layers and isinstance(getattr(module, "norm", None), nn.Module):
            return module.norm
    return None


class _DARTSelector:
    """Watches layer K-1's keys while that layer runs; selects at layer K."""

    def __init__(self, K: int, budget: int, pivots: tuple[int, int], norm: nn.Module | None) -> None:
        self.K, self.budget, self.pivots, self.norm = K, budget, pivots, norm
        self.probe = None

    def before_layer(self, ctx) -> None:
        if ctx.layer_idx == self.K - 1:
            self.probe = ctx.watch_attention(keys=True)
        elif ctx.layer_idx == self.K and self.probe is not None:
            keys, self.probe = self.probe.keys, None
            states = self.norm(ctx.hidden) if self.norm is not None else ctx.hidden
            vision = ctx.groups[VISION] & ctx.keep("kv")
            keep = dart_select(keys, states, vision, ctx.groups[INSTRUCTION] & ctx.keep("kv"),
                               self.budget, *self.pivots)
            ctx.drop(vision & ~keep)


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
        check_int("knob (budget)", knob, 0, method=self.name)
        layers = get_adapter(model).decoder_layers()
        pivots = (self.hparams["pivot_image_tokens"], self.hparams["pivot_text_tokens"])
        return [_DARTSelector(self._K(len(layers)), knob, pivots, final_norm(model, layers))]
