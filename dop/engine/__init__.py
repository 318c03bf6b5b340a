"""The operation-pruning engine: ``prune(model, policy)`` on one model instance, reversibly.

Owns: the gather/scatter core (``core``: per-layer kept rows, masks, RoPE at original positions,
the KV cache record), the token-reduction baselines built on it (``baselines``: in-LLM selectors and
pre-LLM reducers) and DOP's ``n_v`` front end (``front_end``: a pre-LLM reducer before the pruned
decoder). ``prune`` below is the public entry that composes the core with the front end.

May import: the concepts (``dop.ops``, ``dop.policy``, ``dop.flops``, ``dop.budget``, ...) and model
access (``dop.models``, ``dop.adapters``, ``dop.divergence``). Inside: ``front_end`` -> ``baselines``
-> ``core``, never the other way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dop.adapters import Adapter
from dop.engine import core
from dop.engine.core import EngineError, LayerContext, Pruner
from dop.engine.front_end import hooks
from dop.policy import Policy

__all__ = ["EngineError", "LayerContext", "Pruner", "prune"]


@contextmanager
def prune(
    model: nn.Module,
    policy: Policy | None = None,
    *,
    adapter: Adapter | None = None,
    prefix: tuple[int, torch.Tensor] | None = None,
    selectors: list | None = None,
) -> Iterator[Pruner]:
    """Run ``model`` under ``policy`` inside the block; the model is restored on exit.

    ``prefix=(D, hidden_D)`` starts layer D from a known dense hidden state (layers < D are skipped);
    it serves divergence sweeps, whose layers shallower than the pruning depth are exactly dense.
    ``selectors`` choose rows per sample during a prefill: each one's ``before_layer(ctx)`` is
    called with a :class:`LayerContext` at the start of every decoder layer. A policy with ``n_v``
    also installs its reducer; its inputs must come from ``dop.engine.front_end.reduce_inputs``.
    """
    with hooks(model, policy) as front, core.prune(model, policy, adapter=adapter, prefix=prefix,
                                                    selectors=[*front, *(selectors or [])]) as pruner:
        yield pruner
