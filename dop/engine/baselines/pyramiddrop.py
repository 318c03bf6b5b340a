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

Knob: a member ``(first, lam)`` of the paper's family of schedules. PyramidDrop splits the model
into stages and keeps ``lam^s`` of the image tokens in stage ``s`` (``ratio_list`` [0.5, 0.25, 0.125]
is ``lam = 0.5``, the paper's setting; it must be geometric). ``first`` moves the first boundary and
spaces the others evenly up to the last stage's end (``[8,16,24]`` with first=2 -> ``[2,12,22]``);
``lam`` sets every ratio (``lam, lam^2, lam^3``). ``(8, 0.5)`` is the paper's schedule.

Which members budget matching may pick (``knob_values``): ``lam`` on a grid of ``lambda_step``, at
least the paper's ``lam`` at every first layer, and below it only at the earliest one. Cheaper budgets
therefore first move the first stage earlier at the paper's ``lam`` (``[2, 12, 22]`` x 0.5 is about 192
tokens on LLaVA-1.5), and only then, from layer 1, drop harder between stages; the old (first layer,
ratio scale) grid picked schedules the paper never runs (e.g. 28/14/7 tokens from layer 6 at 128).
``first_layers`` (in layers of the reference depth, like ``layer_list``; null = 1..the paper's first)
restricts the first layers; ``[8]`` keeps the paper's layers, where 128 or 64 tokens are unreachable
(8 dense layers already average 144).

Nominal knob (``budget.match=nominal``, the literature's "PyramidDrop at k tokens"): the member whose
layer-averaged kept visual tokens are the most not above ``k``, in the same order (paper ``lam`` first).
The paper's own settings for 192/128/64 are not published in its code; this choice is ours.
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
    knob = "schedule"  # (first stage layer, lambda)
    paper_convention = "pdrop"
    defaults = {"layer_list": [8, 16, 24], "ratio_list": [0.5, 0.25, 0.125], "reference_layers": 32,
                "first_layers": None, "lambda_step": 0.01}

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
        lam = ratios[0]
        if any(abs(r - lam ** (s + 1)) > 1e-6 for s, r in enumerate(ratios)):
            raise MethodError(f"pdrop: ratio_list must be geometric (lam, lam^2, ...: the paper's "
                              f"[0.5, 0.25, 0.125] is lam=0.5), got {ratios}")
        step = self.hparams["lambda_step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
            raise MethodError(f"pdrop: lambda_step must be a number in (0, 1], got {step!r}")
        self.layers, self.ratios, self.lam = layers, ratios, lam

    def stages(self, num_layers: int, knob: Any) -> list[tuple[int, float]]:
        """``[(boundary layer, ratio of the original visual tokens kept from it on), ...]``."""
        base = self._base(num_layers)
        first, lam = self._parse(knob, base)
        if first != base[0]:
            span = (num_layers - first) / (num_layers - base[0])
            layers = [first + round((b - base[0]) * span) for b in base]
            if layers != sorted(set(layers)) or layers[-1] >= num_layers:
                raise MethodError(f"pdrop: first stage layer {first} gives boundaries {layers} "
                                  f"on {num_layers} layers")
        else:
            layers = base
        return [(layer, round(lam ** (s + 1), 12)) for s, layer in enumerate(layers)]

    def _base(self, num_layers: int) -> list[int]:
        return scale_layers(self.layers, self.hparams["reference_layers"], num_layers, method=self.name)

    def _parse(self, knob: Any, base: list[int]) -> tuple[int, float]:
        if knob is None:
            return base[0], self.lam
        if isinstance(knob, Mapping):
            knob = (knob.get("first"), knob.get("lambda"))
        if not isinstance(knob, (tuple, list)) or len(knob) != 2:
            raise MethodError(f"pdrop: knob must be (first stage layer, lambda), got {knob!r}")
        first, lam = knob
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= base[0]:
            raise MethodError(f"pdrop: first stage layer must be an int in 1..{base[0]}, got {first!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
            raise MethodError(f"pdrop: lambda must be in (0, 1], got {lam!r}")
        return first, float(lam)

    def first_layers(self, num_layers: int) -> list[int]:
        """Candidate first boundaries (model layers), latest first."""
        base = self._base(num_layers)
        ref, wanted = self.hparams["reference_layers"], self.hparams["first_layers"]
        firsts = (range(1, base[0] + 1) if not wanted
                  else {min(base[0], max(1, round(int(f) * num_layers / ref))) for f in wanted})
        return sorted(firsts, reverse=True)

    def lambdas(self) -> list[float]:
        """The ``lam`` grid, largest first (multiples of ``lambda_step`` up to 1, and the paper's)."""
        step = float(self.hparams["lambda_step"])
        grid = {round(i * step, 10) for i in range(1, int(math.floor(1 / step + 1e-9)) + 1)} | {1.0, self.lam}
        return sorted(grid, reverse=True)

    def knob_values(self, groups: Mapping[str, int], num_layers: int) -> list[Any]:
        firsts = self.first_layers(num_layers)
        values, seen = [], set()
        for first in firsts:
            for lam in self.lambdas():
                if lam < self.lam and first != firsts[-1]:
                    continue  # harder drops than the paper's lambda only once the first stage is earliest
                key = tuple(tuple(d.items()) for d in self.schedule(groups, num_layers, (first, lam)))
                if key not in seen:  # distinct schedules only
                    seen.add(key)
                    values.append((first, lam))
        return values

    def nominal_knob(self, tokens: float, groups: Mapping[str, int], num_layers: int, images: int = 1,
                     reference_rows: float | None = None) -> Any:
        """The family member whose layer-averaged kept visual tokens are the most not above ``tokens``."""
        best = None
        for knob in self.knob_values(groups, num_layers):
            avg = sum(layer.get(VISION, 0) for layer in self.schedule(groups, num_layers, knob)) / num_layers
            if avg <= tokens + 1e-9 and (best is None or avg > best[0]):
                best = (avg, knob)
        if best is None:
            raise MethodError(f"pdrop: no schedule of the family averages at most {tokens:g} visual tokens")
        return best[1]

    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        n = int(groups.get(VISION, 0))
        changes = {layer: {VISION: _count(n, r)} for layer, r in self.stages(num_layers, knob)}
        return uniform_schedule(groups, num_layers, changes)

    def selectors(self, model: nn.Module, knob: Any) -> list[Any]:
        return [_PDropSelector(self.stages(flops.num_layers(model), knob))]
