"""DOP's front end: ``n_v`` visual tokens per image kept by a pre-LLM reducer before the decoder.

The paper's third policy parameter (reviewers' (D_A, D_P, n_v)): a token-reduction method chosen
per model family (VisPruner by default) keeps ``n_v`` visual tokens, and the policy's operations
act on those. The reducer is a ``dop.engine.baselines`` pre-LLM method, so DOP's front end and that
baseline are the same code: ``reduce_inputs`` shortens the prompt to ``n_v`` placeholders per
image and ``dop.engine.prune`` installs the reducer's hooks (``hooks``) around the pruned decoder.
The sweep measures ``n_v``'s divergence curve like a depth parameter (``dop.sweep.NvPoint``) and
the search solves depths and ``n_v`` jointly (``dop.search``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from dop.engine.baselines import get_method
from dop.engine.baselines.reducer import drops_rows
from dop.engine.baselines.reducer import tokens_per_image as count
from dop.policy import Policy, PolicyError

_REDUCERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # policy -> its reducer instance


def reducer_of(policy: Policy | None) -> Any:
    """The policy's ``n_v`` reducer (a ``dop.engine.baselines`` pre-LLM method), or ``None`` without ``n_v``.
    One instance per policy: a text-guided reducer keeps its encoded instruction between
    ``reduce_inputs`` and the hooks."""
    if policy is None or policy.n_v is None:
        return None
    method = _REDUCERS.get(policy)
    if method is None:
        method = get_method(policy.reducer)
        if method.kind != "pre_llm":
            raise PolicyError(f"policy reducer {policy.reducer!r} is a {method.kind} method; n_v needs a "
                              "pre-LLM reducer (fastervlm, visionzip, prumerge_plus, trim, divprune, "
                              "vispruner, cdpruner, resize)")
        _REDUCERS[policy] = method
    return method


def reduce_inputs(model: nn.Module, inputs: Mapping[str, Any], policy: Policy | None) -> Mapping[str, Any]:
    """The model inputs a policy runs on: the reducer's (fewer placeholders on LLaVA-1.5, a smaller
    image with ``resize``) with a front end; the inputs themselves otherwise."""
    reducer = reducer_of(policy)
    return inputs if reducer is None else reducer.reduce_inputs(model, inputs, policy.n_v)


@contextlib.contextmanager
def hooks(model: nn.Module, policy: Policy | None) -> Iterator[list[Any]]:
    """The reducer's hooks for the block, yielding the engine selectors it needs (used by
    ``dop.engine.prune``): none on LLaVA-1.5, whose prompt is shortened; on Qwen-VL and LLaVA-NeXT,
    whose prompt keeps every placeholder, the selector that drops the other visual rows before layer 0."""
    reducer = reducer_of(policy)
    if reducer is None:
        yield []
        return
    if drops_rows(model) and hasattr(reducer, "visual_selector"):  # token selection (input resizing has none)
        with reducer.visual_selector(model, policy.n_v) as selector:
            yield [selector]
        return
    with reducer.apply(model, policy.n_v):
        yield []


def tokens_per_image(model: nn.Module, reducer: str, vision_rows: Sequence[int] = ()) -> int:
    """Visual tokens per image before reduction (the dense end of the ``n_v`` axis): from the config
    on LLaVA-1.5; on Qwen-VL and LLaVA-NeXT, where it depends on the image, the most ``vision_rows``
    of a sample (one image per calibration sample)."""
    get_method(reducer).check_model(model)  # refuses a family the reducer does not support, naming it
    if drops_rows(model):
        if not vision_rows:
            raise PolicyError("n_v on Qwen-VL / LLaVA-NeXT: the visual tokens per image come from the "
                              "calibration set, and it has none")
        return int(max(vision_rows))
    return int(count(model))


def nv_values(values: Sequence[int | float] | None, full: int) -> list[int]:
    """The ``n_v`` grid of a search: the configured values (an int is a token count, a float in
    (0, 1] a fraction of ``full``, so one grid serves models with 576 or 2880 visual tokens), capped
    at ``full``, and ``full`` itself (no reduction)."""
    if not values:
        return []
    out = set()
    for v in values:
        if isinstance(v, float) and 0 < v <= 1:
            v = round(v * full)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PolicyError(f"method.n_v values must be token counts (ints >= 0) or fractions in (0, 1], "
                              f"got {v!r}")
        out.add(min(int(v), full))
    return sorted(out | {full})
