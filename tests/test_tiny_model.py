"""The embedded tiny LLaVA: loads like a hub checkpoint, prompts have three token groups, it answers
the synthetic benchmark, and the training loop checkpoints and resumes."""

import pytest
import torch

from dop.data import synthetic as syn
from dop.models import TINY_LLAVA_DIR, build_prompt, load_model, prepare_inputs
from dop.training.tiny_llava import evaluate_accuracy, evaluate_task_formats, train_tiny_llava


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model("tiny_llava")


@pytest.fixture(scope="module")
def test200():
    # sample i of a split depends only on (seed, split, i): these are the first 200 of the test split
    return syn.generate_splits(0, {"test": 200})["test"]


def test_checkpoint_is_small_and_plain():
    files = {p.name: p.stat().st_size for p in TINY_LLAVA_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert sum(files.values()) < 20 * 2**20


def test_loads_in_eval_mode(tiny):
    model, processor = tiny
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert not model.training
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    assert 6 <= model.config.text_config.num_hidden_layers <= 8
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    assert not any("aux" in k for k in model.state_dict())


def test_prompt_has_system_vision_instruction(tiny):
    model, processor = tiny
    prompt = build_prompt(processor, "how many objects are there ?")
    assert prompt.startswith("<s> ") and prompt.endswith("assistant :")
    assert prompt.index("<image>") > len("<s> ") + 10  # a system prompt before the image
    img = syn.render(syn.sample_scene(syn.sample_rng(0, "test", 0)), syn.sample_rng(0, "test", 1))
    from PIL import Image

    inputs = prepare_inputs(processor, [Image.fromarray(img)] * 2, ["how many objects are there ?", "list the objects ."])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    img_id = model.config.image_token_index
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding
    for row, m in zip(ids, mask):
        pos = (row == img_id).nonzero().flatten()
        assert len(pos) == model.config.image_seq_length
        assert pos.max() - pos.min() + 1 == len(pos)  # one contiguous block
        system = m[: pos.min()].sum().item()
        instruction = m[pos.max() + 1:].sum().item()
        assert system >= 5 and instruction >= 3


def test_accuracy_on_test_subset(tiny, test200):
    model, processor = tiny
    res = evaluate_accuracy(model, processor, test200, batch_size=50)
    assert res["n"] == 200
    assert res["accuracy"] >= 0.85, res
    chance = syn.chance_accuracy(test200)
    assert res["accuracy"] > chance["blind"] + 0.3


def test_answers_benchmark_prompt_formats(tiny):
    # held-out questions about synthetic scenes in the 13 benchmarks' own prompt formats (issue 17):
    # the short-answer post-prompt, yes/no, and option lists answered with the capital letter alone
    model, processor = tiny
    rows = syn.task_rows(0, "task_test", 300)
    res = evaluate_task_formats(model, processor, rows, batch_size=100)
    assert res["n"] == 300 and set(res["per_family"]) == set(syn.FAMILIES)
    assert all(acc >= 0.8 for acc in res["per_family"].values()), res["per_family"]
    letters = [p for p, f in zip(res["predictions"], rows["family"]) if f == "choice"]
    assert sum(p in set(syn.OPTION_LETTERS) for p in letters) >= 0.95 * len(letters)  # a letter, nothing else


def test_generate_answers_one_word(tiny, test200):
    model, processor = tiny
    rows = test200.select(range(8))
    inputs = prepare_inputs(processor, rows["image"], rows["question"])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert sum(t.split()[0] == a for t, a in zip(texts, rows["answer"]) if t.split()) >= 6


def test_training_checkpoints_and_resumes(tmp_path):
    kw = dict(run_dir=tmp_path / "run", batch_size=4, stage1_steps=2, ckpt_every=1, eval_every=0,
              progress_bar=False, arch={"layers": 2, "hidden": 32, "mlp": 64, "vision_hidden": 32,
                                        "vision_mlp": 64, "vision_layers": 1})
    info = train_tiny_llava(tmp_path / "model", seed=0, steps=3, **kw)
    assert info["steps"] == 3 and info["start_step"] == 0
    assert (tmp_path / "run" / "last.ckpt").exists()
    ck = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 3
    info = train_tiny_llava(tmp_path / "model", seed=0, steps=5, **kw)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.ckpt")) == ["last.ckpt"]
    assert info["start_step"] == 3 and info["first_step_run"] == 3 and info["steps"] == 5
    model, processor = load_model(str(tmp_path / "model"))
    # the interrupted-and-resumed run equals an uninterrupted one (batches are a function of the step)
    kw["run_dir"] = tmp_path / "run2"
    train_tiny_llava(tmp_path / "model2", seed=0, steps=5, **kw)
    straight, _ = load_model(str(tmp_path / "model2"))
    for (k, a), b in zip(model.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert not any("aux" in k for k in model.state_dict())
