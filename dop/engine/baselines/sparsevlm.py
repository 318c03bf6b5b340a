"""SparseVLM (Zhang et al., ICML'25, ``Gumpest/SparseVLMs``), v1.5 fixed-count schedules.

1. Text raters, once per prefill on the decoder's input embeddings (as the v1 code does on
   ``inputs_embeds``): per sample, ``m = softmax_text(V T^T).mean(over V)`` with V the visual rows and
   T the instruction rows (everything after the image); raters are the rows with ``m > mean(m)``.
2. At each pruning layer ``l`` (``[2, 6, 15]`` of 32, scaled to depth like PyramidDrop), the raters'
   attention of layer ``l`` (read from the keys layer ``l`` computes itself, ``ctx.watch_attention``),
   head-mean, then mean over raters, scores the visual rows still present; the top ``count_s`` stay.
   As in the v1 code the pruning layer itself runs on all rows and its *outputs* are pruned: rows
   leave from ``l + 1`` (decided at the start of layer ``l + 1``).
3. Counts per stage are the v1.5 schedules per budget (``schedules``, written for the LLaVA-1.5 image
   of ``reference_tokens`` visual tokens), scaled by
   ``n_img / reference_tokens`` per sample on other models and rounded.
4. Recycling (``recycle``, on as in the released code): of the ``d`` rows a stage drops, the top
   ``int(0.3 d) + 1`` by score are clustered on the pruning layer's *outputs* into ``int(m / 10) + 1``
   density-peak clusters (density from the mean squared distance to the ``c`` nearest, centres by
   density x distance to a denser row, every row to its nearest centre) and each cluster's mean
   becomes one token. Deviation: the engine inserts no rows, so each merged token takes the place
   (and original position) of its cluster's centre row, which stays; the others leave. The
   released code inserts them after the kept visual tokens at truncated positions, and adds 1e-6
   noise to the densities (omitted: deterministic ties). FLOPs count the recycled tokens.

Not implemented: v1's rank-adaptive counts, v2.0's RoPE de-biasing and head selection. Kept rows
keep their original positions (v1/v1.5 truncate position ids).

Knob: a published schedule, by its budget name (192, 128, 96 or 64 layer-averaged visual tokens at
576), or ``(name, scale)``: that schedule with every count multiplied by ``scale`` (rounded), the
FLOPs-matched rows. Under dop's exact counter the labelled schedules cost more than their names
(192/128/96/64 cost 207/147/115/83 equivalent tokens with recycling), so budget matching
(``budget.match=flops``) scales a schedule down to the budget (``knob_values``: every labelled
schedule at scales ``scale_step, 2 scale_step, ..., 1``), and ``budget.match=nominal`` runs the
labelled one named by the token count (``nominal_knob``), each recorded with its true FLOPs.
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


def text_raters(hidden: torch.Tensor, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: per sample, the text rows most relevant to its visual rows (SparseVLM step 1).

    Batched: each sample's visual and text rows are gathered into padded blocks (one host sync for
    their sizes); padding is masked out of the softmax and the means."""
    B, T, D = hidden.shape
    n_v, n_t = vision.sum(1), text.sum(1)
    size_v, size_t = torch.stack([n_v.max(), n_t.max()]).tolist()  # the block sizes are data dependent
    v_idx, v_ok = _padded_rows(vision, size_v)
    t_idx, t_ok = _padded_rows(text, size_t)
    ext = torch.cat([hidden, hidden.new_zeros(B, 1, D)], dim=1).float()
    v = ext.gather(1, v_idx.unsqueeze(-1).expand(-1, -1, D))
    t = ext.gather(1, t_idx.unsqueeze(-1).expand(-1, -1, D))
    p = (v @ t.transpose(1, 2)).masked_fill(~t_ok[:, None, :], float("-inf")).softmax(dim=-1)
    m = (p * v_ok[..., None]).sum(1) / n_v.clamp(min=1)[:, None]  # mean over the visual rows
    mean = (m * t_ok).sum(1, keepdim=True) / n_t.clamp(min=1)[:, None]
    rates = (m > mean) & t_ok
    rates = torch.where(rates.any(dim=1, keepdim=True), rates, t_ok)  # all equal: every text row rates
    rates &= ((n_v > 0) & (n_t > 0))[:, None]
    return torch.zeros(B, T + 1, dtype=torch.bool, device=hidden.device).scatter(1, t_idx, rates)[:, :T]


def _padded_rows(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, size) ascending positions of each sample's ``mask`` rows, padded with T, and their validity."""
    B, T = mask.shape
    pos = torch.arange(T, device=mask.device).expand(B, T)
    idx = torch.where(mask, pos, torch.full_like(pos, T)).sort(dim=1).values[:, :size]
    return idx, idx < T


def rater_scores(probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, heads, Q, T) attention of padded rater queries -> (B, T) mean over heads and the true raters
    (``weight`` (B, Q): 1 for a rater, 0 for a padding query)."""
    weight = weight.float()
    per_q = probs.float().mean(dim=1)  # (B, Q, T)
    return (per_q * weight[..., None]).sum(1) / weight.sum(1).clamp(min=1)[:, None]


def _query_index(raters: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q) rater rows padded with each sample's last row, and (B, Q) 1/0 weights (0 = padding)."""
    size = max(1, int(raters.sum(1).max()))  # the query count is data dependent: one host sync
    index, weight = _padded_rows(raters, size)
    return torch.where(weight, index, last_rows(valid)), weight


def recycled_clusters(candidates: int) -> int:
    """Clusters the recycled candidates merge into: one per 10, + 1."""
    return int(candidates / 10) + 1


def recycled(dropped: int) -> tuple[int, int]:
    """(candidates, clusters) of a stage dropping ``dropped`` rows: top 30% + 1, then their clusters."""
    if dropped <= 0:
        return 0, 0
    m = int(dropped * 0.3) + 1
    return m, recycled_clusters(m)


def density_peak_clusters(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k,) centre rows and (n, k) one-hot assignment of the rows of ``x`` (n, C) (SparseVLM's
    ``cluster_and_merge``: DPC-kNN)."""
    n, C = x.shape
    dist = torch.cdist(x, x) / C ** 0.5
    density = (-(dist.topk(k, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = (delta * density).topk(k).indices
    nearest = dist[:, centres].argmin(dim=-1)
    nearest[centres] = torch.arange(k, device=x.device)  # a centre is its own cluster
    return centres, torch.nn.functional.one_hot(nearest, k).to(x.dtype)


class _SparseVLMSelector:
    """At a pruning layer, watches the raters' attention while the layer runs; at the next layer's
    start drops the rows its outputs lose and merges the recycled ones on those outputs."""

    def __init__(self, stages: list[tuple[int, int]], reference_tokens: int, recycle: bool = True) -> None:
        self.stages, self.ref, self.recycle = dict(stages), reference_tokens, recycle
        self.raters = self.n_img = None
        # (layer the stage prunes from, probe of the pruning layer, rater weights, candidate rows, count)
        self.pending: tuple[int, Any, torch.Tensor, torch.Tensor, int] | None = None

    def before_layer(self, ctx) -> None:
        if ctx.layer_idx == 0:
            vision = ctx.groups[VISION]
            self.n_img = vision.sum(dim=1)
            self.raters = text_raters(ctx.hidden, vision, ctx.groups[INSTRUCTION])
        if self.pending is not None and self.pending[0] == ctx.layer_idx:
            self._prune(ctx)
        count = self.stages.get(ctx.layer_idx)
        if count is None:
            return
        allowed = ctx.groups[VISION] & ctx.keep("kv")
        instruction = ctx.groups[INSTRUCTION]
        raters = torch.where(self.raters.any(dim=1, keepdim=True), self.raters, instruction)  # per sample
        qi, weight = _query_index(raters, ctx.valid)
        self.pending = (ctx.layer_idx + 1, ctx.watch_attention(qi), weight, allowed, count)

    def _prune(self, ctx) -> None:
        """The stage of the previous layer: its outputs (this layer's input) lose the dropped rows; the
        best-scored dropped rows are merged there (recycling), each cluster's centre row stays."""
        _, probe, weight, allowed, count = self.pending
        self.pending = None
        score = rater_scores(probe.probs, weight)
        dropped = allowed & ~topk_rows(score, allowed, scaled_counts(count, self.n_img, self.ref))
        if not self.recycle:
            ctx.drop(dropped)
            return
        cand = topk_rows(score, dropped, recycled_candidates(dropped.sum(1)))
        ctx.drop(dropped & ~cand)
        merged, hosts = ctx.hidden.clone(), torch.zeros_like(cand)
        # per sample: the candidate and cluster counts differ between samples (DPC-kNN on each set)
        for b in range(cand.shape[0]):
            idx = cand[b].nonzero()[:, 0]
            if len(idx) == 0:
                continue
            x = ctx.hidden[b, idx].float()
            centres, assign = density_peak_clusters(x, recycled_clusters(len(idx)))
            means = (assign.T @ x) / assign.sum(0)[:, None]
            merged[b, idx[centres]] = means.to(merged.dtype)
            hosts[b, idx[centres]] = True
        ctx.drop(cand & ~hosts)
        ctx.replace(hosts, merged)


def scaled_count(count: int, n_img: int, reference_tokens: int) -> int:
    return min(n_img, int(round(count * n_img / reference_tokens)))


def scaled_counts(count: int, n_img: torch.Tensor, reference_tokens: int) -> torch.Tensor:
    """``scaled_count`` per sample on a tensor (float64 and round-half-even, as Python's ``round``)."""
    return torch.minimum(n_img, torch.round(count * n_img.double() / reference_tokens).long())


def recycled_candidates(dropped: torch.Tensor) -> torch.Tensor:
    """``recycled(d)[0]`` per sample on a tensor: top 30% + 1 of the ``d`` dropped rows (0 if none)."""
    return torch.where(dropped > 0, torch.floor(dropped.double() * 0.3).long() + 1, 0)


class SparseVLM(Method):
    name = "sparsevlm"
    knob = "budget"  # which published schedule
    paper_convention = "fastv"
    defaults = {"version": "1.5", "pruning_layers": [2, 6, 15], "reference_layers": 32, "reference_tokens": 576,
                "schedules": {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]},
                "recycle": True, "scale_step": 0.01}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        if str(self.hparams["version"]) != "1.5":
            raise MethodError("sparsevlm: only version 1.5 (fixed schedules) is implemented, "
                              f"got {self.hparams['version']!r}")
        layers = list(self.hparams["pruning_layers"])
        bad = any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers)
        if bad or layers != sorted(set(layers)):
            raise MethodError(f"sparsevlm: pruning_layers must be strictly increasing ints >= 0, got {layers}")
        self.schedules = {int(k): [int(c) for c in v] for k, v in dict(self.hparams["schedules"]).items()}
        for k, counts in self.schedules.items():
            if len(counts) != len(layers) or any(c < 0 for c in counts) or counts != sorted(counts, reverse=True):
                raise MethodError(f"sparsevlm: schedule {k} {counts} must have one non-increasing count >= 0 "
                                  f"per pruning layer {layers}")
        step = self.hparams["scale_step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
            raise MethodError(f"sparsevlm: scale_step must be a number in (0, 1], got {step!r}")
        self.layers = layers

    def knob_values(self, groups: Mapping[str, int], num_layers: int) -> list[Any]:
        """Every labelled schedule at every scale (distinct schedules only), largest first."""
        step = float(self.hparams["scale_step"])
        scales = sorted({round(i * step, 10) for i in range(1, int(math.floor(1 / step + 1e-9)) + 1)} | {1.0},
                        reverse=True)
        values, seen = [], set()
        for label in sorted(self.schedules, reverse=True):
            for scale in scales:
                key = tuple(tuple(d.items()) for d in self.schedule(groups, num_layers, (label, scale)))
                if key not in seen:
                    seen.add(key)
                    values.append((label, scale))
        return values

    def nominal_knob(self, tokens: float, groups: Mapping[str, int], num_layers: int, images: int = 1,
                     reference_rows: float | None = None) -> Any:
        """The labelled schedule named by ``tokens`` visual tokens of ``reference_rows`` (default: the
        sample's visual rows), in counts of a ``reference_tokens`` image (LLaVA-NeXT: 640 of 2880 -> 128)."""
        rows = float(reference_rows) if reference_rows else float(groups.get(VISION, 0))
        label = round(tokens * self.hparams["reference_tokens"] / rows) if rows else 0
        if label not in self.schedules:
            raise MethodError(f"sparsevlm: no published schedule for {tokens:g} of {rows:g} visual tokens "
                              f"({label} at {self.hparams['reference_tokens']}); published: {sorted(self.schedules)}")
        return label

    def _counts(self, knob: Any) -> list[int]:
        label, scale = (knob, 1.0) if not isinstance(knob, (list, tuple)) else tuple(knob)
        if label not in self.schedules:
            raise MethodError(f"sparsevlm: no schedule for budget {label!r}; known: {sorted(self.schedules)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise MethodError(f"sparsevlm: schedule scale must be in (0, 1], got {scale!r}")
        return [int(round(c * scale)) for c in self.schedules[label]]

    def stages(self, num_layers: int, knob: Any) -> list[tuple[int, int]]:
        """``[(layer whose outputs are pruned, visual tokens kept at reference_tokens), ...]``."""
        counts = self._counts(knob)
        layers = scale_layers(self.layers, self.hparams["reference_layers"], num_layers, low=0, method=self.name)
        if layers[-1] + 1 >= num_layers:
            raise MethodError(f"sparsevlm: pruning layers {layers} leave no layer to prune on {num_layers} layers")
        return list(zip(layers, counts))

    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        n, ref = int(groups.get(VISION, 0)), self.hparams["reference_tokens"]
        changes, present = {}, n
        for layer, c in self.stages(num_layers, knob):
            kept = min(present, scaled_count(c, n, ref))
            extra = recycled(present - kept)[1] if self.hparams["recycle"] else 0
            present = kept + extra  # recycled tokens are visual rows from the next layer on
            changes[layer + 1] = {VISION: present}
        return uniform_schedule(groups, num_layers, changes)

    def selectors(self, model: nn.Module, knob: Any) -> list[Any]:
        return [_SparseVLMSelector(self.stages(flops.num_layers(model), knob), self.hparams["reference_tokens"],
                                   bool(self.hparams["recycle"]))]
