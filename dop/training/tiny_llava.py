"""Lightning training of the embedded tiny MLLM (``dop/assets/tiny_llava``).

Recipe (``tiny-model-notes.md``): stage 1 captions only (per-cell description and sorted object
list, loss on every caption token); stage 2 samples of several families (``cfg.mix``): captions, the
synthetic benchmark's own questions (relational types more often), and questions about the same
scenes in the 13 lmms-eval benchmarks' prompt formats (``syn.make_task_sample``: the short-answer
post-prompt, yes / no, option lists answered with the letter); training-only auxiliary heads on
each image token predicting its cell and that cell's colour and shape (dropped before saving, so the
checkpoint is a plain ``LlavaForConditionalGeneration``), and for the benchmark formats a per-option
head (is it the answer, its letter) and an answer-word head at the last prompt position; half of the
caption/qa questions follow hint sentences (``lead_in``), so cells are found by content, not by their
distance from the question; AdamW with a higher learning rate on the vision tower + projector,
warmup, constant, linear decay over the last part, gradient clipping. ``init_from`` fine-tunes a
saved model, its vocabulary extended (how the shipped checkpoint was made: see its README).

The tokenizer is word level (``word_tokenizer``): it folds capitals inside words, keeps a lone
capital (option letters), splits punctuation off, and maps unknown words to ``<unk>``, so real
benchmark prompts tokenize without surprises.

Every batch is a function of (seed, global step) only (``batch_for_step``), so a run resumed from
``last.ckpt`` sees exactly the batches it would have seen uninterrupted.

Entry points: ``dop stage=train`` (``dop.stages.train``) and ``train_tiny_llava(out_dir, ...)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import string
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from dop.data import synthetic as syn
from dop.models import build_prompt, encode_prompts, prepare_inputs

log = logging.getLogger("dop.train")

SYSTEM_PROMPT = "a chat between a user and an assistant ."
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TEMPLATE_WORDS = ["user", "assistant", ":", "chat", "between", "an", "and"]

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + SYSTEM_PROMPT + "') -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
    "{%- if m['content'] is string -%}{%- set ns.system = m['content'] -%}"
    "{%- else -%}{%- set ns.system = m['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}{%- if ns.system -%}{{- ' ' + ns.system -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- ' user :' -}}"
    "{%- if m['content'] is string -%}{{- ' ' + m['content'] -}}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- ' <image>' -}}"
    "{%- elif c['type'] == 'text' -%}{{- ' ' + c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' assistant :' -}}"
    "{%- if m['content'] is string -%}{{- ' ' + m['content'] -}}"
    "{%- else -%}{%- for c in m['content'] -%}{%- if c['type'] == 'text' -%}{{- ' ' + c['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{{- ' ' + eos_token -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' assistant :' -}}{%- endif -%}"
)


@dataclass
class TinyArch:
    """Architecture of the tiny LLaVA (CLIP vision tower + Llama decoder)."""

    grid: int = 2
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 256
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 512
    max_positions: int = 256


TASK_TEST_SAMPLES = 600  # held-out benchmark-format prompts scored after `dop stage=train` (200 per family)
DEFAULT_MIX = {"caption": 0.25, "qa": 0.3, "short": 0.15, "yesno": 0.12, "choice": 0.18}
BATCH_FAMILIES = ("caption", "qa", *syn.FAMILIES)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 6000
    stage1_steps: int = 800
    batch_size: int = 32
    # a batch is encoded as this many micro-batches of samples of similar length (less padding);
    # the loss, and so the gradient, is still the whole batch's
    micro_batches: int = 3
    # stage 2: share of samples per family (``sample_family``): captions, the synthetic benchmark's
    # own questions (qa), and questions in the benchmarks' prompt formats (syn.FAMILIES: short
    # answer, yes / no, multiple choice)
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    # qa sampling weights, overriding syn.training_weights (relational types 2, others 1);
    # exists x4 and right_of x3 is what made `exists` learnable
    qtype_weights: dict | None = field(default_factory=lambda: {"exists": 4.0, "right_of": 3.0})
    lr_lm: float = 1e-3
    lr_vision: float = 3e-3           # vision tower, projector, auxiliary heads
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    warmup_steps: int = 100
    decay_fraction: float = 0.2       # linear decay to 0 over the last part of training
    grad_clip: float = 1.0
    # share of caption and qa training samples whose question gets a lead-in of 1-2 known sentences
    # (``syn.HINTS``): the benchmark formats put text of any length between the image and the
    # question, so a cell must be found by what its image tokens hold, not by their distance
    lead_in: float = 0.5
    # auxiliary per-image-token loss: its cell's colour and shape, and the cell itself (without the
    # cell target the LM-input features carry no position, and questions whose length varies cannot
    # find a cell by its distance from the question)
    aux_weight: float = 1.0
    # auxiliary loss on multiple-choice prompts (training only): at each option's last word, a head
    # reading the residual stream ``option_aux_layer`` layers deep predicts whether the option is the
    # answer and which letter it has, so the last layers only need to copy the flagged option's letter
    option_aux_weight: float = 1.0
    option_aux_layer: int = 4
    # auxiliary loss at the last prompt position (training only): a head reading the residual stream
    # ``answer_aux_layer`` layers deep predicts the answer word (for multiple choice, the correct
    # option's word, not its letter), so the answer is known early and the last layers only map it
    # to the format (the option holding it, yes / no)
    answer_aux_weight: float = 1.0
    answer_aux_layer: int = 3
    ckpt_every: int = 250             # last.ckpt every N steps
    eval_every: int = 500             # quick val accuracy (0 = never)
    eval_samples: int = 200
    num_threads: int = 1
    progress_bar: bool = True
    # a saved tiny LLaVA (directory) to start from instead of random weights: its vocabulary must be
    # a prefix of this tokenizer's (new words get the mean of its embeddings); null = from scratch
    init_from: str | None = None
    arch: TinyArch = field(default_factory=TinyArch)


# ------------------------------------------------------------------ model + processor
def tokenizer_vocabulary(grid: int = 2) -> list[str]:
    """The tiny model's words: special tokens first (``<image>`` = 4), the chat template's, the
    synthetic benchmark's, then those of the benchmark prompt formats (``syn.task_vocabulary``)."""
    words = list(SPECIAL_TOKENS) + TEMPLATE_WORDS + syn.vocabulary(grid) + SYSTEM_PROMPT.split()
    return list(dict.fromkeys(words + syn.task_vocabulary(grid)))


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A word-level ``tokenizers.Tokenizer`` that reads benchmark prompts the way
    ``syn.prompt_words`` describes: a capital inside a word is lower-cased (one ``Replace`` per letter,
    so ``Answer`` reads as ``answer``) but a capital standing alone is kept (the option letters
    ``A``..``E`` are their own tokens, and an answer decodes as ``A``, which every multiple-choice
    task's parser accepts; a lower-case ``a`` is not accepted by MMBench's or MMMU's); punctuation
    other than ``_`` is split off (``phrase.`` -> ``phrase`` ``.``; ``top_left`` stays one word);
    a cell in words is its name (``syn.cell_phrases``: ``Upper left corner`` -> ``top_left``);
    anything else is ``<unk>``."""
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([
        *(normalizers.Replace(Regex(f"(?<=[A-Za-z]){c}|{c}(?=[A-Za-z])"), c.lower()) for c in string.ascii_uppercase),
        *(normalizers.Replace(Regex(pattern), cell) for pattern, cell in syn.cell_phrases()),
    ])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated"),
    ])
    return tk


def build_processor(arch: TinyArch | None = None):
    """Word-level tokenizer (``word_tokenizer``) + ``CLIPImageProcessorPil`` + ``LlavaProcessor``
    with the chat template."""
    arch = arch or TinyArch()
    tk = word_tokenizer(tokenizer_vocabulary(arch.grid))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": arch.image_size}, crop_size={"height": arch.image_size, "width": arch.image_size},
    )
    return LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=arch.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>", chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava(processor, arch: TinyArch | None = None, attn_implementation: str = "sdpa"):
    """A randomly initialised tiny ``LlavaForConditionalGeneration`` matching ``processor``."""
    arch = arch or TinyArch()
    tok = processor.tokenizer
    n_img = (arch.image_size // arch.patch_size) ** 2
    vcfg = CLIPVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_mlp, num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads, image_size=arch.image_size, patch_size=arch.patch_size,
        projection_dim=arch.vision_hidden,
    )
    tcfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=arch.hidden, intermediate_size=arch.mlp, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, max_position_embeddings=arch.max_positions,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_img, vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gc.do_sample = False
    return model


def init_model(path, processor) -> LlavaForConditionalGeneration:
    """The model saved in ``path`` with its vocabulary extended to ``processor``'s: the saved
    tokenizer's words must be the first words of the new one (``tokenizer_vocabulary`` only appends);
    a new word's input and output rows are drawn around the mean of the saved rows with their
    spread (identical rows would make the new option letters indistinguishable at the start)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"train.init_from={str(path)!r}: no saved model (config.json) there")
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    old = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    new = processor.tokenizer.get_vocab()
    if any(new.get(w) != i for w, i in old.items()):
        raise ValueError(f"train.init_from={str(path)!r}: its vocabulary is not a prefix of the tiny tokenizer's")
    n_old, n_new = len(old), len(new)
    emb, head = model.get_input_embeddings().weight.data, model.get_output_embeddings().weight.data
    model.resize_token_embeddings(n_new, mean_resizing=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for new_w, old_w in ((model.get_input_embeddings().weight, emb), (model.get_output_embeddings().weight, head)):
            mean, std = old_w[:n_old].mean(0), old_w[:n_old].std(0)
            new_w[n_old:] = mean + std * torch.randn(n_new - n_old, old_w.shape[1], generator=gen)
    model.config.text_config.vocab_size = n_new
    return model.train()  # from_pretrained leaves eval mode


# ------------------------------------------------------------------ batches
def sample_family(index: int, step: int, cfg: TrainConfig) -> str:
    """The family of training sample ``index`` of the stream (drawn at ``step``): captions in stage 1;
    then drawn from ``cfg.mix`` by (seed, index)."""
    if step < cfg.stage1_steps:
        return "caption"
    unknown = set(cfg.mix) - set(BATCH_FAMILIES)
    if unknown:
        raise ValueError(f"unknown sample families {sorted(unknown)} in mix; known: {BATCH_FAMILIES}")
    names = [f for f in BATCH_FAMILIES if cfg.mix.get(f, 0) > 0]
    w = np.asarray([float(cfg.mix[f]) for f in names])
    return names[int(syn.sample_rng(cfg.seed, "family", index).choice(len(names), p=w / w.sum()))]


def qa_weights(cfg: TrainConfig) -> list[float]:
    """Sampling weights of ``syn.QA_TYPES`` in qa batches."""
    w = syn.training_weights(syn.QA_TYPES)
    if cfg.qtype_weights:
        w = [float(cfg.qtype_weights.get(q, wq)) for q, wq in zip(syn.QA_TYPES, w)]
    return w


def with_lead_in(sample: dict, index: int, cfg: TrainConfig) -> dict:
    """``sample`` with, ``cfg.lead_in`` of the time, 1-2 ``syn.HINTS`` sentences before its question
    (drawn by (seed, index))."""
    rng = syn.sample_rng(cfg.seed, "lead_in", index)
    if rng.random() >= cfg.lead_in:
        return sample
    lead = " ".join(syn.HINTS[int(i)] for i in rng.choice(len(syn.HINTS), int(rng.integers(1, 3)), replace=False))
    return {**sample, "question": f"{lead} {sample['question']}"}


def step_samples(step: int, cfg: TrainConfig) -> list[dict]:
    """The samples of a step's batch (families by ``sample_family``): a pure function of (cfg.seed, step)."""
    kw = {"grid": cfg.arch.grid, "image_size": cfg.arch.image_size}
    out = []
    for index in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        family = sample_family(index, step, cfg)
        if family == "caption":
            s = syn.make_sample(syn.sample_rng(cfg.seed, "stream", index), syn.TRAIN_CAPTION_TYPES, **kw)
            out.append(with_lead_in(s, index, cfg))
        elif family == "qa":
            s = syn.make_sample(syn.sample_rng(cfg.seed, "stream", index), syn.QA_TYPES, qa_weights(cfg), **kw)
            out.append(with_lead_in(s, index, cfg))
        else:
            out.append(syn.make_task_sample(syn.sample_rng(cfg.seed, "task_stream", index), family, **kw))
    return out


def patch_cells(arch: TinyArch) -> torch.Tensor:
    """The grid cell of each image token (row-major patches)."""
    pps = arch.image_size // arch.patch_size
    return torch.tensor([(p // pps * arch.grid // pps) * arch.grid + (p % pps * arch.grid // pps)
                         for p in range(pps * pps)])


def cell_targets(scenes: list[syn.Scene], arch: TinyArch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image token (row-major patches): colour index (0 = empty) and shape index (0 = empty)."""
    pps = arch.image_size // arch.patch_size
    colours = list(syn.COLOURS)
    col = np.zeros((len(scenes), pps * pps), np.int64)
    shp = np.zeros_like(col)
    for b, sc in enumerate(scenes):
        for p in range(pps * pps):
            r, c = divmod(p, pps)
            cell = (r * sc.grid // pps) * sc.grid + (c * sc.grid // pps)
            o = sc.at(cell)
            if o is not None:
                col[b, p] = colours.index(o.colour) + 1
                shp[b, p] = syn.SHAPES.index(o.shape) + 1
    return torch.from_numpy(col), torch.from_numpy(shp)


def encode_samples(processor, images: list[list], questions: list[str], answers: list[str] | None = None):
    """``dop.models.prepare_inputs`` for questions with one or more images each: the images of a
    question sit together where the chat template puts its image, as dop's lmms-eval plugin places
    a document's images (``dop.evaluation.scoring.build_prompt``)."""
    token = processor.image_token
    texts = [build_prompt(processor, q).replace(token, " ".join([token] * len(ims)), 1)
             for ims, q in zip(images, questions)]
    if answers is not None:
        texts = [f"{t} {a} {processor.tokenizer.eos_token}" for t, a in zip(texts, answers)]
    return encode_prompts(processor, [im for ims in images for im in ims], texts)


def encode_training(processor, samples: list[dict], arch: TinyArch) -> dict:
    """Teacher-forced inputs of samples + answer token counts (``n_target``, with ``</s>``) and the
    auxiliary targets of each sample's first image."""
    images = [[Image.fromarray(im) for im in [s["image"], *s.get("extra_images", [])]] for s in samples]
    answers = [s["answer"] for s in samples]
    inputs = encode_samples(processor, images, [s["question"] for s in samples], answers=answers)
    tok = processor.tokenizer
    n_target = torch.tensor([len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers])
    col, shp = cell_targets([syn.Scene.from_json(s["scene"]) for s in samples], arch)
    opt_pos, opt_letter, opt_correct = option_targets(processor, inputs["input_ids"], samples)
    return {**dict(inputs), "n_target": n_target, "cell_colour": col, "cell_shape": shp,
            "option_pos": opt_pos, "option_letter": opt_letter, "option_correct": opt_correct,
            "answer_word": answer_words(processor, samples)}


def answer_words(processor, samples: list[dict]) -> torch.Tensor:
    """Per sample the token of its answer word (-100 for captions): the answer's first token, or for
    a multiple-choice sample the word its correct option stands for."""
    tok = processor.tokenizer
    out = []
    for s in samples:
        if s["qtype"] in syn.TRAIN_CAPTION_TYPES:
            out.append(-100)
            continue
        word = s["answer"]
        if s.get("family") == "choice":
            word = syn.task_answer(syn.Scene.from_json(s["scene"]), s["qtype"], json.loads(s["args"]))
        out.append(tok(word, add_special_tokens=False)["input_ids"][0])
    return torch.tensor(out, dtype=torch.long)


def option_targets(processor, input_ids: torch.Tensor, samples: list[dict]):
    """The options of the multiple-choice samples in a batch: (row, position of the option's last
    word) pairs ``(K, 2)``, the option's letter index ``(K,)`` and whether it is the answer ``(K,)``.
    An option starts at a lone letter followed by ``.``; it ends before the next option or before the
    instruction that follows the list (its first word)."""
    tok = processor.tokenizer
    letter_id = {tok.convert_tokens_to_ids(c): i for i, c in enumerate(syn.OPTION_LETTERS)}
    dot = tok.convert_tokens_to_ids(".")
    stops = {tok.convert_tokens_to_ids(w) for w in (syn.prompt_words(syn.LETTER)[0], syn.prompt_words(syn.LETTER_CN)[0])}
    pos, letters, correct = [], [], []
    for b, s in enumerate(samples):
        if s.get("family") != "choice":
            continue
        ids = input_ids[b].tolist()
        starts = [i for i in range(len(ids) - 1) if ids[i] in letter_id and ids[i + 1] == dot]
        for k, i in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else next(j for j in range(i + 2, len(ids)) if ids[j] in stops)
            letter = letter_id[ids[i]]
            pos.append((b, end - 1))
            letters.append(letter)
            correct.append(int(syn.OPTION_LETTERS[letter] == s["answer"]))
    return (torch.tensor(pos, dtype=torch.long).view(-1, 2), torch.tensor(letters, dtype=torch.long),
            torch.tensor(correct, dtype=torch.long))


def batch_for_step(processor, step: int, cfg: TrainConfig) -> list[dict]:
    """The training batch of a step (a pure function of (cfg.seed, step)) as ``cfg.micro_batches``
    micro-batches of samples of similar length."""
    samples = step_samples(step, cfg)
    size = [len(syn.prompt_words(s["question"] + " " + s["answer"])) + 16 * len(s.get("extra_images", []))
            for s in samples]
    order = sorted(range(len(samples)), key=lambda i: size[i])
    parts = np.array_split(np.asarray(order), max(1, min(int(cfg.micro_batches), len(samples))))
    return [encode_training(processor, [samples[int(i)] for i in part], cfg.arch) for part in parts if len(part)]


class StepIndex(torch.utils.data.Dataset):
    """A dataloader of step numbers; the module builds each batch from its global step."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


# ------------------------------------------------------------------ Lightning module
def _lightning():
    return lightning


def make_module(cfg: TrainConfig, processor, model=None):
    L = _lightning()

    def aux_layer(depth: int) -> int:
        # a model with fewer layers (tests) reads its last hidden state
        return min(int(depth), cfg.arch.layers)

    class TinyLlavaModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.cfg = cfg
            self.processor = processor
            self.model = model if model is not None else build_tiny_llava(processor, cfg.arch)
            h = cfg.arch.hidden
            self.aux_colour = torch.nn.Linear(h, len(syn.COLOURS) + 1)
            self.aux_shape = torch.nn.Linear(h, len(syn.SHAPES) + 1)
            self.aux_cell = torch.nn.Linear(h, cfg.arch.grid ** 2)
            self.aux_option = torch.nn.Linear(h, 2)
            self.aux_letter = torch.nn.Linear(h, len(syn.OPTION_LETTERS))
            self.aux_answer = torch.nn.Linear(h, len(processor.tokenizer))
            self.register_buffer("patch_cell", patch_cells(cfg.arch), persistent=False)
            self.steps_seen: list[int] = []
            self._t0 = None

        def forward_loss(self, micro_batches: list[dict]):
            """(loss, LM loss, auxiliary loss) of a batch given as micro-batches: the LM loss is the
            mean over samples of each sample's mean answer-token loss; the auxiliary loss the mean
            over image tokens."""
            per_sample, aux = zip(*(self._micro_loss(b) for b in micro_batches))
            lm_loss = torch.cat(per_sample).mean()
            rows = torch.tensor([len(p) for p in per_sample], dtype=torch.float32)
            aux_loss = (torch.stack(aux) * rows).sum() / rows.sum()
            return lm_loss + cfg.aux_weight * aux_loss, lm_loss, aux_loss

        def _micro_loss(self, batch):
            m = self.model
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    output_hidden_states=cfg.aux_weight > 0 or cfg.option_aux_weight > 0 or cfg.answer_aux_weight > 0)
            logits = out.logits  # (B, T, V)
            B, T, _ = logits.shape
            ids = batch["input_ids"]
            n_t = batch["n_target"]
            pos = torch.arange(T).expand(B, T)
            tgt_mask = pos >= (T - n_t)[:, None]          # answer tokens (rows end at T: left padding)
            pred = logits[:, :-1][tgt_mask[:, 1:]]
            gold = ids[:, 1:][tgt_mask[:, 1:]]
            tok_loss = F.cross_entropy(pred.float(), gold, reduction="none")
            row = torch.repeat_interleave(torch.arange(B), n_t)
            per_sample = torch.zeros(B).index_add_(0, row, tok_loss) / n_t
            aux = torch.zeros(())
            if cfg.aux_weight > 0:
                emb = out.hidden_states[0]                   # LM input: projected image features
                img = ids == m.config.image_token_index
                first = img & (img.cumsum(1) <= m.config.image_seq_length)  # a row's first image
                feats = emb[first].view(B, -1, emb.shape[-1])
                aux = (
                    F.cross_entropy(self.aux_colour(feats).flatten(0, 1), batch["cell_colour"].flatten())
                    + F.cross_entropy(self.aux_shape(feats).flatten(0, 1), batch["cell_shape"].flatten())
                    + F.cross_entropy(self.aux_cell(feats).flatten(0, 1), self.patch_cell.repeat(B))
                ) / 3
            if cfg.option_aux_weight > 0 and len(batch["option_pos"]):
                h = out.hidden_states[aux_layer(cfg.option_aux_layer)][batch["option_pos"][:, 0], batch["option_pos"][:, 1]]
                aux = aux + cfg.option_aux_weight * (
                    F.cross_entropy(self.aux_option(h), batch["option_correct"])
                    + F.cross_entropy(self.aux_letter(h), batch["option_letter"])
                ) / 2
            if cfg.answer_aux_weight > 0 and (batch["answer_word"] >= 0).any():
                last = out.hidden_states[aux_layer(cfg.answer_aux_layer)][torch.arange(B), T - n_t - 1]
                aux = aux + cfg.answer_aux_weight * F.cross_entropy(self.aux_answer(last), batch["answer_word"],
                                                                    ignore_index=-100)
            return per_sample, aux

        def training_step(self, step_index, batch_idx):
            step = int(self.global_step)
            if self._t0 is None:
                self._t0 = time.time()
            self.steps_seen.append(step)
            batch = batch_for_step(self.processor, step, cfg)
            loss, lm_loss, aux = self.forward_loss(batch)
            self.log_dict({"loss": loss.detach(), "lm": lm_loss.detach(), "aux": aux.detach()},
                          prog_bar=True, on_step=True, batch_size=cfg.batch_size)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            step = int(self.global_step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step >= cfg.stage1_steps:
                acc = quick_eval(self.model, self.processor, cfg, cfg.eval_samples)
                task = quick_task_eval(self.model, self.processor, cfg, cfg.eval_samples)
                self.log_dict({"val_acc": acc, "task_acc": task["accuracy"]}, prog_bar=True, on_step=True,
                              batch_size=cfg.batch_size)
                log.info("step %d: val acc %.3f, benchmark formats %.3f %s (%.0f s)", step, acc, task["accuracy"],
                         {k: round(v, 3) for k, v in task["per_family"].items()}, time.time() - self._t0)
                self.model.train()

        def configure_optimizers(self):
            groups = defaultdict(list)
            for name, p in self.named_parameters():
                if not p.requires_grad:
                    continue
                vision = not name.startswith("model.model.language_model") and not name.startswith("model.lm_head")
                decay = p.ndim >= 2 and "embed" not in name
                groups[(vision, decay)].append(p)
            opt = torch.optim.AdamW(
                [{"params": ps, "lr": cfg.lr_vision if vis else cfg.lr_lm,
                  "weight_decay": cfg.weight_decay if dec else 0.0} for (vis, dec), ps in sorted(groups.items())],
                betas=tuple(cfg.betas),
            )
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TinyLlavaModule()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return 1.0
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))


# ------------------------------------------------------------------ evaluation
def quick_eval(model, processor, cfg: TrainConfig, n: int) -> float:
    """Accuracy on ``n`` generated val samples (no dataset on disk needed)."""
    rows = {"image": [], "question": [], "answer": [], "qtype": []}
    for i in range(n):
        s = syn.make_sample(syn.sample_rng(cfg.seed + 10_000, "val", i), grid=cfg.arch.grid,
                            image_size=cfg.arch.image_size)
        rows["image"].append(Image.fromarray(s["image"]))
        for k in ("question", "answer", "qtype"):
            rows[k].append(s[k])
    return evaluate_accuracy(model, processor, rows, batch_size=50)["accuracy"]


def quick_task_eval(model, processor, cfg: TrainConfig, n: int) -> dict:
    """``evaluate_task_formats`` on ``n`` generated benchmark-format val samples (``syn.task_rows``)."""
    rows = syn.task_rows(cfg.seed + 10_000, "task_val", n, grid=cfg.arch.grid, image_size=cfg.arch.image_size)
    return evaluate_task_formats(model, processor, rows, batch_size=50)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def task_correct(family: str, prediction: str, answer: str) -> bool:
    """A benchmark-format answer scored strictly: the whole greedy output must be the answer. Short
    answers compare lower-cased with punctuation other than ``_`` dropped; yes / no compare as POPE
    does (lower-cased, stripped); an option letter must be the capital alone (MMBench's and MMMU's
    parsers need the capital; ScienceQA and SEED-Bench also take ``a`` or ``A. red``)."""
    pred = prediction.strip()
    if family == "choice":
        return pred == answer
    if family == "yesno":
        return pred.lower() == answer
    return _words(pred) == _words(answer)


@torch.no_grad()
def evaluate_task_formats(model, processor, rows: dict, batch_size: int = 32, max_new_tokens: int = 4) -> dict:
    """Greedy answers to benchmark-format prompts (``syn.task_rows``: ``image``, ``question``,
    ``answer``, ``family``, ``format``) scored with ``task_correct``. Returns ``{"accuracy", "n",
    "per_family", "per_format", "predictions"}``."""
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    n = len(rows["answer"])
    hits: dict[str, list] = defaultdict(list)
    preds = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        images = [[rows["image"][i], *(rows["extra_images"][i] if "extra_images" in rows else [])] for i in idx]
        inputs = encode_samples(processor, images, [rows["question"][i] for i in idx]).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            ok = task_correct(rows["family"][i], text, rows["answer"][i])
            hits["family:" + rows["family"][i]].append(ok)
            hits["format:" + rows["format"][i]].append(ok)
            preds.append(text.strip())
    model.train(was_training)
    mean = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    return {
        "accuracy": sum(sum(v) for k, v in hits.items() if k.startswith("family:")) / max(1, n),
        "n": n,
        "per_family": {k.split(":", 1)[1]: v for k, v in mean.items() if k.startswith("family:")},
        "per_format": {k.split(":", 1)[1]: v for k, v in mean.items() if k.startswith("format:")},
        "predictions": preds,
    }


def _normalise(text: str) -> str:
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


@torch.no_grad()
def evaluate_accuracy(model, processor, dataset, batch_size: int = 32, max_samples: int | None = None,
                      max_new_tokens: int = 5) -> dict:
    """Greedy one-word answers compared with ``answer`` (exact match after lower-casing).

    When every answer is one token of the tokenizer, the answer is the arg-max of the logits after
    the prompt (the first greedy token: one forward pass per batch); otherwise a short greedy
    ``generate`` and its first word. ``dataset``: a ``datasets.Dataset`` or a dict of lists with
    ``image``, ``question``, ``answer`` (and optional ``qtype``).
    Returns ``{"accuracy", "n", "per_qtype": {qtype: accuracy}, "predictions": [...]}``."""
    tok = getattr(processor, "tokenizer", processor)
    n = len(dataset["answer"]) if isinstance(dataset, dict) else len(dataset)
    if max_samples is not None:
        n = min(n, int(max_samples))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    correct, per_type, preds = 0, defaultdict(lambda: [0, 0]), []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        if isinstance(dataset, dict):
            rows = {k: [dataset[k][i] for i in idx] for k in dataset}
        else:
            rows = dataset[start:start + len(idx)]
        answers = [str(a).strip().lower() for a in rows["answer"]]
        qtypes = rows.get("qtype") or ["all"] * len(answers)
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in rows["image"]]
        inputs = prepare_inputs(processor, images, list(rows["question"])).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        single = all(len(tok(a, add_special_tokens=False)["input_ids"]) == 1 for a in answers)
        if single:
            logits = model(**inputs).logits[:, -1]
            out = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
            got = [_normalise(o) for o in out]
        else:
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            texts = tok.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            got = [_normalise(t) for t in texts]
        for g, a, t in zip(got, answers, qtypes):
            ok = g == a
            correct += ok
            per_type[t][0] += ok
            per_type[t][1] += 1
            preds.append(g)
    model.train(was_training)
    return {
        "accuracy": correct / max(1, n),
        "n": n,
        "per_qtype": {t: c / k for t, (c, k) in sorted(per_type.items())},
        "predictions": preds,
    }


# ------------------------------------------------------------------ training
def _as_train_config(**kw) -> TrainConfig:
    arch = kw.pop("arch", None)
    if isinstance(arch, dict):
        arch = TinyArch(**arch)
    cfg = TrainConfig(**kw)
    if arch is not None:
        cfg.arch = arch
    if isinstance(cfg.betas, list):
        cfg.betas = tuple(cfg.betas)
    return cfg


def fit(cfg: TrainConfig, run_dir, out_dir=None, *, resume: bool = True, logger=False):
    """Train (or resume) in ``run_dir`` (``last.ckpt`` there); then, when ``out_dir`` is given,
    ``save_pretrained`` the plain LLaVA + processor there. Returns ``(module, info)``."""
    L = _lightning()
    torch.set_num_threads(int(cfg.num_threads))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    processor = build_processor(cfg.arch)
    module = make_module(cfg, processor, init_model(cfg.init_from, processor) if cfg.init_from else None)
    last = run_dir / "last.ckpt"
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(run_dir), filename="step{step}", save_last=True, save_top_k=0,
        every_n_train_steps=int(cfg.ckpt_every), save_on_train_epoch_end=False,
        enable_version_counter=False,  # always overwrite last.ckpt (never last-v1.ckpt)
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=int(cfg.steps), max_epochs=-1,
        gradient_clip_val=cfg.grad_clip, callbacks=[ckpt_cb], logger=logger,
        enable_progress_bar=bool(cfg.progress_bar), enable_model_summary=False,
        default_root_dir=str(run_dir), num_sanity_val_steps=0, log_every_n_steps=50,
    )
    loader = torch.utils.data.DataLoader(StepIndex(int(cfg.steps)), batch_size=None, shuffle=False)
    ckpt_path = str(last) if (resume and last.exists()) else None
    start_step = 0
    if ckpt_path:
        start_step = int(torch.load(ckpt_path, map_location="cpu", weights_only=False)["global_step"])
        log.info("resuming from %s at step %d", ckpt_path, start_step)
    t0 = time.time()
    with warnings.catch_warnings():
        # batches are a function of the global step, so resuming mid-"epoch" is exact
        warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    elapsed = time.time() - t0
    trainer.save_checkpoint(str(last))
    info = {"seed": cfg.seed, "steps": int(trainer.global_step), "start_step": start_step,
            "first_step_run": module.steps_seen[0] if module.steps_seen else None,
            "train_seconds_this_run": round(elapsed, 1), "config": _jsonable(asdict(cfg))}
    prev = run_dir / "train_info.json"
    total = elapsed
    if ckpt_path and prev.exists():
        total += json.loads(prev.read_text()).get("train_seconds_total", 0.0)
    info["train_seconds_total"] = round(total, 1)
    prev.write_text(json.dumps(info, indent=2))
    if out_dir is not None:
        save_plain(module.model, processor, out_dir)
    return module, info


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def save_plain(model, processor, out_dir) -> Path:
    """``save_pretrained`` of the plain ``LlavaForConditionalGeneration`` (no auxiliary heads) and
    the processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    return out


def train_tiny_llava(out_dir, seed: int = 1, steps: int = 6000, *, run_dir=None, resume: bool = True,
                     evaluate_on=None, **kw) -> dict:
    """Train the tiny LLaVA and save it (plain ``LlavaForConditionalGeneration`` + processor) to
    ``out_dir``. ``run_dir`` holds ``last.ckpt`` (default ``<out_dir>/../<name>_run``); an
    interrupted call resumes there. ``evaluate_on``: a dataset (split) to report test accuracy on.
    Other keyword arguments are ``TrainConfig`` fields (``batch_size``, ``stage1_steps``, ``arch``
    = dict of ``TinyArch`` fields, ...). Returns the info dict (also in ``<run_dir>/train_info.json``)."""
    out_dir = Path(out_dir)
    run_dir = Path(run_dir) if run_dir is not None else out_dir.parent / f"{out_dir.name}_run"
    cfg = _as_train_config(seed=seed, steps=steps, **kw)
    module, info = fit(cfg, run_dir, out_dir, resume=resume)
    if evaluate_on is not None:
        res = evaluate_accuracy(module.model, module.processor, evaluate_on)
        info["test"] = {k: v for k, v in res.items() if k != "predictions"}
        (run_dir / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None):
    """``python -m dop.training.tiny_llava OUT_DIR [STEPS] [SEED] [--qtype-weights JSON] [--run-dir DIR] [--config JSON]``."""
    ap = argparse.ArgumentParser(prog="python -m dop.training.tiny_llava", description=main.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("steps", nargs="?", type=int, default=6000)
    ap.add_argument("seed", nargs="?", type=int, default=0)
    ap.add_argument("--qtype-weights", type=json.loads, default=None, help='e.g. \'{"exists": 4}\'')
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--config", type=json.loads, default=None,
                    help='other TrainConfig fields as JSON, e.g. \'{"init_from": "base", "stage1_steps": 0}\'')
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    kw = dict(a.config or {})
    if a.qtype_weights is not None:
        kw["qtype_weights"] = a.qtype_weights
    info = train_tiny_llava(a.out_dir, seed=a.seed, steps=a.steps, run_dir=a.run_dir, **kw)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
