"""Policies: which operations are skipped.

``Policy`` is a set of pruned operations (the identity prunes nothing). ``DepthPolicy`` is the
paper's depth-wise form: one depth per (type, group) pair, every layer >= depth pruned; it expands
to a ``Policy`` and adds the dead operations that a pruned key/value side makes free.

Both may carry DOP's front end ``n_v``: the visual tokens per image that a pre-LLM reducer
(``reducer``, a ``pre_llm`` method of ``dop.engine.baselines``; VisPruner by default) keeps before the
decoder. The policy's operations then act on the ``n_v`` kept tokens (``dop.engine.front_end``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from dop.errors import DopError
from dop.io import atomic_write_text
from dop.ops import INSTRUCTION, OP_TYPES, Operation, OpType, as_op_type

# Groups whose rows' outputs are read (the last prompt position sits in `instruction`): their
# q/mlp ops never become dead, whatever their kv side does.
DEFAULT_OUTPUT_GROUPS: tuple[str, ...] = (INSTRUCTION,)
DEFAULT_REDUCER = "vispruner"  # the paper's n_v front end for LLaVA-NeXT / InternVL3


def check_front_end(n_v: Any, reducer: Any) -> tuple[int | None, str | None]:
    """``(n_v, reducer)`` validated; the reducer defaults to VisPruner when ``n_v`` is set."""
    if n_v is None:
        if reducer is not None:
            raise PolicyError(f"policy reducer={reducer!r} without n_v: set n_v (visual tokens kept per image)")
        return None, None
    if isinstance(n_v, bool) or not isinstance(n_v, int) or n_v < 0:
        raise PolicyError(f"policy n_v must be a non-negative int (visual tokens kept per image), got {n_v!r}")
    if reducer is not None and not isinstance(reducer, str):
        raise PolicyError(f"policy reducer must be a pre-LLM method name (e.g. 'vispruner'), got {reducer!r}")
    return n_v, reducer or DEFAULT_REDUCER


class PolicyError(DopError, ValueError):
    """A policy does not fit a model, or a policy file is malformed."""


class Policy:
    """A set of pruned ``Operation``s, optionally tagged with the model it was made for.

    ``Policy()`` is the identity. ``num_layers`` and ``model`` (a model id) are metadata used by
    ``validate`` to refuse a policy made for another model. ``n_v``/``reducer``: the front end
    (module docstring); ``None`` keeps every visual token.
    """

    def __init__(
        self,
        ops: Iterable[Operation] = (),
        *,
        num_layers: int | None = None,
        model: str | None = None,
        meta: Mapping[str, Any] | None = None,
        n_v: int | None = None,
        reducer: str | None = None,
    ) -> None:
        ops = frozenset(ops)
        for op in ops:
            if not isinstance(op, Operation):
                raise PolicyError(f"Policy takes Operation objects, got {op!r}")
        self._ops = ops
        self.num_layers = num_layers
        self.model = model
        self.meta: dict[str, Any] = dict(meta or {})
        self.n_v, self.reducer = check_front_end(n_v, reducer)
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
        return (isinstance(other, Policy) and self._ops == other._ops
                and (self.n_v, self.reducer) == (other.n_v, other.reducer))

    def __hash__(self) -> int:
        return hash((self._ops, self.n_v, self.reducer))

    def __or__(self, other: Policy) -> Policy:
        fronts = {(p.n_v, p.reducer) for p in (self, other) if p.n_v is not None}
        if len(fronts) > 1:
            raise PolicyError(f"cannot combine policies with different front ends {sorted(fronts)}")
        n_v, reducer = fronts.pop() if fronts else (None, None)
        return Policy(self._ops | other._ops, num_layers=self.num_layers or other.num_layers,
                      model=self.model or other.model, meta={**other.meta, **self.meta}, n_v=n_v, reducer=reducer)

    def __repr__(self) -> str:
        front = f", n_v={self.n_v} ({self.reducer})" if self.n_v is not None else ""
        return f"Policy({len(self._ops)} ops, groups={sorted(self.groups)}, num_layers={self.num_layers}{front})"

    @property
    def is_identity(self) -> bool:
        """Nothing pruned and no front end: the model's own forward."""
        return not self._ops and self.n_v is None

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(op.group for op in self._ops)

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
                      model=self.model, meta=self.meta, n_v=self.n_v, reducer=self.reducer)

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
        if self.n_v is not None:
            doc.update(n_v=self.n_v, reducer=self.reducer)
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
        unknown = set(doc) - {"kind", "num_layers", "model", "pruned", "ops", "meta", "n_v", "reducer"}
        if unknown:
            raise PolicyError(f"unknown policy field(s) {sorted(unknown)}")
        return cls(ops, num_layers=doc.get("num_layers"), model=doc.get("model"), meta=doc.get("meta"),
                   n_v=doc.get("n_v"), reducer=doc.get("reducer"))

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
        """Stable short hash of the pruned set and the front end (metadata excluded)."""
        canon = json.dumps(sorted([op.layer, op.group, op.type.value] for op in self._ops))
        if self.n_v is not None:  # without a front end the digest is what it always was
            canon += json.dumps({"n_v": self.n_v, "reducer": self.reducer})
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
    layers prunes nothing. The type ``"attn"`` ties ``q`` and ``kv`` to one depth. ``n_v`` (and
    ``reducer``) is the front-end parameter, searched jointly with the depths.
    """

    def __init__(
        self,
        depths: Mapping[Any, int],
        *,
        num_layers: int | None = None,
        model: str | None = None,
        n_v: int | None = None,
        reducer: str | None = None,
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
        self.n_v, self.reducer = check_front_end(n_v, reducer)

    def __repr__(self) -> str:
        inner = ", ".join(f"{t}/{g}={d}" for (t, g), d in sorted(self.depths.items()))
        if self.n_v is not None:
            inner += f"{', ' if inner else ''}n_v={self.n_v} ({self.reducer})"
        return f"DepthPolicy({inner})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DepthPolicy) and self.depths == other.depths
                and (self.n_v, self.reducer) == (other.n_v, other.reducer))

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.depths.items())), self.n_v, self.reducer))

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
        policy = Policy(ops, num_layers=num_layers, model=self.model, meta=meta, n_v=self.n_v, reducer=self.reducer)
        return policy.with_dead_ops(num_layers, output_groups) if dead_ops else policy

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "kind": "depth_policy",
            "num_layers": self.num_layers,
            "model": self.model,
            "depths": {f"{t}/{g}": d for (t, g), d in sorted(self.depths.items())},
        }
        if self.n_v is not None:
            doc.update(n_v=self.n_v, reducer=self.reducer)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DepthPolicy:
        if "depths" not in doc or not isinstance(doc["depths"], Mapping):
            raise PolicyError("a depth policy document needs a 'depths' mapping of 'type/group': depth")
        return cls(dict(doc["depths"]), num_layers=doc.get("num_layers"), model=doc.get("model"),
                   n_v=doc.get("n_v"), reducer=doc.get("reducer"))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> DepthPolicy:
        doc = _load_yaml(path_or_text)
        if isinstance(doc, Mapping) and "meta" in doc and "depths" in (doc["meta"] or {}):
            return cls(doc["meta"]["depths"], num_layers=doc.get("num_layers"), model=doc.get("model"),
                       n_v=doc.get("n_v"), reducer=doc.get("reducer"))
        return cls.from_dict(doc)

    def pairs(self) -> list[tuple[str, str]]:
        return sorted(self.depths)


def all_pairs(groups: Iterable[str], types: Iterable[OpType | str] = OP_TYPES) -> list[tuple[str, str]]:
    """Every (type, group) pair, in a stable order."""
    return [(as_op_type(t).value, g) for g in groups for t in types]


def _load_yaml(path_or_text: str | Path) -> Any:
    """A policy document from a file, or from YAML/JSON text (text has a line break or starts with
    ``{``; anything else is a path, so a missing path is never read as inline YAML)."""
    text_given = isinstance(path_or_text, str) and ("\n" in path_or_text or path_or_text.lstrip().startswith("{"))
    if text_given:
        where, text = "policy text", path_or_text
    else:
        path = Path(path_or_text)
        if not path.is_file():
            raise PolicyError(f"policy file {str(path_or_text)!r} does not exist"
                              + (" (it is a directory; name a .yaml file in it)" if path.is_dir() else ""))
        where, text = f"policy file {str(path)!r}", path.read_text()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{where} is not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    if doc is None:
        raise PolicyError(f"{where} is empty: a policy is a mapping with 'pruned' (or 'depths'), see Policy.to_yaml")
    if not isinstance(doc, Mapping):
        raise PolicyError(f"{where} must hold a mapping (a policy), got {type(doc).__name__}")
    return doc
