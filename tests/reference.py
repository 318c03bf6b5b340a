"""A slow reference for operation pruning, written independently of dop.engine.

Every row is computed at every layer; pruning is expressed by masking instead of skipping:
pruned keys get -inf scores, pruned query rows and pruned MLP rows keep their residual unchanged.
It shares no code with the engine (its own groups, masks, attention and RoPE call).
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import torch


def reference_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_ids: list[int]) -> dict:
    B, T = input_ids.shape
    out = {k: torch.zeros(B, T, dtype=torch.bool) for k in ("system", "vision", "instruction")}
    for b in range(B):
        img_pos = [t for t in range(T) if int(input_ids[b, t]) in image_ids and attention_mask[b, t]]
        first = img_pos[0] if img_pos else None
        for t in range(T):
            if not attention_mask[b, t]:
                continue
            if t in img_pos:
                out["vision"][b, t] = True
            elif first is not None and t < first:
                out["system"][b, t] = True
            else:
                out["instruction"][b, t] = True
    return out


def _keep(policy, layer: int, kind: str, groups: dict, valid: torch.Tensor) -> torch.Tensor:
    keep = valid.clone()
    for op in policy.ops:
        if op.layer == layer and op.type.value == kind:
            keep &= ~groups[op.group]
    return keep


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _reference_layer(layer, idx: int, state: dict):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        policy, groups, valid = state["policy"], state["groups"], state["valid"]
        attn = self.self_attn
        mod = sys.modules[type(attn).__module__]
        B, T, _ = hidden_states.shape
        x = hidden_states
        h = self.input_layernorm(x)
        q = attn.q_proj(h).view(B, T, -1, attn.head_dim)
        k = attn.k_proj(h).view(B, T, -1, attn.head_dim)
        v = attn.v_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
        n_rep = q.shape[1] // k.shape[1]
        k, v = _repeat(k, n_rep), _repeat(v, n_rep)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        kv_keep = _keep(policy, idx, "kv", groups, valid)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = causal[None] & kv_keep[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        has_key = allowed.any(-1)
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
        o = (probs @ v).transpose(1, 2).reshape(B, T, -1)
        o = attn.o_proj(o)
        q_keep = _keep(policy, idx, "q", groups, valid) & has_key
        x = x + torch.where(q_keep[..., None], o, torch.zeros_like(o))
        mlp_keep = _keep(policy, idx, "mlp", groups, valid)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + torch.where(mlp_keep[..., None], m, torch.zeros_like(m))

    return forward


@contextmanager
def reference_prune(model, layers, policy, groups: dict, valid: torch.Tensor):
    state = {"policy": policy, "groups": groups, "valid": valid}
    for i, layer in enumerate(layers):
        layer.forward = types.MethodType(_reference_layer(layer, i, state), layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
