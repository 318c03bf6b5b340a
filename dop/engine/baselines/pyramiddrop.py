"""PyramidDrop (Xing et al., CVPR'25, ``Cooperx521/PyramidDrop``): staged visual-token dropping.

At each stage boundary ``l`` of ``layer_list`` the visual rows still present are scored by the
attention of the **last instruction token** (the last prompt row), computed with layer ``l``'s
q/k projections on layer ``l``'s input (PDrop's "next layer's projections on the current hidden")
before layer ``l`` runs, which then reuses those keys for the rows it keeps, head-averaged; the top ``floor(n_img * ratio_s)`` stay from layer ``l`` on (``n_img`` = the sample's
original visual tokens). Kept rows keep their original positions (PDrop re-indexes positions
contiguously; dop's engine always uses original positions, see ``baselines.md`` 2.2).

Depth scaling: ``layer_list`` refers to a ``reference_layers``-deep model (LLaVA-1.5-7B: 32); on a
model of L layers each boundary becomes ``round(l * L / reference_layers)`` (at least 1, strictly
increasing, below L), e.g. ``[8, 16, 24] -> [1, 2, 3]`` on 4 layers.

Knob: a schedule choice ``(first, scale)``. The boundaries are remapped linearly so the first one is
at layer ``first`` and the last stage keeps its end (``[8,16,24]`` with first=2 -> ``[2,12,22]``),
and every ratio is multiplied by ``scale`` (capped at 1). ``(first default, 1.0)`` is the paper's
schedule. The paper's layers alone cannot reach a 128- or 64-token average on 32 layers (8 dense
layers already average 144): with ``first_layers: [8]`` such budgets are unreachable and budget
matching reports the nearest reachable one; the default candidate set (``first_layers: null``, every
first layer up to the paper's) also moves the first stage. ``first_layers`` are in layers of the
reference depth, like ``layer_list``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dop import flops
from dop.engine.baselines.base import (
    Method,
    MethodError,
    last_rows,
    scale_layers,
    topk_rows,
    uniform_schedule,
)
from dop.ops import INSTRUCTION, VISION


def last_instruction_rows(groups: Mapping[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """(B, 1): each sample's last instruction row (its last valid row when it has none)."""
    instr = groups.get(INSTRUCTION)
    if instr is None:
        return last_rows(valid)
    return torch.where(instr.any(dim=1, keepdim=True), last_rows(instr), last_rows(valid))


class _PDropSelector:
    def __init__(self, stages: list[tuple[int, float]]) -> None:
        self.stages = dict(stages)
        self.n_img: torch.Tensor | None = None

    def before_layer(self, ctx) -> None:
        if ctx.layer_idx == 0:
            self.n_img = ctx.groups[VISION].sum(dim=1)
        ratio = self.stages.get(ctx.layer_idx)
        if ratio is None:
            return
        allowed = ctx.groups[VISION] & ctx.keep("kv")
        # this layer's own attention decides its own rows: the keys are projected here, on the rows
        # still present, and the layer reuses them for the rows it keeps
        probs = ctx.attention_probs(last_instruction_rows(ctx.groups, ctx.valid))
        score = probs.float().mean(dim=1)[:, 0]
        kept = topk_rows(score, allowed, _counts(self.n_img, ratio))
        ctx.drop(allowed & ~kept)


def _count(n_img: int, ratio: float) -> int:
    return int(math.floor(n_img * ratio + 1e-9))


def _counts(n_img: torch.Tensor, ratio: float) -> torch.Tensor:
    """``_count`` per sample on a tensor (float64, the same arithmetic as Python floats)."""
    return torch.floor(n_img.double() * ratio + 1e-9).long()


class PyramidDrop(Method):
    name = "pdrop"
    knob = "schedule"  # (first stage layer, ratio scale)
    paper_convention = "pdrop"
    defaults = {"layer_list": [8, 16, 24], "ratio_list": [0.5, 0.25, 0.125], "reference_layers": 32,
                "first_layers": None, "ratio_scales": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05]}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        layers, ratios = list(self.hparams["layer_list"]), [float(r) for r in self.hparams["ratio_list"]]
        if not layers or len(layers) != len(ratios):
            raise MethodError(f"pdrop: layer_list {layers} and ratio_list {ratios} must be non-empty "
                              "and of equal length")
        if any(not isinstance(x, int) or x < 1 for x in layers) or layers != sorted(set(layers)):
            raise MethodError(f"pdrop: layer_list must be strictly increasing ints >= 1, got {layers}")
        if any(not 0 < r <= 1 for r in ratios) or ratios != sorted(ratios, reverse=True):
            raise MethodError(f"pdrop: ratio_list must be non-increasing ratios in (0, 1], got {ratios}")
        if any(not 0 < float(s) for s in self.hparams["ratio_scales"]):
            raise MethodError(f"pdrop: ratio_scales must be > 0, got {self.hparams['ratio_scales']}")
        self.layers, self.ratios = layers, ratios

    def stages(self, num_layers: int, knob: Any) -> list[tuple[int, float]]:
        """``[(boundary layer, ratio of the original visual tokens kept from it on), ...]``."""
        base = scale_layers(self.layers, self.hparams["reference_layers"], num_layers, method=self.name)
        first, scale = self._parse(knob, base)
        if first != base[0]:
            span = (num_layers - first) / (num_layers - base[0])
            layers = [first + round((b - base[0]) * span) for b in base]
            if layers != sorted(set(layers)) or layers[-1] >= num_layers:
                raise MethodError(f"pdrop: first stage layer {first} gives boundaries {layers} "
                                  f"on {num_layers} layers")
        else:
            layers = base
        return [(layer, min(1.0, r * scale)) for layer, r in zip(layers, self.ratios)]

    def _parse(self, knob: Any, base: list[int]) -> tuple[int, float]:
        if knob is None:
            return base[0], 1.0
        if isinstance(knob, Mapping):
            knob = (knob.get("first"), knob.get("scale"))
        if not isinstance(knob, (tuple, list)) or len(knob) != 2:
            raise MethodError(f"pdrop: knob must be (first stage layer, ratio scale), got {knob!r}")
        first, scale = knob
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= base[0]:
            raise MethodError(f"pdrop: first stage layer must be an int in 1..{base[0]}, got {first!r}")
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise MethodError(f"pdrop: ratio scale must be > 0, got {scale!r}")
        return first, float(scale)

    def knob_values(self, groups: Mapping[str, int], num_layers: int) -> list[Any]:
        base = scale_layers(self.layers, self.hparams["reference_layers"], num_layers, method=self.name)
        ref = self.hparams["reference_layers"]
        wanted = self.hparams["first_layers"]  # in layers of the reference depth, like layer_list
        firsts = (range(1, base[0] + 1) if not wanted
                  else sorted({min(base[0], max(1, round(int(f) * num_layers / ref))) for f in wanted}))
        values, seen = [], set()
        for first in firsts:
            for scale in self.hparams["ratio_scales"]:
                key = tuple(tuple(d.items()) for d in self.schedule(groups, num_layers, (first, float(scale))))
                if key not in seen:  # distinct schedules only
                    seen.add(key)
                    values.append((first, float(scale)))
        return values

    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        n = int(groups.get(VISION, 0))
        changes = {layer: {VISION: _count(n, r)} for layer, r in self.stages(num_layers, knob)}
        return uniform_schedule(groups, num_layers, changes)

    def selectors(self, model: nn.Module, knob: Any) -> list[Any]:
        return [_PDropSelector(self.stages(flops.num_layers(model), knob))]
