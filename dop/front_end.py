"""DOP's front end: ``n_v`` visual tokens per image kept by a pre-LLM reducer before the decoder.

The paper's third policy parameter (reviewers' (D_A, D_P, n_v)): a token-reduction method chosen
per model family (VisPruner by default) keeps ``n_v`` visual tokens, and the policy's operations
act on those. The reducer is a ``dop.baselines`` pre-LLM method, so DOP's front end and that
baseline are the same code: ``prepare_inputs`` shortens the prompt to ``n_v`` placeholders per
image and ``dop.engine.prune`` installs the reducer's hooks (``hooks``) around the pruned decoder.
The sweep measures ``n_v``'s divergence curve like a depth parameter (``dop.sweep.NvPoint``) and
the search solves depths and ``n_v`` jointly (``dop.search``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from dop.policy import Policy, PolicyError


def prepare_inputs(model: nn.Module, inputs: Mapping[str, Any], policy: Policy | None) -> Mapping[str, Any]:
    """The model inputs a policy runs on: ``n_v`` placeholders per image with a front end; the inputs
    themselves (minus the text-guided reducers' ``instruction``) otherwise."""
    reducer = policy.front_end() if policy is not None else None
    if reducer is None:
        if "instruction" in inputs:
            return {k: v for k, v in inputs.items() if k != "instruction"}
        return inputs
    return reducer.prepare_inputs(model, inputs, policy.n_v)


@contextlib.contextmanager
def hooks(model: nn.Module, policy: Policy | None) -> Iterator[None]:
    """The reducer's hooks for the block (nothing without a front end); used by ``dop.engine.prune``."""
    reducer = policy.front_end() if policy is not None else None
    if reducer is None:
        yield
        return
    with reducer.apply(model, policy.n_v):
        yield


def tokens_per_image(model: nn.Module, reducer: str) -> int:
    """Visual tokens per image before reduction (the dense end of the ``n_v`` axis)."""
    from dop.baselines import get_method
    from dop.baselines.reducer import tokens_per_image as count

    get_method(reducer).check_model(model)  # refuses a family the reducer does not support, naming it
    return int(count(model))


def nv_values(values: Sequence[int] | None, full: int) -> list[int]:
    """The ``n_v`` grid of a search: the configured values below ``full``, and ``full`` itself."""
    if not values:
        return []
    out = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PolicyError(f"method.n_v values must be non-negative ints, got {v!r}")
        out.add(min(int(v), full))
    return sorted(out | {full})
