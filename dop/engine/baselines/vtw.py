"""VTW, Visual Tokens Withdrawal (Lin et al., arXiv 2405.05803, ``lzhxmu/VTW``).

Every visual row leaves the model from layer K on (all ops, KV cache included; the other rows keep
their positions, VTW's ``pe_type="keep"``). ``find_k`` picks K as VTW's ``--findk`` does: for each
candidate K from the shallowest (``first_candidate`` of ``reference_layers``, 5 of 32, scaled to
depth) to the last layer, the mean KL between the full and the withdrawn model's next-token laws on
a few calibration samples; K is the shallowest candidate whose KL is at most ``kl_threshold``.

Deviations: the KL is dop's objective, KL(full || withdrawn) at the scored positions
(``dop.divergence``); VTW's code evaluates ``KLDivLoss(log p_full, p_withdrawn)``, i.e.
KL(withdrawn || full), at the last position. VTW publishes K=15 for LLaVA-1.5-7B, not the threshold;
``kl_threshold`` is our choice.

Knob: K (``num_layers`` = nothing withdrawn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dop import flops
from dop.divergence import kl_per_sample, scored_logits
from dop.engine.baselines.base import Method, MethodError, check_int, uniform_schedule
from dop.ops import VISION


class _WithdrawSelector:
    def __init__(self, K: int) -> None:
        self.K = K

    def before_layer(self, ctx) -> None:
        if ctx.layer_idx == self.K:
            ctx.drop(ctx.groups[VISION] & ctx.keep("kv"))


def shallowest_below(kl_by_k: Mapping[int, float], threshold: float) -> int | None:
    """The smallest K whose KL is at most ``threshold`` (None when no candidate is)."""
    ok = [k for k, kl in kl_by_k.items() if kl <= threshold]
    return min(ok) if ok else None


class VTW(Method):
    name = "vtw"
    knob = "K"  # first layer without visual tokens
    paper_convention = "fastv"
    defaults = {"K": 15, "reference_layers": 32, "first_candidate": 5, "kl_threshold": 0.01}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        check_int("K", self.hparams["K"], 0, method=self.name)
        check_int("first_candidate", self.hparams["first_candidate"], 0, method=self.name)
        check_int("reference_layers", self.hparams["reference_layers"], 1, method=self.name)
        t = self.hparams["kl_threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise MethodError(f"vtw: kl_threshold must be a number >= 0, got {t!r}")

    def default_k(self, num_layers: int) -> int:
        """The paper's K (15 of 32) scaled to the model's depth."""
        return min(num_layers, round(self.hparams["K"] * num_layers / self.hparams["reference_layers"]))

    def _K(self, knob: Any, num_layers: int) -> int:
        return check_int("knob (K)", knob, 0, num_layers, method=self.name)

    def knob_values(self, groups: Mapping[str, int], num_layers: int) -> list[Any]:
        return list(range(num_layers + 1))

    def nominal_knob(self, tokens: float, groups: Mapping[str, int], num_layers: int, images: int = 1,
                     reference_rows: float | None = None) -> Any:
        """VTW has no token count: its published setting is K (15 of 32, scaled to the depth)."""
        return self.default_k(num_layers)

    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        K = self._K(knob, num_layers)
        return uniform_schedule(groups, num_layers, {K: {VISION: 0}} if K < num_layers else {})

    def selectors(self, model: nn.Module, knob: Any) -> list[Any]:
        K = self._K(knob, flops.num_layers(model))
        return [_WithdrawSelector(K)]

    def candidates(self, num_layers: int) -> list[int]:
        first = round(self.hparams["first_candidate"] * num_layers / self.hparams["reference_layers"])
        return list(range(first, num_layers))

    @torch.no_grad()
    def kl_curve(self, model: nn.Module, batches: Sequence[Any], candidates: Sequence[int] | None = None
                 ) -> dict[int, float]:
        """Mean KL(full || withdrawn from K) over the samples of ``batches`` (``CalibrationBatch``)."""
        if not batches:
            raise MethodError("vtw: find_k needs at least one calibration batch")
        device = next(model.parameters()).device
        ks = list(candidates) if candidates is not None else self.candidates(flops.num_layers(model))
        dense = [torch.log_softmax(scored_logits(model, b, device)[0].float(), dim=-1) for b in batches]
        curve = {}
        for K in ks:
            total, count = 0.0, 0
            for batch, ref in zip(batches, dense):
                with self.apply(model, K):
                    logits = scored_logits(model, batch, device)[0]
                rows = batch.score_mask.nonzero(as_tuple=True)[0].to(logits.device)
                kl = kl_per_sample(ref, logits, rows, batch.score_mask.shape[0])
                total, count = total + float(kl.sum()), count + kl.numel()
            curve[K] = total / count
        return curve

    def find_k(self, model: nn.Module, batches: Sequence[Any], candidates: Sequence[int] | None = None
               ) -> tuple[int, dict[int, float]]:
        """``(K, curve)``: the shallowest candidate whose KL is at most ``kl_threshold``; the model's
        depth (no withdrawal) when none is."""
        curve = self.kl_curve(model, batches, candidates)
        K = shallowest_below(curve, float(self.hparams["kl_threshold"]))
        return (flops.num_layers(model) if K is None else K), curve
