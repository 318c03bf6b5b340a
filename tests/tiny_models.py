"""Tiny random MLLMs built from configs (no downloads), one per adapter family, with inputs.

Each builder returns ``(model, make_inputs)``; ``make_inputs(batch, seed)`` gives a left-padded
batch whose samples have different text lengths (so group spans differ per sample).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
WORDS = SPECIAL + ["USER:", "ASSISTANT:", "system", "you", "are", "a", "helpful", "assistant", "what",
                   "is", "in", "the", "image", "?", "describe", "colour", "shape", "left", "right"]
WORDS += [f"w{i}" for i in range(128 - len(WORDS))]
IDS = {w: i for i, w in enumerate(WORDS)}
TEXT_WORDS = WORDS[len(SPECIAL):]


def tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel(vocab=IDS, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:], padding_side="left")


def text_config(**over) -> dict:
    cfg = dict(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(over)
    return cfg


def _images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _texts(n: int, seed: int, template: str) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sys_words = " ".join(rng.choice(TEXT_WORDS) for _ in range(2 + i % 3))
        q_words = " ".join(rng.choice(TEXT_WORDS) for _ in range(3 + (2 * i) % 5))
        out.append(template.format(sys=sys_words, q=q_words))
    return out


def build_llava(attn: str = "eager", layers: int = 4, seed: int = 0):
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tok = tokenizer()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=56, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(vision_config=vcfg, text_config=LlamaConfig(**text_config(num_hidden_layers=layers)),
                      image_token_index=IDS["<image>"], image_seq_length=16,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()

    def make_inputs(batch: int = 1, seed: int = 0):
        texts = _texts(batch, seed, "<s> {sys} USER: <image> {q} ASSISTANT:")
        return proc(images=_images(batch, 56, seed), text=texts, return_tensors="pt", padding=True)

    return model, make_inputs


def build_llava_next(attn: str = "eager", layers: int = 4, seed: int = 0, crop: int = 28):
    """``crop``: the CLIP input side (28: 2x2 patches per crop; 56: 4x4, room for unpadding)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    torch.manual_seed(seed)
    tok = tokenizer()
    pinpoints = [[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]]
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, image_token="<image>")
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=crop, patch_size=14, projection_dim=32)
    cfg = LlavaNextConfig(vision_config=vcfg, text_config=LlamaConfig(**text_config(num_hidden_layers=layers)),
                          image_token_index=IDS["<image>"], image_grid_pinpoints=pinpoints,
                          vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()

    def make_inputs(batch: int = 1, seed: int = 0, sizes=None):  # sizes: (H, W) per image, cycled
        rng = np.random.default_rng(seed)
        sizes = sizes or [(crop, 2 * crop), (2 * crop, crop), (2 * crop, 2 * crop)]
        imgs = [Image.fromarray(rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
                for i in range(batch)]
        texts = _texts(batch, seed, "<s> {sys} USER: <image> {q} ASSISTANT:")
        return proc(images=imgs, text=texts, return_tensors="pt", padding=True)

    return model, make_inputs


def _qwen_processor(patch: int = 14):
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):  # no torchvision: drop the video slot
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    ip = Qwen2VLImageProcessorPil(min_pixels=(2 * patch) ** 2, max_pixels=(4 * patch) ** 2 * 2, patch_size=patch,
                                  temporal_patch_size=2, merge_size=2)
    return ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tokenizer())


def build_qwen_vl(kind: str = "qwen2_vl", attn: str = "eager", layers: int = 4, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    patch = 16 if kind == "qwen3_vl" else 14
    proc = _qwen_processor(patch)
    tcfg = text_config(num_hidden_layers=layers, eos_token_id=IDS["<|im_end|>"],
                       rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=IDS["<|image_pad|>"], video_token_id=IDS["<|video_pad|>"],
               vision_start_token_id=IDS["<|vision_start|>"], vision_end_token_id=IDS["<|vision_end|>"])
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg = tf.Qwen2VLConfig(vision_config=vision, text_config=tcfg, **ids)
        cls = tf.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      window_size=56, fullatt_block_indexes=[1])
        cfg = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=tcfg, **ids)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif kind == "qwen3_vl":
        tcfg["rope_parameters"]["mrope_section"] = [2, 3, 3]
        tcfg["head_dim"] = 16
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        cfg = tf.Qwen3VLConfig(vision_config=vision, text_config=tcfg, **ids)
        cls = tf.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(kind)
    model = cls._from_config(cfg, attn_implementation=attn).eval()

    def make_inputs(batch: int = 1, seed: int = 0):
        rng = np.random.default_rng(seed)
        sizes = [(2 * patch * 2, 2 * patch * 2), (2 * patch * 2, 3 * patch * 2), (3 * patch * 2, 2 * patch * 2)]
        imgs = [Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(batch)]
        texts = _texts(batch, seed, "<|im_start|> {sys} <|vision_start|> <|image_pad|> <|vision_end|> {q} "
                                    "<|im_end|> <|im_start|> assistant")
        return proc(images=imgs, text=texts, return_tensors="pt", padding=True)

    return model, make_inputs


def build_internvl(attn: str = "eager", layers: int = 4, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[28, 28], patch_size=[7, 7])
    tcfg = text_config(num_hidden_layers=layers)
    tcfg["model_type"] = "qwen2"
    cfg = tf.InternVLConfig(vision_config=vision, text_config=tcfg, image_token_id=IDS["<IMG_CONTEXT>"],
                            downsample_ratio=0.5, image_seq_length=4)
    model = tf.InternVLForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()
    tok = tokenizer()

    def make_inputs(batch: int = 1, seed: int = 0):
        ctx = " ".join(["<IMG_CONTEXT>"] * 4)
        texts = _texts(batch, seed, "<s> {sys} <img> " + ctx + " </img> {q} ASSISTANT:")
        enc = tok(texts, return_tensors="pt", padding=True)
        g = torch.Generator().manual_seed(seed)
        enc["pixel_values"] = torch.randn(batch, 3, 28, 28, generator=g)
        return enc

    return model, make_inputs


class ImageOnlyOnevisionProcessor(transformers.LlavaOnevisionProcessor):  # no torchvision: drop the video slot
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


def build_llava_onevision(attn: str = "eager", layers: int = 4, seed: int = 0, crop: int = 28):
    """LLaVA-OneVision: SigLIP tower (no [CLS]), Qwen2 decoder, anyres crops with unpadding and newline
    rows (``crop``: the tower's input side, 2x2 patches per crop)."""
    torch.manual_seed(seed)
    pinpoints = [[crop, crop], [crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]]
    ip = transformers.LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop},
                                                      image_grid_pinpoints=pinpoints)
    proc = ImageOnlyOnevisionProcessor(image_processor=ip, tokenizer=tokenizer(), num_image_tokens=(crop // 14) ** 2,
                                       vision_feature_select_strategy="full", image_token="<image>",
                                       video_token="<|video_pad|>", vision_aspect_ratio="anyres_max_9")
    vcfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=crop, patch_size=14)
    tcfg = text_config(num_hidden_layers=layers)
    tcfg["model_type"] = "qwen2"
    cfg = transformers.LlavaOnevisionConfig(vision_config=vcfg, text_config=tcfg, image_token_index=IDS["<image>"],
                                            video_token_index=IDS["<|video_pad|>"], image_grid_pinpoints=pinpoints,
                                            vision_feature_select_strategy="full", vision_feature_layer=-1,
                                            vision_aspect_ratio="anyres_max_9")
    model = transformers.LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()

    def make_inputs(batch: int = 1, seed: int = 0):
        rng = np.random.default_rng(seed)
        sizes = [(crop, 2 * crop), (2 * crop, crop), (2 * crop, 2 * crop)]
        imgs = [Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(batch)]
        texts = _texts(batch, seed, "<s> {sys} USER: <image> {q} ASSISTANT:")
        return proc(images=imgs, text=texts, return_tensors="pt", padding=True)

    return model, make_inputs


BUILDERS = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": lambda **kw: build_qwen_vl("qwen2_vl", **kw),
    "qwen2_5_vl": lambda **kw: build_qwen_vl("qwen2_5_vl", **kw),
    "qwen3_vl": lambda **kw: build_qwen_vl("qwen3_vl", **kw),
    "internvl": build_internvl,
}
