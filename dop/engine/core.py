"""The engine core: per-instance, reversible, gather/scatter (``dop.engine.prune`` adds the ``n_v`` front end).

``prune(model, policy)`` overrides ``forward`` on each decoder-layer *instance* of one model (never a
class) and adds a forward pre-hook on the module that receives ``input_ids``; leaving the ``with``
block restores the model exactly. Per decoder layer, for the rows a policy keeps:

- Q and O projections and attention only for kept query rows; K and V only for kept key rows;
- RoPE at each row's original position (rows of the model's own per-token cos/sin);
- a mask built from original sequence indices: causal, padding, and kept keys only;
- the residual is updated only at kept query rows, the MLP runs only on kept MLP rows;
- a kept query row that sees no kept key skips the attention block (like a pruned q row);
- the KV cache of a layer stores only its kept key rows; decoding masks use the engine's own record
  of each cached row's original index.

A layer whose rows are all kept runs the model's own forward, untouched; with ``Policy()`` every
layer does, so logits are ``torch.equal`` to the unpatched model.
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dop.adapters import Adapter, get_adapter
from dop.errors import DopError
from dop.ops import OpType
from dop.policy import Policy

_LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


_INSTALLED: weakref.WeakSet = weakref.WeakSet()  # models with a Pruner installed (no nesting on one model)


class EngineError(DopError, RuntimeError):
    """The engine cannot run this model or this call."""


@dataclass
class _Rows:
    """Kept rows of one operation type in one layer, per sample.

    ``idx`` (B, M) holds sorted kept sequence indices; samples with fewer than M kept rows are
    padded with T, the index of a scratch row appended to the hidden states, and flagged in ``ok``.
    ``full`` means every row of every sample is kept (no gather needed).
    """

    idx: torch.Tensor
    ok: torch.Tensor
    full: bool

    @property
    def count(self) -> int:
        return self.idx.shape[1]

    @classmethod
    def from_mask(cls, keep: torch.Tensor, counts: list[int] | None = None) -> _Rows:
        """Rows of a (B, T) mask; ``counts`` (kept rows per sample), when the caller has them, saves the
        host sync that the gather size (their max) otherwise needs."""
        B, T = keep.shape
        if counts is None:
            counts = keep.sum(dim=1).tolist()  # the gather size is data dependent: one host sync
        if all(c == T for c in counts):
            idx = torch.arange(T, device=keep.device).expand(B, T)
            return cls(idx, torch.ones_like(keep), True)
        pos = torch.arange(T, device=keep.device).expand(B, T)
        idx = torch.where(keep, pos, torch.full_like(pos, T)).sort(dim=1).values
        idx = idx[:, : max(counts, default=0)]
        return cls(idx, idx < T, False)


@dataclass
class _LayerPlan:
    q: _Rows
    kv: _Rows
    mlp: _Rows
    dense: bool  # every valid row kept for every type: run the layer's own forward
    q_is_kv: bool = False  # the same rows for q and kv (share their norm and RoPE rows)
    kv_pruned: bool = False  # some sample keeps fewer than T kv rows (its cache is shorter)


@dataclass
class LayerProbe:
    """What a selector asked to see of one layer's own attention (``LayerContext.watch_attention``).

    Filled while that layer runs, from the keys the layer computes anyway (no second key projection):
    ``probs`` (B, heads, Q, T), the softmax attention of the ``query_index`` (B, Q) rows over the rows
    kept as keys at that layer (causal, 0 at the other columns); with ``want_keys``, ``keys`` (B, T,
    kv_heads * head_dim), the layer's keys with RoPE (meaningful at the rows it keeps as keys). Read
    it at a later layer's ``before_layer``."""

    query_index: torch.Tensor | None
    want_keys: bool = False
    probs: torch.Tensor | None = None
    keys: torch.Tensor | None = None


@dataclass
class _LayerKeys:
    """Keys of one layer's kept kv rows, computed for a selector's ``attention_probs`` before the
    layer runs; the layer gathers its own (a subset) from them instead of projecting again."""

    rows: _Rows
    h: torch.Tensor  # (B, M, D) normed input at the rows
    k: torch.Tensor  # (B, kv_heads, M, head_dim) with RoPE
    hidden: torch.Tensor  # the layer input they were computed on (a replace() makes them stale)


@dataclass
class _CallState:
    """What one forward call (prefill or decode step) needs across layers."""

    decode: bool
    past: int  # logical number of positions before this call
    length: int  # tokens in this call
    valid: torch.Tensor  # (B, T) non-padding rows of this call
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    plans: dict[int, _LayerPlan] = field(default_factory=dict)
    # token-level selections: (from_layer, rows (B, T) bool, op types) registered by selectors
    drops: list[tuple[int, torch.Tensor, tuple[OpType, ...]]] = field(default_factory=list)
    probes: dict[int, list[LayerProbe]] = field(default_factory=dict)  # layer -> what selectors watch
    keys: dict[int, _LayerKeys] = field(default_factory=dict)  # layer -> keys a selector computed


@dataclass
class _CacheRecord:
    """Original sequence index and validity of every row in each layer's KV cache."""

    cache_ref: weakref.ReferenceType | None
    length: int = 0  # logical length (prompt + generated so far)
    kv_orig: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_pruned: bool = False  # some layer cached fewer rows than the logical length


class Pruner:
    """Installs a policy on one model instance. Use through :func:`prune`."""

    def __init__(
        self,
        model: nn.Module,
        policy: Policy,
        *,
        adapter: Adapter | None = None,
        prefix: tuple[int, torch.Tensor] | None = None,
        selectors: list | None = None,
    ) -> None:
        self.model = model
        self.selectors = list(selectors or [])
        self.policy = policy
        self.adapter = adapter or get_adapter(model)
        self.layers = self.adapter.decoder_layers()
        self.num_layers = len(self.layers)
        policy.validate(self.num_layers, groups=self.adapter.group_names)
        self._check_layers()
        self.prefix = prefix
        if prefix is not None:
            depth, hidden = prefix
            # hidden_states[L] of a transformers output is after the final norm: no valid prefix
            if not 0 <= int(depth) < self.num_layers:
                raise EngineError(f"prefix depth {depth} outside 0..{self.num_layers - 1}")
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                raise EngineError("prefix hidden state must be a (batch, seq, hidden) tensor")
            if policy.n_v is not None:
                raise EngineError("prefix= cannot serve a policy with n_v: its sequence is shorter than the "
                                  "dense states from layer 0 on")
        self.layer_forwards = 0  # decoder-layer forwards actually computed (for sweep accounting)
        self.kept_rows: dict[int, dict[str, list[int]]] = {}  # last prefill: layer -> type -> per-sample
        self.kept_masks: dict[int, dict[str, torch.Tensor]] = {}  # last prefill: layer -> type -> (B, T)
        self._call: _CallState | None = None
        self._record: _CacheRecord | None = None
        self._hook = None
        self._patched: list[tuple[nn.Module, str, object]] = []

    # --- install / remove ------------------------------------------------------------------
    def _check_layers(self) -> None:
        for i, layer in enumerate(self.layers):
            missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
            missing += [f"self_attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(layer, "self_attn", None), p)]
            if missing:
                raise EngineError(
                    f"decoder layer {i} ({type(layer).__name__}) lacks {missing}: unsupported layer recipe"
                )
            if hasattr(layer, "pre_feedforward_layernorm"):
                raise EngineError(f"{type(layer).__name__}: sandwich-norm layers (Gemma) are not supported")
            if getattr(layer.self_attn, "sliding_window", None) is not None:
                raise EngineError(f"decoder layer {i} uses sliding-window attention, which is not supported")

    def install(self) -> Pruner:
        if self._hook is not None:
            raise EngineError("this Pruner is already installed")
        if self.model in _INSTALLED:  # two policies on one model would compute a mixture of both
            raise EngineError(f"{type(self.model).__name__} is already inside a prune() block: nested prune() on one "
                              "model is refused; leave the first block, or run one policy combining both "
                              "(policy_a | policy_b)")
        _INSTALLED.add(self.model)
        module = self.adapter.input_module()
        self._hook = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        for i, layer in enumerate(self.layers):
            # accelerate-dispatched layers already hold an instance `forward`; patch its inner one
            name = "_old_forward" if hasattr(layer, "_hf_hook") and "_old_forward" in layer.__dict__ else "forward"
            original = layer.__dict__.get(name, None)
            own = original if original is not None else type(layer).forward.__get__(layer)
            setattr(layer, name, types.MethodType(_make_layer_forward(self, i, own), layer))
            self._patched.append((layer, name, original))
        return self

    def remove(self) -> None:
        _INSTALLED.discard(self.model)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for layer, name, original in reversed(self._patched):
            if original is None:
                layer.__dict__.pop(name, None)
            else:
                setattr(layer, name, original)
        self._patched.clear()
        self._call = None
        self._record = None

    # --- per call ------------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        seen = {"input_ids": args[0], **kwargs} if args else kwargs  # input_ids may be positional
        input_ids = seen.get("input_ids")
        attn2d = seen.get("attention_mask")
        cache = seen.get("cache", seen.get("past_key_values"))
        changed = False
        record = self._record
        is_decode = (
            record is not None
            and cache is not None
            and record.cache_ref is not None
            and record.cache_ref() is cache
            and record.length > 0
        )
        if not is_decode:
            self.adapter.check_inputs(seen)
            use_cache = seen.get("use_cache")
            use_cache = getattr(self.model.config, "use_cache", True) if use_cache is None else use_cache
            if cache is None and use_cache and not (self.policy.is_identity and not self.selectors):
                # Own the cache the model would create inside, so later decode calls are recognised.
                cache = DynamicCache(config=self.model.config)
                kwargs["cache"] = cache
                changed = True
            T = input_ids.shape[1]
            valid = _valid_rows(attn2d, T, input_ids)
            groups = self.adapter.token_groups(input_ids, attn2d)
            self._record = _CacheRecord(weakref.ref(cache) if cache is not None else None, length=T)
            self._call = _CallState(False, 0, T, valid, groups)
            self.kept_rows, self.kept_masks = {}, {}
        else:
            if self.prefix is not None:
                raise EngineError("prefix reuse is for scoring a prefill, not for decoding")
            T = (input_ids if input_ids is not None else seen["inputs_embeds"]).shape[1]
            past = record.length
            valid = _valid_rows(attn2d, T, input_ids, past=past)
            record.length = past + T
            self._call = _CallState(True, past, T, valid)
        return (args, kwargs) if changed else None

    def _plan(self, layer_idx: int, call: _CallState) -> _LayerPlan:
        plan = call.plans.get(layer_idx)
        if plan is not None:
            return plan
        keep = self.keep_masks(layer_idx, call)
        q, kv, mlp = keep[OpType.Q], keep[OpType.KV], keep[OpType.MLP]
        # The one host sync of a layer plan: the gather sizes (and whether the layer is dense) depend
        # on the data. Every mask is a subset of the valid rows, so equal counts mean equal masks.
        valid_n, q_n, kv_n, mlp_n, q_vs_kv = torch.stack(
            [call.valid.sum(1), q.sum(1), kv.sum(1), mlp.sum(1), (q != kv).sum(1)]).tolist()
        T = call.valid.shape[1]
        kv_rows = _Rows.from_mask(kv, kv_n)
        q_is_kv = not any(q_vs_kv)
        plan = _LayerPlan(kv_rows if q_is_kv else _Rows.from_mask(q, q_n), kv_rows, _Rows.from_mask(mlp, mlp_n),
                          dense=q_n == valid_n and kv_n == valid_n and mlp_n == valid_n, q_is_kv=q_is_kv,
                          kv_pruned=any(c < T for c in kv_n))
        call.plans[layer_idx] = plan
        self.kept_rows[layer_idx] = {OpType.Q.value: q_n, OpType.KV.value: kv_n, OpType.MLP.value: mlp_n}
        self.kept_masks[layer_idx] = {t.value: m for t, m in keep.items()}
        return plan

    def keep_masks(self, layer_idx: int, call: _CallState) -> dict[OpType, torch.Tensor]:
        """(B, T) kept rows per op type at a layer: the policy's groups, then selectors' drops."""
        keep = {}
        for op_type in (OpType.Q, OpType.KV, OpType.MLP):
            mask = call.valid.clone()
            for group in self.policy.pruned_groups(layer_idx, op_type):
                g = call.groups.get(group)
                if g is not None:
                    mask &= ~g
            for start, rows, op_types in call.drops:
                if start <= layer_idx and op_type in op_types:
                    mask &= ~rows
            keep[op_type] = mask
        return keep


class LayerContext:
    """What a selector sees at the start of a decoder layer during a prefill.

    ``hidden`` is the layer's input (B, T, D); ``groups`` the adapter's group masks; ``keep(type)``
    the rows kept at this layer so far. ``drop(rows, from_layer)`` removes rows (per sample) from
    ``from_layer`` on; ``replace(rows, values)`` overwrites kept rows of the layer's input (a merging
    method's recycled tokens). Attention for scoring, with any attention backend:
    ``watch_attention`` hands over this layer's attention rows (and keys) as the layer itself computes
    them, for a decision at a later layer; ``attention_probs`` computes them now, before the layer
    runs (for a decision at this layer), and the layer then reuses those keys.
    """

    def __init__(self, pruner: Pruner, layer_idx: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                 call: _CallState) -> None:
        self.pruner, self.layer_idx, self.layer, self.hidden = pruner, layer_idx, layer, hidden
        self.position_embeddings = kwargs.get("position_embeddings")
        self._call = call

    @property
    def groups(self) -> dict[str, torch.Tensor]:
        return self._call.groups

    @property
    def valid(self) -> torch.Tensor:
        return self._call.valid

    @property
    def num_layers(self) -> int:
        return self.pruner.num_layers

    def keep(self, op_type: OpType | str = OpType.KV) -> torch.Tensor:
        return self.pruner.keep_masks(self.layer_idx, self._call)[OpType(op_type)]

    def drop(self, rows: torch.Tensor, from_layer: int | None = None,
             types: tuple[OpType | str, ...] = (OpType.Q, OpType.KV, OpType.MLP)) -> None:
        start = self.layer_idx if from_layer is None else int(from_layer)
        if start < self.layer_idx:
            raise EngineError(f"a selector at layer {self.layer_idx} cannot drop rows from layer {start}")
        if rows.shape != self._call.valid.shape or rows.dtype != torch.bool:
            raise EngineError(f"drop rows must be a bool mask of shape {tuple(self._call.valid.shape)}")
        self._call.drops.append((start, rows.to(self._call.valid.device), tuple(OpType(t) for t in types)))

    def replace(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the layer input at ``rows`` (B, T) bool with ``values`` (B, T, D) at those rows;
        the rows must be kept by every op of this layer (their new content then flows on)."""
        if rows.shape != self._call.valid.shape or rows.dtype != torch.bool:
            raise EngineError(f"replace rows must be a bool mask of shape {tuple(self._call.valid.shape)}")
        if values.shape != self.hidden.shape:
            raise EngineError(f"replace values must have the hidden shape {tuple(self.hidden.shape)}")
        kept = self.keep(OpType.Q) & self.keep(OpType.KV) & self.keep(OpType.MLP)
        if bool((rows & ~kept).any()):  # a host sync, kept: a wrong replace would corrupt rows silently
            raise EngineError(f"layer {self.layer_idx}: replace() touches rows that this layer does not keep")
        self.hidden = torch.where(rows.unsqueeze(-1), values.to(self.hidden.dtype), self.hidden)

    def watch_attention(self, query_index: torch.Tensor | None = None, keys: bool = False) -> LayerProbe:
        """This layer's softmax attention of the rows ``query_index`` (B, Q) (and with ``keys`` its keys),
        as the layer computes them: the returned probe is filled once the layer has run (read it at a
        later layer's ``before_layer``). Costs the query rows' q projection, no second key projection."""
        if query_index is None and not keys:
            raise EngineError("watch_attention needs query rows, keys=True, or both")
        probe = LayerProbe(None if query_index is None else query_index.to(self._call.valid.device), keys)
        self._call.probes.setdefault(self.layer_idx, []).append(probe)
        return probe

    def attention_probs(self, query_index: torch.Tensor, layer: nn.Module | None = None,
                        hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention (B, heads, Q, T) of the rows ``query_index`` (B, Q) over the rows kept as
        keys at this layer (causal), computed now with ``layer``'s q/k projections (default: this
        layer) on ``hidden`` (default: this layer's input). Columns of dropped rows are 0. Keys are
        projected for the kept rows only; with the defaults the layer reuses them for its own keys."""
        own = layer is None and hidden is None
        layer = self.layer if layer is None else layer
        hidden = self.hidden if hidden is None else hidden
        keys = self._call.keys.get(self.layer_idx) if own else None
        if keys is None or keys.hidden is not hidden:
            keys = _project_keys(layer, hidden, _Rows.from_mask(self.keep(OpType.KV)), self.position_embeddings)
            if own:
                self._call.keys[self.layer_idx] = keys
        q_hidden = (_gather_rows(keys.h, query_index) if keys.rows.full  # keys.h is the whole normed input
                    else layer.input_layernorm(_gather_rows(hidden, query_index)))
        return _attention_rows(layer, q_hidden, query_index, keys.k, keys.rows, hidden.shape[1],
                               self.position_embeddings)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, Q, D) rows ``index`` (B, Q) of ``x`` (B, T, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _project_keys(layer: nn.Module, hidden: torch.Tensor, rows: _Rows, position_embeddings) -> _LayerKeys:
    """The layer's normed input and keys (RoPE at each row's position) at ``rows`` of ``hidden``."""
    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]
    B, _, D = hidden.shape
    ext = hidden if rows.full else torch.cat([hidden, hidden.new_zeros(B, 1, D)], dim=1)
    h = layer.input_layernorm(_gather(ext, rows))
    k = _rotate(module, _project(attn, h, "k_proj", "k_norm"), *_rope_rows(position_embeddings, rows, B))
    return _LayerKeys(rows, h, k, hidden)


def _attention_rows(layer: nn.Module, q_hidden: torch.Tensor, query_index: torch.Tensor, k: torch.Tensor,
                    rows: _Rows, T: int, position_embeddings) -> torch.Tensor:
    """(B, heads, Q, T) softmax attention of the normed query rows ``q_hidden`` (B, Q, D) at positions
    ``query_index`` over keys ``k`` (B, kv_heads, M, head_dim) of ``rows`` (causal); 0 elsewhere."""
    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]
    B = q_hidden.shape[0]
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)
    ci = query_index.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
    q = _rotate(module, _project(attn, q_hidden, "q_proj", "q_norm"), cos.gather(1, ci), sin.gather(1, ci))
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling
    allowed = rows.ok[:, None, :] & (rows.idx[:, None, :] <= query_index[:, :, None])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    if not rows.full:  # back to sequence columns (padding slots land in a scratch column T)
        full = scores.new_full((*scores.shape[:3], T + 1), float("-inf"))
        scores = full.scatter(3, rows.idx[:, None, None, :].expand_as(scores), scores)[..., :T]
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def _fill_probes(layer: nn.Module, probes: list[LayerProbe], hidden: torch.Tensor, k: torch.Tensor, rows: _Rows,
                 position_embeddings, normed: torch.Tensor | None = None) -> None:
    """Fill ``probes`` from a layer's own keys ``k`` (B, kv_heads, M, head_dim) at ``rows``; ``hidden``
    is the layer input (B, T, D), ``normed`` its normed version when the layer computed it whole."""
    B, T, _ = hidden.shape
    for probe in probes:
        if probe.query_index is not None:
            qi = probe.query_index
            q_hidden = (_gather_rows(normed, qi) if normed is not None
                        else layer.input_layernorm(_gather_rows(hidden, qi)))
            probe.probs = _attention_rows(layer, q_hidden, qi, k, rows, T, position_embeddings)
        if probe.want_keys:
            flat = k.transpose(1, 2).reshape(B, k.shape[2], -1)
            if not rows.full:
                out = flat.new_zeros(B, T + 1, flat.shape[-1])
                flat = out.scatter(1, rows.idx.unsqueeze(-1).expand_as(flat), flat)[:, :T]
            probe.keys = flat


def _valid_rows(attn2d: torch.Tensor | None, T: int, input_ids: torch.Tensor | None, past: int = 0) -> torch.Tensor:
    if attn2d is None:
        B = input_ids.shape[0] if input_ids is not None else 1
        device = input_ids.device if input_ids is not None else None
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if attn2d.dim() != 2:
        raise EngineError(f"the engine needs a 2-D attention_mask (batch, seq), got shape {tuple(attn2d.shape)}")
    return attn2d[:, past : past + T].bool()


def _make_layer_forward(pruner: Pruner, layer_idx: int, own_forward):
    def forward(layer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        call = pruner._call
        if call is None:  # not inside a model call we saw (e.g. a direct layer call)
            return own_forward(hidden_states, *args, **kwargs)
        if pruner.prefix is not None and not call.decode:
            depth, hidden = pruner.prefix
            if layer_idx < depth:  # the dense prefix: its output is known, skip the compute
                _record_full(pruner, layer_idx, call)
                return hidden.to(hidden_states.dtype) if layer_idx == depth - 1 else hidden_states
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        record = pruner._record
        if call.decode:
            pruner.layer_forwards += 1
            if not record.kv_pruned:  # every cache holds every row: the model's own path is exact
                _extend_full(record, layer_idx, call)
                return own_forward(hidden_states, *args, **kwargs)
            return _decode_layer(layer, layer_idx, hidden_states, kwargs, cache, pruner, call)
        if pruner.selectors and layer_idx not in call.plans:
            ctx = LayerContext(pruner, layer_idx, layer, hidden_states, kwargs, call)
            for selector in pruner.selectors:
                selector.before_layer(ctx)
            hidden_states = ctx.hidden  # a selector may have replaced rows
        plan = pruner._plan(layer_idx, call)
        pruner.layer_forwards += 1
        probes = call.probes.pop(layer_idx, None)
        keys = call.keys.pop(layer_idx, None)
        if keys is not None and keys.hidden is not hidden_states:
            keys = None  # computed before a replace(): stale
        if plan.dense:
            _record_full(pruner, layer_idx, call)
            if not probes:
                return own_forward(hidden_states, *args, **kwargs)
            return _dense_with_probes(layer, own_forward, hidden_states, args, kwargs, probes, call.valid)
        return _prefill_layer(layer, layer_idx, hidden_states, kwargs, cache, pruner, call, plan, probes, keys)

    return forward


def _dense_with_probes(layer: nn.Module, own_forward, hidden: torch.Tensor, args: tuple, kwargs: dict,
                       probes: list[LayerProbe], valid: torch.Tensor) -> torch.Tensor:
    """The layer's own forward, its k_proj input (the normed hidden) and output kept for the probes."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["h"], seen["k"] = inputs[0], output

    handle = layer.self_attn.k_proj.register_forward_hook(grab)
    try:
        out = own_forward(hidden, *args, **kwargs)
    finally:
        handle.remove()
    if "k" not in seen:
        raise EngineError(f"{type(layer).__name__}: its forward never called self_attn.k_proj; "
                          "watch_attention cannot read its keys")
    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]
    B, T, _ = hidden.shape
    cos, sin = (t.expand(B, -1, -1) for t in kwargs["position_embeddings"])
    k = seen["k"].view(B, T, -1, attn.head_dim)
    if hasattr(attn, "k_norm"):  # per head (Qwen3-VL)
        k = attn.k_norm(k)
    k = _rotate(module, k.transpose(1, 2), cos, sin)
    # every position present (no gather); the valid rows are the kept keys of a dense layer
    rows = _Rows(torch.arange(T, device=hidden.device).expand(B, T), valid, True)
    _fill_probes(layer, probes, hidden, k, rows, kwargs["position_embeddings"], normed=seen["h"])
    return out


def _record_full(pruner: Pruner, layer_idx: int, call: _CallState) -> None:
    record = pruner._record
    T = call.length
    B = call.valid.shape[0]
    record.kv_orig[layer_idx] = torch.arange(T, device=call.valid.device).expand(B, T)
    record.kv_valid[layer_idx] = call.valid


def _extend_full(record: _CacheRecord, layer_idx: int, call: _CallState) -> None:
    B, T = call.valid.shape
    new = call.past + torch.arange(T, device=call.valid.device).expand(B, T)
    record.kv_orig[layer_idx] = torch.cat([record.kv_orig[layer_idx], new], dim=1)
    record.kv_valid[layer_idx] = torch.cat([record.kv_valid[layer_idx], call.valid], dim=1)


# --- the layer computation ------------------------------------------------------------------
def _gather(x: torch.Tensor, rows: _Rows) -> torch.Tensor:
    if rows.full:
        return x[:, : rows.count]
    return x.gather(1, rows.idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _scatter(ext: torch.Tensor, rows: _Rows, values: torch.Tensor) -> torch.Tensor:
    if rows.full:
        return torch.cat([values, ext[:, rows.count :]], dim=1)
    return ext.scatter(1, rows.idx.unsqueeze(-1).expand(-1, -1, ext.shape[-1]), values)


def _rope_rows(position_embeddings, rows: _Rows, B: int):
    cos, sin = position_embeddings
    T = cos.shape[1]
    cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
    if rows.full:
        return cos, sin
    idx = rows.idx.clamp(max=T - 1).unsqueeze(-1).expand(-1, -1, cos.shape[-1])
    return cos.gather(1, idx), sin.gather(1, idx)


def _rotate(module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The family's own rotate_half with the standard RoPE formula (Llama, Qwen2/2.5/3-VL, InternVL).
    return x * cos.unsqueeze(1) + module.rotate_half(x) * sin.unsqueeze(1)


def _attention_fn(attn: nn.Module, module):
    impl = attn.config._attn_implementation
    if impl in ("eager", "sdpa"):
        return impl, ALL_ATTENTION_FUNCTIONS.get_interface(impl, module.eager_attention_forward)
    # Flash/flex kernels take no arbitrary 4-D mask; pruned layers run SDPA with the explicit mask.
    return "sdpa", sdpa_attention_forward


def _project(attn: nn.Module, x: torch.Tensor, proj: str, norm: str | None) -> torch.Tensor:
    B, M, _ = x.shape
    linear = getattr(attn, proj)
    y = linear(x).view(B, M, linear.out_features // attn.head_dim, attn.head_dim)
    if norm is not None and hasattr(attn, norm):  # q_norm/k_norm act per head (Qwen3-VL)
        y = getattr(attn, norm)(y)
    return y.transpose(1, 2)


def _attend(
    layer: nn.Module,
    x_q: torch.Tensor,
    q_orig: torch.Tensor,
    cos_q: torch.Tensor,
    sin_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_orig: torch.Tensor,
    kv_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of kept query rows over the given keys; returns (o_proj output, has_key)."""
    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]
    q = _project(attn, x_q, "q_proj", "q_norm")
    q = _rotate(module, q, cos_q, sin_q)
    allowed = kv_valid[:, None, :] & (kv_orig[:, None, :] <= q_orig[:, :, None])
    has_key = allowed.any(dim=-1)
    impl, fn = _attention_fn(attn, module)
    mask = allowed[:, None]
    if impl == "eager":
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
    out, _ = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
    B, M = x_q.shape[:2]
    out = attn.o_proj(out.reshape(B, M, -1).contiguous())
    return out, has_key


def _prefill_layer(
    layer: nn.Module,
    layer_idx: int,
    hidden: torch.Tensor,
    kwargs: dict,
    cache,
    pruner: Pruner,
    call: _CallState,
    plan: _LayerPlan,
    probes: list[LayerProbe] | None = None,
    keys: _LayerKeys | None = None,
) -> torch.Tensor:
    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]
    B, T, D = hidden.shape
    record = pruner._record
    # A scratch row T takes the writes of padded index slots (samples with fewer kept rows).
    ext = torch.cat([hidden, hidden.new_zeros(B, 1, D)], dim=1)
    position_embeddings = kwargs["position_embeddings"]

    # Key/value side: kept kv rows only, RoPE at their original positions.
    cos_kv, sin_kv = _rope_rows(position_embeddings, plan.kv, B)
    if keys is not None:  # a selector projected this layer's keys on a superset of its rows: gather them
        # (padding slots may pick any row of keys: they are masked like every padding slot)
        pos = torch.searchsorted(keys.rows.idx.contiguous(), plan.kv.idx.contiguous())
        pos = pos.clamp(max=max(keys.rows.count - 1, 0))
        h_kv = keys.h.gather(1, pos.unsqueeze(-1).expand(-1, -1, D))
        k = keys.k.gather(2, pos[:, None, :, None].expand(-1, keys.k.shape[1], -1, keys.k.shape[3]))
    else:
        h_kv = layer.input_layernorm(_gather(ext, plan.kv))
        k = _rotate(module, _project(attn, h_kv, "k_proj", "k_norm"), cos_kv, sin_kv)
    v = _project(attn, h_kv, "v_proj", None)
    kv_orig, kv_valid = plan.kv.idx, plan.kv.ok
    if probes:
        _fill_probes(layer, probes, hidden, k, plan.kv, position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    record.kv_orig[layer_idx], record.kv_valid[layer_idx] = kv_orig, kv_valid
    if plan.kv_pruned:
        record.kv_pruned = True

    # Query side: kept q rows attend over kept keys; residual added only there.
    if plan.q.count:
        x_q = _gather(ext, plan.q)
        h_q = h_kv if plan.q_is_kv else layer.input_layernorm(x_q)
        cos_q, sin_q = (cos_kv, sin_kv) if plan.q_is_kv else _rope_rows(position_embeddings, plan.q, B)
        o, has_key = _attend(layer, h_q, plan.q.idx, cos_q, sin_q, k, v, kv_orig, kv_valid)
        x_q = x_q + torch.where(has_key.unsqueeze(-1), o, torch.zeros((), dtype=o.dtype, device=o.device))
        ext = _scatter(ext, plan.q, x_q)

    # MLP on kept rows.
    if plan.mlp.count:
        x_m = _gather(ext, plan.mlp)
        x_m = x_m + layer.mlp(layer.post_attention_layernorm(x_m))
        ext = _scatter(ext, plan.mlp, x_m)
    return ext[:, :T]


def _decode_layer(
    layer: nn.Module,
    layer_idx: int,
    hidden: torch.Tensor,
    kwargs: dict,
    cache,
    pruner: Pruner,
    call: _CallState,
) -> torch.Tensor:
    """A decode step: all new rows kept; keys are this layer's cached kept rows plus the new ones."""
    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]
    record = pruner._record
    B, T, _ = hidden.shape
    cos, sin = (t.expand(B, -1, -1) for t in kwargs["position_embeddings"])
    h = layer.input_layernorm(hidden)
    k = _rotate(module, _project(attn, h, "k_proj", "k_norm"), cos, sin)
    v = _project(attn, h, "v_proj", None)
    if cache is None:
        raise EngineError("a decode step needs the KV cache of the prefill")
    k, v = cache.update(k, v, attn.layer_idx)
    _extend_full(record, layer_idx, call)
    kv_orig, kv_valid = record.kv_orig[layer_idx], record.kv_valid[layer_idx]
    if kv_orig.shape[1] != k.shape[2]:
        raise EngineError(
            f"layer {layer_idx}: KV cache holds {k.shape[2]} rows but the engine recorded {kv_orig.shape[1]}; "
            "was the cache used outside this prune() block?"
        )
    q_orig = call.past + torch.arange(T, device=hidden.device).expand(B, T)
    o, has_key = _attend(layer, h, q_orig, cos, sin, k, v, kv_orig, kv_valid)
    x = hidden + torch.where(has_key.unsqueeze(-1), o, torch.zeros((), dtype=o.dtype, device=o.device))
    return x + layer.mlp(layer.post_attention_layernorm(x))


@contextmanager
def prune(
    model: nn.Module,
    policy: Policy | None = None,
    *,
    adapter: Adapter | None = None,
    prefix: tuple[int, torch.Tensor] | None = None,
    selectors: list | None = None,
) -> Iterator[Pruner]:
    """The gather/scatter core of ``dop.engine.prune``, without the ``n_v`` front end: the baselines'
    selectors run on it, and ``dop.engine.prune`` composes it with the front end."""
    pruner = Pruner(model, policy if policy is not None else Policy(), adapter=adapter, prefix=prefix,
                    selectors=selectors)
    pruner.install()
    try:
        yield pruner
    finally:
        pruner.remove()
