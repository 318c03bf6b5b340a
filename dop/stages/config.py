"""The stages' typed configuration: one dataclass per config group (``conf/<group>/``) and one per
stage, filled strictly from the composed Hydra config by ``load``.

    conf = load(SearchStage, cfg)          # a ConfigError naming the key if anything does not fit
    conf.method.grid_step, conf.budgets    # typed: ints, lists, Budget objects

Defaults live in the YAML files; a field has a default here only when its key is optional in the
YAML (e.g. ``benchmark.members`` exists only for suites). Values with a closed set of choices are
``Literal`` and fail with the valid ones listed. The stages are the only code that calls ``load``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_type_hints

from omegaconf import DictConfig, OmegaConf

from dop.budget import Budget, BudgetError, parse_budgets
from dop.evaluation.benchmarks import Benchmark, BenchmarkError
from dop.evaluation.benchmarks import resolve as resolve_benchmarks
from dop.models import ModelError, resolve_dtype, resolve_path
from dop.stages import CONF_DIR
from dop.stages.schema import ConfigError, convert, plain, typed
from dop.tracking import LoggerConfig
from dop.training.tiny_llava import TinyArch

T = TypeVar("T")
Device = str  # auto | cpu | cuda | cuda:N (checked by check_device)


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------
@dataclass
class PathsConfig:
    root_dir: str
    output_dir: str
    data_dir: str
    results_dir: str
    run_dir: str


@dataclass
class BudgetConfig:
    kind: str
    values: list[float]
    # flops: each baseline's knob matched to every sample's budget; nominal: its published knob for the
    # token count (the literature's rows, recorded with their true TFLOPs); both: one row of each.
    # Optional (default flops) so a whole budget node given in code, an experiment or a model's
    # `budgets:` stays valid.
    match: Literal["flops", "nominal", "both"] = "flops"
    # tflops budgets: the prompt the values were stated for (a sample gets the same share of its own dense)
    reference_groups: dict[str, float] | None = None


@dataclass
class ModelConfig:
    name: str
    pretrained: str  # a load_model name (tiny_llava), a hub id or a local path
    family: str
    dtype: str | None
    attn_implementation: str
    hf_id: str | None
    clip_text_tower: str | None
    revision: str | None  # hub revision; null: a hash of a local checkpoint is recorded
    # the system prompt of the model's evaluation conversation template (LLaVA-1.5's vicuna_v1), when
    # its processor's chat template lacks it; null: the template's own
    system_prompt: str | None
    front_end: str | None  # the model family's n_v front end (a pre-LLM reducer: method=dop_paper)
    budgets: BudgetConfig  # the paper's budgets for this model (budget=model)

    def __post_init__(self) -> None:
        try:
            resolve_dtype(self.dtype)
        except ModelError as err:
            raise ConfigError(str(err)) from None
        if self.attn_implementation not in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
            raise ConfigError(f"model.attn_implementation={self.attn_implementation!r} is not valid; valid: "
                              "eager, sdpa, flash_attention_2, flex_attention")

    def check_checkpoint(self) -> None:
        """A local ``model.pretrained`` path exists (a hub id is checked when it loads)."""
        try:
            resolve_path(self.pretrained)
        except (ModelError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None


@dataclass
class _SyntheticSettings:
    """The synthetic set's settings, in every data config (conf/data/*.yaml include synthetic):
    training and benchmark=synthetic read them whatever the calibration source."""

    name: str
    path: str | None
    seed: int
    grid: int
    image_size: int
    sizes: dict[str, int]
    calibration_split: str | None
    # calibrating on a split that a configured benchmark evaluates is refused unless this is true
    allow_overlap: bool

    def __post_init__(self) -> None:
        for split, n in self.sizes.items():  # an empty split dies deep inside datasets otherwise
            if n < 1:
                raise ConfigError(f"data.sizes.{split}={n}: every split of the synthetic set needs >= 1 sample")


@dataclass
class SyntheticDataConfig(_SyntheticSettings):
    """The synthetic image-QA set (``dop.data.synthetic``): built at ``path`` on first use."""

    @property
    def kind(self) -> str:
        return "synthetic"


@dataclass
class DiskDataConfig(_SyntheticSettings):
    """Calibration samples from a dataset on disk (``dop.data.calibration``)."""

    kind: Literal["disk"]
    split: str | None
    data_files: Any
    subset: str | None
    image_column: str
    question_column: str
    id_column: str | None
    shuffle_seed: int | None


@dataclass
class LmmsTaskDataConfig(_SyntheticSettings):
    """Calibration samples from the docs of an lmms-eval task (``dop.data.calibration``)."""

    kind: Literal["lmms_eval"]
    task: str | None
    include_path: str | None
    split: str | None
    shuffle_seed: int | None


@dataclass
class LlavaJsonDataConfig(_SyntheticSettings):
    """Calibration samples from a LLaVA instruction-tuning JSON and its image folder."""

    kind: Literal["llava_json"]
    json_file: str | None
    image_folder: str | None
    image_prefix: str | None
    rounds: Literal["first", "all"]
    shuffle_seed: int | None


DataConfig = SyntheticDataConfig | DiskDataConfig | LmmsTaskDataConfig | LlavaJsonDataConfig
_DATA_KINDS: dict[str, type] = {"synthetic": SyntheticDataConfig, "disk": DiskDataConfig,
                                "lmms_eval": LmmsTaskDataConfig, "llava_json": LlavaJsonDataConfig}


@dataclass
class DopMethodConfig:
    """``method=dop`` / ``method=dop_paper``: the search space, the calibration objective and the solver."""

    name: Literal["dop", "dop_paper"]
    groups: list[str]
    types: list[str]
    pairs: list[str] | None
    grid_step: int
    interpolation: Literal["linear"]
    objective: Literal["kl", "accuracy"]
    accuracy_max_new_tokens: int | None
    response_tokens: int
    num_calibration: int
    solver: Literal["exact", "greedy"]
    convention: Literal["dop", "fastv", "pdrop"]
    flops_groups: dict[str, int | float] | None
    measure: bool
    check_additive: int
    n_v: list[int | float] | None
    reducer: str

    def __post_init__(self) -> None:
        for name in ("grid_step", "response_tokens", "num_calibration"):
            if getattr(self, name) < 1:
                raise ConfigError(f"method.{name}={getattr(self, name)} is not valid; it must be >= 1")
        if self.check_additive < 0:
            raise ConfigError(f"method.check_additive={self.check_additive} is not valid; it must be >= 0")


@dataclass
class BaselineMethodConfig:
    """A baseline (``dop.engine.baselines``): its registry name and hyper-parameters (checked by the
    method class itself, which lists the valid ones)."""

    name: str
    hparams: dict[str, Any] = field(default_factory=dict)


MethodConfig = DopMethodConfig | BaselineMethodConfig
DOP_METHODS: tuple[str, ...] = ("dop", "dop_paper")  # DopMethodConfig: a search space (conf/method/dop*.yaml)
POLICY_METHODS: tuple[str, ...] = (*DOP_METHODS, "dense", "policy")  # evaluate a policy file (or dense), not a baseline


@dataclass
class SweepConfig:
    run_dir: str | None
    dir: str | None
    shard: int
    num_shards: int
    merge_from: list[str]
    reuse: Literal["none", "prefix", "half_layer"]
    hidden_store: Literal["memory", "disk"]
    batch_size: int
    accelerator: str
    devices: int | str | list[int]
    strategy: str
    precision: int | str
    progress_bar: bool
    # the search store: one search per (model, calibration, space, budgets) under <store>/<model>/<key>,
    # reused by every benchmark cell and rerun (null: the search lives in the stage's run dir)
    store: str | None
    num_nodes: int | None = None  # multi-node DDP (launcher settings); absent: Lightning's default

    def __post_init__(self) -> None:
        if self.num_shards < 1 or not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"sweep.shard={self.shard} of sweep.num_shards={self.num_shards} is not valid; "
                              "need 0 <= shard < num_shards")
        if self.batch_size < 1:
            raise ConfigError(f"sweep.batch_size={self.batch_size} is not valid; it must be >= 1")


@dataclass
class BenchmarkConfig:
    name: str
    limit: int | float | None
    batch_size: int
    tasks: list[str] | None = None
    metric: str | None = None
    metrics: list[str] | None = None
    sum_of: list[str] | None = None
    needs_api_key: str | None = None
    needs_server: bool = False
    dataset_path: str | None = None  # a local copy of the dataset (dop.evaluation.local_tasks)
    # false: a GPT-judged benchmark (MMBench) scored by lmms-eval's rule-based matcher; null (a suite,
    # paper13): each member its own
    judge: bool | None = True
    notes: str = ""
    members: list[str] | None = None  # a suite (paper13)


@dataclass
class TrainSection:
    """``conf/train``: ``dop.training.tiny_llava.TrainConfig`` plus where the run writes."""

    seed: int
    steps: int
    stage1_steps: int
    batch_size: int
    micro_batches: int
    mix: dict[str, float]
    qtype_weights: dict[str, float] | None
    lr_lm: float
    lr_vision: float
    weight_decay: float
    betas: list[float]
    warmup_steps: int
    decay_fraction: float
    grad_clip: float
    lead_in: float
    aux_weight: float
    option_aux_weight: float
    option_aux_layer: int
    answer_aux_weight: float
    answer_aux_layer: int
    init_from: str | None
    ckpt_every: int
    eval_every: int
    eval_samples: int
    num_threads: int
    progress_bar: bool
    resume: bool
    out_dir: str | None
    arch: TinyArch


@dataclass
class BenchConfig:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    n_system: int
    n_vision: int
    n_instruction: int
    dtype: Literal["float32", "bfloat16", "float16"]
    repeats: int
    clock: Literal["wall", "process"]
    methods: list[str] | str
    budget: str | None

    @property
    def slice_shape(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                                              "num_kv_heads", "n_system", "n_vision", "n_instruction")}


@dataclass
class PipelineConfig:
    """``conf/pipeline``: what the main job evaluates beside DOP at the same budgets."""

    baselines: list[str]
    uniform: bool


@dataclass
class CompareConfig:
    run_dir: str
    limit: int | None
    random: int


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
@dataclass
class SweepStage:
    """``dop stage=sweep`` and ``dop stage=merge``."""

    model: ModelConfig
    data: DataConfig
    method: DopMethodConfig
    sweep: SweepConfig
    paths: PathsConfig
    logger: LoggerConfig
    seed: int
    device: Device
    num_threads: int | None


@dataclass
class SearchStage(SweepStage):
    """``dop stage=search``: the sweep (when missing) and one solve per budget."""

    budget: BudgetConfig
    benchmark: BenchmarkConfig  # the benchmarks the policies are for: calibration must not be their split

    @property
    def budgets(self) -> list[Budget]:
        return budgets_of(self.budget)


@dataclass
class EvaluateStage:
    """``dop stage=evaluate``: dense, policy files or a baseline at each budget, on benchmarks."""

    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    budget: BudgetConfig
    benchmark: BenchmarkConfig
    policy: str | None
    paths: PathsConfig
    logger: LoggerConfig
    device: Device
    num_threads: int | None
    overwrite: bool
    fail_on_error: bool
    eval_batch_size: int | None
    latency_samples: int

    @property
    def budgets(self) -> list[Budget]:
        return budgets_of(self.budget)

    @property
    def benchmarks(self) -> list[Benchmark]:
        return benchmarks_of(self.benchmark)


@dataclass
class ReportStage:
    """``dop stage=report``: tables and plots of the results store."""

    paths: PathsConfig
    logger: LoggerConfig
    policy: str | None  # draw these policy files (a file or a folder) instead of the store's tables
    report_filter: dict[str, Any] | None = None  # e.g. {model: tiny_llava, benchmark: [synthetic]}


@dataclass
class BenchStage:
    """``dop stage=bench``: prefill latency of policies and baselines on a decoder slice."""

    bench: BenchConfig
    budget: BudgetConfig
    paths: PathsConfig
    device: Device
    num_threads: int | None


@dataclass
class TrainStage:
    """``dop stage=train``: the embedded tiny model."""

    train: TrainSection
    data: DataConfig
    paths: PathsConfig
    num_threads: int | None


@dataclass
class PipelineStage:
    """``dop`` (``stage=pipeline``): sweep + search, evaluate dense, each policy, the uniform-depth
    policies and the baselines at the same budgets, report."""

    pipeline: PipelineConfig
    model: ModelConfig
    data: DataConfig
    method: DopMethodConfig
    sweep: SweepConfig
    budget: BudgetConfig
    benchmark: BenchmarkConfig
    paths: PathsConfig
    logger: LoggerConfig
    seed: int
    device: Device
    num_threads: int | None
    overwrite: bool
    fail_on_error: bool
    eval_batch_size: int | None
    latency_samples: int

    def search_stage(self, run_dir: str) -> SearchStage:
        """The search of this pipeline, linked into (or, without a search store, living in) ``run_dir``."""
        return SearchStage(model=self.model, data=self.data, method=self.method, sweep=self.sweep,
                           paths=dataclasses.replace(self.paths, run_dir=run_dir), logger=self.logger, seed=self.seed,
                           device=self.device, num_threads=self.num_threads, budget=self.budget,
                           benchmark=self.benchmark)

    def evaluate_stage(self, run_dir: str, policy: str | None, method: MethodConfig | None = None) -> EvaluateStage:
        """Evaluation, in ``run_dir``, of dense (``policy=None``), of the policies in a file or folder, or of
        a baseline ``method`` at this pipeline's budgets (an unreachable budget is reported, not fatal)."""
        return EvaluateStage(model=self.model, data=self.data, method=method or self.method, budget=self.budget,
                             benchmark=self.benchmark, policy=policy,
                             paths=dataclasses.replace(self.paths, run_dir=run_dir), logger=self.logger,
                             device=self.device, num_threads=self.num_threads, overwrite=self.overwrite,
                             fail_on_error=self.fail_on_error and method is None,
                             eval_batch_size=self.eval_batch_size, latency_samples=self.latency_samples)

    def report_stage(self, run_dir: str, report_filter: dict[str, Any]) -> ReportStage:
        return ReportStage(paths=dataclasses.replace(self.paths, run_dir=run_dir), logger=self.logger, policy=None,
                           report_filter=report_filter)


@dataclass
class CompareStage:
    """``dop stage=compare``: found policies vs uniform and random ones of the same FLOPs."""

    compare: CompareConfig
    data: DataConfig
    paths: PathsConfig
    seed: int


STAGE_SCHEMAS: dict[str, type] = {"compare": CompareStage, "sweep": SweepStage, "merge": SweepStage, "search": SearchStage,
                                  "evaluate": EvaluateStage, "report": ReportStage, "bench": BenchStage,
                                  "train": TrainStage, "pipeline": PipelineStage}
# top-level keys no stage reads: the stage name and an experiment's bookkeeping (conf/experiment)
BOOKKEEPING_KEYS = ("stage", "table", "hydra", "debug")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load(schema: type[T], cfg: DictConfig | dict[str, Any]) -> T:
    """The stage config ``schema`` from a composed config (extra groups other stages read are
    ignored; an unknown top-level key, or anything wrong inside a group, is a ``ConfigError``)."""
    data = plain(cfg)
    known = {f.name for s in STAGE_SCHEMAS.values() for f in dataclasses.fields(s)} | set(BOOKKEEPING_KEYS)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a known config key; valid top-level keys: {', '.join(sorted(known))}")
    values = {}
    for f in dataclasses.fields(schema):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{f.name} is missing from the config")
            continue
        values[f.name] = _group(f.name, data[f.name], schema)
    out = schema(**values)
    for f in dataclasses.fields(schema):  # derived checks, before any model is loaded
        if f.name in ("budget",):
            budgets_of(out.budget)
        if f.name == "device":
            check_device(out.device)
        if f.name == "num_threads" and out.num_threads is not None and out.num_threads < 1:
            raise ConfigError(f"num_threads={out.num_threads} is not valid; it must be >= 1 (or null)")
    if isinstance(out, EvaluateStage):
        benchmarks_of(out.benchmark, check=False)
    return out


def _group(name: str, node: Any, schema: type) -> Any:
    if name == "data":
        return data_config(node)
    if name == "method":
        if schema in (SweepStage, SearchStage, PipelineStage):
            method = method_config(node)
            if not isinstance(method, DopMethodConfig):
                raise ConfigError(f"method={method.name} is a baseline: stage {_stage_name(schema)} searches DOP "
                                  "policies (use method=dop or method=dop_paper, or stage=evaluate for a baseline)")
            return method
        return method_config(node)
    return convert(get_type_hints(schema)[name], plain(node), name)


def _stage_name(schema: type) -> str:
    return next(k for k, v in STAGE_SCHEMAS.items() if v is schema)


def data_config(node: Any) -> DataConfig:
    data = plain(node) or {}
    kind = str(data.get("kind") or data.get("name"))
    aliases = {"lmms_task": "lmms_eval", "lmms-eval": "lmms_eval"}
    kind = aliases.get(kind, kind)
    if kind not in _DATA_KINDS:
        raise ConfigError(f"data.kind={kind!r} is not valid; valid: {', '.join(_DATA_KINDS)}")
    if kind == "synthetic":
        data = {k: v for k, v in data.items() if k != "kind"}
    return typed(_DATA_KINDS[kind], data, "data")


def method_config(node: Any) -> MethodConfig:
    data = dict(plain(node) or {})
    name = str(data.get("name", "dop"))
    if name in DOP_METHODS:
        return typed(DopMethodConfig, data, "method")
    data.pop("name", None)
    return BaselineMethodConfig(name=name, hparams=data)


def baseline_method_config(name: str, model: ModelConfig | None = None) -> BaselineMethodConfig:
    """A baseline with the hyper-parameters of ``conf/method/<name>.yaml`` (interpolations such as
    ``${oc.select:model.clip_text_tower,null}`` resolved against ``model``); the method's paper
    defaults when the file does not exist."""
    path = Path(CONF_DIR) / "method" / f"{name}.yaml"
    if not path.is_file():
        return BaselineMethodConfig(name=name)
    node = OmegaConf.merge({"model": dataclasses.asdict(model) if model is not None else {}},
                           {"method": OmegaConf.load(path)})
    method = method_config(node.method)
    if not isinstance(method, BaselineMethodConfig):
        raise ConfigError(f"conf/method/{name}.yaml is not a baseline (name: {method.name})")
    return method


def budgets_of(budget: BudgetConfig) -> list[Budget]:
    try:
        budgets = parse_budgets({"kind": budget.kind, "values": budget.values})
    except BudgetError as err:
        raise ConfigError(f"budget: {err}") from None
    if budget.match != "flops" and budgets[0].kind != "tokens":
        raise ConfigError(f"budget.match={budget.match} runs baselines at their published knob for a token count: "
                          f"it needs budget=tokens, got budget={budgets[0].kind}")
    return budgets


def benchmarks_of(benchmark: BenchmarkConfig, check: bool = True) -> list[Benchmark]:
    spec = {k: v for k, v in dataclasses.asdict(benchmark).items() if v is not None}
    try:
        return resolve_benchmarks(spec, check=check)
    except BenchmarkError as err:
        raise ConfigError(f"benchmark: {err}") from None


def check_device(device: str) -> str:
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ConfigError(f"device={device!r} is not valid; valid: auto, cpu, cuda, cuda:N")
