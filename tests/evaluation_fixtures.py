"""Shared builders for the evaluation tests: a tiny random LLaVA and a small synthetic DatasetDict.

No downloads: a word-level tokenizer, a PIL CLIP image processor (no torchvision) and random
weights (recipe from transformers-notes.md section 3.1). Accuracy of this model is meaningless;
the tests compare two scoring paths on the same model, so only determinism matters.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "user", ":", "assistant", "what", "is", "the",
         "colour", "shape", "of", "object", "?", "red", "blue", "green", "circle", "square",
         "yes", "no", "how", "many", "one", "two", "three", "top_left", "where"]
ANSWERS = ["red", "blue", "green", "circle", "square", "yes", "no", "one", "two"]


def tiny_llava(seed: int = 0, attn: str = "sdpa"):
    """(model, processor): a ~100k-parameter LLaVA whose prompt format mimics the embedded tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = WORDS + [f"w{i}" for i in range(64 - len(WORDS))]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=["<image>"], padding_side="left")
    # The embedded model's prompt layout: `<s> user : <image> {question} assistant :`.
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ ' ' + m['role'] + ' :' }}"
                         "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ ' <image>' }}"
                         "{% else %}{{ ' ' + c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ ' assistant :' }}{% endif %}")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>", chat_template=tok.chat_template)
    torch.manual_seed(seed)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=32)
    tcfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=4, image_seq_length=16,
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    # Bias the output head towards answer words so greedy decoding yields varied, answer-like tokens.
    with torch.no_grad():
        ids = [words.index(a) for a in ANSWERS]
        model.lm_head.weight[ids] *= 8.0
    return model, proc


def synthetic_dataset(n: int = 12, seed: int = 0):
    """A DatasetDict with the columns of dop.data.synthetic (id, image, question, answer, qtype)."""
    import random

    from datasets import Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    rng = random.Random(seed)
    features = Features({"id": Value("string"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "qtype": Value("string")})
    qtypes = {"colour_at": ("what is the colour of the object ?", ["red", "blue", "green"]),
              "shape_at": ("what is the shape of the object ?", ["circle", "square"]),
              "count": ("how many object ?", ["one", "two"]),
              "exists": ("is the red circle ?", ["yes", "no"])}

    def split(name: str, size: int):
        rows = {k: [] for k in features}
        for i in range(size):
            qtype = rng.choice(sorted(qtypes))
            question, answers = qtypes[qtype]
            colour = tuple(rng.randrange(256) for _ in range(3))
            rows["id"].append(f"{name}-{i}")
            rows["image"].append(PILImage.new("RGB", (32, 32), colour))
            rows["question"].append(question)
            rows["answer"].append(rng.choice(answers))
            rows["qtype"].append(qtype)
        return Dataset.from_dict(rows, features=features)

    return DatasetDict(train=split("train", 4), val=split("val", 4), test=split("test", n))


def save_synthetic(out_dir: Path, n: int = 12) -> Path:
    out_dir = Path(out_dir)
    synthetic_dataset(n).save_to_disk(str(out_dir))
    return out_dir


def save_tiny_llava(out_dir: Path) -> Path:
    model, proc = tiny_llava()
    model.save_pretrained(str(out_dir))
    proc.save_pretrained(str(out_dir))
    return Path(out_dir)
