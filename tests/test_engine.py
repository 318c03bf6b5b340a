"""The engine against the unpatched model and an independent masking reference."""

from __future__ import annotations

import random

import pytest
import torch
from reference import reference_groups, reference_prune
from tiny_models import BUILDERS, IDS

from dop.adapters import AdapterError, get_adapter
from dop.engine import prune
from dop.ops import Operation
from dop.policy import DepthPolicy, Policy, PolicyError

FAMILIES = list(BUILDERS)
ATTNS = ["eager", "sdpa"]


def random_policy(num_layers: int, seed: int, p: float = 0.3) -> Policy:
    rng = random.Random(seed)
    return Policy(
        Operation(layer, group, kind)
        for layer in range(num_layers)
        for group in ("system", "vision", "instruction")
        for kind in ("q", "kv", "mlp")
        if rng.random() < p
    )


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_is_bit_exact(family, attn):
    model, make_inputs = BUILDERS[family](attn=attn)
    for batch in (1, 3):
        inputs = make_inputs(batch, seed=batch)
        stock = model(**inputs).logits
        with prune(model, Policy()) as pruner:
            ours = model(**inputs).logits
        assert torch.equal(stock, ours)
        assert pruner.layer_forwards == len(get_adapter(model).decoder_layers())


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_random_policies_match_reference(family, attn):
    model, make_inputs = BUILDERS[family](attn=attn)
    adapter = get_adapter(model)
    inputs = make_inputs(3, seed=7)
    valid = inputs["attention_mask"].bool()
    groups = reference_groups(inputs["input_ids"], inputs["attention_mask"], adapter.vision_token_ids())
    for seed in range(3):
        policy = random_policy(adapter.num_layers, seed)
        with prune(model, policy):
            ours = model(**inputs).logits
        with reference_prune(model, adapter.decoder_layers(), policy, groups, valid):
            ref = model(**inputs, use_cache=False).logits
        torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=0)


def test_engine_really_skips_rows():
    model, make_inputs = BUILDERS["llava"](attn="sdpa")
    inputs = make_inputs(1)
    n_vision = int((inputs["input_ids"] == IDS["<image>"]).sum())
    T = inputs["input_ids"].shape[1]
    policy = DepthPolicy({("kv", "vision"): 2, ("mlp", "vision"): 1}).expand(4, dead_ops=False)
    with prune(model, policy) as pruner:
        model(**inputs)
    assert pruner.kept_rows[1] == {"q": [T], "kv": [T], "mlp": [T - n_vision]}
    assert pruner.kept_rows[3] == {"q": [T], "kv": [T - n_vision], "mlp": [T - n_vision]}
    # KV cache of a pruned layer holds only the kept rows
    with prune(model, policy):
        out = model(**inputs, use_cache=True)
    lengths = [layer.keys.shape[2] for layer in out.cache.layers]
    assert lengths == [T, T, T - n_vision, T - n_vision]


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_batch_invariance(family, attn):
    model, make_inputs = BUILDERS[family](attn=attn)
    policy = random_policy(4, seed=11, p=0.35)
    batch = make_inputs(3, seed=5)
    with prune(model, policy):
        together = model(**batch).logits
    for i in range(3):
        single = make_inputs(3, seed=5)
        keep = single["attention_mask"][i].bool()
        alone = {k: v[i : i + 1][:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                 for k, v in single.items()}
        if "pixel_values" in alone and family == "llava":
            alone["pixel_values"] = single["pixel_values"][i : i + 1]
        if family == "llava_next":
            alone["pixel_values"] = single["pixel_values"][i : i + 1]
            alone["image_sizes"] = single["image_sizes"][i : i + 1]
        if family == "qwen2_vl":
            grid = single["image_grid_thw"]
            counts = grid.prod(-1).tolist()
            start = sum(counts[:i])
            alone["pixel_values"] = single["pixel_values"][start : start + counts[i]]
            alone["image_grid_thw"] = grid[i : i + 1]
        with prune(model, policy):
            solo = model(**alone).logits[0]
        torch.testing.assert_close(solo, together[i][keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_cached_generation_equals_recomputation(family, attn):
    model, make_inputs = BUILDERS[family](attn=attn)
    inputs = make_inputs(3, seed=2)
    # Generated tokens are never pruned: policies on system/vision make recomputation comparable.
    policy = DepthPolicy({("kv", "vision"): 1, ("q", "system"): 2, ("mlp", "vision"): 0,
                          ("kv", "system"): 3}).expand(4)
    specials = [[IDS[t]] for t in ("<image>", "<|image_pad|>", "<|vision_start|>", "<|video_pad|>")]
    with prune(model, policy):
        gen = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, bad_words_ids=specials, min_new_tokens=8)
    T0 = inputs["input_ids"].shape[1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for step in range(8):
        ids = gen.sequences[:, : T0 + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, step, dtype=torch.long)], dim=1)
        if "mm_token_type_ids" in inputs:
            tt = inputs["mm_token_type_ids"]
            extra["mm_token_type_ids"] = torch.cat([tt, torch.zeros(3, step, dtype=tt.dtype)], dim=1)
        with prune(model, policy):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
        torch.testing.assert_close(logits, gen.logits[step], atol=1e-5, rtol=0)


def test_prefix_reuse_equals_full_run():
    model, make_inputs = BUILDERS["llava"](attn="sdpa", layers=6)
    inputs = make_inputs(2, seed=3)
    dense = model(**inputs, output_hidden_states=True)
    for depth in range(6):
        policy = DepthPolicy({("kv", "vision"): depth, ("mlp", "system"): depth}).expand(6)
        with prune(model, policy) as full:
            expected = model(**inputs).logits
        with prune(model, policy, prefix=(depth, dense.hidden_states[depth])) as reuse:
            got = model(**inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert full.layer_forwards == 6 and reuse.layer_forwards == 6 - depth


def test_install_is_reversible_and_per_instance():
    model, make_inputs = BUILDERS["llava"](attn="sdpa")
    other, _ = BUILDERS["llava"](attn="sdpa")
    layers = get_adapter(model).decoder_layers()
    cls_forward = type(layers[0]).forward
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with prune(model, random_policy(4, 0)):
        assert "forward" in layers[0].__dict__
        assert "forward" not in get_adapter(other).decoder_layers()[0].__dict__
        assert type(layers[0]).forward is cls_forward
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert not get_adapter(model).input_module()._forward_pre_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    inputs = make_inputs(1)
    with prune(model, random_policy(4, 1)):
        model(**inputs)
    assert model.config.to_dict() == other.config.to_dict()  # the config never carries method knobs


def test_bad_inputs_name_the_field():
    model, make_inputs = BUILDERS["llava"](attn="sdpa")
    with pytest.raises(PolicyError, match="group 'image'"):
        with prune(model, Policy([Operation(0, "image", "kv")])):
            pass
    with pytest.raises(ValueError, match="operation type 'ffn'"):
        Operation(0, "vision", "ffn")
    with pytest.raises(PolicyError, match="layer 9 is past"):
        with prune(model, Policy([Operation(9, "vision", "kv")])):
            pass
    with pytest.raises(PolicyError, match="32 decoder layers|num_layers=32"):
        with prune(model, Policy([Operation(1, "vision", "kv")], num_layers=32, model="llava-hf/llava-1.5-7b-hf")):
            pass
    inputs = make_inputs(1)
    inputs.pop("pixel_values")
    with prune(model, Policy([Operation(1, "vision", "kv")])):
        with pytest.raises(AdapterError, match="images missing"):
            model(**inputs)


def test_manual_decode_loop_without_passing_a_cache():
    model, make_inputs = BUILDERS["llava"](attn="sdpa")
    inputs = make_inputs(2, seed=4)
    policy = DepthPolicy({("kv", "vision"): 1, ("kv", "system"): 2}).expand(4)
    with prune(model, policy):
        out = model(**inputs)  # the model's cache, created for us, holds only kept rows
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(input_ids=nxt, attention_mask=mask, cache=out.cache).logits[:, -1]
        full = model(input_ids=torch.cat([inputs["input_ids"], nxt], 1), attention_mask=mask,
                     pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


class LastTokenTopK:
    """A FastV-like toy selector: at layer k-1, keep the vision rows the last token attends most."""

    def __init__(self, layer: int, keep: int):
        self.layer, self.k, self.dropped = layer, keep, None

    def before_layer(self, ctx):
        if ctx.layer_idx != self.layer - 1:
            return
        B, T = ctx.valid.shape
        probs = ctx.attention_probs(torch.full((B, 1), T - 1)).mean(1)[:, 0]  # (B, T)
        vision = ctx.groups["vision"]
        score = probs.masked_fill(~vision, float("-inf"))
        top = score.topk(self.k, dim=1).indices
        keep = torch.zeros_like(vision).scatter(1, top, True)
        self.dropped = vision & ~keep
        ctx.drop(self.dropped, from_layer=self.layer)


@pytest.mark.parametrize("attn", ATTNS)
def test_selector_drops_rows_like_the_reference(attn):
    model, make_inputs = BUILDERS["llava"](attn=attn)
    adapter = get_adapter(model)
    inputs = make_inputs(3, seed=8)
    selector = LastTokenTopK(layer=2, keep=5)
    with prune(model, selectors=[selector]) as pruner:
        ours = model(**inputs).logits
    assert pruner.kept_rows[2]["kv"] == [int(v) for v in (inputs["attention_mask"].sum(1) - 11)]
    valid = inputs["attention_mask"].bool()
    groups = {"dropped": selector.dropped}
    policy = Policy(Operation(layer, "dropped", t) for layer in (2, 3) for t in ("q", "kv", "mlp"))
    with reference_prune(model, adapter.decoder_layers(), policy, groups, valid):
        ref = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=0)
    # generation after a token-level selection stays exact
    with prune(model, selectors=[LastTokenTopK(layer=2, keep=5)]):
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_attention_probs_equal_eager_weights():
    model, make_inputs = BUILDERS["llava"](attn="eager")
    inputs = make_inputs(2, seed=1)
    stock = model(**inputs, output_attentions=True).attentions
    seen = {}

    class Probe:
        def before_layer(self, ctx):
            T = ctx.valid.shape[1]
            seen[ctx.layer_idx] = ctx.attention_probs(torch.tensor([[T - 1, T - 2]] * 2))

    with prune(model, selectors=[Probe()]):
        model(**inputs)
    valid = inputs["attention_mask"].bool()
    for layer, probs in seen.items():
        expected = stock[layer][:, :, -2:].flip(2) * valid[:, None, None, :]
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)


def _last_rows(B: int, T: int) -> torch.Tensor:
    return torch.tensor([[T - 1, T - 2]] * B)


class _DropThenScore:
    """Drops vision rows ``drop_rows`` from layer 1, then at every layer scores the last two rows:
    ``mode="watch"`` while the layer runs (``watch_attention``), ``"now"`` before (``attention_probs``)."""

    def __init__(self, mode: str, drop_rows: torch.Tensor):
        self.mode, self.drop_rows, self.seen = mode, drop_rows, {}

    def before_layer(self, ctx):
        if ctx.layer_idx == 1:
            ctx.drop(self.drop_rows)
        B, T = ctx.valid.shape
        if self.mode == "watch":
            self.seen[ctx.layer_idx] = ctx.watch_attention(_last_rows(B, T), keys=True)
        else:
            self.seen[ctx.layer_idx] = ctx.attention_probs(_last_rows(B, T))


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_watched_attention_equals_attention_computed_before_the_layer(family, attn):
    """The probe filled from a layer's own keys (dense layer 0: the model's own forward; pruned layers
    1-3: the engine's) equals the attention recomputed before the layer, and its keys are the layer's."""
    model, make_inputs = BUILDERS[family](attn=attn)
    inputs = make_inputs(3, seed=2)
    vision = get_adapter(model).token_groups(inputs["input_ids"], inputs["attention_mask"])["vision"]
    drop_rows = vision & (torch.rand(vision.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    watch, now = _DropThenScore("watch", drop_rows), _DropThenScore("now", drop_rows)
    with torch.no_grad():
        with prune(model, selectors=[watch]):
            watched = model(**inputs).logits
        with prune(model, selectors=[now]):
            computed = model(**inputs).logits
        hidden = model(**inputs, output_hidden_states=True).hidden_states[0]  # layer 0's input
    torch.testing.assert_close(watched, computed, atol=1e-5, rtol=0)
    assert sorted(watch.seen) == sorted(now.seen) == [0, 1, 2, 3]
    for layer in range(4):
        torch.testing.assert_close(watch.seen[layer].probs, now.seen[layer], atol=1e-6, rtol=0)
    kept = ~drop_rows & inputs["attention_mask"].bool()
    assert (watch.seen[2].probs.sum(-1) - 1).abs().max() < 1e-5 and (watch.seen[2].probs[..., ~kept[0]][0] == 0).all()
    # layer 0's keys: its k_proj on its normed input, RoPE at each row's position
    layer0 = get_adapter(model).decoder_layers()[0]
    attn_mod = layer0.self_attn
    B, T, _ = hidden.shape
    k = attn_mod.k_proj(layer0.input_layernorm(hidden)).view(B, T, -1, attn_mod.head_dim)
    valid = inputs["attention_mask"].bool()
    keys = watch.seen[0].keys.view(B, T, -1, attn_mod.head_dim)
    # RoPE rotates each head's key (its norm stays); rows of padding are not compared
    torch.testing.assert_close(keys.norm(dim=-1)[valid], k.norm(dim=-1)[valid], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(keys[valid], k[valid])  # rotated


@pytest.mark.parametrize("attn", ATTNS)
def test_a_layer_scoring_its_own_rows_reuses_its_keys_exactly(attn):
    """PyramidDrop's pattern: at layer 2, the last row's attention (keys projected on the rows still
    present) picks the rows layer 2 itself drops; the layer gathers its keys from that projection.
    Equal to the reference with those rows removed from layer 2 on, and generation stays exact."""
    model, make_inputs = BUILDERS["llava"](attn=attn)
    adapter = get_adapter(model)
    inputs = make_inputs(3, seed=9)
    vision = adapter.token_groups(inputs["input_ids"], inputs["attention_mask"])["vision"]
    first = vision & (torch.arange(vision.shape[1]) % 3 == 0)  # dropped from layer 1: layer 2 keeps a subset

    class ScoreOwnLayer:
        def __init__(self):
            self.dropped = None

        def before_layer(self, ctx):
            if ctx.layer_idx == 1:
                ctx.drop(first)
            if ctx.layer_idx != 2:
                return
            B, T = ctx.valid.shape
            score = ctx.attention_probs(torch.full((B, 1), T - 1)).mean(1)[:, 0]
            allowed = vision & ctx.keep("kv")
            top = score.masked_fill(~allowed, float("-inf")).topk(3, dim=1).indices
            self.dropped = allowed & ~torch.zeros_like(allowed).scatter(1, top, True)
            ctx.drop(self.dropped)

    selector = ScoreOwnLayer()
    with torch.no_grad(), prune(model, selectors=[selector]) as pruner:
        ours = model(**inputs).logits
    assert pruner.kept_rows[2]["kv"] == (inputs["attention_mask"].sum(1) - vision.sum(1) + 3).tolist()
    valid = inputs["attention_mask"].bool()
    groups = {"first": first, "dropped": selector.dropped}
    policy = Policy([Operation(layer, "first", t) for layer in (1, 2, 3) for t in ("q", "kv", "mlp")]
                    + [Operation(layer, "dropped", t) for layer in (2, 3) for t in ("q", "kv", "mlp")])
    with torch.no_grad(), reference_prune(model, adapter.decoder_layers(), policy, groups, valid):
        ref = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=0)
    with torch.no_grad(), prune(model, selectors=[ScoreOwnLayer()]):
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        step_by_step = [model(**inputs).logits[:, -1].argmax(-1)]
    assert torch.equal(gen[:, inputs["input_ids"].shape[1]], step_by_step[0])


def test_keys_computed_before_a_replace_are_not_reused():
    """attention_probs then replace(): the layer must project keys on the replaced input."""
    model, make_inputs = BUILDERS["llava"](attn="sdpa")
    inputs = make_inputs(2, seed=3)
    vision = get_adapter(model).token_groups(inputs["input_ids"], inputs["attention_mask"])["vision"]
    T = vision.shape[1]
    value = torch.randn(2, T, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(4))
    rows = vision & (torch.arange(T) % 2 == 0)

    def selector(score_first: bool):
        class Edit:
            def before_layer(self, ctx):
                if ctx.layer_idx != 2:
                    return
                if score_first:
                    ctx.attention_probs(torch.full((2, 1), T - 1))
                ctx.drop(vision & ~rows)
                ctx.replace(rows, value)
        return Edit()

    with torch.no_grad():
        with prune(model, selectors=[selector(True)]):
            scored = model(**inputs).logits
        with prune(model, selectors=[selector(False)]):
            plain = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(scored[valid], plain[valid], atol=1e-6, rtol=0)
