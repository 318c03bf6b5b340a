"""Scoring sweep points and policies against the dense reference, with prefix and half-layer reuse."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from dop.adapters import get_adapter
from dop.divergence import CalibrationBatch, DenseReference, kl_per_sample, scored_logits
from dop.engine import prune
from dop.engine.front_end import reduce_inputs
from dop.policy import DEFAULT_OUTPUT_GROUPS, Policy
from dop.sweep.store import AnyPoint, NvPoint, SweepError, SweepPoint

log = logging.getLogger("dop.sweep")

REUSE_MODES = ("none", "prefix", "half_layer")

PruneFn = Callable[..., Any]  # dop.engine.prune-compatible context manager

class PointScorer:
    """Scores sweep points and arbitrary policies against a dense reference on one model."""

    def __init__(
        self,
        model: nn.Module,
        reference: DenseReference,
        *,
        reuse: str = "half_layer",
        prune_fn: PruneFn | None = None,
        adapter: Any = None,
        output_groups: Iterable[str] = DEFAULT_OUTPUT_GROUPS,
    ) -> None:
        if reuse not in REUSE_MODES:
            raise SweepError(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
        self.model = model
        self.reference = reference
        self.prune = prune_fn or prune
        if adapter is None:
            adapter = get_adapter(model)
        self.adapter = adapter
        self.layers = adapter.decoder_layers()
        self.num_layers = len(self.layers)
        self.output_groups = tuple(output_groups)
        self.reuse = reuse
        if reuse != "none" and reference.hidden_store == "none":
            raise SweepError("prefix reuse needs the dense hidden states (hidden_store memory or disk)")
        if reuse == "half_layer" and not reference.keep_mids:
            raise SweepError("half-layer reuse needs the dense post-attention states (keep_mids=True)")
        if reuse == "half_layer" and not all(_llama_recipe(layer) for layer in self.layers):
            log.warning("decoder layers are not pre-norm attention + MLP; using plain prefix reuse")
            self.reuse = "prefix"
        self.layer_forwards = 0.0  # layer-forward units spent on points (half a layer = 0.5)
        self.naive_layer_forwards = 0  # what scoring every point from layer 0 would have spent

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def groups(self, batch: CalibrationBatch) -> dict[str, torch.Tensor]:
        return self.adapter.token_groups(batch.inputs["input_ids"], batch.inputs.get("attention_mask"))

    @torch.no_grad()
    def score_point(self, point: AnyPoint) -> dict[str, Any]:
        """Mean KL of a single-change point over the calibration set, with its compute count."""
        Lyr = self.num_layers
        if isinstance(point, NvPoint):
            return self._score_nv(point)
        if point.depth > Lyr or point.depth < 0:
            raise SweepError(f"point {point.key}: depth outside 0..{Lyr}")
        names = self.adapter.group_names
        if point.group not in names:
            raise SweepError(f"group {point.group!r} is not a token group of this model; valid: {list(names)}")
        n = sum(b.size for b in self.reference.batches)
        if point.depth == Lyr:  # the dense point: KL 0 by definition, nothing to run
            return {"kl": 0.0, "kl_per_sample": [0.0] * n, "layer_forwards": 0.0, "naive_layer_forwards": 0}
        policy = point.policy(Lyr, self.output_groups)
        per_sample: list[float] = []
        spent = 0.0
        for b, batch in enumerate(self.reference.batches):
            kl, used = self._score_batch(b, batch, policy, point)
            per_sample.extend(kl.tolist())
            spent += used
        naive = Lyr * len(self.reference.batches)
        self.layer_forwards += spent
        self.naive_layer_forwards += naive
        return {"kl": float(np.mean(per_sample)), "kl_per_sample": per_sample, "layer_forwards": spent,
                "naive_layer_forwards": naive}

    def _score_nv(self, point: NvPoint) -> dict[str, Any]:
        per_sample: list[float] = []
        for b, batch in enumerate(self.reference.batches):
            kl, _ = self._score_batch(b, batch, point.policy(self.num_layers), None)
            per_sample.extend(kl.tolist())
        spent = naive = self.num_layers * len(self.reference.batches)  # whole forwards, no reuse
        self.layer_forwards += spent
        self.naive_layer_forwards += naive
        return {"kl": float(np.mean(per_sample)), "kl_per_sample": per_sample, "layer_forwards": float(spent),
                "naive_layer_forwards": naive}

    @torch.no_grad()
    def score_policy(self, policy: Policy) -> float:
        """Mean KL of any policy (prefix reuse up to its shallowest op)."""
        per_sample: list[float] = []
        for b, batch in enumerate(self.reference.batches):
            kl, _ = self._score_batch(b, batch, policy, None)
            per_sample.extend(kl.tolist())
        return float(np.mean(per_sample))

    def _score_batch(self, b: int, batch: CalibrationBatch, policy: Policy, point: SweepPoint | None):
        device = self.device
        rows = batch.score_mask.nonzero(as_tuple=True)[0].to(device)
        if policy.n_v is not None:  # a shorter sequence from layer 0 on: no dense prefix applies
            return self._run(front_end_batch(self.model, batch, policy), policy, None, rows, b)
        start = min((op.layer for op in policy), default=self.num_layers)
        Lyr = self.num_layers
        if start >= Lyr:  # identity: the reference itself
            return torch.zeros(batch.size, dtype=torch.float64), 0.0
        if self.reuse == "none":
            return self._run(batch, policy, None, rows, b)
        if self.reuse == "half_layer" and point is not None and point.type in ("q", "mlp"):
            g = self.groups(batch)[point.group].to(device)
            if start == Lyr - 1:
                if not bool((g & batch.score_mask.to(device)).any()):
                    # last layer, no scored row in the group: the scored logits cannot change
                    return torch.zeros(batch.size, dtype=torch.float64), 0.0
            else:
                h_in, h_mid = self.reference.hidden_at(b, start, device)
                hidden = self._half_layer(start, point.type, g, h_in, h_mid)
                kl, used = self._run(batch, policy, (start + 1, hidden), rows, b)
                return kl, used + 0.5
        prefix = (start, self.reference.input_at(b, start, device)) if start > 0 else None
        return self._run(batch, policy, prefix, rows, b)

    def _half_layer(self, d: int, op_type: str, group: torch.Tensor, h_in: torch.Tensor,
                    h_mid: torch.Tensor) -> torch.Tensor:
        """Layer d of a q or mlp point from the dense states: only its MLP half runs.

        q point: the group's rows skip attention (their residual is the layer input), every other
        row's attention output is dense (all keys kept). mlp point: attention is dense; the group's
        rows skip the MLP.
        """
        layer = self.layers[d]
        mask = group.unsqueeze(-1)
        if op_type == "q":
            x = torch.where(mask, h_in, h_mid)
            return x + layer.mlp(layer.post_attention_layernorm(x))
        x = h_mid
        return torch.where(mask, x, x + layer.mlp(layer.post_attention_layernorm(x)))

    def _run(self, batch: CalibrationBatch, policy: Policy, prefix, rows: torch.Tensor, b: int):
        kwargs = {"prefix": prefix} if prefix is not None else {}
        with self.prune(self.model, policy, **kwargs) as pruner:
            logits, _ = scored_logits(self.model, batch, self.device)
        used = float(getattr(pruner, "layer_forwards", self.num_layers - (prefix[0] if prefix else 0)))
        kl = kl_per_sample(self.reference.logp[b], logits, rows, batch.size)
        return kl.cpu(), used

def front_end_batch(model: nn.Module, batch: CalibrationBatch, policy: Policy) -> CalibrationBatch:
    """The batch a policy with ``n_v`` runs on: fewer image placeholders, the same scored positions
    (left padding keeps every row's tail, where the answer positions are, at the end)."""
    inputs = dict(reduce_inputs(model, batch.inputs, policy))
    T, T_new = batch.score_mask.shape[1], inputs["input_ids"].shape[1]
    mask = batch.score_mask[:, T - T_new:]
    if T_new > T or int(mask.sum()) != int(batch.score_mask.sum()):
        raise SweepError(f"n_v={policy.n_v}: the reduced prompt lost scored positions (padding must be left)")
    return CalibrationBatch(inputs, mask, batch.sample_ids)

def _llama_recipe(layer: nn.Module) -> bool:
    """Pre-norm residual attention + MLP (Llama, Qwen2/2.5-VL, InternVL's Qwen2): the half-layer
    shortcut reproduces exactly what such a layer computes after attention."""
    return (all(hasattr(layer, p) for p in ("self_attn", "post_attention_layernorm", "mlp"))
            and not hasattr(layer, "pre_feedforward_layernorm"))
