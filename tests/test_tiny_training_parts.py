"""Pieces of the tiny LLaVA's training for the benchmark formats (dop.training.tiny_llava): cells written in words
read as one token, the multiple-choice auxiliary targets, lead-in sentences, and fine-tuning a saved
model with its vocabulary extended."""

import json

import torch
from transformers import LlavaForConditionalGeneration

from dop.data import synthetic as syn
from dop.training.tiny_llava import (
    TrainConfig,
    answer_words,
    build_processor,
    build_tiny_llava,
    encode_training,
    init_model,
    option_targets,
    save_plain,
    step_samples,
    tokenizer_vocabulary,
)


def test_cells_in_words_are_one_token():
    tok = build_processor().tokenizer
    for text in ("top left", "Top-Left", "upper left corner", "Upper left"):
        assert tok.tokenize(f"is the red circle at the {text}?") == ["is", "the", "red", "circle", "at", "the", "top_left", "?"], text
    assert tok.tokenize("lower-right") == ["bottom_right"]
    # the words alone stay words, and a longer word is not cut
    assert tok.tokenize("the top of the left") == ["the", "top", "of", "the", "left"]
    assert tok.tokenize("top leftover") == ["top", "<unk>"]
    assert syn.prompt_words("A. upper right\nB. Bottom left") == ["A", ".", "top_right", "B", ".", "bottom_left"]


def test_option_targets_mark_each_options_last_word():
    proc = build_processor()
    tok = proc.tokenizer
    cfg = TrainConfig(seed=3, stage1_steps=0, mix={"choice": 1.0, "qa": 1.0})
    samples = step_samples(0, cfg)[:8]
    batch = encode_training(proc, samples, cfg.arch)
    pos, letters, correct = batch["option_pos"], batch["option_letter"], batch["option_correct"]
    ids = batch["input_ids"]
    for b, s in enumerate(samples):
        mine = (pos[:, 0] == b).nonzero().flatten()
        if s.get("family") != "choice":
            assert len(mine) == 0
            continue
        n_opts = sum(line[:2] in {f"{c}." for c in syn.OPTION_LETTERS} for line in s["question"].split("\n"))
        assert len(mine) == n_opts and letters[mine].tolist() == list(range(n_opts))
        assert correct[mine].sum() == 1 and syn.OPTION_LETTERS[int(letters[mine][correct[mine] == 1])] == s["answer"]
        for k in mine.tolist():
            after = tok.convert_ids_to_tokens([int(ids[b, pos[k, 1] + 1])])[0]
            # the next token starts the next option or the instruction after the list
            assert after in set(syn.OPTION_LETTERS) | {"answer", syn.LETTER_CN[:-1]}
    # a batch without choice samples has none
    empty = option_targets(proc, ids, [{**s, "family": "short"} for s in samples])
    assert empty[0].shape == (0, 2) and len(empty[1]) == 0


def test_answer_word_of_a_choice_is_its_correct_options_word():
    proc = build_processor()
    tok = proc.tokenizer
    cfg = TrainConfig(seed=4, stage1_steps=0, mix={"choice": 1.0, "qa": 1.0, "caption": 1.0})
    samples = step_samples(0, cfg)
    words = tok.convert_ids_to_tokens([max(0, i) for i in answer_words(proc, samples).tolist()])
    ids = answer_words(proc, samples).tolist()
    for s, w, i in zip(samples, words, ids):
        if s["qtype"] in syn.TRAIN_CAPTION_TYPES:
            assert i == -100
        elif s.get("family") == "choice":
            line = next(x for x in s["question"].split("\n") if x.startswith(s["answer"] + ". "))
            assert tok.tokenize(line[3:]) == [w] or w in syn.NUMBER_WORDS  # counts may be written as digits
            if w in syn.NUMBER_WORDS and line[3:].isdigit():
                assert syn.NUMBER_WORDS[int(line[3:])] == w
        else:
            assert w == s["answer"]


def test_lead_in_puts_hint_sentences_before_some_questions():
    cfg = TrainConfig(seed=0, stage1_steps=2, lead_in=0.5)
    samples = step_samples(0, cfg)
    plain = step_samples(0, TrainConfig(seed=0, stage1_steps=2, lead_in=0.0))
    led = [s["question"] != p["question"] for s, p in zip(samples, plain)]
    assert 0.2 < sum(led) / len(led) < 0.8
    for s, p, yes in zip(samples, plain, led):
        assert s["answer"] == p["answer"] and s["question"].endswith(p["question"])
        if yes:
            assert any(s["question"].startswith(h) for h in syn.HINTS)


def test_init_from_extends_a_saved_vocabulary(tmp_path):
    proc = build_processor()
    words = tokenizer_vocabulary()
    n_old = 60
    small = build_tiny_llava(proc)
    small.resize_token_embeddings(n_old)
    small.config.text_config.vocab_size = n_old
    save_plain(small, proc, tmp_path / "small")
    tj = json.loads((tmp_path / "small" / "tokenizer.json").read_text())
    tj["model"]["vocab"] = {w: i for i, w in enumerate(words[:n_old])}
    (tmp_path / "small" / "tokenizer.json").write_text(json.dumps(tj))

    model = init_model(tmp_path / "small", proc)
    assert isinstance(model, LlavaForConditionalGeneration) and model.training
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(words) == model.config.text_config.vocab_size
    assert torch.equal(emb[:n_old], small.get_input_embeddings().weight)
    assert torch.equal(head[:n_old], small.get_output_embeddings().weight)
    new = emb[n_old:]
    assert torch.cdist(new, new).add(torch.eye(len(new)) * 1e9).min() > 1e-3  # new words start distinct
    # a vocabulary that is not a prefix is refused
    tj["model"]["vocab"] = {w: i for i, w in enumerate(reversed(words[:n_old]))}
    (tmp_path / "small" / "tokenizer.json").write_text(json.dumps(tj))
    try:
        init_model(tmp_path / "small", proc)
    except ValueError as e:
        assert "prefix" in str(e)
    else:
        raise AssertionError("a non-prefix vocabulary was accepted")
