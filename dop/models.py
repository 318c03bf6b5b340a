"""Load a model + processor: the embedded tiny LLaVA (``"tiny_llava"``), a hub id or a local path.

Prompts follow the processor's own chat template (system prompt, image, instruction), so the
three token groups the pruning framework uses exist in every prompt: ``system`` = the tokens
before the image tokens, ``vision`` = the image tokens (``config.image_token_index``),
``instruction`` = the tokens after them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from dop.errors import DopError

TINY_LLAVA = "tiny_llava"
TINY_CLIP_TEXT = "tiny_clip_text"  # the CLIP text tower aligned with tiny_llava's vision tower (TRIM, CDPruner)
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_LLAVA_DIR = ASSETS_DIR / "tiny_llava"
TINY_CLIP_TEXT_DIR = ASSETS_DIR / "tiny_clip_text"
EMBEDDED = {TINY_LLAVA: TINY_LLAVA_DIR, TINY_CLIP_TEXT: TINY_CLIP_TEXT_DIR}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ModelError(DopError, ValueError):
    """A model name or path that does not resolve to a checkpoint."""


def resolve_dtype(dtype) -> torch.dtype | str | None:
    """``None`` / ``"auto"`` pass through; strings map to torch dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ModelError(f"model.dtype={dtype!r} is not valid; valid: {', '.join(sorted(_DTYPES))}, auto")
    return _DTYPES[key]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other names unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_path(name_or_path: str) -> str:
    """An embedded checkpoint name (``"tiny_llava"``, ``"tiny_clip_text"``) -> its directory in
    ``dop/assets``; anything else unchanged."""
    name = str(name_or_path)
    if name in EMBEDDED:
        path = EMBEDDED[name]
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded {name} checkpoint is missing at {path}; "
                f"rebuild it with the command in dop/assets/{name}/README.md"
            )
        return str(path)
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ModelError(f"model.pretrained={name!r}: no such checkpoint directory (a local path, a hub id "
                         f"org/name, or one of {sorted(EMBEDDED)})")
    return name


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name``): absolute, relative with ./ or ../, ~, or deeper."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def load_processor(name_or_path: str):
    return AutoProcessor.from_pretrained(resolve_path(name_or_path))


def load_config(name_or_path: str):
    """The model's config alone (no weights): FLOPs and layer counts without loading the model."""
    return AutoConfig.from_pretrained(resolve_path(name_or_path))


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device: str = "cpu",
):
    """``(model, processor)``. ``"tiny_llava"`` loads the checkpoint shipped in
    ``dop/assets/tiny_llava`` with ``from_pretrained``, exactly like a hub checkpoint; any other
    string is a hub id or a local path, loaded with ``AutoModelForImageTextToText`` and
    ``AutoProcessor``. ``dtype=None`` keeps the checkpoint's own dtype. The model is in eval mode."""
    path = resolve_path(name_or_path)
    kwargs = {"attn_implementation": attn_implementation}
    dt = resolve_dtype(dtype)
    kwargs["dtype"] = "auto" if dt is None else dt
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as err:  # a hub id that is neither cached nor downloadable (offline), a broken checkpoint
        raise ModelError(f"model.pretrained={name_or_path!r} cannot be loaded: {' '.join(str(err).split())[:300]}") from None
    model.to(device)
    model.eval()
    processor = load_processor(name_or_path)
    return model, processor


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def build_prompt(processor, question: str, system: str | None = None) -> str:
    """The generation prompt for one image and one question, from the processor's chat template
    (LLaVA-1.5 layout: ``<s> {system} user : <image> {question} assistant :`` for the tiny model).
    ``system`` overrides the template's default system prompt."""
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prepare_inputs(processor, images: list, questions: list[str], *, system: str | None = None,
                   answers: list[str] | None = None):
    """A left-padded ``BatchFeature`` (``return_tensors="pt"``) for a batch of (image, question).

    With ``answers``, each prompt is followed by ``" {answer} {eos}"`` (teacher forcing); the
    answer tokens are then the last tokens of every row (left padding)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    tok = _tokenizer(processor)
    texts = [build_prompt(processor, q, system) for q in questions]
    if answers is not None:
        texts = [f"{t} {a} {tok.eos_token}" for t, a in zip(texts, answers)]
    return encode_prompts(processor, list(images), texts)


def encode_prompts(processor, images: list, prompts: list[str]):
    """``processor(images, prompts)`` with left padding (the last prompt token sits at the same
    position in every row, as batched greedy decoding and answer-position scoring need)."""
    tok = _tokenizer(processor)
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        return processor(images=images or None, text=list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
