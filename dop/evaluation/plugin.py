"""lmms-eval model plugin ``dop``: any model ``dop.models.load_model`` can load, dense or pruned.

lmms-eval finds it through the entry point ``lmms_eval.models: dop = dop.evaluation.plugin:manifest``::

    lmms-eval --model dop --model_args pretrained=tiny_llava,policy=policy.yaml,batch_size=8 \
        --tasks dop_synthetic --include_path "$(python -m dop.evaluation.tasks)"

In-process (what ``dop stage=evaluate`` does)::

    lm = DopLMM.from_model(model, processor, policy=policy)
    simple_evaluate(model=lm, tasks=[...], task_manager=TaskManager(model_name="dop", ...))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from dop.budget import parse_budgets
from dop.engine.baselines import Method, get_method
from dop.engine.baselines import known_methods as baseline_names
from dop.engine.baselines.budget import SampleMatcher
from dop.evaluation import scoring
from dop.evaluation.per_sample import (
    BaselineResolver,
    FixedResolver,
    Resolution,
    Resolver,
    SampleFlops,
    sample_shapes,
)
from dop.models import load_model
from dop.policy import Policy

# The plugin's own methods; every registered baseline (``dop.engine.baselines.known_methods()``) is known too.
KNOWN_METHODS: tuple[str, ...] = ("dense", "policy")

# lmms-eval's prompt variants are chosen by model name; dop always asks for the same one.
MODEL_NAME = "dop"


def known_methods() -> list[str]:
    """``dense``, ``policy`` and the registered baselines."""
    return [*KNOWN_METHODS, *baseline_names()]


def _check_method(method: str) -> str:
    if method in ("dop", "dop_paper"):  # the search's policies (conf/method/dop*.yaml): the policy path
        return "policy"
    if method not in known_methods():
        raise ValueError(f"dop plugin: unknown method {method!r}; valid methods: {', '.join(known_methods())}")
    return method


def _parse_knob(knob: Any) -> Any:
    """A knob from model_args: numbers arrive parsed; a string may be YAML (``[2,10,20]``)."""
    if not isinstance(knob, str):
        return knob
    try:
        return yaml.safe_load(knob)
    except yaml.YAMLError:
        return knob


def load_policy(policy: Any):
    """A ``Policy`` from a path (YAML), a ``Policy``, or None (dense)."""
    if policy is None or policy == "" or policy == "none":
        return None
    if isinstance(policy, Policy):
        return policy
    return Policy.from_yaml(str(policy))


class DopLMM(lmms):
    """An lmms-eval model wrapping a transformers MLLM, run dense or under a pruning policy.

    model_args: ``pretrained`` (a ``load_model`` name or path), ``policy`` (a policy YAML),
    ``method`` (``dense`` | ``policy`` | a baseline name from ``dop.engine.baselines``; default: ``policy``
    when a policy is given), ``knob`` (the baseline's knob value, e.g. kept tokens), or ``budget``
    (``tokens:128``, ``ratio:0.3``, ``tflops:3.4``: the knob is matched to it per sample, on each
    sample's own group sizes; ``match=nominal``: the published knob for a token count instead),
    ``batch_size``, ``dtype``, ``attn_implementation``, ``device``, ``system_prompt`` (the model's
    system prompt when its chat template lacks one: LLaVA's vicuna_v1, ``conf/model``), ``latency_samples``
    (time a batch-1 prefill of the first N requests). In-process, ``method`` may be a ``dop.engine.baselines.Method``
    instance (hyper-parameters kept) and ``resolver`` any ``dop.evaluation.per_sample.Resolver``
    (the evaluate stage's per-sample DOP policies).

    Per sample: every batch is resolved row by row (``Resolver.resolve`` on the row's group sizes and
    images, cached per shape); rows that resolved alike run together, so a batch with several input
    shapes runs as several smaller batches. ``samples`` keeps one ``SampleFlops`` per request and
    ``latency`` one ``{seconds, peak_memory_bytes, ...}`` per timed request.
    """

    def __init__(
        self,
        pretrained: str = "tiny_llava",
        policy: str | None = None,
        method: Any = None,
        knob: Any = None,
        budget: str | None = None,
        batch_size: int | str | None = 1,
        dtype: str | None = None,
        attn_implementation: str = "sdpa",
        device: str | None = "cpu",
        max_batch_size: int | None = None,
        system_prompt: str | None = None,
        match: str = "flops",
        latency_samples: int | str = 0,
        *,
        model: Any = None,
        processor: Any = None,
        resolver: Resolver | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            # lmms-eval passes e.g. device=None through; anything else is a typo worth hearing about.
            unknown = {k: v for k, v in kwargs.items() if v is not None}
            if unknown:
                raise TypeError(f"dop plugin: unknown model_args {sorted(unknown)}")
        self.policy = load_policy(policy)
        # the baseline (a dop.engine.baselines.Method) and its knob; None for dense / policy
        self.baseline: Method | None = method if isinstance(method, Method) else None
        if self.baseline is not None:
            method = self.baseline.name
        method = method or ("policy" if self.policy is not None else "dense")
        self.method = _check_method(str(method))
        if self.method == "policy" and self.policy is None:
            raise ValueError("dop plugin: method=policy needs policy=<policy.yaml>")
        if self.method == "dense" and self.policy is not None and not self.policy.is_identity:
            raise ValueError("dop plugin: method=dense with a non-identity policy; drop one of them")
        is_baseline = self.method not in KNOWN_METHODS
        if is_baseline and self.policy is not None:
            raise ValueError(f"dop plugin: method={self.method} is a baseline; it takes knob= or budget=, not policy=")
        if not is_baseline and (knob is not None or budget is not None):
            raise ValueError(f"dop plugin: knob=/budget= are for baseline methods, not method={self.method}")
        if is_baseline and self.baseline is None:
            self.baseline = get_method(self.method)
        if is_baseline and (knob is None) == (budget is None) and resolver is None:
            raise ValueError(f"dop plugin: method={self.method} needs exactly one of knob=<value> or "
                             "budget=<kind>:<value> (e.g. budget=tokens:128)")
        if model is None:
            model, processor = load_model(pretrained, dtype=dtype, attn_implementation=attn_implementation,
                                          device=device or "cpu")
        self.model = model.eval()
        self.processor = processor
        self.system_prompt = system_prompt or None
        self.meter = scoring.GroupMeter()
        self.knob = _parse_knob(knob)
        if self.baseline is not None:
            self.baseline.check_model(self.model)  # e.g. a CLIP text tower the model lacks: fail before running
        if resolver is None:
            if self.baseline is not None and budget is not None:
                (b,) = parse_budgets(str(budget))
                resolver = BaselineResolver(SampleMatcher(self.baseline, self.model.config, b, str(match)))
            else:
                resolver = FixedResolver(self.model.config, self.active_policy, self.baseline, self.knob)
        self.resolver = resolver
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size) if batch_size not in (None, "auto") else 1
        self.latency_samples = int(latency_samples or 0)
        # Wall time spent in model calls and the number of requests served (the stage records latency).
        self.stats: dict[str, float] = {"model_seconds": 0.0, "requests": 0}
        self.samples: list[SampleFlops] = []  # one per request served, in order
        self.latency: list[dict[str, Any]] = []  # one per timed request (the first ``latency_samples``)

    @classmethod
    def from_model(cls, model: Any, processor: Any, policy: Any = None, method: Any = None,
                   batch_size: int = 1, name: str = "in-process", knob: Any = None,
                   resolver: Resolver | None = None, latency_samples: int = 0,
                   system_prompt: str | None = None) -> DopLMM:
        """Wrap an already loaded model (no second copy in memory)."""
        return cls(pretrained=name, policy=policy, method=method, knob=knob, batch_size=batch_size,
                   model=model, processor=processor, resolver=resolver, latency_samples=latency_samples,
                   system_prompt=system_prompt)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DopLMM:
        """Like lmms-eval's, but ``model_args`` win over the CLI's ``--batch_size``/``--device``
        (the base class passes both and fails with "multiple values for keyword argument")."""
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(lmms_utils.simple_parse_args_string(arg_string))
        return cls(**args)

    # --- helpers -----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def active_policy(self):
        return self.policy if self.method == "policy" else None

    def _doc_images(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        if doc_to_visual is None or task not in self.task_dict:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return [v for v in visuals if hasattr(v, "convert")]  # PIL images only (no video/audio)

    @staticmethod
    def _chunks(items: Sequence[Any], size: int):
        for start in range(0, len(items), size):
            yield start, items[start : start + size]

    # --- lmms-eval API --------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy generation, batched in request order (``until`` and ``max_new_tokens`` respected).

        Requests are batched in the order lmms-eval gives them (document order), so batches match
        ``scoring.score_synthetic`` exactly; requests with different generation kwargs are batched apart.
        """
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            gen_kwargs = dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            key = (tuple(until), int(gen_kwargs.get("max_new_tokens", 128)))
            groups.setdefault(key, []).append(i)
        if self.latency_samples > len(self.latency):
            self._time_prefills([self._generation_inputs(req) for req in requests[: self.latency_samples]])
        for (until, max_new_tokens), idx in groups.items():
            for _, chunk in self._chunks(idx, self.batch_size):
                prompts, images = [], []
                for i in chunk:
                    _, ims, prompt = self._generation_inputs(requests[i])
                    images.append(ims)
                    prompts.append(prompt)
                instructions = [requests[i].args[0] for i in chunk]
                t0 = time.perf_counter()
                texts: list[str] = [""] * len(chunk)
                for rows, res in self._resolve(images, prompts):
                    out = scoring.generate_texts(self.model, self.processor, [images[r] for r in rows],
                                                 [prompts[r] for r in rows], max_new_tokens=max_new_tokens,
                                                 until=until, policy=res.policy, method=res.method, knob=res.knob,
                                                 instructions=[instructions[r] for r in rows], meter=self.meter)
                    for r, text in zip(rows, out):
                        texts[r] = text
                self.stats["model_seconds"] += time.perf_counter() - t0
                self.stats["requests"] += len(chunk)
                for i, text in zip(chunk, texts):
                    results[i] = text
        return [r if r is not None else "" for r in results]

    def _generation_inputs(self, req: Instance) -> tuple[str, list[Any], str]:
        """(question, images, prompt) of a generation request."""
        context, _, doc_to_visual, doc_id, task, split = req.args
        ims = self._doc_images(doc_to_visual, doc_id, task, split)
        return context, ims, scoring.build_prompt(self.processor, context, num_images=len(ims),
                                                   system=self.system_prompt)

    def _resolve(self, images: list[list[Any]], prompts: list[str]) -> list[tuple[list[int], Resolution]]:
        """The rows of one batch grouped by what they resolve to (first-seen order), each row's FLOPs
        kept in ``samples``."""
        shapes = sample_shapes(self.model, self.processor, images, prompts)
        runs: dict[Any, tuple[list[int], Resolution]] = {}
        for row, shape in enumerate(shapes):
            res = self.resolver.resolve(shape)
            self.samples.append(SampleFlops(shape, res))
            runs.setdefault(res.key, ([], res))[0].append(row)
        return list(runs.values())

    def _time_prefills(self, items: list[tuple[str, list[Any], str]]) -> None:
        """Batch-1 prefill latency and peak memory of the first ``latency_samples`` requests, each run
        alone under what it resolves to (after one untimed warm-up run of the first)."""
        todo = items[: self.latency_samples - len(self.latency)]
        warm = int(bool(todo) and not self.latency)
        for n, (question, ims, prompt) in enumerate(todo[:warm] + todo):
            shape = sample_shapes(self.model, self.processor, [ims], [prompt])[0]
            res = self.resolver.resolve(shape)
            batch = scoring.encode(self.processor, [ims], [prompt], self.model.device, self.model.dtype)
            seconds, peak = scoring.time_prefill(self.model, batch, policy=res.policy, method=res.method,
                                                 knob=res.knob, instructions=[question])
            if n >= warm:
                self.latency.append({"seconds": seconds, "peak_memory_bytes": peak, "flops": res.flops,
                                     "dense_flops": res.dense_flops, "label": res.label})

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(-sum log p(continuation | context, image), is_greedy)``.

        The value is the *summed* negative log-likelihood of the continuation tokens (not the mean
        loss that lmms-eval's llava_hf returns, which favours long choices): lmms-eval 0.7.3 treats the
        first value as a loss (multiple choice takes the argmin), so the sign is flipped. Results are
        wrapped in ``GenerationResult(text=(value, is_greedy))`` because 0.7.3's evaluator turns a plain
        ``(float, bool)`` tuple into its string form.
        """
        out: list[GenerationResult | None] = [None] * len(requests)
        if self.latency_samples > len(self.latency):
            items = [self._loglikelihood_inputs(req) for req in requests[: self.latency_samples]]
            self._time_prefills([(q, ims, ctx + cont) for q, ims, ctx, cont in items])
        for _, chunk in self._chunks(list(range(len(requests))), self.batch_size):
            contexts, continuations, images, questions = [], [], [], []
            for i in chunk:
                question, ims, context, continuation = self._loglikelihood_inputs(requests[i])
                images.append(ims)
                contexts.append(context)
                questions.append(question)
                continuations.append(continuation)
            t0 = time.perf_counter()
            scores: list[tuple[float, bool]] = [(0.0, False)] * len(chunk)
            full = [c + k for c, k in zip(contexts, continuations)]
            for rows, res in self._resolve(images, full):
                got = scoring.continuation_logprobs(self.model, self.processor, [images[r] for r in rows],
                                                    [contexts[r] for r in rows], [continuations[r] for r in rows],
                                                    policy=res.policy, method=res.method, knob=res.knob,
                                                    instructions=[questions[r] for r in rows], meter=self.meter)
                for r, score in zip(rows, got):
                    scores[r] = score
            self.stats["model_seconds"] += time.perf_counter() - t0
            self.stats["requests"] += len(chunk)
            for i, (logprob, greedy) in zip(chunk, scores):
                out[i] = GenerationResult(text=(-logprob, greedy))  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def _loglikelihood_inputs(self, req: Instance) -> tuple[str, list[Any], str, str]:
        """(question, images, context prompt, continuation) of a log-likelihood request."""
        args = tuple(req.args)
        # Unconditional (mutual-information) requests carry only (context, continuation).
        context, target, doc_to_visual, doc_id, task, split = args + (None,) * (6 - len(args))
        doc = self.task_dict[task][split][doc_id] if task in self.task_dict else None
        continuation = target if isinstance(target, str) else target(doc)
        ims = self._doc_images(doc_to_visual, doc_id, task, split)
        prompt = scoring.build_prompt(self.processor, context, num_images=len(ims), system=self.system_prompt)
        return str(context), ims, prompt, str(continuation)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("dop plugin: multi-round generation is not supported")

    def clean(self) -> None:
        """Keep the model: lmms-eval 0.7.3 calls ``clean()`` at the end of every evaluation and the base
        class deletes each ``nn.Module`` attribute, so the next benchmark evaluated with this instance
        (``paper13``, one ``simple_evaluate`` per benchmark) would find no model. The caller owns it."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def manifest():
    """Entry-point payload for ``lmms_eval.models`` (a callable, so lmms-eval imports it lazily)."""
    # lmms_eval.models loads every plugin's entry point on import: importing it at the top of this
    # module would call this function before the module exists (a cycle through lmms-eval)
    from lmms_eval.models.registry_v2 import ModelManifest  # noqa: PLC0415

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="dop.evaluation.plugin.DopLMM")  # dotted: lmms-eval rsplits on "."
