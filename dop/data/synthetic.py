"""Synthetic image-QA benchmark: coloured shapes on a grid, questions that need the image.

Every sample is drawn from ``numpy.random.default_rng([seed, split_code, index])``, so a sample
depends only on (seed, split, index): the same seed gives the same bytes, and training can draw
sample ``i`` of step ``s`` without materialising a dataset.

Scene: a ``grid x grid`` board (default 2x2, 32x32 pixels), 1..cells objects, each in its own
cell, with a colour (6) and a shape (3), jittered position and size, on a noisy dark background.
Question types (one-word answers):

- ``colour_at``  what colour is the object at the <cell> ?        -> colour
- ``shape_at``   what shape is the object at the <cell> ?         -> shape
- ``count``      how many objects are there ?                      -> one / two / ...
- ``exists``     is there a <colour> <shape> ?                     -> yes / no
- ``shape_of_colour`` what shape is the <colour> object ?          -> shape (colour unique)
- ``where``      where is the <colour> <shape> ?                   -> cell (object unique)
- ``right_of``   what colour is the object right of the <colour> <shape> ? -> colour / nothing

Caption samples (training only; stage 1 of the recipe in ``tiny-model-notes.md``):

- ``caption_cells`` describe the image .  -> ``top_left red circle top_right empty ...``
- ``caption_list``  list the objects .    -> objects sorted by colour, shape, cell
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from dop.errors import DopError
from dop.io import share_dir

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 40),
    "purple": (160, 50, 200),
    "orange": (240, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EMPTY, NOTHING = "empty", "nothing"

QA_TYPES: tuple[str, ...] = (
    "colour_at", "shape_at", "count", "exists", "shape_of_colour", "where", "right_of",
)
CAPTION_TYPES: tuple[str, ...] = ("caption_cells", "caption_list")
# Training also describes the cells in a random order: the content after each cell name must then be
# looked up by the name (as colour_at and shape_at need), not by its distance from the image.
TRAIN_CAPTION_TYPES: tuple[str, ...] = (*CAPTION_TYPES, "caption_shuffled")
# Relational types: sampled twice as often in training (recipe).
RELATIONAL_TYPES: tuple[str, ...] = ("exists", "shape_of_colour", "where", "right_of")

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "stream": 3,
               # benchmark-format prompts (``make_task_sample``): training stream, held-out sets,
               # and the per-step choice of a training batch's family
               "task_stream": 4, "task_val": 5, "task_test": 6, "family": 7,
               # training-only lead-in sentences before a question (dop.train.with_lead_in)
               "lead_in": 8}
DEFAULT_SIZES = {"train": 2000, "val": 500, "test": 1000}



class SyntheticDataError(DopError, ValueError):
    """The synthetic data settings do not fit (sizes, or a path holding another dataset)."""

def cell_names(grid: int) -> list[str]:
    """Row-major cell names: ``top_left, top_right, bottom_left, bottom_right`` for a 2x2 grid;
    ``top_left, top_middle, ..., bottom_right`` for 3x3."""
    if grid == 2:
        rows, cols = ["top", "bottom"], ["left", "right"]
    elif grid == 3:
        rows, cols = ["top", "middle", "bottom"], ["left", "centre", "right"]
    else:
        raise ValueError(f"grid must be 2 or 3, got {grid}")
    return [f"{r}_{c}" for r in rows for c in cols]


@dataclass(frozen=True)
class Obj:
    cell: int
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    grid: int
    objects: tuple[Obj, ...]

    def at(self, cell: int) -> Obj | None:
        for o in self.objects:
            if o.cell == cell:
                return o
        return None

    def to_json(self) -> str:
        return json.dumps({"grid": self.grid, "objects": [[o.cell, o.colour, o.shape] for o in self.objects]})

    @staticmethod
    def from_json(text: str) -> Scene:
        d = json.loads(text)
        return Scene(d["grid"], tuple(Obj(int(c), col, sh) for c, col, sh in d["objects"]))


# ------------------------------------------------------------------ drawing
def sample_scene(rng: np.random.Generator, grid: int = 2, max_objects: int | None = None) -> Scene:
    n_cells = grid * grid
    max_objects = max_objects or n_cells
    n = int(rng.integers(1, max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(n_cells, size=n, replace=False))
    colours = list(COLOURS)
    objs = tuple(Obj(c, colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))]) for c in cells)
    return Scene(grid, objs)


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        r = size / 2
        return (yy - r) ** 2 + (xx - r) ** 2 <= r * r
    if shape == "triangle":  # apex up: half-width grows linearly with the row
        half = (yy / size) * (size / 2)
        return np.abs(xx - size / 2) <= half
    raise ValueError(shape)


def render(scene: Scene, rng: np.random.Generator, image_size: int = 32, noise: float = 12.0) -> np.ndarray:
    """Draw a scene as an (H, W, 3) uint8 array. Each object stays inside its cell."""
    cell = image_size // scene.grid
    base = rng.integers(10, 40, size=3)
    img = np.empty((image_size, image_size, 3), np.float32)
    img[:] = base
    for o in scene.objects:
        r, c = divmod(o.cell, scene.grid)
        size = int(rng.integers(int(cell * 0.55), int(cell * 0.85) + 1))
        oy = r * cell + int(rng.integers(0, cell - size + 1))
        ox = c * cell + int(rng.integers(0, cell - size + 1))
        m = _shape_mask(o.shape, size)
        col = np.asarray(COLOURS[o.colour], np.float32) + rng.normal(0, 8, size=3)
        patch = img[oy:oy + size, ox:ox + size]
        patch[m] = col
    img += rng.normal(0, noise, size=img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


# ------------------------------------------------------------------ questions
def caption_cells(scene: Scene) -> str:
    names = cell_names(scene.grid)
    parts = []
    for i, name in enumerate(names):
        o = scene.at(i)
        parts.append(f"{name} {o.colour} {o.shape}" if o else f"{name} {EMPTY}")
    return " ".join(parts)


def caption_shuffled(scene: Scene, order: Sequence[int]) -> str:
    """``caption_cells`` with the cells in ``order``."""
    names = cell_names(scene.grid)
    parts = []
    for i in order:
        o = scene.at(int(i))
        parts.append(f"{names[i]} {o.colour} {o.shape}" if o else f"{names[i]} {EMPTY}")
    return " ".join(parts)


def caption_list(scene: Scene) -> str:
    names = cell_names(scene.grid)
    objs = sorted(scene.objects, key=lambda o: (o.colour, o.shape, o.cell))
    return " ".join(f"{o.colour} {o.shape} {names[o.cell]}" for o in objs)


def answer_question(scene: Scene, qtype: str, args: dict) -> str:
    """The ground-truth answer of a question, computed from the scene (used by the generator and
    by tests to re-check stored answers)."""
    names = cell_names(scene.grid)
    if qtype == "colour_at":
        return scene.at(names.index(args["cell"])).colour
    if qtype == "shape_at":
        return scene.at(names.index(args["cell"])).shape
    if qtype == "count":
        return NUMBER_WORDS[len(scene.objects)]
    if qtype == "exists":
        hit = any(o.colour == args["colour"] and o.shape == args["shape"] for o in scene.objects)
        return "yes" if hit else "no"
    if qtype == "shape_of_colour":
        (o,) = [o for o in scene.objects if o.colour == args["colour"]]
        return o.shape
    if qtype == "where":
        (o,) = [o for o in scene.objects if o.colour == args["colour"] and o.shape == args["shape"]]
        return names[o.cell]
    if qtype == "right_of":
        (o,) = [o for o in scene.objects if o.colour == args["colour"] and o.shape == args["shape"]]
        r, c = divmod(o.cell, scene.grid)
        right = scene.at(r * scene.grid + c + 1)
        return right.colour if right else NOTHING
    if qtype == "caption_cells":
        return caption_cells(scene)
    if qtype == "caption_list":
        return caption_list(scene)
    if qtype == "caption_shuffled":
        return caption_shuffled(scene, args["order"])
    raise ValueError(f"unknown qtype {qtype!r}")


def question_text(scene: Scene, qtype: str, args: dict) -> str:
    if qtype == "colour_at":
        return f"what colour is the object at the {args['cell']} ?"
    if qtype == "shape_at":
        return f"what shape is the object at the {args['cell']} ?"
    if qtype == "count":
        return "how many objects are there ?"
    if qtype == "exists":
        return f"is there a {args['colour']} {args['shape']} ?"
    if qtype == "shape_of_colour":
        return f"what shape is the {args['colour']} object ?"
    if qtype == "where":
        return f"where is the {args['colour']} {args['shape']} ?"
    if qtype == "right_of":
        return f"what colour is the object right of the {args['colour']} {args['shape']} ?"
    if qtype == "caption_cells":
        return "describe the image ."
    if qtype == "caption_list":
        return "list the objects ."
    if qtype == "caption_shuffled":
        return "describe each part of the image ."
    raise ValueError(f"unknown qtype {qtype!r}")


def _possible(scene: Scene, qtype: str) -> bool:
    if qtype == "shape_of_colour":
        return any(c == 1 for c in Counter(o.colour for o in scene.objects).values())
    if qtype in ("where",):
        return any(c == 1 for c in Counter((o.colour, o.shape) for o in scene.objects).values())
    if qtype == "right_of":
        cnt = Counter((o.colour, o.shape) for o in scene.objects)
        return any(cnt[(o.colour, o.shape)] == 1 and o.cell % scene.grid != scene.grid - 1 for o in scene.objects)
    return True


def _question_args(scene: Scene, qtype: str, rng: np.random.Generator) -> dict:
    names = cell_names(scene.grid)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if qtype in ("colour_at", "shape_at"):
        return {"cell": names[pick([o.cell for o in scene.objects])]}
    if qtype == "count" or qtype in CAPTION_TYPES:
        return {}
    if qtype == "caption_shuffled":
        return {"order": [int(i) for i in rng.permutation(scene.grid * scene.grid)]}
    if qtype == "exists":
        if rng.random() < 0.5:
            o = pick(scene.objects)
            return {"colour": o.colour, "shape": o.shape}
        present = {(o.colour, o.shape) for o in scene.objects}
        # half of the negatives share the colour or the shape of a present object (harder)
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        if rng.random() < 0.5:
            near = [(c, s) for c, s in absent if any(c == o.colour or s == o.shape for o in scene.objects)]
            absent = near or absent
        c, s = pick(absent)
        return {"colour": c, "shape": s}
    if qtype == "shape_of_colour":
        cnt = Counter(o.colour for o in scene.objects)
        return {"colour": pick(sorted(c for c, k in cnt.items() if k == 1))}
    if qtype == "where":
        cnt = Counter((o.colour, o.shape) for o in scene.objects)
        o = pick([o for o in scene.objects if cnt[(o.colour, o.shape)] == 1])
        return {"colour": o.colour, "shape": o.shape}
    if qtype == "right_of":
        cnt = Counter((o.colour, o.shape) for o in scene.objects)
        cand = [o for o in scene.objects if cnt[(o.colour, o.shape)] == 1 and o.cell % scene.grid != scene.grid - 1]
        o = pick(cand)
        return {"colour": o.colour, "shape": o.shape}
    raise ValueError(f"unknown qtype {qtype!r}")


def make_sample(
    rng: np.random.Generator,
    qtypes: Sequence[str] = QA_TYPES,
    weights: Sequence[float] | None = None,
    grid: int = 2,
    image_size: int = 32,
) -> dict:
    """One sample: ``{"image": uint8 array, "question", "answer", "qtype", "scene" (json)}``.

    The question type is drawn from ``qtypes`` (with ``weights``); if the scene cannot pose it
    (e.g. no unique colour), the scene is redrawn."""
    p = None if weights is None else np.asarray(weights, float) / float(np.sum(weights))
    qtype = qtypes[int(rng.choice(len(qtypes), p=p))]
    while True:
        scene = sample_scene(rng, grid)
        if _possible(scene, qtype):
            break
    args = _question_args(scene, qtype, rng)
    image = render(scene, rng, image_size)
    return {
        "image": image,
        "question": question_text(scene, qtype, args),
        "answer": answer_question(scene, qtype, args),
        "qtype": qtype,
        "scene": scene.to_json(),
        "args": json.dumps(args, sort_keys=True),
    }


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def training_weights(qtypes: Sequence[str]) -> list[float]:
    """Recipe: relational types twice as often as the others."""
    return [2.0 if q in RELATIONAL_TYPES else 1.0 for q in qtypes]


def vocabulary(grid: int = 2) -> list[str]:
    """Every word that can occur in a question, answer or caption (sorted, deterministic)."""
    words: set[str] = set(COLOURS) | set(SHAPES) | set(cell_names(grid)) | {EMPTY, NOTHING, "yes", "no"}
    words |= set(NUMBER_WORDS[: grid * grid + 1])
    templates = [question_text(None, q, {"cell": "x", "colour": "x", "shape": "x"}) for q in QA_TYPES + CAPTION_TYPES]
    for t in templates:
        words |= set(t.split())
    words.discard("x")
    return sorted(words)


# ------------------------------------------------------------------ benchmark prompt formats
# The default prompts of the 13 lmms-eval 0.7.3 benchmarks (each task YAML's default
# ``lmms_eval_specific_kwargs`` and its ``doc_to_text``), wrapped around questions about synthetic
# scenes, so that the embedded model answers through them (issue 17). dop's lmms-eval plugin puts
# doc_to_text's output after the image in the model's chat template (literal ``<image>`` removed).
SHORT_ANSWER = "Answer the question using a single word or phrase."   # gqa, vqav2, pope, mme, textvqa, ...
YES_NO = "Please answer yes or no."       # inside MME's questions; replaced by SHORT_ANSWER by default
LETTER = "Answer with the option's letter from the given choices directly."  # scienceqa, seedbench, mmbench, mmmu
LETTER_CN = "请直接使用所提供的选项字母作为答案回答。"                       # mmbench_cn
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."  # vizwiz, ok_vqa
MMBENCH_OPTIONS = "There are several options:"
OPTION_LETTERS = "ABCDE"

# Answer families: a word (``short``), yes / no, or an option letter (``choice``).
FAMILIES: tuple[str, ...] = ("short", "yesno", "choice")
TASK_KINDS: dict[str, tuple[str, ...]] = {
    "short": ("colour_at", "shape_at", "count", "shape_of_colour", "where", "right_of"),
    "yesno": ("exists", "colour_is", "shape_is", "count_is", "where_is"),
    "choice": ("colour_at", "shape_at", "count", "shape_of_colour", "where", "right_of"),
}
# The benchmark layouts each family appears in (``task_prompt``).
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "short": ("gqa", "vqav2", "ok_vqa", "vizwiz_vqa", "textvqa", "mmmu_open", "ocrbench"),
    "yesno": ("pope", "mme", "gqa", "vqav2", "ok_vqa", "vizwiz_vqa", "textvqa", "ocrbench"),
    "choice": ("scienceqa_img", "seedbench", "mmbench_en", "mmbench_cn", "mmmu_mc"),
}

# Paraphrases of the question kinds: {cw} colour/color, {noun}/{nouns} object(s)/shape(s)/item(s),
# {prep} at/in/on, {pos} a cell (``top_left``, ``top left``, ``upper left corner``, ...), {c} {s}
# a colour and a shape, {art} a/an, {n} a count (word or digit), {cand} the colour or shape asked about.
NATURAL_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour_at": ("What {cw} is the {noun} {prep} the {pos}?", "What is the {cw} of the {noun} {prep} the {pos}?",
                  "Which {cw} is the {noun} {prep} the {pos}?", "What {cw} is the {s} {prep} the {pos}?",
                  "What {cw} does the {noun} {prep} the {pos} have?"),
    "shape_at": ("What shape is the {noun} {prep} the {pos}?", "What is the shape of the {noun} {prep} the {pos}?",
                 "Which shape is {prep} the {pos}?", "What shape is the {c} {noun} {prep} the {pos}?",
                 "What kind of shape is {prep} the {pos}?"),
    "count": ("How many {nouns} are there?", "How many {nouns} are there in the image?",
              "How many {nouns} are in the image?", "How many {nouns} can you see?",
              "How many {nouns} are shown in the picture?", "What is the number of {nouns} in the image?"),
    "shape_of_colour": ("What shape is the {c} {noun}?", "What is the shape of the {c} {noun}?",
                        "Which shape is {c}?", "What shape is the {c} {noun} in the image?"),
    "where": ("Where is the {c} {s}?", "Where is the {c} {s} located?", "Where is the {c} {s} in the image?",
              "In which part of the image is the {c} {s}?"),
    "right_of": ("What {cw} is the {noun} to the right of the {c} {s}?", "What {cw} is the {noun} right of the {c} {s}?",
                 "What is the {cw} of the {noun} to the right of the {c} {s}?"),
    "exists": ("Is there {art} {c} {s} in the image?", "Is there {art} {c} {s} in this image?", "Is there {art} {c} {s}?",
               "Is there any {c} {s} in the image?", "Does the image contain {art} {c} {s}?",
               "Can you see {art} {c} {s} in the image?", "Is there {art} {c} {s} in the picture?"),
    "colour_is": ("Is the {noun} {prep} the {pos} {cand}?", "Is the {s} {prep} the {pos} {cand}?",
                  "Is the {cw} of the {noun} {prep} the {pos} {cand}?"),
    "shape_is": ("Is the {noun} {prep} the {pos} a {cand}?", "Is the {c} {noun} {prep} the {pos} a {cand}?",
                 "Is the shape {prep} the {pos} a {cand}?"),
    "count_is": ("Are there {n} {nouns} in the image?", "Are there exactly {n} {nouns} in the image?",
                 "Is the number of {nouns} in the image {n}?", "Are there {n} {nouns}?"),
    "where_is": ("Is the {c} {s} {prep} the {pos}?", "Is there {art} {c} {s} {prep} the {pos}?",
                 "Is the {c} {s} located {prep} the {pos} of the image?"),
}
_WORDS_OF = {
    "cw": ("colour", "color"), "noun": ("object", "shape", "item"), "nouns": ("objects", "shapes", "items"),
    "prep": ("at", "in", "on"), "art": ("a", "an"),
}
# Option texts that are never an answer (distractors) and context sentences of ScienceQA / MMBench hints.
EXTRA_COLOURS: tuple[str, ...] = ("black", "white", "pink", "brown", "gray")
EXTRA_SHAPES: tuple[str, ...] = ("star", "hexagon", "rectangle", "oval", "diamond")
EXTRA_COUNTS: tuple[str, ...] = ("zero", "five", "six")
HINTS: tuple[str, ...] = (
    "The image shows coloured shapes on a dark background.", "Look at the shapes in the picture.",
    "Each part of the image holds at most one shape.", "The picture is divided into four parts.",
    "Select the best answer.", "Think about the colours and shapes you see.",
)
# Words deliberately left out of the vocabulary: hints also carry unknown words (``<unk>``), as real
# benchmark contexts do.
UNKNOWN_WORDS: tuple[str, ...] = (
    "Students", "observed", "diagram", "science", "experiment", "passage", "following", "lesson", "figure",
    "photo", "label", "describes", "weather", "animal", "garden", "measure", "compare", "Tom", "city",
)


_IN_WORD_CAPITAL = re.compile(r"(?<=[A-Za-z])[A-Z]|[A-Z](?=[A-Za-z])")
_PROMPT_WORD = re.compile(r"\w+|[^\w\s]")


def cell_phrases() -> list[tuple[str, str]]:
    """(regex, cell name) pairs that read a cell written in words as its one-word name:
    ``top left``, ``top-left``, ``upper left`` (+ `` corner``) -> ``top_left`` (grids 2 and 3). The
    tiny model's tokenizer applies them after folding capitals, so a position is one token however
    a prompt writes it, as in the synthetic benchmark's own questions."""
    out = []
    for cell in dict.fromkeys(cell_names(2) + cell_names(3)):
        row, col = cell.split("_")
        rows = "|".join(dict.fromkeys([row, _ROW_SYNONYM.get(row, row)]))
        out.append((rf"\b(?:{rows})[ -]{col}(?: corner)?\b", cell))
    return out


def prompt_words(text: str) -> list[str]:
    """The words the tiny model's tokenizer makes of ``text`` (``dop.train.build_processor``):
    capitals inside words lower-cased (``Answer`` -> ``answer``) while a capital standing alone
    stays (option letters ``A``, ``B``, ... stay upper case, so decoded answers are ``A``), cells in
    words read as their names (``cell_phrases``), then runs of word characters (``_`` included:
    ``top_left``) and single punctuation marks."""
    text = _IN_WORD_CAPITAL.sub(lambda m: m.group().lower(), text)
    for pattern, cell in cell_phrases():
        text = re.sub(pattern, cell, text)
    return _PROMPT_WORD.findall(text)


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


_ROW_SYNONYM = {"top": "upper", "bottom": "lower"}


def position_phrase(cell: str, rng: np.random.Generator) -> str:
    """A cell in words: ``top_left``, ``top left``, ``top-left`` or ``upper left``, sometimes + ``corner``."""
    row, col = cell.split("_")
    form = int(rng.integers(4))
    if form == 0:
        text = cell
    elif form == 1:
        text = f"{row} {col}"
    elif form == 2:
        text = f"{row}-{col}"
    else:
        text = f"{_ROW_SYNONYM.get(row, row)} {col}"
    return f"{text} corner" if form != 0 and rng.random() < 0.25 else text


def _count_text(n: int, rng: np.random.Generator) -> str:
    return str(n) if rng.random() < 0.5 else NUMBER_WORDS[n]


def _task_args(scene: Scene, kind: str, rng: np.random.Generator) -> dict:
    """Arguments of a question kind; yes/no kinds get a true or a false candidate half the time each."""
    names = cell_names(scene.grid)
    if kind in QA_TYPES:
        return _question_args(scene, kind, rng)
    o = _pick(rng, scene.objects)
    args = {"cell": names[o.cell], "colour": o.colour, "shape": o.shape}
    yes = bool(rng.random() < 0.5)
    if kind == "colour_is":
        others = [c for c in COLOURS if c != o.colour]
        present = [c for c in others if any(p.colour == c for p in scene.objects)]
        args["cand"] = o.colour if yes else _pick(rng, present if present and rng.random() < 0.5 else others)
    elif kind == "shape_is":
        args["cand"] = o.shape if yes else _pick(rng, [s for s in SHAPES if s != o.shape])
    elif kind == "count_is":
        n = len(scene.objects)
        args = {"n": n if yes else _pick(rng, [k for k in range(1, scene.grid * scene.grid + 1) if k != n])}
    elif kind == "where_is":
        if not yes:
            args["cell"] = _pick(rng, [c for i, c in enumerate(names) if i != o.cell])
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return args


def task_answer(scene: Scene, kind: str, args: dict) -> str:
    """The answer of a question kind (``QA_TYPES`` or a yes/no kind of ``TASK_KINDS``)."""
    if kind in QA_TYPES:
        return answer_question(scene, kind, args)
    names = cell_names(scene.grid)
    if kind == "colour_is":
        hit = scene.at(names.index(args["cell"])).colour == args["cand"]
    elif kind == "shape_is":
        hit = scene.at(names.index(args["cell"])).shape == args["cand"]
    elif kind == "count_is":
        hit = len(scene.objects) == args["n"]
    elif kind == "where_is":
        o = scene.at(names.index(args["cell"]))
        hit = o is not None and (o.colour, o.shape) == (args["colour"], args["shape"])
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return "yes" if hit else "no"


# Share of benchmark-format questions in the synthetic benchmark's own phrasing (``question_text``),
# as ``dop.evaluation.fixtures`` writes its documents; the rest are paraphrases (``NATURAL_QUESTIONS``).
OWN_PHRASING = 0.75


def natural_question(kind: str, args: dict, rng: np.random.Generator, own: float = OWN_PHRASING) -> str:
    """A question of ``kind`` in words: the benchmark's own phrasing (``question_text``, ``own`` of the
    time for the kinds that have one) or a paraphrase of ``NATURAL_QUESTIONS``."""
    if kind in QA_TYPES and rng.random() < own:
        return question_text(None, kind, args)
    template = _pick(rng, NATURAL_QUESTIONS[kind])
    fill = {k: _pick(rng, v) for k, v in _WORDS_OF.items()}
    colour = args.get("colour", "")
    fill["art"] = "an" if colour.startswith(("a", "e", "i", "o", "u")) and rng.random() < 0.8 else "a"
    fill.update(c=colour, s=args.get("shape", ""), cand=args.get("cand", ""))
    if "cell" in args:
        fill["pos"] = position_phrase(args["cell"], rng)
    if "n" in args:
        fill["n"] = _count_text(args["n"], rng)
    return template.format(**fill)


def _option_text(kind: str, value: str, rng: np.random.Generator) -> str:
    if kind == "count":
        return _count_text(NUMBER_WORDS.index(value), rng)
    if kind == "where":
        return position_phrase(value, rng) if value in cell_names(2) + cell_names(3) else value
    return value.capitalize() if rng.random() < 0.3 else value


def choice_options(scene: Scene, kind: str, answer: str, n: int, rng: np.random.Generator) -> tuple[list[str], str]:
    """``n`` option texts (the answer among distractors, at a random position) and the answer's letter.
    Distractors come from the answer's own domain first (most of the time), then from words that are
    never answers (``EXTRA_COLOURS``, ...)."""
    if kind == "colour_at":
        real, extra = list(COLOURS), list(EXTRA_COLOURS)
    elif kind == "right_of":
        real, extra = [*COLOURS, NOTHING], list(EXTRA_COLOURS)
    elif kind in ("shape_at", "shape_of_colour"):
        real, extra = list(SHAPES), list(EXTRA_SHAPES)
    elif kind == "count":
        real, extra = list(NUMBER_WORDS[1: scene.grid * scene.grid + 1]), list(EXTRA_COUNTS)
    elif kind == "where":
        real, extra = cell_names(scene.grid), ["centre", "center"]
    else:
        raise ValueError(f"no options for {kind!r}")
    real = [v for v in real if v != answer]
    extra = [v for v in extra if v != answer]
    if rng.random() < 0.75:
        pool = [real[int(i)] for i in rng.permutation(len(real))] + [extra[int(i)] for i in rng.permutation(len(extra))]
    else:
        both = real + extra
        pool = [both[int(i)] for i in rng.permutation(len(both))]
    values = pool[: n - 1]
    at = int(rng.integers(len(values) + 1))
    values.insert(at, answer)
    return [_option_text(kind, v, rng) for v in values], OPTION_LETTERS[at]


def _hint(rng: np.random.Generator) -> str:
    """A ScienceQA context / MMBench hint: none, a known sentence, or words partly out of vocabulary."""
    r = rng.random()
    if r < 0.4:
        return ""
    if r < 0.7:
        return _pick(rng, HINTS)
    pool = list(UNKNOWN_WORDS) + ["the", "image", "shapes", "colour", "of", "is", "a", "and", "in", "picture"]
    words = [_pick(rng, pool) for _ in range(int(rng.integers(3, 13)))]
    return " ".join(words).capitalize() + "."


def task_prompt(fmt: str, question: str, options: Sequence[str] = (), *, hint: str = "", variant: int = 0) -> str:
    """``doc_to_text`` of benchmark ``fmt`` with its default lmms-eval kwargs, for a question (with
    ``options`` for multiple choice; ``hint`` for ScienceQA's context and MMBench's hint).
    ``variant`` (MME only): 0 = the default, whose post-prompt replaces the question's trailing
    `` Please answer yes or no.``; 1 = that sentence kept (no post-prompt); 2 = kept without the
    space, so the replacement misses and the post-prompt follows it."""
    choices = "\n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options))
    if fmt in ("gqa", "vqav2", "pope"):
        return f"{question}\n{SHORT_ANSWER}"
    if fmt == "mme":
        return (f"{question}\n{SHORT_ANSWER}", f"{question} {YES_NO}", f"{question}{YES_NO}\n{SHORT_ANSWER}")[variant]
    if fmt == "ok_vqa":
        return f"{question}\n{UNANSWERABLE}\n{SHORT_ANSWER}"
    if fmt == "vizwiz_vqa":
        return f"{question.capitalize()}\n{UNANSWERABLE}\n{SHORT_ANSWER}"
    if fmt == "textvqa":
        return f"{question.capitalize()}\n{SHORT_ANSWER}"
    if fmt == "mmmu_open":
        return f"{question}\n\n{SHORT_ANSWER}"
    if fmt == "ocrbench":
        return question
    if fmt == "scienceqa_img":
        context = f"Context: {hint}\n" if hint else ""
        return f"{context}{question}\n{choices}\n{LETTER}"
    if fmt == "seedbench":
        return f"{question}\n{choices}\n{LETTER}"
    if fmt in ("mmbench_en", "mmbench_cn"):
        query = f"{hint} {question} {MMBENCH_OPTIONS}\n{choices}" if hint else f"{question} {MMBENCH_OPTIONS}\n{choices}"
        return f"{query}\n\n{LETTER if fmt == 'mmbench_en' else LETTER_CN}"
    if fmt == "mmmu_mc":
        return f"{question}\n{choices}\n\n{LETTER}"
    raise ValueError(f"unknown benchmark format {fmt!r}")


_N_OPTIONS = {"seedbench": (4, 4), "mmbench_en": (2, 4), "mmbench_cn": (2, 4), "scienceqa_img": (2, 5), "mmmu_mc": (2, 5)}


def make_task_sample(rng: np.random.Generator, family: str | None = None, fmt: str | None = None,
                     grid: int = 2, image_size: int = 32, upscale: float = 0.2,
                     own_phrasing: float = OWN_PHRASING) -> dict:
    """One question about a synthetic scene in a benchmark's prompt format.

    ``{"image", "extra_images" (more renderings of the scene: MMMU documents with two images),
    "question" (the full doc_to_text), "answer" (a word, yes / no, or an option letter), "qtype"
    (the question kind), "family", "format", "scene", "args"}``. ``upscale``: share of images drawn
    at 2x the size (the processor scales them back down), as benchmark fixtures may be.
    ``own_phrasing``: share of questions in the benchmark's own phrasing (``natural_question``).
    Yes / no questions ask ``exists`` half the time (POPE's and MME's fixture questions)."""
    family = family or _pick(rng, FAMILIES)
    fmt = fmt or _pick(rng, TASK_FORMATS[family])
    if family == "yesno" and rng.random() < 0.5:
        kind = "exists"
    else:
        kind = _pick(rng, [k for k in TASK_KINDS[family] if family != "yesno" or k != "exists"])
    while True:
        scene = sample_scene(rng, grid)
        if _possible(scene, kind):
            break
    args = _task_args(scene, kind, rng)
    answer = task_answer(scene, kind, args)
    question = natural_question(kind, args, rng, own_phrasing)
    options: list[str] = []
    if family == "choice":
        lo, hi = _N_OPTIONS[fmt]
        options, answer = choice_options(scene, kind, answer, int(rng.integers(lo, hi + 1)), rng)
    n_images = 1
    if fmt.startswith("mmmu"):
        # MMMU questions name their images (``<image 1>``; the marker stays in the text), and some
        # documents hold several: here a second rendering of the same scene, a third of the time
        n_images = 2 if rng.random() < 1 / 3 else 1
        marker = " ".join(f"<image {k + 1}>" for k in range(n_images))
        r = rng.random()
        question = f"{marker} {question}" if r < 0.6 else f"{question} {marker}" if r < 0.8 else question
    hint = _hint(rng) if fmt in ("scienceqa_img", "mmbench_en", "mmbench_cn") else ""
    variant = int(rng.choice(3, p=[0.7, 0.15, 0.15])) if fmt == "mme" else 0
    size = image_size * 2 if rng.random() < upscale else image_size
    return {
        "image": render(scene, rng, size),
        "extra_images": [render(scene, rng, size) for _ in range(n_images - 1)],
        "question": task_prompt(fmt, question, options, hint=hint, variant=variant),
        "answer": answer,
        "qtype": kind,
        "family": family,
        "format": fmt,
        "scene": scene.to_json(),
        "args": json.dumps(args, sort_keys=True),
    }


def task_rows(seed: int, split: str, n: int, *, grid: int = 2, image_size: int = 32,
              own_phrasing: float = OWN_PHRASING) -> dict[str, list]:
    """``n`` benchmark-format samples (families in turn: short, yes/no, choice) as a dict of lists
    with PIL images; ``split`` ``task_val`` or ``task_test`` (held out from ``task_stream``)."""
    rows: dict[str, list] = defaultdict(list)
    for i in range(n):
        s = make_task_sample(sample_rng(seed, split, i), FAMILIES[i % len(FAMILIES)], grid=grid, image_size=image_size,
                             own_phrasing=own_phrasing)
        s["image"] = Image.fromarray(s["image"])
        s["extra_images"] = [Image.fromarray(im) for im in s["extra_images"]]
        for k, v in s.items():
            rows[k].append(v)
    return dict(rows)


def task_vocabulary(grid: int = 2) -> list[str]:
    """Every word (``prompt_words``) of the benchmark prompt formats, their paraphrases, options and
    hints, except ``UNKNOWN_WORDS`` (sorted, deterministic)."""
    texts = [SHORT_ANSWER, YES_NO, LETTER, LETTER_CN, UNANSWERABLE, MMBENCH_OPTIONS, "Context:", "<image 1> <image 2>",
             *HINTS, *OPTION_LETTERS, *(str(i) for i in range(10)), *EXTRA_COLOURS, *EXTRA_SHAPES, *EXTRA_COUNTS,
             "upper lower corner centre center - .", *cell_names(grid), *(w for c in cell_names(grid) for w in c.split("_"))]
    texts += [question_text(None, "caption_shuffled", {}), *(re.sub(r"\{\w+\}", " ", t) for ts in NATURAL_QUESTIONS.values() for t in ts)]
    texts += [w for ws in _WORDS_OF.values() for w in ws]
    words = {w for t in texts for w in prompt_words(t)}
    return sorted(words - {w.lower() for w in UNKNOWN_WORDS})


# ------------------------------------------------------------------ datasets
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def generate_split(
    seed: int, split: str, size: int, *, grid: int = 2, image_size: int = 32,
    caption_fraction: float = 0.0,
):
    """A ``datasets.Dataset`` of ``size`` samples. QA types are uniform (balanced evaluation);
    ``caption_fraction`` of the rows (train only by default) are caption samples."""
    rows = defaultdict(list)
    n_cap = int(round(size * caption_fraction))
    for i in range(size):
        rng = sample_rng(seed, split, i)
        types = CAPTION_TYPES if i < n_cap else QA_TYPES
        s = make_sample(rng, types, grid=grid, image_size=image_size)
        rows["id"].append(f"{split}-{i:06d}")
        rows["image"].append({"bytes": _png(s["image"]), "path": None})
        for k in ("question", "answer", "qtype", "scene", "args"):
            rows[k].append(s[k])
    features = datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "qtype": datasets.Value("string"),
        "scene": datasets.Value("string"),
        "args": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict(dict(rows), features=features)


def generate_splits(
    seed: int = 0, sizes: dict | None = None, *, grid: int = 2, image_size: int = 32,
    train_caption_fraction: float = 0.3,
):
    """``DatasetDict`` with the splits in ``sizes`` (default train 2000 / val 500 / test 1000).
    The train split also holds caption samples (``train_caption_fraction`` of its rows); val and
    test hold QA only, the seven types in equal expectation."""
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    out = {}
    for split, n in sizes.items():
        frac = train_caption_fraction if split == "train" else 0.0
        out[split] = generate_split(seed, split, int(n), grid=grid, image_size=image_size, caption_fraction=frac)
    return datasets.DatasetDict(out)


def ensure_dataset(out_dir, seed: int = 0, sizes: dict | None = None, *, grid: int = 2, image_size: int = 32) -> Path:
    """Generate and save the benchmark to ``out_dir`` unless it is already there (atomic: written
    to a temporary sibling directory, then renamed). Returns ``out_dir``.

    A ``dop_meta.json`` records (seed, sizes, grid, image_size); a directory with different
    parameters raises instead of being silently reused."""
    out = Path(out_dir)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    meta = {"seed": int(seed), "sizes": {k: int(v) for k, v in sizes.items()}, "grid": grid, "image_size": image_size}
    meta_file = out / "dop_meta.json"
    if meta_file.exists():
        have = json.loads(meta_file.read_text())
        if have != meta:
            raise SyntheticDataError(f"{out} holds a synthetic dataset with {have}, asked for {meta}; use another "
                                     "data.path")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = share_dir(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # honour the umask, not 0700
    try:
        generate_splits(seed, sizes, grid=grid, image_size=image_size).save_to_disk(str(tmp / "data"))
        for p in (tmp / "data").iterdir():
            shutil.move(str(p), str(tmp / p.name))
        (tmp / "data").rmdir()
        (tmp / "dop_meta.json").write_text(json.dumps(meta, sort_keys=True))
        try:
            os.rename(tmp, out)
        except OSError:
            if (out / "dop_meta.json").exists():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_from_config(data_cfg: Any, path: Any = None) -> Path:
    """``ensure_dataset`` with the settings of a ``conf/data`` node (or dict): path, seed, sizes,
    grid, image_size. ``path`` overrides ``data_cfg.path`` (e.g. a benchmark's own dataset dir)."""
    def get(key: str, default: Any = None) -> Any:
        value = data_cfg.get(key, default) if hasattr(data_cfg, "get") else getattr(data_cfg, key, default)
        return default if value is None else value

    target = path if path is not None else get("path")
    if target is None:
        raise ValueError("data.path must be set for the synthetic data")
    sizes = get("sizes")
    return ensure_dataset(target, seed=int(get("seed", 0)), sizes=dict(sizes) if sizes else None,
                          grid=int(get("grid", 2)), image_size=int(get("image_size", 32)))


def load_dataset_dir(path):
    return datasets.load_from_disk(str(path))


def chance_accuracy(dataset) -> dict:
    """Two baselines on a QA dataset:

    - ``chance``: guessing uniformly among the answers seen for the question's type;
    - ``blind``: always answering the majority answer of the question's type (an image-free model
      that learned the answer prior of each type);
    - ``blind_question``: the majority answer per exact question text, fitted on this same data
      (optimistic on small sets: many question texts occur only a few times).

    Returns ``{"chance": float, "blind": float, "blind_question": float}``."""
    qtypes, answers, questions = dataset["qtype"], dataset["answer"], dataset["question"]
    by_type: dict[str, Counter] = defaultdict(Counter)
    by_q: dict[str, Counter] = defaultdict(Counter)
    for t, a, q in zip(qtypes, answers, questions):
        by_type[t][a] += 1
        by_q[q][a] += 1
    n = len(answers)
    chance = sum(1.0 / len(by_type[t]) for t in qtypes) / n
    majority = sum(by_type[t].most_common(1)[0][1] for t in by_type) / n
    blind_q = sum(c.most_common(1)[0][1] for c in by_q.values()) / n
    return {"chance": chance, "blind": majority, "blind_question": blind_q}
