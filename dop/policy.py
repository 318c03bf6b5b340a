"""Policies: which operations are skipped.

``Policy`` is a set of pruned operations (the identity prunes nothing). ``DepthPolicy`` is the
paper's depth-wise form: one depth per (type, group) pair, every layer >= depth pruned; it expands
to a ``Policy`` and adds the dead operations that a pruned key/value side makes free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from dop.io import atomic_write_text
from dop.ops import INSTRUCTION, OP_TYPES, Operation, OpType, as_op_type

# Groups whose rows' outputs are read (the last prompt position sits in `instruction`): their
# q/mlp ops never become dead, whatever their kv side does.
DEFAULT_OUTPUT_GROUPS: tuple[str, ...] = (INSTRUCTION,)


class PolicyError(ValueError):
    """A policy does not fit a model, or a policy file is malformed."""


class Policy:
    """A set of pruned ``Operation``s, optionally tagged with the model it was made for.

    ``Policy()`` is the identity. ``num_layers`` and ``model`` (a model id) are metadata used by
    ``validate`` to refuse a policy made for another model.
    """

    def __init__(
        self,
        ops: Iterable[Operation] = (),
        *,
        num_layers: int | None = None,
        model: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        ops = frozenset(ops)
        for op in ops:
            if not isinstance(op, Operation):
                raise PolicyError(f"Policy takes Operation objects, got {op!r}")
        self._ops = ops
        self.num_layers = num_layers
        self.model = model
        self.meta: dict[str, Any] = dict(meta or {})
        index: dict[tuple[int, OpType], set[str]] = {}
        for op in ops:
            index.setdefault((op.layer, op.type), set()).add(op.group)
        self._index = {k: frozenset(v) for k, v in index.items()}

    # --- set-like -------------------------------------------------------------------------
    @property
    def ops(self) -> frozenset[Operation]:
        return self._ops

    def __iter__(self) -> Iterator[Operation]:
        return iter(sorted(self._ops))

    def __len__(self) -> int:
        return len(self._ops)

    def __contains__(self, op: object) -> bool:
        return op in self._ops

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self._ops == other._ops

    def __hash__(self) -> int:
        return hash(self._ops)

    def __or__(self, other: Policy) -> Policy:
        return Policy(self._ops | other._ops, num_layers=self.num_layers or other.num_layers,
                      model=self.model or other.model, meta={**other.meta, **self.meta})

    def __repr__(self) -> str:
        return f"Policy({len(self._ops)} ops, groups={sorted(self.groups)}, num_layers={self.num_layers})"

    @property
    def is_identity(self) -> bool:
        return not self._ops

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(op.group for op in self._ops)

    @property
    def max_layer(self) -> int:
        return max((op.layer for op in self._ops), default=-1)

    def pruned_groups(self, layer: int, type: OpType | str) -> frozenset[str]:
        """Groups whose rows skip operation ``type`` at ``layer``."""
        return self._index.get((layer, as_op_type(type)), frozenset())

    def is_pruned(self, layer: int, group: str, type: OpType | str) -> bool:
        return group in self.pruned_groups(layer, type)

    # --- dead operations -------------------------------------------------------------------
    def with_dead_ops(
        self, num_layers: int, output_groups: Iterable[str] = DEFAULT_OUTPUT_GROUPS
    ) -> Policy:
        """Add the q/mlp ops that cannot change any read output.

        If a group's kv side is pruned at every layer >= l, its rows at layers >= l only feed their
        own (unread) outputs, so their q and mlp ops there are free to prune; except for groups whose
        outputs are read (``output_groups``).
        """
        output_groups = set(output_groups)
        added = set()
        for group in self.groups - output_groups:
            start = num_layers
            while start > 0 and self.is_pruned(start - 1, group, OpType.KV):
                start -= 1
            for layer in range(start, num_layers):
                added.add(Operation(layer, group, OpType.Q))
                added.add(Operation(layer, group, OpType.MLP))
        return Policy(self._ops | added, num_layers=self.num_layers or num_layers,
                      model=self.model, meta=self.meta)

    # --- validation ----------------------------------------------------------------------------
    def validate(
        self,
        num_layers: int,
        groups: Iterable[str] | None = None,
        model: str | None = None,
    ) -> Policy:
        """Check the policy fits a model with ``num_layers`` decoder layers and these ``groups``."""
        if self.num_layers is not None and self.num_layers != num_layers:
            raise PolicyError(
                f"policy num_layers={self.num_layers} (made for model {self.model!r}) does not match "
                f"this model's {num_layers} decoder layers"
            )
        if model is not None and self.model is not None and self.model != model:
            raise PolicyError(f"policy model={self.model!r} was made for another model than {model!r}")
        bad = sorted({op.layer for op in self._ops if op.layer >= num_layers})
        if bad:
            raise PolicyError(
                f"policy layer {bad[0]} is past the model's depth: valid layers are 0..{num_layers - 1}"
            )
        if groups is not None:
            groups = set(groups)
            unknown = sorted(self.groups - groups)
            if unknown:
                raise PolicyError(
                    f"policy group {unknown[0]!r} is not a token group of this model; "
                    f"valid groups: {sorted(groups)}"
                )
        return self

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Compact form: ``{pruned: {group: {type: [layers]}}, num_layers, model, meta}``."""
        pruned: dict[str, dict[str, list[int]]] = {}
        for op in sorted(self._ops):
            pruned.setdefault(op.group, {}).setdefault(op.type.value, []).append(op.layer)
        doc: dict[str, Any] = {"kind": "policy", "num_layers": self.num_layers, "model": self.model,
                               "pruned": pruned}
        if self.meta:
            doc["meta"] = self.meta
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Policy:
        if not isinstance(doc, Mapping):
            raise PolicyError(f"a policy document must be a mapping, got {type(doc).__name__}")
        if "depths" in doc:  # a depth policy document: expand it
            depth = DepthPolicy.from_dict(doc)
            if depth.num_layers is None:
                raise PolicyError("depth policy document needs num_layers to expand")
            return depth.expand()
        ops: list[Operation] = []
        if "ops" in doc:
            for item in doc["ops"]:
                try:
                    ops.append(Operation(int(item["layer"]), str(item["group"]), item["type"]))
                except (KeyError, TypeError) as exc:
                    raise PolicyError(f"bad policy op {item!r}: needs layer, group, type") from exc
        for group, by_type in (doc.get("pruned") or {}).items():
            if not isinstance(by_type, Mapping):
                raise PolicyError(f"policy pruned.{group} must map op types to layer lists")
            for type_, layers in by_type.items():
                op_type = as_op_type(type_)
                for layer in layers:
                    ops.append(Operation(int(layer), str(group), op_type))
        unknown = set(doc) - {"kind", "num_layers", "model", "pruned", "ops", "meta"}
        if unknown:
            raise PolicyError(f"unknown policy field(s) {sorted(unknown)}")
        return cls(ops, num_layers=doc.get("num_layers"), model=doc.get("model"), meta=doc.get("meta"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.from_dict(json.loads(text))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Policy:
        return cls.from_dict(_load_yaml(path_or_text))

    def digest(self) -> str:
        """Stable short hash of the pruned set (metadata excluded)."""
        canon = json.dumps(sorted([op.layer, op.group, op.type.value] for op in self._ops))
        return hashlib.sha256(canon.encode()).hexdigest()[:12]


def _parse_key(key: Any) -> tuple[str, str]:
    """Parse a depth key: ``("kv", "vision")``, ``"kv/vision"`` or ``"kv:vision"``."""
    if isinstance(key, str):
        for sep in ("/", ":"):
            if sep in key:
                key = tuple(key.split(sep, 1))
                break
        else:
            raise PolicyError(f"depth key {key!r} must be 'type/group', e.g. 'kv/vision'")
    if not (isinstance(key, tuple) and len(key) == 2):
        raise PolicyError(f"depth key {key!r} must be a (type, group) pair")
    type_, group = str(key[0]).lower(), str(key[1])
    if type_ != "attn":
        type_ = as_op_type(type_).value
    return type_, group


class DepthPolicy:
    """One pruning depth per (type, group) pair: every layer >= depth is pruned for that pair.

    ``DepthPolicy({("kv", "vision"): 12, ("mlp", "vision"): 6})``; a depth equal to the number of
    layers prunes nothing. The type ``"attn"`` ties ``q`` and ``kv`` to one depth.
    """

    def __init__(
        self,
        depths: Mapping[Any, int],
        *,
        num_layers: int | None = None,
        model: str | None = None,
    ) -> None:
        parsed: dict[tuple[str, str], int] = {}
        for key, depth in depths.items():
            type_, group = _parse_key(key)
            if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
                raise PolicyError(f"depth for {type_}/{group} must be a non-negative int, got {depth!r}")
            targets = ("q", "kv") if type_ == "attn" else (type_,)
            for t in targets:
                parsed[(t, group)] = depth
        self.depths = parsed
        self.num_layers = num_layers
        self.model = model

    def __repr__(self) -> str:
        inner = ", ".join(f"{t}/{g}={d}" for (t, g), d in sorted(self.depths.items()))
        return f"DepthPolicy({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DepthPolicy) and self.depths == other.depths

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.depths.items())))

    def depth(self, type: OpType | str, group: str, default: int | None = None) -> int | None:
        return self.depths.get((as_op_type(type).value, group), default)

    def expand(
        self,
        num_layers: int | None = None,
        *,
        dead_ops: bool = True,
        output_groups: Iterable[str] = DEFAULT_OUTPUT_GROUPS,
    ) -> Policy:
        """The ``Policy`` pruning every layer >= depth of each pair (plus dead ops if asked)."""
        num_layers = num_layers if num_layers is not None else self.num_layers
        if num_layers is None:
            raise PolicyError("DepthPolicy.expand needs num_layers")
        if self.num_layers is not None and num_layers != self.num_layers:
            raise PolicyError(f"depth policy made for {self.num_layers} layers, expanded for {num_layers}")
        ops = []
        for (type_, group), depth in self.depths.items():
            if depth > num_layers:
                raise PolicyError(
                    f"depth {depth} for {type_}/{group} is past the model's depth: valid 0..{num_layers}"
                )
            ops.extend(Operation(layer, group, type_) for layer in range(depth, num_layers))
        meta = {"depths": self.to_dict()["depths"]}
        policy = Policy(ops, num_layers=num_layers, model=self.model, meta=meta)
        return policy.with_dead_ops(num_layers, output_groups) if dead_ops else policy

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "depth_policy",
            "num_layers": self.num_layers,
            "model": self.model,
            "depths": {f"{t}/{g}": d for (t, g), d in sorted(self.depths.items())},
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DepthPolicy:
        if "depths" not in doc or not isinstance(doc["depths"], Mapping):
            raise PolicyError("a depth policy document needs a 'depths' mapping of 'type/group': depth")
        return cls(dict(doc["depths"]), num_layers=doc.get("num_layers"), model=doc.get("model"))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> DepthPolicy:
        doc = _load_yaml(path_or_text)
        if isinstance(doc, Mapping) and "meta" in doc and "depths" in (doc["meta"] or {}):
            return cls(doc["meta"]["depths"], num_layers=doc.get("num_layers"), model=doc.get("model"))
        return cls.from_dict(doc)

    def pairs(self) -> list[tuple[str, str]]:
        return sorted(self.depths)


def all_pairs(groups: Iterable[str], types: Iterable[OpType | str] = OP_TYPES) -> list[tuple[str, str]]:
    """Every (type, group) pair, in a stable order."""
    return [(as_op_type(t).value, g) for g in groups for t in types]


def _load_yaml(path_or_text: str | Path) -> Any:
    path = Path(path_or_text) if not isinstance(path_or_text, str) or "\n" not in path_or_text else None
    if path is not None and path.exists():
        text = path.read_text()
    elif isinstance(path_or_text, str) and ("\n" in path_or_text or ":" in path_or_text) and not path_or_text.endswith((".yaml", ".yml", ".json")):
        text = path_or_text
    else:
        raise PolicyError(f"policy file {str(path_or_text)!r} does not exist")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file {str(path_or_text)!r} is not valid YAML/JSON: {exc}") from exc
