"""Exact FLOPs of a (pruned) MLLM prefill, per operation, in the conventions the papers use.

A decoder layer processes three kinds of rows (``dop.ops.OpType``): at layer ``l`` let ``n_q`` be
the rows whose query side runs, ``n_kv`` the rows that are keys/values, ``n_mlp`` the rows whose MLP
runs. With hidden size ``d``, query width ``d_q = H * head_dim``, key/value width
``d_kv = KV * head_dim`` (grouped-query attention) and MLP width ``m``, one layer costs (DOP/GSOP
code, ``paper-notes.md`` section 4: 2 FLOPs per multiply-add, SwiGLU = 3 matrices)::

    K: 2 n_kv d d_kv      V: 2 n_kv d d_kv      Q: 2 n_q d d_q      O: 2 n_q d_q d
    QK^T: 2 n_q n_kv d_q  AV: 2 n_q n_kv d_q    MLP: 3 * 2 n_mlp d m

so ``n`` dense tokens of a multi-head model cost ``8nd^2 + 4n^2d + 6ndm`` per layer. Attention is
counted over the full ``n_q x n_kv`` score matrix (causal masking saves nothing in the kernels, and
every paper counts it so). Norms, RoPE, softmax and residual adds are not counted (not matmuls).

Other conventions (``baselines.md`` 2.1/2.2) reuse the same per-component shapes with other factors:

- ``fastv``: multiply-adds, 2 MLP matrices: ``4nd^2 + 2n^2d + 2ndm`` per layer (FastV, VisionZip,
  DivPrune ``tflops.py``).
- ``pdrop``: multiply-adds, 3 MLP matrices, image rows only: ``4nd^2 + 2n^2d + 3ndm`` with ``n``
  the visual tokens of the layer (reproduces PyramidDrop's printed 3.82 T / 1.78 T).

All conventions use the GQA-aware widths, so they equal the papers' formulas for multi-head models
(LLaVA-1.5/NeXT) and stay meaningful for GQA models (Qwen2.5-VL, InternVL3).

Row counts come from token groups (``{"system": 35, "vision": 576, "instruction": 100}``) and a
``Policy`` (a pruned (layer, group, type) removes that group's rows from that type's count), or
from a per-layer ``schedule`` of group sizes (token-level methods: FastV, PDrop, ...), or directly
from ``rows``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dop.errors import DopError
from dop.ops import OP_TYPES, VISION, OpType, as_op_type
from dop.policy import DepthPolicy, Policy

__all__ = [
    "CONVENTIONS",
    "Convention",
    "FlopsBreakdown",
    "FlopsError",
    "FlopsReport",
    "LayerFlops",
    "TextShape",
    "VisionShape",
    "count_flops",
    "equivalent_tokens",
    "flops_breakdown",
    "flops_for_tokens",
    "flops_report",
    "flops_unit",
    "format_flops",
    "unit_scale",
    "format_kept_tokens",
    "kept_tokens_per_layer",
    "layer_rows",
    "num_layers",
    "progressive_schedule",
    "register_cpu_sdpa_flops",
    "text_config",
    "text_shape",
    "vision_flops",
    "vision_shape",
]

Number = float  # counts may be fractional (equivalent-token budgets); ints pass as floats
LmHead = Literal["none", "last", "all"]
COMPONENTS: tuple[str, ...] = ("q", "k", "v", "o", "qk", "av", "mlp")


class FlopsError(DopError, ValueError):
    """Bad input to the FLOPs model (unknown convention, group, field, negative count...)."""


# --------------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Convention:
    """How a paper turns row counts into a number.

    ``per_mac``: 2 counts FLOPs (one multiply-add = 2), 1 counts multiply-adds (what FastV and
    PyramidDrop print as "FLOPs"). ``mlp_matrices``: 3 for SwiGLU (gate, up, down), 2 for the
    classic two-matrix MLP FastV assumes. ``vision_only``: count the visual groups' rows only.
    """

    name: str
    per_mac: int
    mlp_matrices: int
    vision_only: bool
    unit: str
    source: str


CONVENTIONS: dict[str, Convention] = {
    "dop": Convention("dop", 2, 3, False, "FLOPs", "DOP/GSOP code: 8nd^2+4n^2d+6ndm per layer"),
    "fastv": Convention("fastv", 1, 2, False, "MACs", "FastV paper: 4nd^2+2n^2d+2ndm per layer"),
    "pdrop": Convention("pdrop", 1, 3, True, "MACs", "PyramidDrop: 4nd^2+2n^2d+3ndm, image tokens only"),
}


def _convention(name: str | Convention) -> Convention:
    if isinstance(name, Convention):
        return name
    try:
        return CONVENTIONS[str(name).lower()]
    except KeyError:
        raise FlopsError(f"unknown FLOPs convention {name!r}; valid conventions: {sorted(CONVENTIONS)}") from None


# --------------------------------------------------------------------------------------------
# Model shapes from configs
# --------------------------------------------------------------------------------------------
def _field(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return default if value is None else value


def _require(config: Any, name: str, why: str, *, what: str = "text config") -> int:
    value = _field(config, name)
    if value is None:
        raise FlopsError(f"{what} lacks {name!r} (needed for {why}); got {type(config).__name__}")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FlopsError(f"{what} field {name!r} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class TextShape:
    """The decoder dimensions the FLOPs depend on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int | None = None

    @property
    def d_q(self) -> int:  # width of Q and of O's input; Qwen/Gemma head_dim * H may differ from d
        return self.num_heads * self.head_dim

    @property
    def d_kv(self) -> int:  # width of K and V (grouped-query attention)
        return self.num_kv_heads * self.head_dim


def text_config(obj: Any) -> Any:
    """The decoder's config of a model, a full MLLM config, a text config, or a dict (the one place
    that knows how: ``LlavaConfig`` -> its ``LlamaConfig``; a ``LlamaConfig`` -> itself)."""
    config = getattr(obj, "config", obj)  # a model -> its config
    if hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    if isinstance(config, Mapping) and isinstance(config.get("text_config"), Mapping):
        return config["text_config"]
    return config


def num_layers(obj: Any) -> int:
    """Decoder layers of a model or config (or an int, checked)."""
    if isinstance(obj, int) and not isinstance(obj, bool):
        if obj <= 0:
            raise FlopsError(f"num_layers must be a positive int, got {obj}")
        return obj
    return text_shape(obj).num_layers


_layer_count = num_layers  # for functions whose num_layers argument shadows it


def text_shape(config: Any) -> TextShape:
    """Read a ``TextShape`` from a model, a transformers text config, a full MLLM config, or a dict."""
    if isinstance(config, TextShape):
        return config
    config = text_config(config)
    d = _require(config, "hidden_size", "every projection")
    heads = _require(config, "num_attention_heads", "attention widths")
    kv_heads = _field(config, "num_key_value_heads", heads)  # absent on pre-GQA configs: MHA
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise FlopsError(f"text config field 'num_key_value_heads'={kv_heads!r} must divide "
                         f"num_attention_heads={heads}")
    head_dim = _field(config, "head_dim")
    if head_dim is None:
        if d % heads:
            raise FlopsError(f"text config lacks 'head_dim' and hidden_size={d} is not a multiple of "
                             f"num_attention_heads={heads}")
        head_dim = d // heads
    vocab = _field(config, "vocab_size")
    return TextShape(
        hidden_size=d,
        intermediate_size=_require(config, "intermediate_size", "MLP FLOPs"),
        num_layers=_require(config, "num_hidden_layers", "the layer count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        vocab_size=int(vocab) if vocab is not None else None,
    )


@dataclass(frozen=True)
class VisionShape:
    """A ViT (CLIP/SigLIP style) vision tower plus the LLaVA two-layer projector."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    cls_token: bool = True  # CLIP prepends [CLS]; SigLIP does not
    projector_in: int | None = None  # vision features entering the projector (x feature layers)
    projector_out: int | None = None  # the text hidden size; None: no projector counted
    projector_cls: bool = False  # [CLS] also projected (LLaVA vision_feature_select_strategy="full")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def vision_shape(config: Any, vision_config: Any = None) -> VisionShape:
    """Read a ``VisionShape`` from a full MLLM config (``config.vision_config``) or a vision config.

    The projector is counted when the text hidden size is known (a full config), as LLaVA's
    ``linear_1`` (vision width x feature layers -> d) and ``linear_2`` (d -> d).
    """
    if isinstance(config, VisionShape):
        return config
    vc = vision_config if vision_config is not None else _field(config, "vision_config")
    if vc is None:
        raise FlopsError("include_vision needs a vision config: pass the full MLLM config or vision_config=")
    what = "vision config"
    dv = _require(vc, "hidden_size", "the vision tower", what=what)
    model_type = str(_field(vc, "model_type", ""))
    cls_token = "siglip" not in model_type
    feature_layer = _field(config, "vision_feature_layer", -2)  # LLaVA concatenates several layers
    n_feat = 1 if isinstance(feature_layer, int) else len(feature_layer)
    # LLaVA's "default" strategy drops [CLS] before the projector; "full" keeps it.
    keeps_cls = cls_token and _field(config, "vision_feature_select_strategy", "default") == "full"
    try:
        proj_out: int | None = text_shape(config).hidden_size
    except FlopsError:  # a bare vision config: no projector counted
        proj_out = None
    return VisionShape(
        hidden_size=dv,
        intermediate_size=_require(vc, "intermediate_size", "the vision MLP", what=what),
        num_layers=_require(vc, "num_hidden_layers", "the vision layers", what=what),
        image_size=_require(vc, "image_size", "the patch count", what=what),
        patch_size=_require(vc, "patch_size", "the patch count", what=what),
        num_channels=int(_field(vc, "num_channels", 3)),
        cls_token=cls_token,
        projector_in=dv * n_feat,
        projector_cls=keeps_cls,
        projector_out=proj_out,
    )


def vision_flops(vision: VisionShape, num_images: int = 1, per_mac: int = 2) -> float:
    """Vision tower + projector cost of ``num_images`` images (crops, for LLaVA-NeXT), per_mac=2: FLOPs.

    With P = (image/patch)^2 patches, n = P (+1 for [CLS]) tokens, width D, MLP width M::

        patch conv: 2 P (C p^2) D
        per layer:  8 n D^2 + 4 n^2 D + 4 n D M      (q,k,v,o; QK^T and AV; fc1 and fc2)
        projector:  2 P (D_in d + d d)                (LLaVA linear_1 and linear_2, [CLS] dropped)

    Every vision layer is counted: transformers runs the whole tower even when the features come
    from layer -2 (``LlavaModel.get_image_features``).
    """
    if num_images < 0:
        raise FlopsError(f"num_images must be >= 0, got {num_images}")
    p, dv, mv = vision.num_patches, vision.hidden_size, vision.intermediate_size
    n = p + (1 if vision.cls_token else 0)
    conv = p * vision.num_channels * vision.patch_size**2 * dv
    layer = 4 * n * dv * dv + 2 * n * n * dv + 2 * n * dv * mv
    proj = 0
    if vision.projector_out is not None:
        d = vision.projector_out
        rows = p + (1 if vision.projector_cls else 0)
        proj = rows * ((vision.projector_in or dv) * d + d * d)
    return per_mac * num_images * (conv + vision.num_layers * layer + proj)


# --------------------------------------------------------------------------------------------
# Row counts
# --------------------------------------------------------------------------------------------
def _check_counts(groups: Mapping[str, Number], where: str = "groups") -> dict[str, Number]:
    if not isinstance(groups, Mapping):
        raise FlopsError(f"{where} must map group names to token counts, got {type(groups).__name__}")
    out: dict[str, Number] = {}
    for name, count in groups.items():
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count):
            raise FlopsError(f"{where}[{name!r}] must be a number, got {count!r}")
        if count < 0:
            raise FlopsError(f"{where}[{name!r}] is negative ({count}); token counts must be >= 0")
        out[str(name)] = count
    return out


def _default_vision_groups(groups: Iterable[str]) -> frozenset[str]:
    """``vision`` and splitter groups derived from it (``vision_key``, ``vision_rest``)."""
    return frozenset(g for g in groups if g == "vision" or g.startswith("vision_"))


def _as_policy(policy: Policy | DepthPolicy | None, num_layers: int, groups: Iterable[str]) -> Policy:
    if policy is None:
        return Policy()
    if isinstance(policy, DepthPolicy):  # its expansion adds the dead ops the engine also skips
        policy = policy.expand(num_layers)
    if not isinstance(policy, Policy):
        raise FlopsError(f"policy must be a Policy or DepthPolicy, got {type(policy).__name__}")
    # Names the first unknown group / too-deep layer (PolicyError is a ValueError).
    return policy.validate(num_layers, groups)


def front_end_groups(groups: Mapping[str, Number], policy: Policy | DepthPolicy | None,
                     num_images: int = 1) -> dict[str, Number]:
    """Group sizes after a policy's ``n_v`` front end: ``vision`` capped at ``n_v`` per image."""
    groups = dict(groups)
    n_v = getattr(policy, "n_v", None)
    if n_v is not None and VISION in groups:
        groups[VISION] = min(groups[VISION], n_v * num_images)
    return groups


def _schedule(
    num_layers: int, groups: Mapping[str, Number], schedule: Sequence[Mapping[str, Number]] | None
) -> list[dict[str, Number]]:
    if schedule is None:
        return [dict(groups)] * num_layers
    if len(schedule) != num_layers:
        raise FlopsError(f"schedule has {len(schedule)} layers, the model has {num_layers}")
    out = []
    for layer, sizes in enumerate(schedule):
        sizes = _check_counts(sizes, f"schedule[{layer}]")
        unknown = sorted(set(sizes) - set(groups)) if groups else []
        if unknown:
            raise FlopsError(f"schedule[{layer}] group {unknown[0]!r} is not in groups {sorted(groups)}")
        out.append({**groups, **sizes})
    return out


def layer_rows(
    num_layers: int | Any,
    groups: Mapping[str, Number],
    policy: Policy | DepthPolicy | None = None,
    *,
    schedule: Sequence[Mapping[str, Number]] | None = None,
    count_groups: Iterable[str] | None = None,
    num_images: int = 1,
) -> list[dict[str, Number]]:
    """Per layer ``{"n_q", "n_kv", "n_mlp"}``: rows of each op type that run.

    ``groups`` are the prompt's group sizes; ``schedule`` (one mapping per layer) overrides them per
    layer (token-level methods, see ``progressive_schedule``); a group pruned by ``policy`` for a
    type at a layer drops out of that type's count. ``count_groups`` restricts the count to some
    groups (the ``pdrop`` convention counts visual rows only). ``num_layers`` may be a config. A
    policy's ``n_v`` caps ``vision`` at ``n_v`` per image (``num_images``).
    """
    n_layers = _layer_count(num_layers)
    groups = front_end_groups(_check_counts(groups), policy, num_images)
    pol = _as_policy(policy, n_layers, groups)
    keep = set(groups) if count_groups is None else set(count_groups)
    rows = []
    for layer, sizes in enumerate(_schedule(n_layers, groups, schedule)):
        row = {}
        for t in OP_TYPES:
            pruned = pol.pruned_groups(layer, t)
            row[f"n_{t.value}"] = sum(n for g, n in sizes.items() if g in keep and g not in pruned)
        rows.append(row)
    return rows


def progressive_schedule(
    num_layers: int | Any,
    groups: Mapping[str, Number],
    changes: Mapping[int, Mapping[str, Number]],
) -> list[dict[str, Number]]:
    """Per-layer group sizes of a token-dropping method: ``changes[l]`` applies from layer ``l`` on.

    PyramidDrop default: ``{8: {"vision": 288}, 16: {"vision": 144}, 24: {"vision": 72}}``;
    FastV K=2 keeping 192: ``{2: {"vision": 192}}``.
    """
    n_layers = _layer_count(num_layers)
    current = dict(_check_counts(groups))
    for layer in changes:
        if not 0 <= layer < n_layers:
            raise FlopsError(f"schedule change at layer {layer} is outside 0..{n_layers - 1}")
    out = []
    for layer in range(n_layers):
        if layer in changes:
            update = _check_counts(changes[layer], f"changes[{layer}]")
            unknown = sorted(set(update) - set(groups))
            if unknown:
                raise FlopsError(f"changes[{layer}] group {unknown[0]!r} is not in groups {sorted(groups)}")
            current.update(update)
        out.append(dict(current))
    return out


def kept_tokens_per_layer(
    num_layers: int | Any,
    groups: Mapping[str, Number],
    policy: Policy | DepthPolicy | None = None,
    *,
    schedule: Sequence[Mapping[str, Number]] | None = None,
    vision_groups: Iterable[str] | None = None,
    type: OpType | str | None = None,
) -> list[Number]:
    """Visual tokens kept at each layer (the PyramidDrop-style per-layer printout).

    ``type=None`` counts a visual row as kept when any of its operations runs (for token pruning,
    where all three go together, that is simply the tokens still present); ``type="kv"`` etc.
    counts the rows of one operation type.
    """
    n_layers = _layer_count(num_layers)
    groups = _check_counts(groups)
    vis = frozenset(vision_groups) if vision_groups is not None else _default_vision_groups(groups)
    pol = _as_policy(policy, n_layers, groups)
    types = OP_TYPES if type is None else (as_op_type(type),)
    out = []
    for layer, sizes in enumerate(_schedule(n_layers, groups, schedule)):
        out.append(sum(n for g, n in sizes.items()
                       if g in vis and any(g not in pol.pruned_groups(layer, t) for t in types)))
    return out


def format_kept_tokens(kept: Sequence[Number]) -> str:
    """Run-length form: ``576x8 288x8 144x8 72x8 (avg 270)``."""
    runs: list[list[Any]] = []
    for n in kept:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    avg = sum(kept) / len(kept) if kept else 0.0
    return " ".join(f"{_num(n)}x{c}" for n, c in runs) + f" (avg {avg:.4g})"


def _num(x: Number) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFlops:
    """One decoder layer: its rows and the cost of each component (in the convention's unit)."""

    layer: int
    n_q: Number
    n_kv: Number
    n_mlp: Number
    q: Number
    k: Number
    v: Number
    o: Number
    qk: Number
    av: Number
    mlp: Number

    @property
    def attention(self) -> Number:  # everything the q and kv ops own
        return self.q + self.k + self.v + self.o + self.qk + self.av

    @property
    def total(self) -> Number:
        return self.attention + self.mlp

    def as_dict(self) -> dict[str, Number]:
        d = {name: getattr(self, name) for name in ("layer", "n_q", "n_kv", "n_mlp", *COMPONENTS)}
        d["total"] = self.total
        return d


def _layer_flops(shape: TextShape, conv: Convention, layer: int, n_q: Number, n_kv: Number,
                 n_mlp: Number) -> LayerFlops:
    c, d, m = conv.per_mac, shape.hidden_size, shape.intermediate_size
    dq, dkv = shape.d_q, shape.d_kv
    return LayerFlops(
        layer=layer, n_q=n_q, n_kv=n_kv, n_mlp=n_mlp,
        q=c * n_q * d * dq,
        k=c * n_kv * d * dkv,
        v=c * n_kv * d * dkv,
        o=c * n_q * dq * d,
        qk=c * n_q * n_kv * dq,  # per head: (n_q x hd) @ (hd x n_kv); KV heads are shared, not cheaper
        av=c * n_q * n_kv * dq,  # per head: (n_q x n_kv) @ (n_kv x hd)
        mlp=c * conv.mlp_matrices * n_mlp * d * m,
    )


@dataclass(frozen=True)
class FlopsBreakdown:
    """Per-layer costs plus the optional extras, all in ``convention``'s unit (see ``CONVENTIONS``)."""

    convention: str
    layers: list[LayerFlops]
    vision: Number = 0
    lm_head: Number = 0
    decode: Number = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def decoder(self) -> Number:
        return sum(layer.total for layer in self.layers)

    @property
    def total(self) -> Number:
        return self.decoder + self.vision + self.lm_head + self.decode

    def by_component(self) -> dict[str, Number]:
        """Decoder prefill summed over layers, per component (q, k, v, o, qk, av, mlp)."""
        return {c: sum(getattr(layer, c) for layer in self.layers) for c in COMPONENTS}

    def rows(self) -> list[dict[str, Number]]:
        return [layer.as_dict() for layer in self.layers]


def flops_breakdown(
    text_config: Any,
    groups: Mapping[str, Number] | None = None,
    policy: Policy | DepthPolicy | None = None,
    *,
    convention: str | Convention = "dop",
    schedule: Sequence[Mapping[str, Number]] | None = None,
    rows: Sequence[Sequence[Number]] | None = None,
    vision_groups: Iterable[str] | None = None,
    include_vision: bool = False,
    vision_config: Any = None,
    num_images: int = 1,
    decode_tokens: int = 0,
    lm_head: LmHead = "none",
) -> FlopsBreakdown:
    """Per-layer, per-component costs of one prefill (batch 1). See ``count_flops`` for arguments."""
    conv = _convention(convention)
    shape = text_shape(text_config)
    L = shape.num_layers
    if rows is not None:  # explicit rows: taken as-is (for pdrop, pass visual rows only)
        if groups is not None or policy is not None or schedule is not None:
            raise FlopsError("pass either rows= or groups/policy/schedule, not both")
        if len(rows) != L:
            raise FlopsError(f"rows has {len(rows)} layers, the model has {L}")
        triples = []
        for i, r in enumerate(rows):
            if len(r) != 3:
                raise FlopsError(f"rows[{i}] must be (n_q, n_kv, n_mlp), got {r!r}")
            _check_counts(dict(zip(("n_q", "n_kv", "n_mlp"), r)), f"rows[{i}]")
            triples.append(tuple(r))
        prompt_rows: Number = max(triples[0]) if triples else 0
    else:
        if groups is None:
            raise FlopsError("count_flops needs groups (e.g. {'system': 35, 'vision': 576, ...}) or rows")
        groups = front_end_groups(_check_counts(groups), policy, num_images)  # n_v: fewer visual rows
        count: Iterable[str] | None = None
        if conv.vision_only:
            count = frozenset(vision_groups) if vision_groups is not None else _default_vision_groups(groups)
            if not count & set(groups):
                raise FlopsError(f"the {conv.name!r} convention counts visual rows only, but no visual "
                                 f"group is in groups {sorted(groups)}; pass vision_groups=")
        per_layer = layer_rows(L, groups, policy, schedule=schedule, count_groups=count, num_images=num_images)
        triples = [(r["n_q"], r["n_kv"], r["n_mlp"]) for r in per_layer]
        prompt_rows = sum(n for g, n in groups.items() if count is None or g in count)
    layers = [_layer_flops(shape, conv, i, *t) for i, t in enumerate(triples)]

    extras: dict[str, Any] = {}
    vis = 0
    if include_vision:
        vshape = vision_shape(text_config, vision_config)
        vis = vision_flops(vshape, num_images, conv.per_mac)
        extras["vision_shape"] = vshape

    if lm_head not in ("none", "last", "all"):
        raise FlopsError(f"lm_head must be 'none', 'last' or 'all', got {lm_head!r}")
    head_row = 0
    if lm_head != "none":
        if shape.vocab_size is None:
            raise FlopsError("text config lacks 'vocab_size' (needed for lm_head FLOPs)")
        head_row = conv.per_mac * shape.hidden_size * shape.vocab_size
    # 'last': generate() computes logits of the last position only (logits_to_keep=1);
    # 'all': a plain forward computes them for every prompt position (pruned rows included).
    head = head_row * (1 if lm_head == "last" else prompt_rows if lm_head == "all" else 0)

    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 0:
        raise FlopsError(f"decode_tokens must be an int >= 0, got {decode_tokens!r}")
    dec = 0
    if decode_tokens:
        if conv.vision_only:
            raise FlopsError("decode_tokens is undefined in the 'pdrop' convention (it counts image tokens only)")
        # Decode steps are not pruned: new token t (1-based) runs every op for its one row and
        # attends to the layer's kept prefill KV rows plus the t new tokens so far (itself included).
        N = decode_tokens
        keys = N * (N + 1) // 2  # sum over t of t
        for lf in layers:
            one = _layer_flops(shape, conv, lf.layer, 1, 1, 1)
            dec += N * (one.q + one.k + one.v + one.o + one.mlp)
            dec += (one.qk + one.av) * (N * lf.n_kv + keys)
        dec += N * head_row  # one logit row per step, whenever the head is counted
    return FlopsBreakdown(conv.name, layers, vision=vis, lm_head=head, decode=dec, extras=extras)


def count_flops(
    text_config: Any,
    groups: Mapping[str, Number] | None = None,
    policy: Policy | DepthPolicy | None = None,
    *,
    convention: str | Convention = "dop",
    schedule: Sequence[Mapping[str, Number]] | None = None,
    rows: Sequence[Sequence[Number]] | None = None,
    vision_groups: Iterable[str] | None = None,
    include_vision: bool = False,
    vision_config: Any = None,
    num_images: int = 1,
    decode_tokens: int = 0,
    lm_head: LmHead = "none",
) -> float:
    """Cost of one prefill (batch 1) of the decoder, in the convention's unit (not tera-scaled).

    - ``text_config``: a transformers text config, a full MLLM config (its text config is used)
      or a dict with ``hidden_size, intermediate_size, num_hidden_layers, num_attention_heads``
      (optional ``num_key_value_heads``, ``head_dim``, ``vocab_size``).
    - ``groups``: token count of each group; ``policy``: a ``Policy`` or ``DepthPolicy`` (expanded,
      dead ops included); ``schedule``: per-layer group sizes (``progressive_schedule``) for
      token-level methods; ``rows``: explicit per-layer ``(n_q, n_kv, n_mlp)`` instead of all these
      (taken as-is in every convention; ``lm_head="all"`` then uses the largest count of layer 0).
    - ``vision_groups``: the visual groups for ``pdrop`` (default: ``vision`` and ``vision_*``).
    - ``convention``: ``"dop"`` (FLOPs), ``"fastv"`` or ``"pdrop"`` (multiply-adds; see module doc).
    - extras (default off, so the result is the papers' decoder-only prefill):
      ``include_vision`` (vision tower + projector of ``num_images`` images or crops,
      ``vision_flops``; CLIP/SigLIP-style configs as in the LLaVA family),
      ``lm_head`` ``"last"``/``"all"`` (logit rows), ``decode_tokens`` (single-token decode steps
      after prefill; ``generate(max_new_tokens=N)`` runs N-1 of them).
    """
    return flops_breakdown(
        text_config, groups, policy, convention=convention, schedule=schedule, rows=rows,
        vision_groups=vision_groups, include_vision=include_vision, vision_config=vision_config,
        num_images=num_images, decode_tokens=decode_tokens, lm_head=lm_head,
    ).total


# --------------------------------------------------------------------------------------------
# Equivalent tokens
# --------------------------------------------------------------------------------------------
def _split_vision(groups: Mapping[str, Number], vision_group: str | Iterable[str]) -> tuple[set[str], Number]:
    vis = {vision_group} if isinstance(vision_group, str) else set(vision_group)
    unknown = sorted(vis - set(groups))
    if unknown:
        raise FlopsError(f"vision group {unknown[0]!r} is not in groups {sorted(groups)}")
    others = sum(n for g, n in groups.items() if g not in vis)
    return vis, others


def flops_for_tokens(
    text_config: Any,
    groups: Mapping[str, Number],
    k: Number,
    vision_group: str | Iterable[str] = "vision",
    *,
    convention: str | Convention = "dop",
) -> float:
    """Prefill cost with ``k`` visual tokens kept in every layer and the other groups dense."""
    groups = _check_counts(groups)
    vis, _ = _split_vision(groups, vision_group)
    if k < 0:
        raise FlopsError(f"k (visual tokens) must be >= 0, got {k}")
    sized = {g: n for g, n in groups.items() if g not in vis}
    sized["vision"] = k  # one synthetic visual group holds the budget
    return count_flops(text_config, sized, convention=convention, vision_groups={"vision"})


def equivalent_tokens(
    text_config: Any,
    groups: Mapping[str, Number],
    flops: Number,
    vision_group: str | Iterable[str] = "vision",
    *,
    convention: str | Convention = "dop",
) -> float:
    """The ``k`` visual tokens that, kept in all layers (other groups dense), cost ``flops``.

    Inverts the quadratic exactly: with ``n`` rows in every op a layer costs ``A n^2 + B n``, where
    ``A = 2 c d_q`` (QK^T and AV) and ``B = c (2 d d_kv + 2 d d_q + mats d m)``; solve
    ``L (A n^2 + B n) = flops`` for ``n >= 0`` and subtract the other groups' rows (none under
    ``pdrop``, which counts visual rows only). Extras (vision, head, decode) are not part of it.
    """
    conv = _convention(convention)
    shape = text_shape(text_config)
    groups = _check_counts(groups)
    _, others = _split_vision(groups, vision_group)
    if conv.vision_only:
        others = 0
    if flops < 0:
        raise FlopsError(f"flops must be >= 0, got {flops}")
    probe = _layer_flops(shape, conv, 0, 1, 1, 1)
    A = probe.qk + probe.av
    B = probe.q + probe.k + probe.v + probe.o + probe.mlp
    per_layer = flops / shape.num_layers
    n = 2 * per_layer / (B + math.sqrt(B * B + 4 * A * per_layer))  # stable form of (-B + sqrt(.)) / 2A
    k = n - others
    if k < -1e-9 * max(1.0, others):
        raise FlopsError(f"{flops:.4g} is below the cost of the non-visual groups alone "
                         f"({others} tokens); no visual budget fits")
    return max(k, 0.0)


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------
_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


def flops_unit(values: Iterable[Number]) -> str:
    """The SI prefix a table of FLOPs counts reads best in: the largest one in which the largest value
    is at least 1 (the embedded model's prefill is 110 MFLOPs, not 0.00011 TFLOPs; a 7B's 9.47 TFLOPs)."""
    top = max((abs(float(v)) for v in values if v is not None), default=0.0)
    return next((u for u in ("P", "T", "G", "M", "K") if top >= _UNITS[u]), "")


def unit_scale(unit: str) -> float:
    """FLOPs in one ``unit`` FLOPs (``"M"`` -> 1e6)."""
    if unit not in _UNITS:
        raise FlopsError(f"unknown unit {unit!r}; valid units: {sorted(_UNITS)}")
    return _UNITS[unit]


def format_flops(flops: Number, unit: str = "T", digits: int = 2, suffix: str = "FLOPs") -> str:
    """``format_flops(9.47e12) == "9.47 TFLOPs"``; ``unit="auto"`` picks the largest unit <= value."""
    if unit == "auto":
        unit = next((u for u in ("P", "T", "G", "M", "K") if abs(flops) >= _UNITS[u]), "")
    if unit not in _UNITS:
        raise FlopsError(f"unknown unit {unit!r}; valid units: {sorted(_UNITS)} or 'auto'")
    return f"{flops / _UNITS[unit]:.{digits}f} {unit}{suffix}"


@dataclass(frozen=True)
class FlopsReport:
    """One prefill in the three conventions, next to the dense prompt, plus equivalent tokens.

    ``values`` / ``dense`` map a convention name to its number in that convention's unit (FLOPs
    for dop, multiply-adds for fastv/pdrop; ``None`` for pdrop without a visual group).
    """

    values: dict[str, float | None]
    dense: dict[str, float | None]
    equivalent_tokens: float | None
    kept_tokens: list[Number]

    def ratio(self, convention: str = "dop") -> float | None:
        v, d = self.values.get(convention), self.dense.get(convention)
        return None if v is None or not d else v / d

    def __str__(self) -> str:
        lines = [f"{'convention':<10} {'counts':<50} {'value':>9} {'dense':>9} {'ratio':>7} {'MACs':>9}"]
        for name, conv in CONVENTIONS.items():
            v, d = self.values.get(name), self.dense.get(name)
            if v is None:
                continue
            macs = v / 2 if conv.unit == "FLOPs" else v  # every convention's multiply-adds
            r = self.ratio(name)
            lines.append(f"{name:<10} {conv.source:<50} {v / 1e12:>8.3f}T {d / 1e12:>8.3f}T "
                         f"{r:>7.3f} {macs / 1e12:>8.3f}T")
        if self.equivalent_tokens is not None:
            lines.append(f"equivalent visual tokens (dop): {self.equivalent_tokens:.1f}")
        if self.kept_tokens:
            lines.append(f"visual tokens per layer: {format_kept_tokens(self.kept_tokens)}")
        return "\n".join(lines)


def flops_report(
    text_config: Any,
    groups: Mapping[str, Number],
    policy: Policy | DepthPolicy | None = None,
    *,
    schedule: Sequence[Mapping[str, Number]] | None = None,
    vision_groups: Iterable[str] | None = None,
) -> FlopsReport:
    """The same prefill in the dop / fastv / pdrop conventions, side by side with the dense prompt."""
    groups = _check_counts(groups)
    vis = frozenset(vision_groups) if vision_groups is not None else _default_vision_groups(groups)
    values: dict[str, float | None] = {}
    dense: dict[str, float | None] = {}
    for name, conv in CONVENTIONS.items():
        if conv.vision_only and not vis & set(groups):
            values[name] = dense[name] = None
            continue
        values[name] = count_flops(text_config, groups, policy, convention=name, schedule=schedule,
                                   vision_groups=vis)
        dense[name] = count_flops(text_config, groups, convention=name, vision_groups=vis)
    present = vis & set(groups)
    eq = equivalent_tokens(text_config, groups, values["dop"], present) if present else None
    kept = kept_tokens_per_layer(text_config, groups, policy, schedule=schedule, vision_groups=vis)
    return FlopsReport(values, dense, eq, kept)


# --------------------------------------------------------------------------------------------
# FlopCounterMode: CPU SDPA
# --------------------------------------------------------------------------------------------
def register_cpu_sdpa_flops() -> bool:
    """Teach ``torch.utils.flop_counter`` the CPU SDPA kernel (idempotent); True if it registered now.

    On CPU, ``F.scaled_dot_product_attention`` dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no formula in ``flop_registry``
    (only the CUDA kernels do), so FlopCounterMode counts SDPA attention as 0
    (``transformers-notes.md`` section 7). The formula is torch's own ``sdpa_flop_count``
    (QK^T + AV from the shapes, GQA broadcast included; masks are ignored, as for the CUDA kernels).
    """
    import torch  # noqa: PLC0415 - dop.flops is torch-free (the search runs without torch) but for this hook
    import torch.utils.flop_counter as fc  # noqa: PLC0415 - same

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in fc.flop_registry or op.default in fc.flop_registry:
        return False

    def _sdpa_cpu_flop(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    register: Callable[..., Any] = fc.register_flop_formula(op, get_raw=True)
    register(_sdpa_cpu_flop)
    return True
