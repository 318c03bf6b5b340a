"""A tiny random-weight CLIP dual encoder + a real CLIP BPE tokenizer, built offline, for TRIM/CDPruner.

``save_tiny_clip(path)`` writes a ``CLIPModel`` (``save_pretrained``) whose vision config matches
the vision tower of the embedded tiny LLaVA (``dop/assets/tiny_llava``: hidden 64, image 32,
patch 8), so ``visual_projection.in_features`` equals the LLaVA tower width, and a
``CLIPTokenizer`` (byte-level BPE, ``tokenizers`` backend) next to it; ``text_tower=<path>`` then
runs the real loading path (``CLIPModel.from_pretrained`` + ``AutoTokenizer.from_pretrained``).

The vocabulary (``dop.clip_tokenizer.clip_vocab``, also the builder of the shipped
``dop/assets/tiny_clip_text`` tokenizer) is laid out like OpenAI CLIP's: the 256 byte symbols, the
same with ``</w>``, merges that build the words of the synthetic benchmark, then
``<|startoftext|>`` and ``<|endoftext|>`` last (so ``<|endoftext|>`` has the largest id, and the
pad token is ``<|endoftext|>``). The text
config keeps the legacy ``eos_token_id=2`` of the OpenAI checkpoints (HF then pools at the argmax
id, which is ``<|endoftext|>``). ``max_position_embeddings`` is small (16) so that a long
instruction exceeds it (CDPruner's segmenting, TRIM's truncation).

``NEXT_TOWER``: the vision shape of the tiny LLaVA-NeXT tower of ``tiny_models.build_llava_next``
(``crop=56``: hidden 32, 56-pixel crops, patch 14), for ``save_tiny_clip(path, **NEXT_TOWER)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dop.clip_tokenizer import BOS, EOS  # noqa: F401  (re-exported for tests)
from dop.clip_tokenizer import clip_tokenizer as _clip_tokenizer
from dop.clip_tokenizer import clip_vocab as _clip_vocab

WORDS = ["what", "is", "the", "colour", "shape", "of", "object", "objects", "at", "top_left", "top_right",
         "bottom_left", "bottom_right", "how", "many", "are", "there", "red", "blue", "green", "yellow",
         "orange", "purple", "circle", "square", "triangle", "where", "right", "image", "describe", "list",
         "a", "an", "in", "any", "left"]
MAX_POSITIONS = 16
NEXT_TOWER = dict(vision_hidden=32, image_size=56, patch_size=14)


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a small CLIP byte-level BPE in which every word of ``WORDS`` is one token
    (per piece: ``top_left`` is ``top``, ``_``, ``left``), built by ``dop.clip_tokenizer.clip_vocab``."""
    return _clip_vocab(WORDS)


def clip_tokenizer():
    return _clip_tokenizer(WORDS, model_max_length=MAX_POSITIONS)


def tiny_clip(vision_hidden: int = 64, image_size: int = 32, patch_size: int = 8, seed: int = 0):
    """A random ``CLIPModel`` whose vision side matches the tiny LLaVA's tower (only its
    ``visual_projection`` is used by the reducers: the patch features come from LLaVA's tower)."""
    from transformers import CLIPConfig, CLIPModel

    vocab, _ = clip_vocab()
    torch.manual_seed(seed)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_POSITIONS,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)  # OpenAI's legacy ids (see module doc)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=1,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()


def save_tiny_clip(path: str | Path, **kw) -> Path:
    """``tiny_clip`` + ``clip_tokenizer`` saved with ``save_pretrained`` into ``path``."""
    path = Path(path)
    tiny_clip(**kw).save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    return path
