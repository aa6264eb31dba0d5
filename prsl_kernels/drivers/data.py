"""Data for the drivers: synthetic shape scenes, COCO captions and Visual Genome QA.

Every source yields the same record, :class:`Sample`: an id, an image (loaded
lazily for files), several reference captions and/or question-answer pairs.
Training turns records into (image, prompt, target) examples with
:func:`caption_examples` / :func:`vqa_examples`; the model side
(``models.py``) turns those into tensors.

The synthetic scenes are the embedded default: deterministic by seed,
generated in well under a second per thousand images, with captions from
several templates and synonyms (so references differ and CIDEr is
meaningful) and a vocabulary of a few hundred words-pieces once tokenised
(so top-k windows of 6, 20 and 100 non-target tokens are all meaningful).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------- records


@dataclass
class Sample:
    """One image with its text.

    ``image`` is an ``HxWx3`` uint8 array (synthetic) or ``None`` with
    ``image_path`` set (files); :meth:`load_image` returns an RGB PIL image either way.
    ``captions``: reference captions (may be empty for VQA data).
    ``qa``: list of ``(question, answer)`` pairs (may be empty for caption data).
    ``meta``: source-specific details (the synthetic scene's attributes).
    """
    id: str
    image: np.ndarray | None = None
    image_path: str | None = None
    captions: list[str] = field(default_factory=list)
    qa: list[tuple[str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def load_image(self):
        from PIL import Image

        if self.image is not None:
            return Image.fromarray(self.image, mode="RGB")
        if self.image_path is None:
            raise DataError(f"sample {self.id!r} has neither an image array nor an image path")
        try:
            with Image.open(self.image_path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {self.image_path!r} of sample {self.id!r}: {err}") from err


@dataclass
class Example:
    """One training / evaluation example: image of ``sample``, an optional prompt, the target text."""
    sample: Sample
    prompt: str
    target: str


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the problem."""


# --------------------------------------------------------------------------- synthetic scenes

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "cyan": (40, 210, 220),
    "pink": (245, 130, 190), "brown": (130, 80, 40),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (110, 110, 110), "navy": (20, 20, 80)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZES = ("small", "large")
# 3 x 3 grid of positions; phrase variants per template family.
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")

_SHAPE_SYNONYMS = {
    "circle": ("circle", "disc", "round dot"), "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "triangle"), "diamond": ("diamond", "rhombus", "lozenge"),
    "cross": ("cross", "plus sign", "plus"), "ring": ("ring", "hoop", "hollow circle"),
}
_SIZE_SYNONYMS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
_BACKGROUND_SYNONYMS = {"black": ("black", "dark", "black"), "gray": ("gray", "grey", "gray"),
                        "navy": ("navy", "dark blue", "navy blue")}


def _where(row, col):
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"in the {row} {col} corner"


def _where_alt(row, col):
    vertical = {"top": "upper", "middle": "central", "bottom": "lower"}[row]
    horizontal = {"left": "left", "center": "middle", "right": "right"}[col]
    return f"in the {vertical} {horizontal} part of the picture"


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _shape_phrase(obj, variant):
    size = _SIZE_SYNONYMS[obj["size"]][variant % 3]
    shape = _SHAPE_SYNONYMS[obj["shape"]][variant % 3]
    return f"{size} {obj['colour']} {shape}"


# Templates: (scene with its objects) -> caption. The first is canonical and
# always among the references; the others are drawn per image.
def _t_canonical(scene):
    parts = [f"a {o['size']} {o['colour']} {o['shape']} {_where(o['row'], o['col'])}" for o in scene["objects"]]
    return " and ".join(parts) + f" on a {scene['background']} background"


def _t_there_is(scene):
    parts = [f"{_article(p)} {p} {_where(o['row'], o['col'])}"
             for o in scene["objects"] for p in [_shape_phrase(o, 1)]]
    return "there is " + " and ".join(parts)


def _t_picture_of(scene):
    bg = _BACKGROUND_SYNONYMS[scene["background"]][1]
    parts = [f"{_article(p)} {p}" for o in scene["objects"] for p in [_shape_phrase(o, 2)]]
    return "a picture of " + " and ".join(parts) + f" against a {bg} backdrop"


def _t_image_showing(scene):
    parts = [f"{_article(p)} {p} {_where_alt(o['row'], o['col'])}"
             for o in scene["objects"] for p in [_shape_phrase(o, 0)]]
    return "an image showing " + " and ".join(parts)


def _t_colour_first(scene):
    parts = [f"{o['colour']} {_SHAPE_SYNONYMS[o['shape']][0]} placed {_where(o['row'], o['col'])}"
             for o in scene["objects"]]
    return " and ".join(parts) + f" with a {scene['background']} background"


def _t_sits(scene):
    o = scene["objects"][0]
    p = _shape_phrase(o, 1)
    rest = "".join(f" next to {_article(q)} {q}" for q in (_shape_phrase(x, 0) for x in scene["objects"][1:]))
    return f"{_article(p)} {p} sits {_where(o['row'], o['col'])} of a {scene['background']} scene" + rest


def _t_simple(scene):
    parts = [f"{o['colour']} {o['shape']}" for o in scene["objects"]]
    return "simple drawing of " + _article(parts[0]) + " " + " and ".join(parts)


def _t_we_see(scene):
    bg = _BACKGROUND_SYNONYMS[scene["background"]][2]
    parts = [f"one {_shape_phrase(o, 2)} {_where(o['row'], o['col'])}" for o in scene["objects"]]
    return "we can see " + " and ".join(parts) + f" over a {bg} field"


CAPTION_TEMPLATES: tuple[Callable[[dict], str], ...] = (
    _t_canonical, _t_there_is, _t_picture_of, _t_image_showing, _t_colour_first, _t_sits, _t_simple, _t_we_see)


def _questions(scene):
    o = scene["objects"][0]
    qa = [
        ("what color is the shape?" if len(scene["objects"]) == 1 else f"what color is the {o['shape']}?",
         o["colour"]),
        ("what shape is shown?" if len(scene["objects"]) == 1 else f"what shape is {o['colour']}?", o["shape"]),
        ("what color is the background?", scene["background"]),
        (f"is the {o['shape']} small or large?", o["size"]),
        (f"where is the {o['shape']}?", _where(o["row"], o["col"]).split(" ", 1)[1]),
        ("how many shapes are there?", ("one", "two", "three")[len(scene["objects"]) - 1]),
    ]
    return qa


def _draw(scene, size):
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene["background"]]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cell = size / 3.0
    for o in scene["objects"]:
        cy = (ROWS.index(o["row"]) + 0.5) * cell + o["jitter"][0] * cell * 0.15
        cx = (COLS.index(o["col"]) + 0.5) * cell + o["jitter"][1] * cell * 0.15
        r = cell * (0.22 if o["size"] == "small" else 0.45)
        dy, dx = yy - cy, xx - cx
        shape = o["shape"]
        if shape == "circle":
            mask = dy * dy + dx * dx <= r * r
        elif shape == "ring":
            d2 = dy * dy + dx * dx
            mask = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
        elif shape == "square":
            mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
        elif shape == "diamond":
            mask = np.abs(dy) + np.abs(dx) <= r
        elif shape == "cross":
            t = r * 0.35
            mask = ((np.abs(dy) <= t) & (np.abs(dx) <= r)) | ((np.abs(dx) <= t) & (np.abs(dy) <= r))
        else:  # triangle, apex up
            mask = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        img[mask] = COLOURS[o["colour"]]
    return img


def make_scene(rng: random.Random, max_objects=1):
    """A random scene description (attributes only); distinct objects occupy distinct grid cells."""
    n = rng.randint(1, max_objects)
    cells = rng.sample([(r, c) for r in ROWS for c in COLS], n)
    objects = []
    for row, col in cells:
        objects.append({"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                        "size": rng.choice(SIZES), "row": row, "col": col,
                        "jitter": (rng.uniform(-1, 1), rng.uniform(-1, 1))})
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def synthetic_dataset(n_images: int, seed: int = 0, *, image_size: int = 64, n_captions: int = 5,
                      max_objects: int = 1, split: str = "train") -> list[Sample]:
    """``n_images`` deterministic synthetic samples.

    Each has ``n_captions`` references (the canonical template first, then distinct
    others drawn at random), six QA pairs, and ``meta`` = the scene attributes.
    ``split`` only salts the seed, so e.g. ``split="eval"`` gives scenes drawn
    independently of ``split="train"`` with the same ``seed``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if not 1 <= n_captions <= len(CAPTION_TEMPLATES):
        raise ValueError(f"n_captions must be in [1, {len(CAPTION_TEMPLATES)}], got {n_captions}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be in [1, 3], got {max_objects}")
    rng = random.Random(f"prsl-synthetic/{split}/{seed}")
    samples = []
    for i in range(n_images):
        scene = make_scene(rng, max_objects)
        others = rng.sample(range(1, len(CAPTION_TEMPLATES)), n_captions - 1)
        captions = [CAPTION_TEMPLATES[j](scene) for j in [0, *others]]
        samples.append(Sample(id=f"synthetic-{split}-{seed}-{i:06d}", image=_draw(scene, image_size),
                              captions=captions, qa=_questions(scene), meta=scene))
    return samples


def synthetic_corpus(seed: int = 0) -> list[str]:
    """All the text the synthetic data can produce (for training a tokenizer that covers it)."""
    texts = []
    rng = random.Random(f"prsl-synthetic/corpus/{seed}")
    for _ in range(300):
        scene = make_scene(rng, 3)
        texts += [t(scene) for t in CAPTION_TEMPLATES]
        texts += [f"{q} {a}" for q, a in _questions(scene)]
    return texts


# --------------------------------------------------------------------------- file formats


def _read_json(path, what):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{what} file {path} is not valid JSON: {err}") from err


#: Sub-folders searched below a given image folder: Visual Genome ships its images in two.
IMAGE_SUBDIRS = ("VG_100K", "VG_100K_2")


class ImageDirs:
    """One or more image folders, searched in order for a file name.

    Visual Genome's ``<id>.jpg`` files are split over ``VG_100K`` and ``VG_100K_2``: give both,
    or their parent (its ``VG_100K*`` sub-folders are searched too). Each folder is listed once
    (one ``scandir`` instead of a ``stat`` per image on ~100k files).
    """

    def __init__(self, image_dirs):
        if image_dirs is None or isinstance(image_dirs, (str, os.PathLike)):
            image_dirs = [image_dirs] if image_dirs is not None else []
        dirs = []
        for d in image_dirs:
            d = Path(d)
            dirs.append(d)
            dirs += [d / sub for sub in IMAGE_SUBDIRS if (d / sub).is_dir()]
        if not dirs:
            raise DataError("no image folder given")
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise DataError(f"image folder(s) not found: {', '.join(missing)}")
        self.dirs = dirs
        self._listing = {}

    def _names(self, d):
        if d not in self._listing:
            with os.scandir(d) as it:
                self._listing[d] = {e.name for e in it}
        return self._listing[d]

    def find(self, name, what):
        if os.sep in name or (os.altsep and os.altsep in name):  # a relative path: no listing
            for d in self.dirs:
                if (d / name).is_file():
                    return str(d / name)
        else:
            for d in self.dirs:
                if name in self._names(d):
                    return str(d / name)
        where = str(self.dirs[0] / name) if len(self.dirs) == 1 else \
            f"{name} (searched {', '.join(map(str, self.dirs))})"
        raise DataError(f"{what}: image file {where} does not exist")


def load_coco_captions(annotation_file, image_dir, *, limit: int | None = None) -> list[Sample]:
    """COCO captions (``captions_train2017.json`` style) + its image folder (or a list of folders).

    Needs ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``).
    Images without any caption are skipped; a caption for an unknown image id is an error.
    """
    data = _read_json(annotation_file, "COCO annotation")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"COCO annotation file {annotation_file} needs top-level lists 'images' and 'annotations'")
    files = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"{annotation_file}: images[{i}] needs 'id' and 'file_name'")
        files[img["id"]] = img["file_name"]
    dirs = ImageDirs(image_dir)
    captions: dict = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DataError(f"{annotation_file}: annotations[{i}] needs 'image_id' and a string 'caption'")
        if ann["image_id"] not in files:
            raise DataError(f"{annotation_file}: annotations[{i}] refers to unknown image_id {ann['image_id']!r}")
        captions.setdefault(ann["image_id"], []).append(" ".join(ann["caption"].strip().split()))
    samples = []
    for image_id in sorted(captions, key=str):
        samples.append(Sample(id=f"coco-{image_id}", captions=captions[image_id],
                              image_path=dirs.find(files[image_id], str(annotation_file))))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise DataError(f"COCO annotation file {annotation_file} has no captioned images")
    return samples


def load_visual_genome_qa(qa_file, image_dir, *, limit: int | None = None) -> list[Sample]:
    """Visual Genome ``question_answers.json`` + its image folder(s) (``<image_id>.jpg``).

    ``image_dir``: a folder, a list of folders (``VG_100K VG_100K_2``), or their parent.

    The file is a list of ``{"id" or "image_id": int, "qas": [{"question", "answer", ...}]}``.
    Images without QA pairs are skipped.
    """
    data = _read_json(qa_file, "Visual Genome QA")
    if not isinstance(data, list):
        raise DataError(f"Visual Genome QA file {qa_file} must hold a JSON list of images")
    dirs = ImageDirs(image_dir)
    samples = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("qas"), list):
            raise DataError(f"{qa_file}: entry {i} needs a list 'qas'")
        image_id = entry.get("image_id", entry.get("id"))
        if image_id is None:
            raise DataError(f"{qa_file}: entry {i} needs 'id' or 'image_id'")
        qa = []
        for j, pair in enumerate(entry["qas"]):
            if not isinstance(pair, dict) or not isinstance(pair.get("question"), str) \
                    or not isinstance(pair.get("answer"), str):
                raise DataError(f"{qa_file}: entry {i} qas[{j}] needs string 'question' and 'answer'")
            qa.append((" ".join(pair["question"].split()), " ".join(pair["answer"].strip().rstrip(".").split())))
        if not qa:
            continue
        name = entry.get("file_name", f"{image_id}.jpg")
        samples.append(Sample(id=f"vg-{image_id}", qa=qa, image_path=dirs.find(name, str(qa_file))))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise DataError(f"Visual Genome QA file {qa_file} has no images with QA pairs")
    return samples


# --------------------------------------------------------------------------- examples


def caption_examples(samples: Sequence[Sample], *, all_references: bool = True) -> list[Example]:
    """One example per (image, reference caption); or only the first reference per image."""
    out = []
    for s in samples:
        if not s.captions:
            raise DataError(f"sample {s.id!r} has no captions (caption task)")
        for c in (s.captions if all_references else s.captions[:1]):
            out.append(Example(s, "", c))
    return out


_VQA_PREFIX, _VQA_SUFFIX = "Question: ", " Answer:"


def vqa_prompt(question: str) -> str:
    """The prompt format of BLIP-2 VQA fine-tuning."""
    return f"{_VQA_PREFIX}{question}{_VQA_SUFFIX}"


def vqa_question(prompt: str) -> str | None:
    """The question of a :func:`vqa_prompt` (None for any other prompt), for models whose own
    question format differs (PaliGemma's ``answer en <question>``)."""
    if prompt.startswith(_VQA_PREFIX) and prompt.endswith(_VQA_SUFFIX):
        return prompt[len(_VQA_PREFIX):len(prompt) - len(_VQA_SUFFIX)]
    return None


def vqa_examples(samples: Sequence[Sample], *, max_per_image: int | None = None) -> list[Example]:
    """One example per (image, question); the target is the answer."""
    out = []
    for s in samples:
        if not s.qa:
            raise DataError(f"sample {s.id!r} has no question-answer pairs (vqa task)")
        for q, a in s.qa[:max_per_image]:
            out.append(Example(s, vqa_prompt(q), a))
    return out


def references(example_or_sample, task: str) -> list[str]:
    """Reference texts for scoring an output: all captions, or all answers to the example's question."""
    if isinstance(example_or_sample, Example):
        if task == "vqa":
            q = example_or_sample.prompt
            return [a for qq, a in example_or_sample.sample.qa if vqa_prompt(qq) == q] or [example_or_sample.target]
        return list(example_or_sample.sample.captions)
    s = example_or_sample
    return list(s.captions) if task == "caption" else [a for _, a in s.qa]


def normalize_text(text: str) -> str:
    """Lower-case, single spaces, no trailing punctuation: the exact-match comparison form."""
    return " ".join(text.lower().strip().rstrip(".?!").split())


# --------------------------------------------------------------------------- one entry point


def load_samples(data: str, *, split: str = "train", task: str = "caption", seed: int = 0,
                 n_images: int = 1000, image_size: int = 64, n_captions: int = 5, max_objects: int = 1,
                 image_dir=None, limit: int | None = None) -> list[Sample]:
    """``data`` = ``"synthetic"``, a COCO annotation JSON, or a Visual Genome question_answers.json.

    For files, ``image_dir`` (a folder or a list of folders, searched in order) defaults to the
    file's folder; the format is chosen by ``task``
    (caption -> COCO, vqa -> Visual Genome) and checked by content.
    """
    if data == "synthetic":
        return synthetic_dataset(n_images, seed, image_size=image_size, n_captions=n_captions,
                                 max_objects=max_objects, split=split)
    if not os.path.exists(data):
        raise DataError(f"--data must be 'synthetic' or an existing annotation file, got {data!r}")
    image_dir = image_dir or [str(Path(data).parent)]
    if task == "caption":
        return load_coco_captions(data, image_dir, limit=limit)
    if task == "vqa":
        return load_visual_genome_qa(data, image_dir, limit=limit)
    raise ValueError(f"task must be 'caption' or 'vqa', got {task!r}")
