"""dop's own scoring loop for the synthetic benchmark, and the inference helpers it shares with the plugin.

The lmms-eval plugin (``dop.evaluation.plugin``) calls the very same ``build_prompt``, ``encode`` and
``generate_texts`` as ``score_synthetic``, so ``simple_evaluate(tasks=["dop_synthetic"])`` and this loop
give identical answers and identical accuracy (the Must-show of issue 6): any difference would be in
lmms-eval's plumbing, not in prompts or decoding.
"""

from __future__ import annotations

import contextlib
import re
import string
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from datasets import load_from_disk
from PIL import Image

from dop.adapters import get_adapter
from dop.engine import prune
from dop.engine.front_end import reduce_inputs
from dop.models import build_prompt as project_build_prompt
from dop.models import encode_prompts
from dop.policy import Policy

# The prompt format of the embedded tiny model (tiny-model-notes.md); used only when neither
# dop.models.build_prompt nor a processor chat template is available (e.g. random test models).
FALLBACK_PROMPT = "<s> user : {image} {question} assistant :"

# Decoding of the synthetic task: answers are one word, so a few tokens suffice.
SYNTHETIC_GEN_KWARGS: dict[str, Any] = {"max_new_tokens": 5, "until": ["\n"], "do_sample": False}


# --- answers -----------------------------------------------------------------------------------
_PUNCT = re.compile(f"[{re.escape(string.punctuation.replace('_', ''))}]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation (but keep ``_`` as in ``top_left``), collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised one-word answer."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


# --- prompts and inputs --------------------------------------------------------------------------
def image_token(processor: Any) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def _drop_token(text: str, token: str) -> str:
    """``text`` without ``token`` and the spaces around it; line breaks are kept."""
    return re.sub(rf"[ \t]*{re.escape(token)}[ \t]*", " ", text)


def build_prompt(processor: Any, question: str, num_images: int = 1, system: str | None = None) -> str:
    """The chat prompt for one question with ``num_images`` images.

    Uses ``dop.models.build_prompt`` (the project's single source of prompts) for chat processors;
    ``system``: the model's system prompt when its chat template lacks one (``model.system_prompt``,
    LLaVA's vicuna_v1 conversation).
    Literal image tokens in the question are removed first: lmms-eval tasks such as MMMU put
    ``<image>`` markers into the context, and the processor would count them as extra images. The
    task's line breaks stay (MMBench, SEED-Bench and ScienceQA put one option per line).
    """
    tok = image_token(processor)
    question = _drop_token(question, tok).strip()
    if getattr(processor, "chat_template", None):
        prompt = project_build_prompt(processor, question, system)
    else:
        prompt = FALLBACK_PROMPT.format(image=tok, question=question)
    if num_images == 0:
        prompt = _drop_token(prompt, tok)
    elif num_images > 1:
        prompt = prompt.replace(tok, " ".join([tok] * num_images), 1)
    return prompt


def encode(processor: Any, images: Sequence[Sequence[Any]], prompts: Sequence[str], device: Any, dtype: Any):
    """Left-padded batch for ``prompts``; ``images[i]`` are the PIL images of prompt i."""
    flat = [im.convert("RGB") for ims in images for im in ims]
    batch = encode_prompts(processor, flat, list(prompts)).to(device)
    if "pixel_values" in batch and torch.is_floating_point(batch["pixel_values"]):
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


@contextlib.contextmanager
def pruned(model: Any, policy: Any) -> Iterator[None]:
    """``dop.engine.prune(model, policy)`` for a non-identity policy (``n_v`` included); nothing for dense."""
    if policy is None or policy.is_identity:
        yield
        return
    with prune(model, policy):
        yield


@contextlib.contextmanager
def running(model: Any, policy: Any = None, method: Any = None, knob: Any = None) -> Iterator[None]:
    """The model under a policy (``pruned``) or under a baseline ``method`` at ``knob`` (its ``apply``)."""
    if method is None:
        with pruned(model, policy):
            yield
        return
    if policy is not None and not policy.is_identity:
        raise ValueError("a policy and a baseline method cannot run together")
    with method.apply(model, knob):
        yield


def reduce_batch(model: Any, batch: Any, method: Any = None, knob: Any = None, policy: Any = None,
            instructions: Sequence[str] | None = None) -> Any:
    """``method.reduce_inputs`` (pre-LLM methods shorten the prompt), or the policy's ``n_v`` front
    end (``dop.engine.front_end``); the batch itself otherwise. Called before entering ``running``, on every
    encoded batch. ``instructions`` (one question per row) reach text-guided methods (TRIM, CDPruner:
    ``method.needs_text``) as ``inputs["instruction"]``."""
    if method is not None:
        if instructions is not None and getattr(method, "needs_text", False):
            batch = {**batch, "instruction": list(instructions)}
        return method.reduce_inputs(model, batch, knob)
    if policy is not None and policy.n_v is not None:
        return reduce_inputs(model, batch, policy)
    return batch


@torch.inference_mode()
def time_prefill(model: Any, batch: Any, *, policy: Any = None, method: Any = None, knob: Any = None,
                 instructions: Sequence[str] | None = None) -> tuple[float, int | None]:
    """(seconds, peak CUDA memory in bytes or None on CPU) of one prefill forward of an encoded
    batch under a policy or a baseline (its ``reduce_inputs`` timed too), synchronised on CUDA."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(model.device)
    t0 = time.perf_counter()
    prepared = reduce_batch(model, batch, method, knob, policy, instructions)
    with running(model, policy, method, knob):
        model(**prepared)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, int(torch.cuda.max_memory_allocated(model.device)) if cuda else None


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """Truncate at the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


@torch.inference_mode()
def generate_texts(
    model: Any,
    processor: Any,
    images: Sequence[Sequence[Any]],
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    until: Sequence[str] = (),
    policy: Any = None,
    method: Any = None,
    knob: Any = None,
    instructions: Sequence[str] | None = None,
    meter: GroupMeter | None = None,
) -> list[str]:
    """Greedy continuations of one batch of prompts, cut at ``until`` (``meter``: counts the
    prompts' tokens per group, before any reduction).

    ``method``/``knob``: a baseline (``dop.engine.baselines``) instead of a policy; its ``reduce_inputs``
    runs on the encoded batch and generation runs under its ``apply``. ``instructions``: the bare
    question of each prompt, for text-guided methods (``reduce_batch``).
    """
    batch = encode(processor, images, prompts, model.device, model.dtype)
    tokenizer = getattr(processor, "tokenizer", processor)
    if meter is not None:
        meter.add(model, batch)
    batch = reduce_batch(model, batch, method, knob, policy, instructions)
    with running(model, policy, method, knob):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    # generate returns prompt + new tokens for input_ids, only the new ones for inputs_embeds
    new = out[:, batch["input_ids"].shape[1]:] if "input_ids" in batch else out
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [cut_at_stops(t, until).strip() for t in texts]


@torch.inference_mode()
def continuation_logprobs(
    model: Any,
    processor: Any,
    images: Sequence[Sequence[Any]],
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    policy: Any = None,
    method: Any = None,
    knob: Any = None,
    instructions: Sequence[str] | None = None,
    meter: GroupMeter | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation token | prefix), is_greedy) per request, batched with left padding.

    ``contexts`` are full prompts; the continuation tokens are those of ``context + continuation``
    past the tokens of ``context`` alone (tokenised with the same processor, images expanded).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    full = [c + k for c, k in zip(contexts, continuations)]
    n_cont = []
    for ims, ctx, text in zip(images, contexts, full):
        ctx_ids = encode(processor, [ims], [ctx], "cpu", torch.float32)["input_ids"][0]
        full_ids = encode(processor, [ims], [text], "cpu", torch.float32)["input_ids"][0]
        n = len(full_ids) - len(ctx_ids)
        if n <= 0 or not torch.equal(full_ids[: len(ctx_ids)], ctx_ids):
            # The tokeniser merged context and continuation: fall back to tokenising them apart.
            n = len(tokenizer(text[len(ctx):], add_special_tokens=False)["input_ids"])
        n_cont.append(max(n, 1))
    batch = encode(processor, images, full, model.device, model.dtype)
    if meter is not None:
        meter.add(model, batch)
    ids = batch["input_ids"]
    # a pre-LLM method shortens the image span; the left-padded rows still end in the continuation
    prepared = reduce_batch(model, batch, method, knob, policy, instructions)
    with running(model, policy, method, knob):
        logits = model(**prepared).logits.float()
    results = []
    for row, n in enumerate(n_cont):
        # With left padding every row ends at the last position: token t is predicted at t - 1.
        target = ids[row, -n:]
        logp = torch.log_softmax(logits[row, -n - 1 : -1], dim=-1)
        total = logp.gather(-1, target[:, None]).sum().item()
        greedy = bool((logp.argmax(-1) == target).all())
        results.append((float(total), greedy))
    return results


# --- the sample prompt (FLOPs, latency, budget matching) -----------------------------------------
SAMPLE_QUESTION = "what is in the image ?"


def sample_inputs(model: Any, processor: Any, system: str | None = None):
    """One prompt + grey image (the size the processor expects) for FLOPs and prefill latency."""
    image = Image.new("RGB", (336, 336), (128, 128, 128))
    prompt = build_prompt(processor, SAMPLE_QUESTION, system=system)
    return encode(processor, [[image]], [prompt], model.device, model.dtype)


def group_sizes(model: Any, input_ids: torch.Tensor) -> dict[str, int]:
    """Group sizes of one unpadded sample, by the model's adapter (design.md section 3)."""
    groups = get_adapter(model).token_groups(input_ids[:1])
    return {name: int(mask.sum()) for name, mask in groups.items()}


class GroupMeter:
    """The mean tokens per group of the prompts a model was given (counted on each encoded batch,
    before any reduction; for log-likelihood requests the continuation is part of the prompt)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.count = 0

    def add(self, model: Any, batch: Mapping[str, Any]) -> None:
        groups = get_adapter(model).token_groups(batch["input_ids"], batch.get("attention_mask"))
        for name, mask in groups.items():
            self.totals[name] = self.totals.get(name, 0.0) + float(mask.sum())
        self.count += int(batch["input_ids"].shape[0])

    def mean(self) -> dict[str, float] | None:
        return {k: v / self.count for k, v in self.totals.items()} if self.count else None

    def reset(self) -> None:
        self.totals, self.count = {}, 0


# --- the direct loop -----------------------------------------------------------------------------
def score_synthetic(
    model: Any,
    processor: Any,
    dataset: Any,
    policy: Any = None,
    batch_size: int = 8,
    limit: int | None = None,
    split: str = "test",
    max_new_tokens: int = SYNTHETIC_GEN_KWARGS["max_new_tokens"],
    until: Sequence[str] = tuple(SYNTHETIC_GEN_KWARGS["until"]),
    method: Any = None,
    knob: Any = None,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on the synthetic set, without lmms-eval.

    ``dataset`` is a ``DatasetDict`` (``split`` is used), a ``Dataset``, or a ``save_to_disk`` path.
    ``method``/``knob`` run a baseline instead of ``policy`` (as the plugin does).
    Returns ``{"accuracy", "n", "per_qtype": {qtype: accuracy}, "predictions": [...]}``.
    """
    if isinstance(dataset, str) or hasattr(dataset, "__fspath__"):
        dataset = load_from_disk(str(dataset))
    if hasattr(dataset, "keys") and split in dataset:
        dataset = dataset[split]
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    correct: list[float] = []
    per_type: dict[str, list[float]] = {}
    predictions: list[str] = []
    for start in range(0, n, batch_size):
        rows = dataset.select(range(start, min(start + batch_size, n)))
        prompts = [build_prompt(processor, q) for q in rows["question"]]
        images = [[im] for im in rows["image"]]
        texts = generate_texts(model, processor, images, prompts, max_new_tokens=max_new_tokens,
                               until=until, policy=policy, method=method, knob=knob,
                               instructions=list(rows["question"]))
        for text, answer, qtype in zip(texts, rows["answer"], rows["qtype"]):
            score = exact_match(text, answer)
            correct.append(score)
            per_type.setdefault(qtype, []).append(score)
            predictions.append(text)
    return {
        "accuracy": sum(correct) / len(correct) if correct else float("nan"),
        "n": len(correct),
        "per_qtype": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
        "predictions": predictions,
    }


def calibration_answers(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reference answer of every calibration sample; an error naming those without one."""
    missing = [str(s.get("id", i)) for i, s in enumerate(samples)
               if s.get("answer") is None or str(s.get("answer")).strip() == ""]
    if missing:
        raise ValueError(
            f"objective=accuracy needs a reference answer for every calibration sample; {len(missing)} of "
            f"{len(samples)} have no 'answer' (e.g. {missing[:3]}); use data whose calibration split has "
            "answers, or method.objective=kl")
    return [str(s["answer"]) for s in samples]


def calibration_accuracy(
    model: Any,
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    policies: Mapping[str, Policy],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 5,
    until: Sequence[str] = ("\n",),
    system: str | None = None,
) -> dict[str, float]:
    """Exact-match accuracy of each policy's greedy answers on the calibration samples, with the
    prompts and decoding of ``dop.evaluation.scoring.score_synthetic`` (policies via the engine)."""
    answers = calibration_answers(samples)
    prompts = [build_prompt(processor, str(s["question"]), system=system) for s in samples]
    images = [[s["image"]] for s in samples]
    out = {}
    for name, policy in policies.items():
        correct = 0.0
        for start in range(0, len(samples), batch_size):
            stop = start + batch_size
            texts = generate_texts(model, processor, images[start:stop], prompts[start:stop],
                                   max_new_tokens=max_new_tokens, until=until, policy=policy)
            correct += sum(exact_match(t, a) for t, a in zip(texts, answers[start:stop]))
        out[name] = correct / len(samples)
    return out


def compare_on_synthetic(
    model: Any,
    processor: Any,
    dataset: Any,
    policies: Mapping[str, Policy | None],
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Test-split exact-match accuracy of each policy (``None`` = dense)."""
    return {name: score_synthetic(model, processor, dataset, policy=policy, batch_size=batch_size,
                                  limit=limit)["accuracy"] for name, policy in policies.items()}
