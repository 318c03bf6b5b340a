"""Small datasets in the exact schema of the paper's 13 lmms-eval tasks, made of synthetic scenes.

Each fixture is what a local copy of the benchmark looks like (same split, columns, image fields,
option and answer shapes), so ``dop.evaluation.local_tasks`` can point lmms-eval's own task code at
it. Documents are ``dop.data.synthetic`` scenes and questions, so a model trained on those scenes
can answer them wherever the task's format allows: yes/no (POPE, MME), one word (GQA, VQAv2, OK-VQA,
VizWiz, TextVQA, MMMU open), an option letter whose option is a colour/shape/count/cell word
(MMBench, ScienceQA, SEED-Bench, MMMU). OCRBench's text-recognition half asks for a word drawn
beside the scene, which the 32x32 embedded model cannot see (see ``text_image``).

    fx = build_fixture("pope", tmp_path / "pope")           # Fixture(task, path, size, split, ...)
    write_local_task("pope", tmp_path / "tasks", dataset_path=fx.path)

Every document is a function of (seed, task, index) only. ``layout`` writes the same rows as a
``save_to_disk`` dir (``"disk"``), hub-style parquet files (``"parquet"``) or an HF hub cache
folder (``"hub_cache"``). ``python -m dop.evaluation.fixtures TASK OUT_DIR`` builds one by hand.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dop.data import synthetic as syn
from dop.evaluation.local_tasks import IMAGE_CONFIGS, task_info

TASKS: tuple[str, ...] = ("gqa", "mmbench_en_dev", "mmbench_cn_dev", "mme", "pope", "scienceqa_img",
                          "vqav2_val", "textvqa_val", "vizwiz_vqa_val", "mmmu_val", "seedbench", "ocrbench",
                          "ok_vqa_val2014")
LAYOUTS: tuple[str, ...] = ("disk", "parquet", "hub_cache")

# The width of the text bands on each side of a 32x32 scene: wide enough for "bottom_right" in PIL's
# default font; the embedded model's processor (shortest edge 32, centre crop 32) cuts them off exactly.
TEXT_BAND = 64

# Answer pools of the question types used for options (distractors come from the same pool).
_CELLS = syn.cell_names(2)
POOLS: dict[str, tuple[str, ...]] = {
    "colour_at": tuple(syn.COLOURS),
    "right_of": (*syn.COLOURS, syn.NOTHING),
    "shape_at": syn.SHAPES,
    "shape_of_colour": syn.SHAPES,
    "count": syn.NUMBER_WORDS[1:5],
    "where": tuple(_CELLS),
    "exists": ("yes", "no"),
}
SHORT_ANSWER_TYPES: tuple[str, ...] = syn.QA_TYPES
FOUR_OPTION_TYPES: tuple[str, ...] = ("colour_at", "right_of", "count", "where")  # pools of >= 4 words


@dataclass(frozen=True)
class Fixture:
    task: str              # the lmms-eval task it stands in for
    path: Path             # what to pass as benchmark.dataset_path
    size: int              # documents in the evaluated split
    split: str
    answer_format: str     # what a right answer looks like


@dataclass(frozen=True)
class Doc:
    """One synthetic question: a scene, its image(s) and its one-word answer."""

    scene: syn.Scene
    images: tuple[Image.Image, ...]
    question: str
    answer: str
    qtype: str


# --- documents ----------------------------------------------------------------------------------
def _rng(seed: int, task: str, index: int, salt: int = 0) -> np.random.Generator:
    code = int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "little")
    return np.random.default_rng([int(seed), code, int(index), salt])


def _render(scene: syn.Scene, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(syn.render(scene, rng, 32))


def doc(seed: int, task: str, index: int, qtypes: Sequence[str] = SHORT_ANSWER_TYPES, frames: int = 1) -> Doc:
    """A synthetic question (type cycling through ``qtypes`` by index) with ``frames`` renderings of its scene."""
    rng = _rng(seed, task, index)
    qtype = qtypes[index % len(qtypes)]
    s = syn.make_sample(rng, [qtype])
    scene = syn.Scene.from_json(s["scene"])
    images = [Image.fromarray(s["image"])] + [_render(scene, rng) for _ in range(frames - 1)]
    return Doc(scene, tuple(images), s["question"], s["answer"], qtype)


def exists_doc(seed: int, task: str, index: int, answer: str) -> Doc:
    """An ``exists`` question with a chosen answer (yes: a present object; no: an absent colour+shape)."""
    rng = _rng(seed, task, index)
    scene = syn.sample_scene(rng, 2, max_objects=3)
    if answer == "yes":
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        args = {"colour": o.colour, "shape": o.shape}
    else:
        present = {(o.colour, o.shape) for o in scene.objects}
        absent = [(c, s) for c in syn.COLOURS for s in syn.SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        args = {"colour": c, "shape": s}
    assert syn.answer_question(scene, "exists", args) == answer
    return Doc(scene, (_render(scene, rng),), syn.question_text(scene, "exists", args), answer, "exists")


def options(d: Doc, n: int, seed: int, task: str, index: int) -> tuple[list[str], int]:
    """``n`` options (fewer if the pool is smaller) holding the answer; returns (options, answer index)."""
    rng = _rng(seed, task, index, salt=1)
    pool = [w for w in POOLS[d.qtype] if w != d.answer]
    picks = [pool[i] for i in rng.permutation(len(pool))[: min(n, len(pool) + 1) - 1]]
    opts = [d.answer, *picks]
    order = rng.permutation(len(opts))
    opts = [opts[i] for i in order]
    return opts, opts.index(d.answer)


def text_image(scene_image: Image.Image, word: str) -> Image.Image:
    """The scene between two text bands, ``word`` written in the left one with PIL's default font.

    A real model sees the word; the embedded model's processor (shortest edge 32, centre crop 32)
    keeps exactly the scene, so the text neither helps nor disturbs it.
    """
    w, h = scene_image.size
    out = Image.new("RGB", (w + 2 * TEXT_BAND, h), (255, 255, 255))
    out.paste(scene_image, (TEXT_BAND, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    draw.text(((TEXT_BAND - (right - left)) // 2, (h - (bottom - top)) // 2 - top), word, fill=(0, 0, 0), font=font)
    return out


def letter(i: int) -> str:
    return "ABCDEFGH"[i]


def _vqa_answers(d: Doc, seed: int, task: str, index: int) -> list[str]:
    """Ten annotator answers: nine agree with the truth, one gives another word of the same kind."""
    rng = _rng(seed, task, index, salt=2)
    others = [w for w in POOLS[d.qtype] if w != d.answer]
    odd = others[int(rng.integers(len(others)))]
    answers = [d.answer] * 10
    answers[int(rng.integers(10))] = odd
    return answers


def _answer_type(d: Doc) -> str:
    return {"exists": "yes/no", "count": "number"}.get(d.qtype, "other")


# --- one builder per task: (rows of the evaluated split, features, answer format) -------------------
Rows = dict[str, list[Any]]


def _gqa(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    rows: Rows = {k: [] for k in ("id", "imageId", "question", "answer", "fullAnswer", "isBalanced",
                                  "types", "semanticStr", "image")}
    for i in range(n):
        d = doc(seed, "gqa", i)
        rows["id"].append(f"{2000000 + i}")
        rows["imageId"].append(f"n{100000 + i}")
        rows["question"].append(d.question)
        rows["answer"].append(d.answer)
        rows["fullAnswer"].append(f"the answer is {d.answer} .")
        rows["isBalanced"].append(True)
        rows["types"].append({"structural": "query", "semantic": "attr", "detailed": d.qtype})
        rows["semanticStr"].append(f"dop_synthetic: {d.qtype}")
        rows["image"].append(d.images[0])
    features = datasets.Features({
        "id": datasets.Value("string"), "imageId": datasets.Value("string"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "fullAnswer": datasets.Value("string"),
        "isBalanced": datasets.Value("bool"),
        "types": {k: datasets.Value("string") for k in ("structural", "semantic", "detailed")},
        "semanticStr": datasets.Value("string"), "image": datasets.Image()})
    return rows, features, "one word (exact match, case and punctuation ignored)"


_MMB_CATEGORY = {
    "colour_at": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "shape_at": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "shape_of_colour": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "count": ("object_localization", "finegrained_perception (instance-level)"),
    "where": ("object_localization", "finegrained_perception (instance-level)"),
    "right_of": ("spatial_relationship", "relation_reasoning"),
}


def _mmbench(task: str) -> Callable[[int, int], tuple[Rows, datasets.Features, str]]:
    def build(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
        # Two thirds main questions, one third circular copies (index + 1e6, options rotated), which
        # MMBench's circular evaluation groups with their main question (index % 1e6).
        n_main = n - n // 3
        keys = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "L2-category",
                "source", "split", "comment", "image")
        rows: Rows = {k: [] for k in keys}
        mc_types = tuple(_MMB_CATEGORY)
        for i in range(n):
            main = i if i < n_main else i - n_main
            d = doc(seed, task, main, mc_types)
            opts, ans = options(d, 4, seed, task, main)
            index = main
            if i >= n_main:  # circular copy: shift the options by one
                opts, ans, index = opts[1:] + opts[:1], (ans - 1) % len(opts), main + 1_000_000
            cat, l2 = _MMB_CATEGORY[d.qtype]
            for k, v in zip(keys, (index, d.question, None, *(opts + [None] * 4)[:4], letter(ans), cat, l2,
                                   "dop_synthetic", "dev", None, d.images[0])):
                rows[k].append(v)
        s = datasets.Value("string")
        features = datasets.Features({"index": datasets.Value("int64"), "question": s, "hint": s, "A": s, "B": s,
                                      "C": s, "D": s, "answer": s, "category": s, "L2-category": s, "source": s,
                                      "split": s, "comment": s, "image": datasets.Image()})
        return rows, features, "an option letter A-D (an option's text is matched too)"

    return build


_MME_CATEGORIES = ("existence", "count", "position", "color", "commonsense_reasoning", "numerical_calculation")


def _mme(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    # MME scores pairs: two questions per image (one yes, one no) share a question_id.
    rows: Rows = {k: [] for k in ("question_id", "question", "answer", "category", "image")}
    for pair in range(n // 2):
        category = _MME_CATEGORIES[pair % len(_MME_CATEGORIES)]
        yes = exists_doc(seed, "mme", pair, "yes")
        no_q = exists_doc(seed, "mme", pair, "no")  # same rng stream: the same scene and image
        for d in (yes, no_q):
            rows["question_id"].append(f"{category}/{pair:06d}.png")
            rows["question"].append(f"{d.question} Please answer yes or no.")
            rows["answer"].append(d.answer.capitalize())
            rows["category"].append(category)
            rows["image"].append(yes.images[0])
    s = datasets.Value("string")
    features = datasets.Features({"question_id": s, "question": s, "answer": s, "category": s,
                                  "image": datasets.Image()})
    return rows, features, "yes / no"


def _pope(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    rows: Rows = {k: [] for k in ("id", "question_id", "question", "answer", "image_source", "image", "category")}
    for i in range(n):
        d = exists_doc(seed, "pope", i, "yes" if i % 2 == 0 else "no")
        for k, v in zip(rows, (str(i), str(i + 1), d.question, d.answer, f"dop_synthetic_{i:06d}", d.images[0],
                               ("adversarial", "popular", "random")[i % 3])):
            rows[k].append(v)
    s = datasets.Value("string")
    features = datasets.Features({"id": s, "question_id": s, "question": s, "answer": s, "image_source": s,
                                  "image": datasets.Image(), "category": s})
    return rows, features, "yes / no"


def _scienceqa(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    keys = ("image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category",
            "skill", "lecture", "solution")
    rows: Rows = {k: [] for k in keys}
    for i in range(n):
        d = doc(seed, "scienceqa_img", i, tuple(_MMB_CATEGORY))
        opts, ans = options(d, 2 + i % 4, seed, "scienceqa_img", i)  # 2-5 choices, as in ScienceQA
        for k, v in zip(keys, (d.images[0], d.question, opts, ans, "", "closed choice", "grade2",
                               "natural science", "shapes", "Identify shapes", d.qtype, "", "")):
            rows[k].append(v)
    s = datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "question": s, "choices": datasets.Sequence(s),
                                  "answer": datasets.Value("int8"), **{k: s for k in keys[4:]}})
    return rows, features, "an option letter (A-E); only the letter scores"


def _vqav2(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    keys = ("question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id",
            "question", "image")
    rows: Rows = {k: [] for k in keys}
    for i in range(n):
        d = doc(seed, "vqav2_val", i)
        answers = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                   for j, a in enumerate(_vqa_answers(d, seed, "vqav2_val", i))]
        for k, v in zip(keys, (" ".join(d.question.split()[:3]), d.answer, answers, 1000 + i, _answer_type(d),
                               (1000 + i) * 1000, d.question, d.images[0])):
            rows[k].append(v)
    s = datasets.Value("string")
    features = datasets.Features({
        "question_type": s, "multiple_choice_answer": s,
        "answers": [{"answer": s, "answer_confidence": s, "answer_id": datasets.Value("int64")}],
        "image_id": datasets.Value("int64"), "answer_type": s, "question_id": datasets.Value("int64"),
        "question": s, "image": datasets.Image()})
    return rows, features, "one word (VQA accuracy over 10 answers)"


def _textvqa(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    keys = ("image_id", "question_id", "question", "question_tokens", "image", "image_width", "image_height",
            "flickr_original_url", "flickr_300k_url", "answers", "image_classes", "set_name", "ocr_tokens")
    rows: Rows = {k: [] for k in keys}
    for i in range(n):
        d = doc(seed, "textvqa_val", i)
        image = text_image(d.images[0], d.answer)  # the answer is also written beside the scene
        for k, v in zip(keys, (f"{i:016x}", 34602 + i, d.question, d.question.split(), image, image.width,
                               image.height, "", "", _vqa_answers(d, seed, "textvqa_val", i), ["Shape"], "val",
                               [d.answer])):
            rows[k].append(v)
    s, i64 = datasets.Value("string"), datasets.Value("int64")
    features = datasets.Features({
        "image_id": s, "question_id": i64, "question": s, "question_tokens": datasets.Sequence(s),
        "image": datasets.Image(), "image_width": i64, "image_height": i64, "flickr_original_url": s,
        "flickr_300k_url": s, "answers": datasets.Sequence(s), "image_classes": datasets.Sequence(s),
        "set_name": s, "ocr_tokens": datasets.Sequence(s)})
    return rows, features, "one word (VQA accuracy over 10 answers; the word is also written in the image)"


def _vqa_list(task: str, split_prefix: str) -> Callable[[int, int], tuple[Rows, datasets.Features, str]]:
    """VizWiz and OK-VQA: answers are a list of 10 strings."""

    def build(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
        rows: Rows = {k: [] for k in ("question_id", "image", "question", "answers", "category",
                                      "question_type", "answer_type", "image_id")}
        for i in range(n):
            d = doc(seed, task, i)
            qid = f"{split_prefix}_{i:08d}" if task.startswith("vizwiz") else str(3000 + i)
            for k, v in zip(rows, (qid, d.images[0], d.question, _vqa_answers(d, seed, task, i), _answer_type(d),
                                   "other", _answer_type(d), 3000 + i)):
                rows[k].append(v)
        s = datasets.Value("string")
        features = datasets.Features({"question_id": s, "image": datasets.Image(), "question": s,
                                      "answers": datasets.Sequence(s), "category": s, "question_type": s,
                                      "answer_type": s, "image_id": datasets.Value("int64")})
        if task.startswith("vizwiz"):  # VizWiz-VQA has no question_type/answer_type/image_id
            for k in ("question_type", "answer_type", "image_id"):
                del rows[k]
                del features[k]
        else:  # OK-VQA has no category
            del rows["category"]
            del features["category"]
        return rows, features, "one word (VQA accuracy over 10 answers)"

    return build


_MMMU_SUBJECTS = ("Art", "Math", "Physics", "Computer_Science")


def _mmmu(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    keys = ("id", "question", "options", "explanation", *(f"image_{k}" for k in range(1, 8)), "img_type",
            "answer", "topic_difficulty", "question_type", "subfield")
    rows: Rows = {k: [] for k in keys}
    for i in range(n):
        is_open = i % 4 == 3
        two = i % 3 == 1  # a second rendering of the same scene: two images, one answer
        d = doc(seed, "mmmu_val", i, ("colour_at",) if is_open else tuple(_MMB_CATEGORY), frames=2 if two else 1)
        markers = "<image 1> <image 2>" if two else "<image 1>"
        if is_open:
            opts, answer = [], d.answer
        else:
            opts, ans = options(d, 4, seed, "mmmu_val", i)
            answer = letter(ans)
        images = list(d.images) + [None] * (7 - len(d.images))
        subject = _MMMU_SUBJECTS[i % len(_MMMU_SUBJECTS)]
        for k, v in zip(keys, (f"validation_{subject}_{i + 1}", f"{markers} {d.question}", repr(opts), "", *images,
                               repr(["Diagrams"] * len(d.images)), answer, "Easy",
                               "open" if is_open else "multiple-choice", subject)):
            rows[k].append(v)
    s = datasets.Value("string")
    features = datasets.Features({**{k: s for k in keys}, **{f"image_{k}": datasets.Image() for k in range(1, 8)}})
    return rows, features, "an option letter A-D (an option's text is matched too); open: one word"


def _seedbench(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    keys = ("answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_id", "data_type", "question",
            "question_id", "question_type_id", "image", "segment")
    rows: Rows = {k: [] for k in keys}
    for i in range(n):
        video = i % 4 == 3  # SEED's video questions hold frames in the same image list
        d = doc(seed, "seedbench", i, FOUR_OPTION_TYPES, frames=4 if video else 1)
        opts, ans = options(d, 4, seed, "seedbench", i)
        for k, v in zip(keys, (letter(ans), *opts, f"{i:06d}.png", "video" if video else "image", d.question,
                               str(100 + i), 1 + FOUR_OPTION_TYPES.index(d.qtype), list(d.images),
                               [0, 4] if video else None)):
            rows[k].append(v)
    s = datasets.Value("string")
    features = datasets.Features({**{k: s for k in keys[:10]}, "question_type_id": datasets.Value("int64"),
                                  "image": datasets.Sequence(datasets.Image()),
                                  "segment": datasets.Sequence(datasets.Value("int64"))})
    return rows, features, "an option letter A-D (only the first character scores)"


def _ocrbench(seed: int, n: int) -> tuple[Rows, datasets.Features, str]:
    rows: Rows = {k: [] for k in ("dataset", "question", "question_type", "answer", "image")}
    for i in range(n):
        d = doc(seed, "ocrbench", i)
        if i % 2 == 0:  # text recognition: read the word (a colour or shape word, not a fact of the scene)
            rng = _rng(seed, "ocrbench", i, salt=3)
            word = (*syn.COLOURS, *syn.SHAPES)[int(rng.integers(len(syn.COLOURS) + len(syn.SHAPES)))]
            row = ("IIIT5K", "what is written in the image?", "Regular Text Recognition", [word],
                   text_image(d.images[0], word))
        else:  # scene-text VQA: the scene's answer, also written beside it
            row = ("textVQA", d.question, "Scene Text-centric VQA", [d.answer], text_image(d.images[0], d.answer))
        for k, v in zip(rows, row):
            rows[k].append(v)
    s = datasets.Value("string")
    features = datasets.Features({"dataset": s, "question": s, "question_type": s, "answer": datasets.Sequence(s),
                                  "image": datasets.Image()})
    return rows, features, "a word, matched as a substring of the answer; score = right answers / 1000"


BUILDERS: dict[str, Callable[[int, int], tuple[Rows, datasets.Features, str]]] = {
    "gqa": _gqa,
    "mmbench_en_dev": _mmbench("mmbench_en_dev"),
    "mmbench_cn_dev": _mmbench("mmbench_cn_dev"),
    "mme": _mme,
    "pope": _pope,
    "scienceqa_img": _scienceqa,
    "vqav2_val": _vqav2,
    "textvqa_val": _textvqa,
    "vizwiz_vqa_val": _vqa_list("vizwiz_vqa_val", "VizWiz_val"),
    "mmmu_val": _mmmu,
    "seedbench": _seedbench,
    "ocrbench": _ocrbench,
    "ok_vqa_val2014": _vqa_list("ok_vqa_val2014", "okvqa"),
}
DEFAULT_SIZE = 12


# --- writing ------------------------------------------------------------------------------------
def _write_split(ds: datasets.Dataset, root: Path, config: str | None, split: str, layout: str) -> None:
    folder = root / config if config else root
    if layout == "disk":
        datasets.DatasetDict({split: ds}).save_to_disk(str(folder))
    else:  # the hub repositories' layout: <config>/<split>-00000-of-00001.parquet (or data/...)
        folder = folder if config else folder / "data"
        folder.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))


def build_fixture(task: str, out_dir: str | Path, *, seed: int = 0, size: int = DEFAULT_SIZE,
                  layout: str = "disk") -> Fixture:
    """Write the fixture of lmms-eval task ``task`` under ``out_dir`` in ``layout``; returns where and how big."""
    if task not in BUILDERS:
        raise ValueError(f"no fixture for task {task!r}; fixtures exist for: {', '.join(TASKS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown fixture layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    info = task_info(task)
    split = str(info.split)
    rows, features, answer_format = BUILDERS[task](seed, size)
    out = Path(out_dir)
    root = out
    if layout == "hub_cache":  # $HF_HOME/hub/datasets--<org>--<name>/snapshots/<sha>/, refs/main naming it
        org, _, name = str(info.dataset_path).partition("/")
        repo = out / f"datasets--{org}--{name}"
        sha = hashlib.sha1(f"{task}-{seed}-{size}".encode()).hexdigest()
        root = repo / "snapshots" / sha
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
    if info.folder in IMAGE_CONFIGS:  # GQA: questions and images are two configs, joined on imageId
        config, key = IMAGE_CONFIGS[info.folder]
        images = datasets.Dataset.from_dict({"id": rows[key], "image": rows.pop("image")},
                                            features=datasets.Features({"id": datasets.Value("string"),
                                                                        "image": datasets.Image()}))
        del features["image"]
        _write_split(images, root, config, split, layout)
    ds = datasets.Dataset.from_dict(rows, features=features)
    _write_split(ds, root, info.dataset_name, split, layout)
    return Fixture(task=task, path=out, size=len(ds), split=split, answer_format=answer_format)


def main(argv: Sequence[str]) -> int:
    """``python -m dop.evaluation.fixtures TASK OUT_DIR [LAYOUT]``: write a fixture, print its path."""
    if len(argv) not in (2, 3):
        print(main.__doc__, file=sys.stderr)
        return 2
    fx = build_fixture(argv[0], argv[1], layout=argv[2] if len(argv) == 3 else "disk")
    print(fx.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
