"""A CLIP text tower aligned with the embedded tiny LLaVA's frozen vision tower (for TRIM / CDPruner).

TRIM and CDPruner score image patches against the question with a CLIP *text* tower in the joint
space of the vision tower (``dop.engine.baselines.reducer.TextGuidedReducer``). LLaVA ships only the vision
tower, so for the embedded tiny LLaVA (``dop/assets/tiny_llava``) this module trains the missing half
the way CLIP was trained, and ships it in ``dop/assets/tiny_clip_text`` (``"tiny_clip_text"`` in
``dop.models.resolve_path``; ``conf/model/tiny_llava.yaml: clip_text_tower``):

- a ``CLIPModel`` whose ``vision_model`` *is* the tiny LLaVA's vision tower (weights copied, frozen),
  so the saved checkpoint is a consistent CLIP dual encoder;
- image embedding = ``visual_projection(post_layernorm([CLS] hidden state of the tower's last
  layer))`` (``pooler_output``), text embedding = ``text_projection(text_model(...).pooler_output)``;
- symmetric InfoNCE with a learnable temperature (``logit_scale``, initialised to 1/0.07 and clamped
  at 100, as CLIP); only ``text_model``, ``text_projection``, ``visual_projection`` and
  ``logit_scale`` train;
- images: the synthetic benchmark's **train** split (``sample_rng(seed, "train", i)``; val and test
  are other splits), one fresh sample per row and step; texts: short captions built from each image's
  own scene metadata (``caption_for``: the full object list in random order, a subset of objects, a
  "X left of Y" relation, or a question that names something in the image);
- a byte-level BPE ``CLIPTokenizer`` built offline from the synthetic vocabulary (``clip_tokenizer``),
  saved next to the model.

Every batch is a function of (seed, step) only, so a run is deterministic on CPU.

Command (one torch thread; the README of the asset gives the time and the accuracy measured)::

    OMP_NUM_THREADS=1 python -m dop.training.clip_text outputs/tiny_clip_text --steps 3500 --seed 0
    cp outputs/tiny_clip_text/* dop/assets/tiny_clip_text/       # keep the README
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from dop.clip_tokenizer import clip_tokenizer
from dop.data import synthetic as syn
from dop.models import load_model
from dop.training.tiny_llava import StepIndex

log = logging.getLogger("dop.clip_text")

# words of the captions that are not in the benchmark's own vocabulary
CAPTION_WORDS = ("and", "left", "a", "an", "image", "objects")
MAX_POSITIONS = 32  # the longest caption (four objects with cells) is 22 tokens










def synthetic_words(grid: int = 2) -> list[str]:
    """Every word of the synthetic benchmark's questions/answers plus the caption words."""
    return list(dict.fromkeys([*syn.vocabulary(grid), *CAPTION_WORDS]))




# --------------------------------------------------------------------------------------------
# Captions from the scene metadata
# --------------------------------------------------------------------------------------------
def _phrase(o: syn.Obj, names: list[str], with_cell: bool) -> str:
    return f"{o.colour} {o.shape} {names[o.cell]}" if with_cell else f"{o.colour} {o.shape}"


def caption_for(scene: syn.Scene, rng: np.random.Generator) -> str:
    """A short text that is true of ``scene``, one of four forms:

    - list (35 %): every object in random order, ``red circle top_left blue square bottom_right``
      (cells shown with probability 1/2);
    - subset (25 %): one or two objects joined by ``and``;
    - relation (10 %, when two objects share a row): ``red circle left of blue square`` / ``... right of ...``;
    - question (30 %): one of the benchmark's questions about something in the image
      (``is there a red circle ?``, ``where is ...``, ``what colour is the object at the top_left ?``, ...).
    """
    names = syn.cell_names(scene.grid)
    objs = list(scene.objects)
    form = rng.choice(4, p=[0.35, 0.25, 0.10, 0.30])
    if form == 2:
        pairs = [(a, b) for a in objs for b in objs
                 if a.cell // scene.grid == b.cell // scene.grid and a.cell < b.cell]
        if not pairs:
            form = 1
        else:
            a, b = pairs[int(rng.integers(len(pairs)))]
            if rng.random() < 0.5:
                return f"{a.colour} {a.shape} left of {b.colour} {b.shape}"
            return f"{b.colour} {b.shape} right of {a.colour} {a.shape}"
    if form == 0:
        with_cell = bool(rng.random() < 0.5)
        order = rng.permutation(len(objs))
        return " ".join(_phrase(objs[i], names, with_cell) for i in order)
    if form == 1:
        m = int(rng.integers(1, min(2, len(objs)) + 1))
        pick = rng.choice(len(objs), size=m, replace=False)
        with_cell = bool(rng.random() < 0.5)
        return " and ".join(_phrase(objs[int(i)], names, with_cell) for i in pick)
    o = objs[int(rng.integers(len(objs)))]
    kinds = ["colour_at", "shape_at", "exists", "where", "shape_of_colour"]
    if o.cell % scene.grid != scene.grid - 1:
        kinds.append("right_of")
    kind = kinds[int(rng.integers(len(kinds)))]
    return syn.question_text(scene, kind, {"cell": names[o.cell], "colour": o.colour, "shape": o.shape})


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
@dataclass
class ClipTextConfig:
    seed: int = 0
    steps: int = 3500
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    warmup_steps: int = 100  # then cosine decay to 0
    grad_clip: float = 1.0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    projection_dim: int = 64
    max_positions: int = MAX_POSITIONS
    eval_every: int = 500
    eval_samples: int = 500  # held-out val images for the retrieval accuracy
    num_threads: int = 1
    progress_bar: bool = True


def _vision_tower(llava):
    return llava.model.vision_tower


def build_clip(llava, tokenizer, cfg: ClipTextConfig | None = None):
    """A ``CLIPModel`` whose vision side is a copy of the LLaVA tower (config and weights) and whose
    text side is freshly initialised (seeded by the caller) for ``tokenizer``."""
    cfg = cfg or ClipTextConfig()
    tower = _vision_tower(llava)
    vision = {k: v for k, v in tower.config.to_dict().items()
              if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                       "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
                       "initializer_range", "initializer_factor")}
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.mlp,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))
    inner = getattr(tower, "vision_model", tower)
    target = getattr(clip.vision_model, "vision_model", clip.vision_model)
    target.load_state_dict(inner.state_dict())
    clip.vision_model.requires_grad_(False)
    return clip


def image_embeds(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, P) un-normalised: visual_projection(post_layernorm([CLS] of the last layer)); the tower frozen."""
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return clip.visual_projection(pooled)


def text_embeds(clip, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) un-normalised: text_projection(text_model(...).pooler_output) (as TRIM/CDPruner read it)."""
    return clip.text_projection(clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def pixel_values(images: Sequence[np.ndarray], image_processor) -> torch.Tensor:
    return image_processor([Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]


def batch_for_step(step: int, cfg: ClipTextConfig, tokenizer, image_processor) -> dict:
    """The batch of a step: train-split samples ``step * B + i`` and one caption each (a pure
    function of (seed, step))."""
    rng = np.random.default_rng([cfg.seed, 7919, step])
    images, texts = [], []
    for i in range(cfg.batch_size):
        s = syn.make_sample(syn.sample_rng(cfg.seed, "train", step * cfg.batch_size + i))
        images.append(s["image"])
        texts.append(caption_for(syn.Scene.from_json(s["scene"]), rng))
    tok = tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_positions, return_tensors="pt")
    return {"pixel_values": pixel_values(images, image_processor), "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"], "texts": texts}


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (the i-th text is the i-th image's)."""
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.T
    target = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# --------------------------------------------------------------------------------------------
# Held-out retrieval
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def retrieval_accuracy(clip, tokenizer, image_processor, n: int = 500, seed: int = 0, split: str = "val",
                       batch: int = 250) -> dict:
    """Image -> text and text -> image top-1 among the ``n`` held-out images of ``split`` and their
    canonical captions (``syn.caption_list``: every object with its cell, sorted). A hit is a
    retrieved caption (image) whose text equals the query's own; images with the same caption are
    counted as hits, and ``chance`` is the accuracy of a uniform random pick under that rule."""
    was = clip.training
    clip.eval()
    samples = [syn.make_sample(syn.sample_rng(seed, split, i)) for i in range(n)]
    caps = [syn.caption_list(syn.Scene.from_json(s["scene"])) for s in samples]
    imgs, txts = [], []
    for a in range(0, n, batch):
        imgs.append(image_embeds(clip, pixel_values([s["image"] for s in samples[a:a + batch]], image_processor)))
        tok = tokenizer(caps[a:a + batch], padding=True, truncation=True, return_tensors="pt")
        txts.append(text_embeds(clip, tok["input_ids"], tok["attention_mask"]))
    img = F.normalize(torch.cat(imgs), dim=-1)
    txt = F.normalize(torch.cat(txts), dim=-1)
    sim = img @ txt.T
    same = torch.tensor([[a == b for b in caps] for a in caps])
    i2t = same[torch.arange(n), sim.argmax(1)].float().mean().item()
    t2i = same[torch.arange(n), sim.argmax(0)].float().mean().item()
    clip.train(was)
    return {"n": n, "split": split, "seed": seed, "i2t_top1": i2t, "t2i_top1": t2i,
            "chance": same.float().mean().item()}


# --------------------------------------------------------------------------------------------
# Lightning training
# --------------------------------------------------------------------------------------------
def lr_factor(step: int, cfg: ClipTextConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_module(cfg: ClipTextConfig, clip, tokenizer, image_processor):
    class ClipTextModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.clip = clip

        def trainable(self):
            c = self.clip
            return [*c.text_model.parameters(), *c.text_projection.parameters(),
                    *c.visual_projection.parameters(), c.logit_scale]

        def training_step(self, step_index, batch_idx):
            self.clip.vision_model.eval()  # frozen (and no dropout in CLIP anyway)
            b = batch_for_step(int(self.global_step), cfg, tokenizer, image_processor)
            loss = clip_loss(image_embeds(self.clip, b["pixel_values"]),
                             text_embeds(self.clip, b["input_ids"], b["attention_mask"]), self.clip.logit_scale)
            self.log_dict({"loss": loss.detach(), "T": 1.0 / self.clip.logit_scale.detach().exp()},
                          prog_bar=True, on_step=True, batch_size=cfg.batch_size)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            step = int(self.global_step)
            if cfg.eval_every and step % cfg.eval_every == 0:
                r = retrieval_accuracy(self.clip, tokenizer, image_processor, n=cfg.eval_samples, seed=cfg.seed)
                self.log("i2t", r["i2t_top1"], prog_bar=True, on_step=True, batch_size=cfg.batch_size)
                log.info("step %d: val retrieval i2t %.3f t2i %.3f (chance %.3f)", step, r["i2t_top1"],
                         r["t2i_top1"], r["chance"])

        def configure_optimizers(self):
            c = self.clip
            decay = [p for p in self.trainable() if p.ndim >= 2 and p is not c.text_model.embeddings.token_embedding.weight
                     and p is not c.text_model.embeddings.position_embedding.weight]
            ids = {id(p) for p in decay}
            rest = [p for p in self.trainable() if id(p) not in ids]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ClipTextModule()


def train(out_dir, cfg: ClipTextConfig | None = None, llava: str = "tiny_llava", *, evaluate: bool = True) -> dict:
    """Train the text tower against ``llava``'s frozen vision tower, ``save_pretrained`` the
    ``CLIPModel`` + tokenizer into ``out_dir`` with ``train_info.json``; returns that info
    (``evaluate``: with the retrieval accuracy on the 500 val and 1,000 test images of seed 0)."""
    cfg = cfg or ClipTextConfig()
    torch.set_num_threads(int(cfg.num_threads))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(llava, dtype="float32")
    tokenizer = clip_tokenizer(synthetic_words(), model_max_length=cfg.max_positions)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    clip = build_clip(model, tokenizer, cfg)
    module = make_module(cfg, clip, tokenizer, processor.image_processor)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=int(cfg.steps), max_epochs=-1,
                        gradient_clip_val=cfg.grad_clip, logger=False, enable_checkpointing=False,
                        enable_progress_bar=bool(cfg.progress_bar), enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(out))
    loader = torch.utils.data.DataLoader(StepIndex(int(cfg.steps)), batch_size=None, shuffle=False)
    t0 = time.time()
    trainer.fit(module, loader)
    elapsed = time.time() - t0
    clip.eval()
    clip.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    info = {"steps": int(trainer.global_step), "train_seconds": round(elapsed, 1), "config": asdict(cfg),
            "temperature": float(1.0 / clip.logit_scale.detach().exp())}
    if evaluate:
        info["retrieval"] = {split: retrieval_accuracy(clip, tokenizer, processor.image_processor, n=n, seed=0,
                                                       split=split) for split, n in (("val", 500), ("test", 1000))}
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None):
    """``python -m dop.training.clip_text OUT_DIR [--steps N] [--seed S] [--batch-size B]``."""
    ap = argparse.ArgumentParser(prog="python -m dop.training.clip_text", description=main.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=ClipTextConfig.steps)
    ap.add_argument("--seed", type=int, default=ClipTextConfig.seed)
    ap.add_argument("--batch-size", type=int, default=ClipTextConfig.batch_size)
    ap.add_argument("--no-progress-bar", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = ClipTextConfig(seed=a.seed, steps=a.steps, batch_size=a.batch_size, progress_bar=not a.no_progress_bar)
    info = train(a.out_dir, cfg)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
