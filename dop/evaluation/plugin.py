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
from dop.engine.baselines.budget import match_budget
from dop.evaluation import scoring
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
    (``tokens:128``, ``ratio:0.3``, ``tflops:3.4``: the knob is matched to it on a sample prompt),
    ``batch_size``, ``dtype``, ``attn_implementation``, ``device``, ``system_prompt`` (the model's
    system prompt when its chat template lacks one: LLaVA's vicuna_v1, ``conf/model``). In-process,
    ``method`` may be a ``dop.engine.baselines.Method`` instance (hyper-parameters kept). ``meter``
    holds the mean tokens per group of the prompts served since its last ``reset``.
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
        *,
        model: Any = None,
        processor: Any = None,
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
        if is_baseline and (knob is None) == (budget is None):
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
        self.match = None  # the budget match when budget= was given
        if self.baseline is not None:
            self.baseline.check_model(self.model)  # e.g. a CLIP text tower the model lacks: fail before running
            if budget is not None:
                self.match = self._match_budget(str(budget))
                self.knob = self.match.knob
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size) if batch_size not in (None, "auto") else 1
        # Wall time spent in model calls and the number of requests served (the stage records latency).
        self.stats: dict[str, float] = {"model_seconds": 0.0, "requests": 0}

    @classmethod
    def from_model(cls, model: Any, processor: Any, policy: Any = None, method: Any = None,
                   batch_size: int = 1, name: str = "in-process", knob: Any = None,
                   system_prompt: str | None = None) -> DopLMM:
        """Wrap an already loaded model (no second copy in memory)."""
        return cls(pretrained=name, policy=policy, method=method, knob=knob, batch_size=batch_size,
                   model=model, processor=processor, system_prompt=system_prompt)

    def _match_budget(self, spec: str):
        """The knob for ``budget=<kind>:<value>`` on the stage's sample prompt (one image)."""
        (budget,) = parse_budgets(spec)
        sample = scoring.sample_inputs(self.model, self.processor, system=self.system_prompt)
        groups = scoring.group_sizes(self.model, sample["input_ids"])
        return match_budget(self.baseline, self.model.config, groups, budget)

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
        for (until, max_new_tokens), idx in groups.items():
            for _, chunk in self._chunks(idx, self.batch_size):
                prompts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    ims = self._doc_images(doc_to_visual, doc_id, task, split)
                    images.append(ims)
                    prompts.append(scoring.build_prompt(self.processor, context, num_images=len(ims),
                                                        system=self.system_prompt))
                t0 = time.perf_counter()
                texts = scoring.generate_texts(self.model, self.processor, images, prompts,
                                               max_new_tokens=max_new_tokens, until=until,
                                               policy=self.active_policy, method=self.baseline, knob=self.knob,
                                               instructions=[requests[i].args[0] for i in chunk], meter=self.meter)
                self.stats["model_seconds"] += time.perf_counter() - t0
                self.stats["requests"] += len(chunk)
                for i, text in zip(chunk, texts):
                    results[i] = text
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(-sum log p(continuation | context, image), is_greedy)``.

        The value is the *summed* negative log-likelihood of the continuation tokens (not the mean
        loss that lmms-eval's llava_hf returns, which favours long choices): lmms-eval 0.7.3 treats the
        first value as a loss (multiple choice takes the argmin), so the sign is flipped. Results are
        wrapped in ``GenerationResult(text=(value, is_greedy))`` because 0.7.3's evaluator turns a plain
        ``(float, bool)`` tuple into its string form.
        """
        out: list[GenerationResult | None] = [None] * len(requests)
        for _, chunk in self._chunks(list(range(len(requests))), self.batch_size):
            contexts, continuations, images, questions = [], [], [], []
            for i in chunk:
                args = tuple(requests[i].args)
                # Unconditional (mutual-information) requests carry only (context, continuation).
                context, target, doc_to_visual, doc_id, task, split = args + (None,) * (6 - len(args))
                doc = self.task_dict[task][split][doc_id] if task in self.task_dict else None
                continuation = target if isinstance(target, str) else target(doc)
                ims = self._doc_images(doc_to_visual, doc_id, task, split)
                images.append(ims)
                contexts.append(scoring.build_prompt(self.processor, context, num_images=len(ims),
                                                     system=self.system_prompt))
                questions.append(str(context))
                continuations.append(str(continuation))
            t0 = time.perf_counter()
            scores = scoring.continuation_logprobs(self.model, self.processor, images, contexts, continuations,
                                                   policy=self.active_policy, method=self.baseline, knob=self.knob,
                                                   instructions=questions, meter=self.meter)
            self.stats["model_seconds"] += time.perf_counter() - t0
            self.stats["requests"] += len(chunk)
            for i, (logprob, greedy) in zip(chunk, scores):
                out[i] = GenerationResult(text=(-logprob, greedy))  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

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
