"""Operations: one module (attention query side, key/value side, or MLP) of one decoder layer
processing one group of tokens."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class OpType(str, Enum):
    """What an operation computes for its rows.

    - ``q``: the attention query side: q_proj, attention of those rows, o_proj, residual add.
    - ``kv``: the key/value side: k_proj, v_proj; pruned rows are no key for any query (nor cache).
    - ``mlp``: the MLP of those rows.
    """

    Q = "q"
    KV = "kv"
    MLP = "mlp"

    def __str__(self) -> str:  # "q", not "OpType.Q", in YAML and messages
        return self.value


OP_TYPES: tuple[OpType, ...] = (OpType.Q, OpType.KV, OpType.MLP)

# Group names the adapters produce. Splitters (e.g. a [CLS]-attention split of `vision`) may add more.
SYSTEM, VISION, INSTRUCTION, RESPONSE = "system", "vision", "instruction", "response"
PROMPT_GROUPS: tuple[str, ...] = (SYSTEM, VISION, INSTRUCTION)
# Generated tokens: never pruned (the engine prunes prefill only).
UNPRUNABLE_GROUPS: frozenset[str] = frozenset({RESPONSE})


def as_op_type(value: OpType | str) -> OpType:
    """Parse an operation type, with an error that lists the valid ones."""
    if isinstance(value, OpType):
        return value
    try:
        return OpType(str(value).lower())
    except ValueError:
        raise ValueError(
            f"unknown operation type {value!r}; valid types: {[t.value for t in OP_TYPES]}"
        ) from None


@dataclass(frozen=True, order=True)
class Operation:
    """One prunable operation: ``Operation(layer=3, group="vision", type="mlp")``."""

    layer: int
    group: str
    type: OpType

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", as_op_type(self.type))
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"Operation.layer must be a non-negative int, got {self.layer!r}")
        if not isinstance(self.group, str) or not self.group:
            raise ValueError(f"Operation.group must be a non-empty string, got {self.group!r}")
        if self.group in UNPRUNABLE_GROUPS:
            raise ValueError(f"Operation.group {self.group!r} cannot be pruned (generated tokens)")

    def to_dict(self) -> dict:
        return {"layer": self.layer, "group": self.group, "type": self.type.value}
