"""Shared machinery of the pre-LLM reducers: read the vision tower, pick k tokens, shorten the prompt.

A pre-LLM reducer (FasterVLM, VisionZip, PruMerge+, TRIM, DivPrune, VisPruner, CDPruner) decides,
per image, which ``k`` visual tokens reach the decoder; the decoder then runs on the shorter
sequence, so every decoder layer sees ``k`` visual tokens (``schedule``).

How it runs on one model instance (nothing is patched, every hook is removed on exit):

- ``reduce_inputs(model, inputs, k)`` rewrites ``input_ids``/``attention_mask`` so that each image
  has exactly ``k`` ``<image>`` placeholders (the padding side of the batch is kept).
- ``apply(model, k)`` installs, for the block:
  * forward pre-hooks on the ``self_attn`` of the vision-tower layers the method reads, and forward
    hooks on their ``q_proj``/``k_proj``; they keep that layer's attention *input* (after
    ``layer_norm1``) and the tower's own q/k projections of it, from which ``VisionContext`` computes
    the [CLS] attention row (only the [CLS] query is projected again, one row) or reads the keys.
    The tower keeps its attention backend (SDPA) and never runs eager;
  * a forward hook on the encoder layer whose output is the LLaVA feature layer (for the [CLS]
    hidden state, which the ``default`` feature strategy drops before the projector);
  * a forward pre-hook on ``model.model.multi_modal_projector`` that runs the method
    (``ReducerMethod.reduce``) on its input ``(images, N, C)``: the method projects only the ``k``
    tokens it keeps (``VisionContext.project``), or every token when its selection reads them
    (``VisionContext.projected``: DivPrune, CDPruner); the projector call itself gets no rows, and a
    forward hook replaces its empty output by the method's ``(images, k, D)`` tokens.
  The projector only runs at prefill, so ``model.generate`` works unchanged.

Supported: ``LlavaForConditionalGeneration`` (``model_type == "llava"``) with a CLIP-style vision
tower, one ``vision_feature_layer`` and the ``default`` feature strategy (LLaVA-1.5); and Qwen2-VL /
Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``), where the prompt is *not* shortened: the tower's merger
output is reduced per image and the other visual rows are dropped before decoder layer 0 by an
engine selector, kept rows at their original M-RoPE positions (``dop.engine.baselines.vision_access``;
methods implement ``reduce_image``/``select_image`` there). FLOPs are the same on both paths
(``schedule``). LLaVA-NeXT (``llava_next``) works like Qwen-VL: the prompt keeps every placeholder,
``k`` of each image's packed rows are kept per image (split over its crops, each crop scored by its
own [CLS] attention, or for TRIM / CDPruner by the relevance to the instruction) and the others
dropped before layer 0 (``dop.engine.baselines.vision_access_next``).
Other families (OneVision's SigLIP has no [CLS] and its packing interpolates, InternVL
pixel-shuffles tiles, Qwen3-VL adds deepstack features) raise ``MethodError`` in ``check_model``,
naming the supported ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPModel

from dop.engine.baselines.base import Method, MethodError, uniform_schedule
from dop.engine.baselines.vision_access import (
    QWEN_MODEL_TYPES,
    ImageTokens,
    QwenVisualReducer,
    check_qwen_tower,
    is_qwen,
)
from dop.engine.baselines.vision_access_next import (
    NEXT_MODEL_TYPES,
    NextVisualReducer,
    check_next_tower,
    image_samples,
    is_llava_next,
)
from dop.engine.baselines.vision_context import VisionContext, feature_layer_index, tower_layers
from dop.engine.core import prune
from dop.models import resolve_path
from dop.ops import VISION

SUPPORTED_MODEL_TYPES = ("llava", *QWEN_MODEL_TYPES, *NEXT_MODEL_TYPES)
CLIP_TOWER_TYPES = ("llava", "llava_next")  # CLIP-L/336 towers: a CLIP text tower shares their joint space


def drops_rows(model: nn.Module) -> bool:
    """Whether the reducers keep the prompt and drop visual rows before layer 0 (Qwen-VL, LLaVA-NeXT)
    instead of shortening it (LLaVA-1.5)."""
    return is_qwen(model) or is_llava_next(model)


# --------------------------------------------------------------------------------------------
# Model access
# --------------------------------------------------------------------------------------------
def check_reducible(model: nn.Module, method: str, model_types: tuple[str, ...] = SUPPORTED_MODEL_TYPES,
                    why: str = "") -> None:
    """Raise ``MethodError`` unless ``model`` is a family the reducer supports (``why``: the reason a
    method supports fewer families, appended to the message)."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in model_types:
        names = {"llava": "LLaVA-1.5", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "llava_next": "LLaVA-NeXT"}
        raise MethodError(f"method {method!r} (pre-LLM reducer) supports model types {list(model_types)} "
                          f"({', '.join(names.get(t, t) for t in model_types)}); got {mtype!r}{why}")
    if mtype in QWEN_MODEL_TYPES:
        check_qwen_tower(model, method)
        return
    if mtype in NEXT_MODEL_TYPES:  # its packing; its CLIP tower is checked below, as LLaVA-1.5's
        check_next_tower(model, method)
    inner = getattr(model, "model", None)
    if getattr(inner, "multi_modal_projector", None) is None or getattr(inner, "vision_tower", None) is None:
        raise MethodError(f"method {method!r}: model has no model.multi_modal_projector / model.vision_tower")
    if not isinstance(cfg.vision_feature_layer, int):
        raise MethodError(f"method {method!r}: a list vision_feature_layer {cfg.vision_feature_layer} is not "
                          "supported (one feature layer only)")
    if cfg.vision_feature_select_strategy != "default":
        raise MethodError(f"method {method!r}: vision_feature_select_strategy "
                          f"{cfg.vision_feature_select_strategy!r} is not supported (only 'default': a [CLS] token)")
    try:
        layers = tower_layers(model)
        layers[0].self_attn.q_proj, layers[0].self_attn.k_proj  # noqa: B018
    except AttributeError as e:
        raise MethodError(f"method {method!r}: vision tower is not CLIP-like (encoder.layers[i].self_attn."
                          f"q_proj/k_proj): {e}") from e


def tokens_per_image(model: nn.Module) -> int:
    """Placeholders (= projector rows) per image: patches of the tower, from its config (LLaVA; on
    Qwen-VL the count depends on the image: ``vision_access.merged_tokens_per_image``)."""
    if is_qwen(model):
        raise MethodError("Qwen-VL tokens per image depend on the image size: use "
                          "dop.engine.baselines.vision_access.merged_tokens_per_image(model, image_grid_thw)")
    if is_llava_next(model):
        raise MethodError("LLaVA-NeXT tokens per image depend on the image size (anyres crops, unpadding, "
                          "newline rows): count the <image> placeholders of the processed prompt")
    vc = model.config.vision_config
    return (int(vc.image_size) // int(vc.patch_size)) ** 2


def scaled_layer(index: int, of: int, num_layers: int) -> int:
    """Layer ``index`` of a ``of``-layer tower mapped to a ``num_layers``-layer one (VisionZip's 22/24)."""
    return max(0, min(num_layers - 1, round(index * num_layers / of)))


# --------------------------------------------------------------------------------------------
# Shared selection helpers
# --------------------------------------------------------------------------------------------
def topk_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) indices of the ``k`` largest scores of each row, in ascending (spatial) order."""
    if k <= 0:
        return score.new_zeros(score.shape[0], 0, dtype=torch.long)
    idx = score.float().argsort(dim=-1, descending=True, stable=True)[:, :k]
    return idx.sort(dim=-1).values


def complement(index: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n - m) ascending indices not in ``index`` (rows, m; distinct per row)."""
    keep = torch.ones(index.shape[0], n, dtype=torch.bool, device=index.device)
    keep.scatter_(1, index, False)
    pos = torch.arange(n, device=index.device).expand(index.shape[0], n)
    return torch.where(keep, pos, torch.full_like(pos, n)).sort(dim=1).values[:, : n - index.shape[1]]


def evenly_spaced(candidates: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` evenly spaced entries of a 1-D ``candidates`` (uniform spatial sampling)."""
    if m <= 0:
        return candidates[:0]
    pos = torch.linspace(0, len(candidates) - 1, m).round().long()
    return candidates[pos]


def iqr_outliers(score: torch.Tensor) -> torch.Tensor:
    """1-D bool: entries above Q3 + 1.5 IQR (PruMerge / TRIM adaptive rule, numpy linear percentiles)."""
    s = score.float()
    q1, q3 = torch.quantile(s, 0.25), torch.quantile(s, 0.75)
    return s > q3 + 1.5 * (q3 - q1)


# --------------------------------------------------------------------------------------------
# Prompt shortening
# --------------------------------------------------------------------------------------------
def shorten_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token: int,
                   per_image: int, k: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each run of ``per_image`` ``image_token``s becomes ``k`` of them; padding side is preserved.

    Tensor ops: every kept token moves to its rank among its sample's kept tokens (after the left
    padding of the new width when the batch is left padded)."""
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    valid = mask.bool()
    is_img = (input_ids == image_token) & valid
    n_img = is_img.sum(1)
    run = is_img.cumsum(1) - 1  # each placeholder's index among its sample's placeholders
    keep = valid & (~is_img | (run % per_image < k))
    lengths = keep.sum(1)
    # one host sync: the padding side, the placeholder check and the new width decide shapes and errors
    pad_end, pad_start, bad, width = torch.stack([(mask[:, -1] == 0).any(), (mask[:, 0] == 0).any(),
                                                  (n_img % per_image != 0).any(), lengths.max()]).tolist()
    if bad:
        b = int((n_img % per_image != 0).nonzero()[0, 0])
        raise MethodError(f"sample {b}: {int(n_img[b])} image placeholders is not a multiple of {per_image} per image")
    right = bool(pad_end) and not pad_start
    rank = keep.cumsum(1) - 1
    dest = rank if right else rank + (width - lengths)[:, None]
    dest = torch.where(keep, dest, torch.full_like(dest, width))  # dropped tokens go to a scratch column
    new_ids = input_ids.new_full((B, width + 1), pad_id).scatter(1, dest, input_ids)[:, :width]
    new_mask = mask.new_zeros((B, width + 1)).scatter(1, dest, keep.to(mask.dtype))[:, :width]
    return new_ids, new_mask


# --------------------------------------------------------------------------------------------
# The method base
# --------------------------------------------------------------------------------------------
class ReducerMethod(Method):
    """A pre-LLM reducer; subclasses implement ``select`` (indices) or ``reduce`` (tokens)."""

    kind: ClassVar[str] = "pre_llm"
    knob: ClassVar[str] = "keep"
    needs_text: ClassVar[bool] = False
    crop_wise: ClassVar[bool] = True  # LLaVA-NeXT: split k over each image's crops (False: pick over the image)

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self._texts: list[Any] | None = None  # per sample, from reduce_inputs (text-guided methods)
        self._image_samples: torch.Tensor | None = None  # per image, its sample (from reduce_inputs)
        # last call's kept token indices: (n, k) on LLaVA; per image a (k,) tensor on Qwen-VL
        self.last_selection: torch.Tensor | list[torch.Tensor] | None = None
        self.pruner: Any = None  # Qwen-VL: the engine pruner of the current ``apply`` (kept_masks)

    # --- what to capture ---------------------------------------------------------------------
    def attn_layers(self, model: nn.Module) -> list[int]:
        """Vision-tower layers whose attention input the method reads (default: the feature layer)."""
        return [feature_layer_index(model)]

    # --- the algorithm -----------------------------------------------------------------------
    def select(self, ctx: VisionContext, k: int) -> torch.Tensor:
        """(n, k) patch indices to keep (ascending); the projected tokens at them go to the LLM."""
        raise NotImplementedError

    def reduce(self, ctx: VisionContext, k: int) -> torch.Tensor:
        """(n, k, D) tokens for the LLM; default: the projected tokens at ``select``'s indices (only
        those are projected, unless ``select`` read every projected token already)."""
        idx = self.select(ctx, k)
        self.last_selection = idx
        if ctx.has_projected:
            return ctx.gather(ctx.projected, idx)
        return ctx.project(ctx.gather(ctx.features, idx))

    def select_image(self, img: ImageTokens, k: int) -> torch.Tensor:
        """Qwen-VL: (k,) ascending indices of the image's merger-output tokens to keep."""
        raise MethodError(f"method {self.name!r} has no Qwen-VL variant")

    def reduce_image(self, img: ImageTokens, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Qwen-VL: kept indices and their (k, D) new contents (``None``: the tokens unchanged)."""
        return self.select_image(img, k), None

    # --- budget ------------------------------------------------------------------------------
    def schedule(self, groups: Mapping[str, int], num_layers: int, knob: Any) -> list[dict[str, int]]:
        k = min(int(knob), int(groups.get(VISION, 0)))
        return uniform_schedule({**groups, VISION: k}, num_layers, {})

    # --- running -----------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        check_reducible(model, self.name)

    def encode_text(self, texts: Sequence[str]) -> list[Any]:
        raise NotImplementedError

    @contextmanager
    def visual_selector(self, model: nn.Module, knob: Any) -> Iterator[QwenVisualReducer]:
        """Qwen-VL / LLaVA-NeXT: only the tower hooks, yielding the engine selector that drops the other
        visual rows before layer 0; for a caller that runs its own ``dop.engine.prune`` (``apply`` = this
        + prune)."""
        self.check_model(model)
        if not drops_rows(model):
            raise MethodError(f"method {self.name!r}: visual_selector is for Qwen-VL and LLaVA-NeXT; LLaVA-1.5 "
                              "shortens the prompt")
        cls = NextVisualReducer if is_llava_next(model) else QwenVisualReducer
        with cls(model, self, max(int(knob), 0)) as selector:
            yield selector

    def reduce_inputs(self, model: nn.Module, inputs: Mapping[str, Any], knob: Any) -> Mapping[str, Any]:
        self.check_model(model)
        out = dict(inputs)
        instruction = out.pop("instruction", None)
        if self.needs_text:
            if instruction is None:
                raise MethodError(f"method {self.name!r} is text-guided: pass inputs['instruction'] "
                                  "(one question string per sample)")
            if isinstance(instruction, str):
                instruction = [instruction]
            self._texts = self.encode_text(list(instruction))
        if "inputs_embeds" in out:
            raise MethodError(f"method {self.name!r}: pass input_ids, not inputs_embeds")
        if drops_rows(model):  # the prompt keeps every placeholder; rows are dropped before layer 0
            if self.needs_text and is_llava_next(model):  # image -> sample, before generate encodes images
                if len(self._texts) != out["input_ids"].shape[0]:
                    raise MethodError(f"method {self.name!r}: {len(self._texts)} instruction(s) for a batch of "
                                      f"{out['input_ids'].shape[0]}")
                self._image_samples = image_samples(model, out["input_ids"], out.get("image_sizes"))
            return out
        n = tokens_per_image(model)
        k = min(int(knob), n)
        # which sample each image belongs to, for text-guided methods: transformers' generate encodes the
        # images (get_image_features -> projector) before model.model runs, so check_prompt is too late
        per_sample = (out["input_ids"] == model.config.image_token_id).sum(1) // n
        self._image_samples = torch.repeat_interleave(torch.arange(len(per_sample)), per_sample.cpu())
        pad = model.config.text_config.pad_token_id
        out["input_ids"], out["attention_mask"] = shorten_prompt(
            out["input_ids"], out.get("attention_mask"), model.config.image_token_id, n, k,
            pad_id=0 if pad is None else int(pad))
        return out

    @contextmanager
    def apply(self, model: nn.Module, knob: Any) -> Iterator[Any]:
        self.check_model(model)
        if drops_rows(model):
            try:
                with self.visual_selector(model, knob) as selector, prune(model, selectors=[selector]) as pruner:
                    self.pruner = pruner
                    yield self
            finally:
                self.pruner = None
            return
        n_patch = tokens_per_image(model)
        k = min(int(knob), n_patch)
        layers = tower_layers(model)
        cap: dict[str, Any] = {"attn": {}, "qk": {}, "cls": None}
        state: dict[str, Any] = {"inner": False, "out": None}
        handles = []

        def grab_attn_input(idx):
            def hook(module, args, kwargs):
                cap["attn"][idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return hook

        def grab_projection(idx, which):  # the tower's own q/k projections: not computed a second time
            def hook(module, args, output):
                cap["qk"].setdefault(idx, {})[which] = output
            return hook

        for i in sorted(set(self.attn_layers(model))):
            attn = layers[i].self_attn
            handles.append(attn.register_forward_pre_hook(grab_attn_input(i), with_kwargs=True))
            handles.append(attn.q_proj.register_forward_hook(grab_projection(i, "q")))
            handles.append(attn.k_proj.register_forward_hook(grab_projection(i, "k")))

        def grab_feature(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            cap["cls"] = h[:, 0]

        handles.append(layers[feature_layer_index(model)].register_forward_hook(grab_feature))

        def check_prompt(module, args, kwargs):
            ids, pix = kwargs.get("input_ids"), kwargs.get("pixel_values")
            if ids is None or pix is None:
                return
            per_sample = (ids == model.config.image_token_id).sum(1)
            n_img = int(pix.shape[0])
            if int(per_sample.sum()) != n_img * k:
                raise MethodError(f"method {self.name!r} at keep={k}: the prompt has {int(per_sample.sum())} image "
                                  f"placeholders for {n_img} image(s); run inputs through "
                                  "method.reduce_inputs(model, inputs, keep) first")

        handles.append(model.model.register_forward_pre_hook(check_prompt, with_kwargs=True))
        projector = model.model.multi_modal_projector

        def project(feats):
            state["inner"] = True
            try:
                return projector(feats)
            finally:
                state["inner"] = False

        # The reduction runs before the projector: the method projects only what it keeps (or reads
        # every projected token through ctx.projected); the projector call itself then gets no rows
        # and its (empty) output is replaced by the method's tokens.
        def reduce_input(module, args):
            if state["inner"]:
                return None
            feats = args[0]
            if feats.shape[1] != n_patch:
                raise MethodError(f"projector input has {feats.shape[1]} rows per image, expected {n_patch}")
            if k >= n_patch:
                return None
            if k == 0:
                return (feats[:, :0], *args[1:])
            texts = None
            if self.needs_text:
                samples = self._image_samples
                if self._texts is None or samples is None or len(samples) != feats.shape[0]:
                    raise MethodError(f"method {self.name!r}: no instruction encoded; call reduce_inputs first")
                texts = [self._texts[int(s)] for s in samples]
            qk = {i: (c["q"], c["k"]) for i, c in cap["qk"].items() if "q" in c and "k" in c}
            ctx = VisionContext(model=model, features=feats, cls_hidden=cap["cls"], attn_inputs=dict(cap["attn"]),
                                texts=texts, _project=project, attn_qk=qk)
            with torch.no_grad():
                state["out"] = self.reduce(ctx, k)
            return (feats[:, :0], *args[1:])

        def replace_output(module, args, output):
            if state["inner"] or state["out"] is None:
                return None
            new, state["out"] = state["out"], None
            if tuple(new.shape) != (output.shape[0], k, output.shape[2]):
                raise MethodError(f"method {self.name!r} returned {tuple(new.shape)}, expected "
                                  f"{(output.shape[0], k, output.shape[2])}")
            return new.to(output.dtype)

        handles.append(projector.register_forward_pre_hook(reduce_input))
        handles.append(projector.register_forward_hook(replace_output))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------------------------
# CLIP text tower (TRIM, CDPruner): LLaVA has none, so it is an explicit hyper-parameter
# --------------------------------------------------------------------------------------------
class TextGuidedReducer(ReducerMethod):
    """A reducer scoring patches against the instruction with a CLIP dual encoder.

    ``text_tower``: a path/hub id of a CLIP checkpoint (loaded as ``CLIPModel``: text model,
    ``text_projection`` and the ``visual_projection`` that maps the tower's patch features into the
    joint space; for LLaVA-1.5 and LLaVA-NeXT ``openai/clip-vit-large-patch14-336``; for the embedded tiny LLaVA
    ``"tiny_clip_text"``, resolved by ``dop.models.resolve_path`` to ``dop/assets/tiny_clip_text``;
    ``conf/model/*.yaml: clip_text_tower`` names each model's) or a ``CLIPModel`` instance.
    ``text_tokenizer``: its tokenizer (default: loaded from ``text_tower`` when that is a path).
    The instruction comes from ``inputs["instruction"]`` (one string per sample) in ``reduce_inputs``.

    The modules used (``text_model``, ``text_projection``, ``visual_projection``) are moved to the
    device of the LLaVA vision tower in ``check_model`` and keep their own dtype (fp32 when loaded from
    a path); the patch features are cast to that dtype, so an fp16/bf16 LLaVA works with an fp32 CLIP.
    CLIP's own vision encoder is never run (the patch features come from LLaVA's tower) and stays put.
    """

    needs_text: ClassVar[bool] = True
    text_segments: ClassVar[bool] = False  # split long instructions into max-length segments (CDPruner)

    def _tower(self):
        if getattr(self, "_clip", None) is None:
            spec, tok = self.hparams.get("text_tower"), self.hparams.get("text_tokenizer")
            if isinstance(spec, str):
                clip = CLIPModel.from_pretrained(resolve_path(spec)).eval()
                tok = AutoTokenizer.from_pretrained(resolve_path(tok if isinstance(tok, str) else spec)) \
                    if not callable(tok) else tok
            else:
                clip = spec
                if isinstance(tok, str):  # "tiny_clip_text" -> dop/assets/tiny_clip_text
                    tok = AutoTokenizer.from_pretrained(resolve_path(tok))
            self._clip, self._clip_tok = clip, tok
        return self._clip, self._clip_tok

    def check_model(self, model: nn.Module) -> None:
        if self.hparams.get("text_tower") is None:
            raise MethodError(
                f"method {self.name!r} needs a CLIP text tower to score patches against the instruction, and "
                f"{type(model).__name__} has none (LLaVA keeps only the CLIP vision tower). Set the hyper-parameter "
                f"text_tower=<path or hub id of the CLIP checkpoint of the vision tower, e.g. "
                f"openai/clip-vit-large-patch14-336> (loaded as CLIPModel).")
        check_reducible(model, self.name)
        clip, tok = self._tower()
        if tok is None:
            raise MethodError(f"method {self.name!r}: set text_tokenizer (a CLIP tokenizer or its path)")
        width = model.config.vision_config.hidden_size
        if clip.visual_projection.in_features != width:
            raise MethodError(f"method {self.name!r}: text_tower's visual_projection expects width "
                              f"{clip.visual_projection.in_features}, the vision tower gives {width}")
        # Fix: the CLIP used to stay where it was loaded (CPU, fp32) while the features come from the
        # LLaVA tower (GPU, fp16/bf16): a device/dtype mismatch on any real run.
        tower = getattr(model.model, "vision_tower", None)
        device = next((tower if tower is not None else model).parameters()).device
        for part in (clip.text_model, clip.text_projection, clip.visual_projection):
            part.to(device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Per text: (segments, P) L2-normalised CLIP text embeddings (pooled at the end token, as
        ``CLIPTextModelWithProjection.text_embeds``). Segments (CDPruner): the content tokens are cut
        into ``max_position_embeddings - 2`` chunks, each wrapped in the start/end tokens."""
        clip, tok = self._tower()
        device = clip.text_projection.weight.device
        max_len = int(clip.config.text_config.max_position_embeddings)
        out = []
        for text in texts:
            ids = tok(text, truncation=not self.text_segments, max_length=max_len)["input_ids"]
            if self.text_segments and len(ids) > max_len:  # bos + content chunks + eos
                bos, body, eos = ids[:1], ids[1:-1], ids[-1:]
                step = max_len - 2
                chunks = [bos + body[i:i + step] + eos for i in range(0, len(body), step)]
            else:
                chunks = [ids]
            L = max(len(c) for c in chunks)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            input_ids = torch.tensor([c + [pad] * (L - len(c)) for c in chunks])
            mask = torch.tensor([[1] * len(c) + [0] * (L - len(c)) for c in chunks])
            pooled = clip.text_model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).pooler_output
            emb = clip.text_projection(pooled)
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return out

    @torch.no_grad()
    def patch_embeds(self, ctx: VisionContext) -> torch.Tensor:
        """(n, N, P) L2-normalised patch features in CLIP's joint space (post_layernorm + visual_projection)."""
        return self.clip_embeds(ctx.model, ctx.features)

    @torch.no_grad()
    def clip_embeds(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """(..., P) L2-normalised CLIP joint-space embeddings of vision-tower features (..., C) of
        ``model``'s tower: its ``post_layernorm``, then the text tower's ``visual_projection``."""
        clip, _ = self._tower()
        tower = model.model.vision_tower
        ln = getattr(tower, "vision_model", tower).post_layernorm
        w = clip.visual_projection.weight
        x = clip.visual_projection(ln(features).to(device=w.device, dtype=w.dtype))
        return (x / x.norm(dim=-1, keepdim=True)).to(features.device)

    def next_relevance(self, model: nn.Module, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """LLaVA-NeXT: (crops, N) relevance of every patch of one image's crops (``features`` (crops, N, C),
        padded patches included) to its sample's text embeddings (segments, P); handed per crop to
        ``reduce_image`` as ``ImageTokens.relevance`` (the crop's candidate rows)."""
        raise NotImplementedError
