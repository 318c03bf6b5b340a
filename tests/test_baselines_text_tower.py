"""TRIM and CDPruner end to end with a real ``CLIPModel`` + CLIP tokenizer (no downloads).

A tiny random CLIP (vision side shaped like the embedded tiny LLaVA's tower) and a CLIP BPE
tokenizer are saved with ``save_pretrained`` (``clip_fixtures``), and the methods get
``text_tower=<that dir>``: the path ``CLIPModel.from_pretrained`` + ``AutoTokenizer.from_pretrained``
runs. On ``dop.models.load_model("tiny_llava")``: prepare_inputs + apply + forward + generate; the
selection depends on the question and equals a slow reference written here from the CLIP modules
and the rules of baselines.md (sections 2.6 and 2.11); batches with left padding equal per-sample
runs; a long instruction exercises CDPruner's segments (and TRIM's truncation); bf16 LLaVA with an
fp32 CLIP; and ``dop stage=evaluate method=trim method.text_tower=<dir>`` lands a record.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from clip_fixtures import MAX_POSITIONS, save_tiny_clip

from dop.engine.baselines import MethodError, get_method
from dop.models import load_model, prepare_inputs

ROOT = Path(__file__).resolve().parents[1]
K = 8
QUESTIONS = ["what colour is the object right of the green triangle ?", "how many objects are there ?"]
LONG = " ".join(["what is the shape of the object at bottom_right ?"] * 3)  # > MAX_POSITIONS CLIP tokens


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="module")
def llava():
    return load_model("tiny_llava")


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    from dop.data.synthetic import make_sample, sample_rng

    return [Image.fromarray(make_sample(sample_rng(0, "test", i))["image"]) for i in range(2)]


@pytest.fixture(scope="module")
def clip(clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)


def _inputs(processor, images, questions):
    inp = dict(prepare_inputs(processor, images, questions))
    inp["instruction"] = list(questions)
    return inp


def _run(model, processor, name, clip_dir, images, questions, k=K, generate=0):
    """(method, logits, generated ids or None, prepared inputs) of one batch under the method."""
    m = get_method(name, text_tower=str(clip_dir))
    inp = _inputs(processor, images, questions)
    with torch.no_grad(), m.apply(model, k):
        x = m.reduce_inputs(model, inp, k)
        logits = model(**x).logits
        gen = model.generate(**x, max_new_tokens=generate, min_new_tokens=generate,
                                                          do_sample=False) if generate else None
    return m, logits, gen, x


# --------------------------------------------------------------------------------------------
# Slow reference, from the CLIP modules (not the methods' helpers)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def ref_text(clip, tok, text, segments):
    """(S, P) normalised text embeddings: each chunk (start + <= MAX-2 content tokens + end) run
    alone, unpadded, through the text transformer; the end token's state -> text_projection."""
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    body, step = ids[1:-1], MAX_POSITIONS - 2
    chunks = [body[i:i + step] for i in range(0, len(body), step)] if segments else [body[:step]]
    out = []
    for c in chunks:
        h = clip.text_model(input_ids=torch.tensor([[ids[0], *c, ids[-1]]])).last_hidden_state[0, -1]
        e = clip.text_projection(h)
        out.append(e / e.norm())
    return torch.stack(out)


@torch.no_grad()
def ref_patches(model, clip, pixel_values):
    """(features (N, C) of the LLaVA feature layer without [CLS], normalised CLIP patch embeds (N, P))."""
    tower = model.model.vision_tower
    hs = tower(pixel_values, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
    feats = hs[0, 1:]
    ln = getattr(tower, "vision_model", tower).post_layernorm  # transformers 5 flattens CLIPVisionModel
    x = clip.visual_projection(ln(feats))
    return feats, x / x.norm(dim=-1, keepdim=True)


def ref_trim(feats, patch, text, k):
    """baselines.md 2.6, fixed k: softmax over patches of the negated cosine to the (first) text
    embedding; top k-1 patches (spatial order) + the mean of the others."""
    score = torch.softmax(-(patch @ text[0]), dim=0)
    idx = sorted(torch.argsort(score, descending=True)[:k - 1].tolist())
    rest = [i for i in range(len(feats)) if i not in idx]
    return idx, torch.cat([feats[idx], feats[rest].mean(0, keepdim=True)])


def ref_cdpruner(projected, patch, text, k):
    """baselines.md 2.11: relevance = min-max of the mean negated cosine over text segments;
    L = diag(r) cos(projected) diag(r); greedy MAP by brute-force log-determinants."""
    rel = -(patch @ text.T).mean(-1)
    rel = (rel - rel.min()) / (rel.max() - rel.min())
    xn = projected / projected.norm(dim=-1, keepdim=True)
    L = (rel[:, None] * (xn @ xn.T) * rel[None]).double()
    chosen: list[int] = []
    for _ in range(k):
        best, best_val = None, -float("inf")
        for j in range(len(L)):
            if j in chosen:
                continue
            sub = L[chosen + [j]][:, chosen + [j]]
            val = torch.linalg.det(sub).item()
            if val > best_val:
                best, best_val = j, val
        chosen.append(best)
    return sorted(chosen)


@torch.no_grad()
def ref_logits(model, processor, image, question, tokens):
    """Logits of the prompt with its 16 image placeholders replaced by ``tokens`` (k, D), by hand."""
    inp = prepare_inputs(processor, [image], [question])
    ids = inp["input_ids"][0]
    img = model.config.image_token_id
    pos = (ids == img).nonzero().flatten()
    ids = torch.cat([ids[:pos[0]], ids[pos[:len(tokens)]], ids[pos[-1] + 1:]]).unsqueeze(0)
    emb = model.get_input_embeddings()(ids)
    emb[ids == img] = tokens.to(emb.dtype)
    return model(inputs_embeds=emb, attention_mask=torch.ones_like(ids)).logits


# --------------------------------------------------------------------------------------------
# Loading from a path
# --------------------------------------------------------------------------------------------
def test_text_tower_loads_from_a_saved_dir(llava, clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    model, _ = llava
    for name in ("trim", "cdpruner"):
        m = get_method(name, text_tower=str(clip_dir))
        m.check_model(model)
        clip, tok = m._tower()
        assert isinstance(clip, CLIPModel) and isinstance(tok, CLIPTokenizer)
        assert clip.visual_projection.in_features == model.config.vision_config.hidden_size == 64
        # a CLIPModel instance + a tokenizer path works too
        m2 = get_method(name, text_tower=clip, text_tokenizer=str(clip_dir))
        m2.check_model(model)
        assert isinstance(m2._tower()[1], CLIPTokenizer)
    wide = get_method("trim", text_tower=str(clip_dir))
    wide._clip = CLIPModel(type(clip.config)(text_config=clip.config.text_config.to_dict(),
                                             vision_config={**clip.config.vision_config.to_dict(), "hidden_size": 32,
                                                            "num_attention_heads": 2}))
    wide._clip_tok = tok
    with pytest.raises(MethodError, match="visual_projection expects width 32, the vision tower gives 64"):
        wide.check_model(model)


# --------------------------------------------------------------------------------------------
# End to end against the slow reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("question", [*QUESTIONS, LONG], ids=["q0", "q1", "long"])
def test_trim_end_to_end_equals_slow_reference(llava, clip, clip_dir, images, question):
    model, processor = llava
    clip_model, tok = clip
    m, logits, gen, x = _run(model, processor, "trim", clip_dir, images[:1], [question], generate=3)
    assert int((x["input_ids"] == model.config.image_token_id).sum()) == K  # k tokens reach the LLM
    assert m.last_selection.shape == (1, K - 1)  # k - 1 patches + the pooled token
    pix = _inputs(processor, images[:1], [question])["pixel_values"]
    feats, patch = ref_patches(model, clip_model, pix)
    text = ref_text(clip_model, tok, question, segments=False)
    if question == LONG:
        assert len(tok(question)["input_ids"]) > MAX_POSITIONS  # truncated to CLIP's context
    idx, tokens = ref_trim(feats, patch, text, K)
    assert m.last_selection[0].tolist() == idx
    with torch.no_grad():
        ref = ref_logits(model, processor, images[0], question, model.model.multi_modal_projector(tokens))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    n = x["input_ids"].shape[1]
    assert gen.shape == (1, n + 3) and gen[0, n].item() == logits[0, -1].argmax().item()


@pytest.mark.parametrize("question", [*QUESTIONS, LONG], ids=["q0", "q1", "long"])
def test_cdpruner_end_to_end_equals_slow_reference(llava, clip, clip_dir, images, question):
    model, processor = llava
    clip_model, tok = clip
    m, logits, gen, x = _run(model, processor, "cdpruner", clip_dir, images[:1], [question], generate=3)
    assert int((x["input_ids"] == model.config.image_token_id).sum()) == K
    assert m.last_selection.shape == (1, K)
    segments = len(m._texts[0])
    if question == LONG:  # longer than the text tower's positions: several segments, all used
        assert len(tok(question)["input_ids"]) > clip_model.config.text_config.max_position_embeddings
        assert segments == 3
    else:
        assert segments == 1
    pix = _inputs(processor, images[:1], [question])["pixel_values"]
    feats, patch = ref_patches(model, clip_model, pix)
    text = ref_text(clip_model, tok, question, segments=True)
    assert len(text) == segments
    with torch.no_grad():
        projected = model.model.multi_modal_projector(feats)
    idx = ref_cdpruner(projected, patch, text, K)
    assert m.last_selection[0].tolist() == idx
    with torch.no_grad():
        ref = ref_logits(model, processor, images[0], question, projected[idx])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    n = x["input_ids"].shape[1]
    assert gen.shape == (1, n + 3) and gen[0, n].item() == logits[0, -1].argmax().item()


@pytest.mark.parametrize("name", ["trim", "cdpruner"])
def test_selection_depends_on_the_instruction(llava, clip_dir, images, name):
    model, processor = llava
    kept = [_run(model, processor, name, clip_dir, images[:1], [q])[0].last_selection[0].tolist()
            for q in (*QUESTIONS, LONG)]
    assert len({tuple(s) for s in kept}) > 1, kept  # same image, different questions -> different sets


@pytest.mark.parametrize("name", ["trim", "cdpruner"])
def test_batch_with_left_padding_equals_per_sample(llava, clip_dir, images, name):
    model, processor = llava
    questions = [QUESTIONS[1], LONG]
    m, logits, gen, x = _run(model, processor, name, clip_dir, images, questions, generate=2)
    assert (x["attention_mask"][:, 0] == 0).any()  # left padded
    for b in range(2):
        one, one_logits, one_gen, y = _run(model, processor, name, clip_dir, images[b:b + 1], questions[b:b + 1],
                                           generate=2)
        assert one.last_selection[0].tolist() == m.last_selection[b].tolist()
        n = one_logits.shape[1]
        torch.testing.assert_close(logits[b, -n:], one_logits[0], rtol=1e-4, atol=1e-4)
        assert gen[b, -2:].tolist() == one_gen[0, -2:].tolist()


@pytest.mark.parametrize("name", ["trim", "cdpruner"])
def test_bf16_llava_with_an_fp32_text_tower(clip_dir, images, name):
    """LLaVA runs in half precision, the CLIP loaded from a path is fp32: no dtype mismatch."""
    model, processor = load_model("tiny_llava", dtype="bfloat16")
    m, logits, _, _ = _run(model, processor, name, clip_dir, images[:1], QUESTIONS[:1])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert m.last_selection.shape[1] == (K - 1 if name == "trim" else K)
    assert m._clip.text_projection.weight.dtype == torch.float32


# transformers 5 ``generate`` runs ``get_image_features`` (vision tower + projector) *before*
# ``model.model``; the image -> sample map of the text-guided methods is therefore taken in
# ``prepare_inputs`` (a pre-hook on ``model.model`` would be too late for the evaluation path).
@pytest.mark.parametrize("name", ["trim", "cdpruner"])
def test_generate_without_a_forward_first(llava, clip_dir, images, name):
    model, processor = llava
    m = get_method(name, text_tower=str(clip_dir))
    with torch.no_grad(), m.apply(model, K):
        x = m.reduce_inputs(model, _inputs(processor, images, [QUESTIONS[1], LONG]), K)
        gen = model.generate(**x, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert gen.shape == (2, x["input_ids"].shape[1] + 2)
    _, _, ref, _ = _run(model, processor, name, clip_dir, images, [QUESTIONS[1], LONG], generate=2)
    assert gen.tolist() == ref.tolist()


# --------------------------------------------------------------------------------------------
# Configs and the evaluation stage
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trim", "cdpruner"])
def test_method_yaml_exposes_the_text_tower(name):
    """``text_tower`` defaults to the model config's ``clip_text_tower`` (null when there is none),
    ``text_tokenizer`` to null; both commented."""
    text = (ROOT / "conf" / "method" / f"{name}.yaml").read_text()
    defaults = {"text_tower": "${oc.select:model.clip_text_tower,null}", "text_tokenizer": "null"}
    for key, default in defaults.items():
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{key}:")]
        assert line.split("  #")[0].split(":", 1)[1].strip() == default and "#" in line
    from omegaconf import OmegaConf

    for model_node, tower in (({}, None), ({"clip_text_tower": None}, None),
                              ({"clip_text_tower": "tiny_clip_text"}, "tiny_clip_text")):
        cfg = OmegaConf.create({"model": model_node, "method": yaml.safe_load(text)})
        node = OmegaConf.to_container(cfg.method, resolve=True)
        m = get_method(name, **{k: v for k, v in node.items() if k != "name"})
        assert m.hparams == {"text_tower": tower, "text_tokenizer": None}


def _compose(overrides, tmp_path, data):
    from hydra import compose, initialize_config_dir

    from dop.stages import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["stage=evaluate", "model=tiny_llava", "device=cpu", "logger=none",
                                            "budget=tokens", "budget.values=[8]", "benchmark.limit=2",
                                            "benchmark.batch_size=2", f"benchmark.dataset_path={data}",
                                            f"paths.run_dir={tmp_path / 'run'}",
                                            f"paths.results_dir={tmp_path / 'results'}", *overrides])


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from dop.data.synthetic import ensure_dataset

    return ensure_dataset(tmp_path_factory.mktemp("data") / "synthetic", 0, {"test": 4})


def test_cli_evaluate_trim_with_a_text_tower_lands_a_record(clip_dir, synthetic_data, tmp_path):
    """`dop stage=evaluate method=trim method.text_tower=<dir> budget=tokens budget.values=[8]`."""
    pytest.importorskip("lmms_eval")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from dop.results import ResultsStore
    from dop.stages import evaluate as stage

    cfg = _compose(["method=trim", f"method.text_tower={clip_dir}"], tmp_path, synthetic_data)
    out = stage.run(cfg)
    assert out["failures"] == []
    (rec,) = ResultsStore(tmp_path / "results").records()
    assert rec.method == "trim" and rec.budget_kind == "tokens" and rec.budget_value == 8
    assert rec.metric == "exact_match" and 0.0 <= rec.value <= 1.0 and rec.samples == 2
    assert rec.extra["knob"] == 8 and rec.extra["hparams"]["text_tower"] == str(clip_dir)
    assert rec.tflops <= rec.extra["budget_tflops"] and rec.prefill_latency_s > 0


def test_cli_evaluate_trim_without_a_text_tower_fails_before_any_forward(synthetic_data, tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from dop.stages import evaluate as stage

    def no_forward(*a, **k):
        pytest.fail("the model ran before the text-tower check")

    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", no_forward)
    monkeypatch.setattr(stage, "evaluate_benchmark", no_forward)
    for name in ("trim", "cdpruner"):  # tiny_llava names its text tower: take it away
        with pytest.raises(MethodError, match="needs a CLIP text tower.*text_tower="):
            stage.run(_compose([f"method={name}", "model.clip_text_tower=null"], tmp_path, synthetic_data))
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.json"))
