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
# Relational types: sampled twice as often in training (recipe).
RELATIONAL_TYPES: tuple[str, ...] = ("exists", "shape_of_colour", "where", "right_of")

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "stream": 3}
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
