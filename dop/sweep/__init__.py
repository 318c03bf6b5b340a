"""The divergence sweep: one point per (type, group, depth), run by Lightning, stored per point.

A point is ``DepthPolicy({(type, group): depth}).expand(L)`` (every other pair dense) scored with
``dop.divergence`` against the dense reference. Points are the items of a ``Trainer.predict`` loop,
so devices, precision, DDP and the progress bar are Lightning's; each point is written to
``<run>/sweep/<type>_<group>/<depth>.json`` atomically (temp file + ``os.replace``), which makes
resume (skip present points), sharding (point i belongs to shard i % n) and DDP (ranks write
disjoint points) need no coordination.

Prefix reuse: every op of a point is at layers >= depth, so layers < depth are exactly dense; the
point starts at layer ``depth`` from the dense hidden state (engine ``prefix=``). ``reuse=half_layer``
goes further for q and mlp points: the attention half of layer ``depth`` is dense for every row a
point keeps, so layer ``depth`` is computed here from the dense post-attention state (MLP only) and
the engine starts at ``depth + 1``; and a q/mlp point at the last layer for a group holding no scored
position cannot change a scored logit (KL is exactly 0, nothing runs).

The front end ``n_v`` (``dop.engine.front_end``) is one more curve: an ``NvPoint`` per configured value, the
decoder dense on the ``n_v`` tokens the reducer keeps, stored at ``<run>/sweep/n_v_<reducer>/<n_v>.json``.
Its sequence is shorter from layer 0 on, so it runs whole (no prefix reuse).

Modules: ``store`` (SweepPoint, NvPoint, SweepStore, merge_stores), ``scorer`` (PointScorer),
``job`` (SweepModule, SweepJob). Owns the divergence sweep. May import: the engine, model access
and the concepts; never the search or the evaluation.
"""

from dop.sweep.job import SweepJob, SweepModule
from dop.sweep.scorer import REUSE_MODES, PointScorer, front_end_batch
from dop.sweep.store import (
    NV_PREFIX,
    AnyPoint,
    NvPoint,
    SweepError,
    SweepPoint,
    SweepStore,
    merge_stores,
    shard_points,
    sweep_points,
)

__all__ = ["NV_PREFIX", "REUSE_MODES", "AnyPoint", "NvPoint", "PointScorer", "SweepError", "SweepJob",
           "SweepModule", "SweepPoint", "SweepStore", "front_end_batch", "merge_stores", "shard_points",
           "sweep_points"]
