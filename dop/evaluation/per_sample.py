"""Budgets per evaluated sample: what each sample runs under, at what FLOPs, and their summary.

A budget is a share of *each sample's own* dense prefill (``dop.engine.baselines.budget.
sample_budget_flops``), so DOP and every baseline are resolved per sample, on that sample's group
sizes and images, and every sample's prefill FLOPs sit at or just below its own budget:

- ``FixedResolver``: dense, a fixed policy, or a baseline at a fixed knob (no budget): the FLOPs only;
- ``BaselineResolver``: a baseline's knob matched per sample (``SampleMatcher``: ``budget.match=flops``)
  or its published knob for the token count (``nominal``);
- ``PolicyResolver``: DOP's policy re-solved per sample by a solver the caller injects (the search
  stage's ``dop.search.per_shape.ShapeSolver``; the evaluation layer does not import the search).

The plugin (``dop.evaluation.plugin``) resolves the rows of each batch, runs rows that resolved alike
together, and keeps one ``SampleFlops`` per request; ``summarize`` turns them into the record's
fields: mean / min / max share of dense, mean TFLOPs, the distribution of knobs.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dop.adapters import get_adapter
from dop.budget import Budget
from dop.engine.baselines import Method
from dop.engine.baselines.budget import SampleMatcher, method_flops, sample_budget_flops
from dop.flops import FlopsError, count_flops, equivalent_tokens
from dop.models import encode_prompts
from dop.policy import Policy


@dataclass(frozen=True)
class SampleShape:
    """What a sample's budget and FLOPs depend on: its group sizes (``system``, ``vision``,
    ``instruction`` rows), its budget units (images, or crops on LLaVA-NeXT) and its image count."""

    groups: tuple[tuple[str, int], ...]
    units: float
    images: int

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.groups)


@dataclass(frozen=True)
class Resolution:
    """What one sample runs under: a policy, or a baseline ``method`` at ``knob`` (both None: dense).
    ``key`` groups samples that can share a batch; FLOPs are of one prefill (dop convention)."""

    key: Any
    flops: float
    dense_flops: float
    budget_flops: float | None = None  # None: no budget (dense, a fixed knob or policy)
    policy: Policy | None = None
    method: Method | None = None
    knob: Any = None
    label: str = "dense"  # the knob or policy as the record's distribution shows it
    reachable: bool = True  # False: nothing fits the sample's budget; the cheapest setting ran
    paper_flops: float | None = None  # a baseline's FLOPs in its own paper's convention

    @property
    def share(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else math.nan


class Resolver(Protocol):
    def resolve(self, shape: SampleShape) -> Resolution: ...


def sample_shapes(model: Any, processor: Any, images: Sequence[Sequence[Any]], prompts: Sequence[str]) -> list[SampleShape]:
    """The shape of every prompt of a batch (encoded once, on the CPU; padding is in no group)."""
    flat = [im.convert("RGB") for ims in images for im in ims]
    batch = encode_prompts(processor, flat, list(prompts))
    adapter = get_adapter(model)
    groups = adapter.token_groups(batch["input_ids"], batch.get("attention_mask"))
    out = []
    for row, ims in enumerate(images):
        sizes = tuple(sorted((name, int(mask[row].sum())) for name, mask in groups.items()))
        hw = [(im.height, im.width) for im in ims]
        out.append(SampleShape(sizes, float(adapter.budget_units(hw)), len(ims)))
    return out


def _label(knob: Any) -> str:
    return knob if isinstance(knob, str) else json.dumps(knob, separators=(",", ":"), default=str)


class FixedResolver:
    """Dense (``policy=None``), a fixed policy, or a baseline at a fixed knob: one setting for all."""

    def __init__(self, text_config: Any, policy: Policy | None = None, method: Method | None = None,
                 knob: Any = None) -> None:
        self.text_config, self.policy, self.method, self.knob = text_config, policy, method, knob
        self._cache: dict[SampleShape, Resolution] = {}

    def resolve(self, shape: SampleShape) -> Resolution:
        if shape not in self._cache:
            groups = shape.sizes
            dense = float(count_flops(self.text_config, groups, convention="dop"))
            if self.method is not None:
                flops = method_flops(self.method, self.text_config, groups, self.knob, images=shape.images)
                conv = self.method.paper_convention
                paper = (method_flops(self.method, self.text_config, groups, self.knob, convention=conv,
                                      images=shape.images) if conv else None)
                res = Resolution(("knob", _label(self.knob)), flops, dense, method=self.method, knob=self.knob,
                                 label=_label(self.knob), paper_flops=paper)
            else:
                policy = self.policy if self.policy is not None and not self.policy.is_identity else None
                flops = dense if policy is None else float(count_flops(self.text_config, groups, policy,
                                                                        num_images=shape.images))
                res = Resolution(("policy", None if policy is None else policy.digest()), flops, dense,
                                 policy=policy, label="dense" if policy is None else policy.digest())
            self._cache[shape] = res
        return self._cache[shape]


class BaselineResolver:
    """A baseline's knob per sample (``SampleMatcher``, cached per shape)."""

    def __init__(self, matcher: SampleMatcher) -> None:
        self.matcher = matcher

    def resolve(self, shape: SampleShape) -> Resolution:
        m = self.matcher.match(shape.sizes, shape.units, shape.images)
        dense = float(count_flops(self.matcher.text_config, shape.sizes, convention="dop"))
        return Resolution(("knob", _label(m.knob)), m.flops, dense, m.budget_flops, method=self.matcher.method,
                          knob=m.knob, label=_label(m.knob), reachable=m.reachable, paper_flops=m.paper_flops)


# (groups, budget FLOPs, images) -> (policy, its FLOPs, reachable)
PolicySolve = Callable[[Mapping[str, int], float, int], tuple[Policy, float, bool]]


class PolicyResolver:
    """DOP's policy per sample: ``solve(groups, budget_flops, images)`` re-solves the search on the
    sample's sizes (``dop.stages.evaluate`` passes ``dop.search.per_shape.ShapeSolver``)."""

    def __init__(self, text_config: Any, budget: Budget, solve: PolicySolve,
                 reference_groups: Mapping[str, float] | None = None) -> None:
        self.text_config, self.budget, self.solve = text_config, budget, solve
        self.reference_groups = reference_groups
        self._cache: dict[SampleShape, Resolution] = {}

    def resolve(self, shape: SampleShape) -> Resolution:
        if shape not in self._cache:
            groups = shape.sizes
            dense = float(count_flops(self.text_config, groups, convention="dop"))
            target = sample_budget_flops(self.budget, self.text_config, groups, shape.units, self.reference_groups)
            policy, flops, reachable = self.solve(groups, target, shape.images)
            digest = policy.digest()
            self._cache[shape] = Resolution(("policy", digest), float(flops), dense, target, policy=policy,
                                            label=digest, reachable=reachable)
        return self._cache[shape]


# --- records ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleFlops:
    """One evaluated request: its shape and the FLOPs it ran at."""

    shape: SampleShape
    resolution: Resolution


def _eq_tokens(text_config: Any, entry: SampleFlops) -> float | None:
    groups = entry.shape.sizes
    if not groups.get("vision"):
        return None
    try:
        return float(equivalent_tokens(text_config, groups, entry.resolution.flops))
    except FlopsError:  # a policy that also cuts non-visual rows below their dense cost
        return None


def summarize(entries: Sequence[SampleFlops], text_config: Any, top_knobs: int = 20) -> dict[str, Any]:
    """The record's per-sample FLOPs: mean / min / max share of dense, mean TFLOPs (the report's
    TFLOPs column), mean budget share, equivalent tokens, unreachable samples and the knobs' counts."""
    if not entries:
        return {"n": 0}
    shares = [e.resolution.share for e in entries]
    tflops = [e.resolution.flops / 1e12 for e in entries]
    budgets = [e.resolution.budget_flops / e.resolution.dense_flops for e in entries
               if e.resolution.budget_flops is not None and e.resolution.dense_flops]
    over = [e for e in entries if e.resolution.budget_flops is not None
            and e.resolution.flops > e.resolution.budget_flops * (1 + 1e-9)]
    eq = [x for x in (_eq_tokens(text_config, e) for e in entries) if x is not None]
    knobs = Counter(e.resolution.label for e in entries)
    return {
        "n": len(entries),
        "mean_share": statistics.fmean(shares), "min_share": min(shares), "max_share": max(shares),
        "mean_tflops": statistics.fmean(tflops), "min_tflops": min(tflops), "max_tflops": max(tflops),
        "mean_dense_tflops": statistics.fmean(e.resolution.dense_flops / 1e12 for e in entries),
        "mean_budget_share": statistics.fmean(budgets) if budgets else None,
        "mean_budget_tflops": (statistics.fmean(e.resolution.budget_flops / 1e12 for e in entries)
                               if len(budgets) == len(entries) else None),
        "mean_equivalent_tokens": statistics.fmean(eq) if len(eq) == len(entries) else None,
        "over_budget": len(over), "unreachable": sum(not e.resolution.reachable for e in entries),
        "shapes": len({e.shape for e in entries}),
        "knobs": dict(knobs.most_common(top_knobs)), "distinct_knobs": len(knobs),
    }


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Per-sample prefill latency distribution (seconds)."""
    if not seconds:
        return {"n": 0}
    xs = sorted(seconds)

    def q(p: float) -> float:
        return float(torch.quantile(torch.tensor(xs, dtype=torch.float64), p))

    return {"n": len(xs), "median": statistics.median(xs), "mean": statistics.fmean(xs), "min": xs[0],
            "max": xs[-1], "p10": q(0.1), "p90": q(0.9)}
