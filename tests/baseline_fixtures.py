"""Stand-in baselines for the budget/evaluation tests, until the real methods land.

- ``StandInFastV`` (in-LLM): at layer ``K`` keep the ``keep`` visual rows the last row attends to most
  at layer ``K - 1`` (FastV's rule on the engine's selectors; knob = kept tokens).
- ``StandInFirstK`` (pre-LLM): keep the first ``keep`` visual tokens before the decoder
  (``reduce_inputs`` drops the other image-token ids, ``apply`` trims the projector's output).
- ``NeedsTextTower``: ``check_model`` raises like a method that needs a CLIP text tower.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from dop.engine.baselines.base import Method, MethodError, uniform_schedule


class _KeepTopK:
    def __init__(self, layer: int, keep: int):
        self.layer, self.keep = layer, keep

    def before_layer(self, ctx) -> None:
        if ctx.layer_idx != self.layer - 1:
            return
        B, T = ctx.valid.shape
        probs = ctx.attention_probs(torch.full((B, 1), T - 1, device=ctx.valid.device)).mean(1)[:, 0]
        vision = ctx.groups["vision"]
        score = probs.masked_fill(~vision, float("-inf"))
        k = min(self.keep, int(vision.sum(1).min()))
        top = score.topk(k, dim=1).indices
        kept = torch.zeros_like(vision).scatter(1, top, True)
        ctx.drop(vision & ~kept, from_layer=self.layer)


class StandInFastV(Method):
    name = "standin_fastv"
    kind = "in_llm"
    knob = "keep"
    paper_convention = "fastv"
    defaults = {"layer": 1}

    def schedule(self, groups, num_layers, knob):
        return uniform_schedule(groups, num_layers, {int(self.hparams["layer"]): {"vision": int(knob)}})

    def selectors(self, model, knob):
        return [_KeepTopK(int(self.hparams["layer"]), int(knob))]


class StandInFirstK(Method):
    name = "standin_firstk"
    kind = "pre_llm"
    knob = "keep"
    paper_convention = None
    defaults: dict[str, Any] = {}

    def schedule(self, groups, num_layers, knob):
        return uniform_schedule(groups, num_layers, {0: {"vision": int(knob)}})

    def reduce_inputs(self, model, inputs: Mapping[str, Any], knob):
        image_id = model.config.image_token_id
        ids = inputs["input_ids"]
        is_img = ids == image_id
        rank = is_img.long().cumsum(1)
        keep = ~is_img | (rank <= int(knob))
        counts = keep.sum(1)
        if not bool((counts == counts[0]).all()):
            raise MethodError("standin_firstk: rows keep different lengths")
        out = dict(inputs)
        out["input_ids"] = ids[keep].view(ids.shape[0], -1)
        if "attention_mask" in inputs and inputs["attention_mask"] is not None:
            out["attention_mask"] = inputs["attention_mask"][keep].view(ids.shape[0], -1)
        return out

    @contextmanager
    def apply(self, model, knob) -> Iterator[None]:
        self.check_model(model)
        k = int(knob)
        handle = model.model.multi_modal_projector.register_forward_hook(lambda mod, args, out: out[:, :k])
        try:
            yield
        finally:
            handle.remove()


class NeedsTextTower(StandInFirstK):
    name = "standin_text_tower"

    def check_model(self, model):
        if getattr(model, "clip_text_model", None) is None:
            raise MethodError(f"method {self.name!r} needs a CLIP text tower (text-image relevance); "
                              f"{type(model).__name__} has none")


STANDINS = {"standin_fastv": "StandInFastV", "standin_firstk": "StandInFirstK",
            "standin_text_tower": "NeedsTextTower"}


@contextmanager
def standins_registered() -> Iterator[None]:
    """The stand-ins in dop's method registry for the block (removed after, so other tests see the real list)."""
    from dop.engine.baselines import METHODS

    for name, cls in STANDINS.items():
        METHODS.register(name, f"{__name__}:{cls}")
    try:
        yield
    finally:
        for name in STANDINS:
            METHODS.unregister(name)


def check_golden(path, got: dict) -> None:
    """Compare kept rows (exactly) and last-position logit sums (1e-2) with a golden file; write it
    with ``DOP_REGEN_GOLDEN=1`` (on purpose only: a missing file fails)."""
    import json
    import os

    if os.environ.get("DOP_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=1) + "\n")
    elif not path.exists():
        raise AssertionError(f"{path} missing: run with DOP_REGEN_GOLDEN=1")
    want = json.loads(path.read_text())
    for k, v in want.items():
        assert got[k]["kept"] == v["kept"]
        assert abs(got[k]["last_logit_sum"] - v["last_logit_sum"]) < 1e-2
