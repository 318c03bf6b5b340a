"""The shipped CLIP text tower of the embedded tiny LLaVA (``dop/assets/tiny_clip_text``, ``dop.training.clip_text``).

It loads through TRIM/CDPruner's own path (``text_tower="tiny_clip_text"`` or the directory), its
vision side *is* the tiny LLaVA's tower, it learned (image -> caption retrieval on held-out images
far above chance, while the same model with a fresh text tower is at chance), the model configs
carry it, and the training recipe is deterministic and writes captions that are true of the image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dop.clip_tokenizer import _pieces, clip_tokenizer
from dop.data import synthetic as syn
from dop.engine.baselines import get_method
from dop.models import TINY_CLIP_TEXT_DIR, load_model, resolve_path
from dop.training import clip_text as ct

pytestmark = pytest.mark.skipif(not (TINY_CLIP_TEXT_DIR / "config.json").exists(),
                                reason="dop/assets/tiny_clip_text not shipped")


@pytest.fixture(scope="module")
def llava():
    return load_model("tiny_llava")


@pytest.fixture(scope="module")
def tower(llava):
    m = get_method("trim", text_tower="tiny_clip_text")
    m.check_model(llava[0])
    return m._tower()


def test_resolves_to_the_asset():
    assert resolve_path("tiny_clip_text") == str(TINY_CLIP_TEXT_DIR)


@pytest.mark.parametrize("name", ["trim", "cdpruner"])
def test_loads_through_the_method_and_its_vision_side_is_the_llava_tower(llava, name):
    from transformers import CLIPModel, CLIPTokenizer

    model, _ = llava
    for spec in ("tiny_clip_text", str(TINY_CLIP_TEXT_DIR)):
        m = get_method(name, text_tower=spec)
        m.check_model(model)
        clip, tok = m._tower()
        assert isinstance(clip, CLIPModel) and isinstance(tok, CLIPTokenizer)
    tower = model.model.vision_tower
    mine = getattr(tower, "vision_model", tower).state_dict()
    theirs = getattr(clip.vision_model, "vision_model", clip.vision_model).state_dict()
    assert mine.keys() == theirs.keys() and len(mine) > 10
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
    assert clip.config.vision_config.hidden_size == model.config.vision_config.hidden_size
    assert clip.config.vision_config.num_hidden_layers == model.config.vision_config.num_hidden_layers


def test_shipped_tokenizer_is_the_offline_builder(tower):
    _, tok = tower
    built = clip_tokenizer(ct.synthetic_words())
    text = "what colour is the object right of the green triangle ? red circle top_left and blue square"
    assert tok(text)["input_ids"] == built(text)["input_ids"]
    for word in ct.synthetic_words():  # every piece of the synthetic vocabulary is one token
        for piece in _pieces(word):
            assert len(tok(piece, add_special_tokens=False)["input_ids"]) == 1, piece


def test_retrieval_on_held_out_images_is_far_above_chance(llava, tower):
    """Image -> caption top-1 among 100 test-split images (never trained on: the tower saw the train
    split): chance ~0.01. A fresh text tower with the same vision side stays near chance."""
    clip, tok = tower
    ip = llava[1].image_processor
    got = ct.retrieval_accuracy(clip, tok, ip, n=100, split="test", batch=100)
    assert got["chance"] < 0.02
    assert got["i2t_top1"] >= 0.3 and got["t2i_top1"] >= 0.3, got
    torch.manual_seed(0)
    fresh = ct.build_clip(llava[0], tok, ct.ClipTextConfig(max_positions=clip.config.text_config.max_position_embeddings))
    base = ct.retrieval_accuracy(fresh.eval(), tok, ip, n=100, split="test", batch=100)
    assert base["i2t_top1"] < 0.1, base


def test_model_configs_carry_their_text_tower(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dop.stages import CONF_DIR

    want = {"tiny_llava": "tiny_clip_text", "llava15_7b": "openai/clip-vit-large-patch14-336",
            "llava15_13b": "openai/clip-vit-large-patch14-336", "qwen2vl_7b": None,
            "llava_next_7b": "openai/clip-vit-large-patch14-336"}  # the same CLIP-L/336 tower
    for model, tower_id in want.items():
        for method in ("trim", "cdpruner"):
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("config", overrides=[f"model={model}", f"method={method}", f"paths.run_dir={tmp_path}"])
            node = OmegaConf.to_container(cfg.method, resolve=True)
            assert node["text_tower"] == tower_id, (model, method)
            m = get_method(method, **{k: v for k, v in node.items() if k != "name"})
            assert m.hparams["text_tower"] == tower_id


def test_captions_are_true_of_their_scene_and_batches_are_deterministic(llava):
    rng = np.random.default_rng(0)
    colours, shapes = set(syn.COLOURS), set(syn.SHAPES)
    names = syn.cell_names(2)
    for i in range(300):
        scene = syn.Scene.from_json(syn.make_sample(syn.sample_rng(0, "train", i))["scene"])
        words = ct.caption_for(scene, rng).split()
        present = {(o.colour, o.shape) for o in scene.objects}
        named = [(a, b) for a, b in zip(words, words[1:]) if a in colours and b in shapes]
        cells = [w for w in words if w in names]
        assert named or cells or any(w in colours for w in words), words  # says something about the image
        assert all(p in present for p in named), (words, present)  # every object named is there
        assert all(scene.at(names.index(c)) is not None for c in cells), words  # every cell named is occupied
    cfg = ct.ClipTextConfig(batch_size=8)
    tok, ip = clip_tokenizer(ct.synthetic_words()), llava[1].image_processor
    a, b, c = (ct.batch_for_step(s, cfg, tok, ip) for s in (3, 3, 4))
    assert a["texts"] == b["texts"] and torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["texts"] != c["texts"]
