"""Synthetic scenes and the COCO / Visual Genome loaders (prsl_kernels/drivers/data.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from prsl_kernels.drivers import data


def test_synthetic_is_deterministic_by_seed_and_split():
    a = data.synthetic_dataset(20, seed=3)
    b = data.synthetic_dataset(20, seed=3)
    assert [s.captions for s in a] == [s.captions for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    other_seed = data.synthetic_dataset(20, seed=4)
    other_split = data.synthetic_dataset(20, seed=3, split="eval")
    assert [s.captions for s in a] != [s.captions for s in other_seed]
    assert [s.captions for s in a] != [s.captions for s in other_split]
    assert len({s.id for s in a + other_seed + other_split}) == 60


def test_synthetic_images_show_their_scene():
    for s in data.synthetic_dataset(30, seed=1, max_objects=2):
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        pixels = s.image.reshape(-1, 3)
        bg = np.array(data.BACKGROUNDS[s.meta["background"]])
        assert (pixels == bg).all(1).mean() > 0.4, "background should cover most of the image"
        for obj in s.meta["objects"]:
            colour = np.array(data.COLOURS[obj["colour"]])
            assert (pixels == colour).all(1).sum() >= 10, f"{obj} not drawn in {s.id}"


def test_captions_vary_and_name_the_scene():
    samples = data.synthetic_dataset(50, seed=0, n_captions=5)
    for s in samples:
        assert len(s.captions) == 5 and len(set(s.captions)) == 5, s.captions
        obj = s.meta["objects"][0]
        canonical = s.captions[0]
        assert canonical.startswith(f"a {obj['size']} {obj['colour']} {obj['shape']}")
        assert canonical.endswith(f"on a {s.meta['background']} background")
        assert all(obj["colour"] in c for c in s.captions)
    words = {w for s in samples for c in s.captions for w in c.split()}
    assert len(words) >= 60, "the language must be rich enough for top-k windows up to 100 tokens"


def test_qa_pairs_match_the_scene():
    for s in data.synthetic_dataset(20, seed=2):
        qa = dict(s.qa)
        obj = s.meta["objects"][0]
        assert qa["what color is the shape?"] == obj["colour"]
        assert qa["what shape is shown?"] == obj["shape"]
        assert qa["what color is the background?"] == s.meta["background"]
        assert qa[f"is the {obj['shape']} small or large?"] == obj["size"]


def test_examples_and_references():
    samples = data.synthetic_dataset(4, seed=0, n_captions=3)
    caps = data.caption_examples(samples)
    assert len(caps) == 12 and all(e.prompt == "" for e in caps)
    assert len(data.caption_examples(samples, all_references=False)) == 4
    assert data.references(caps[1], "caption") == samples[0].captions
    qas = data.vqa_examples(samples)
    assert len(qas) == 4 * len(samples[0].qa)
    assert qas[0].prompt == data.vqa_prompt(samples[0].qa[0][0]) and qas[0].target == samples[0].qa[0][1]
    assert data.references(qas[0], "vqa") == [samples[0].qa[0][1]]
    assert data.normalize_text("  A Red  circle. ") == "a red circle"


def test_bad_synthetic_arguments():
    with pytest.raises(ValueError, match="n_images"):
        data.synthetic_dataset(0)
    with pytest.raises(ValueError, match="n_captions"):
        data.synthetic_dataset(3, n_captions=99)


# --------------------------------------------------------------------------- file formats


def _write_png(path, colour):
    from PIL import Image

    Image.fromarray(np.full((16, 20, 3), colour, dtype=np.uint8)).save(path)


@pytest.fixture
def coco_files(tmp_path):
    _write_png(tmp_path / "000001.png", (200, 10, 10))
    _write_png(tmp_path / "000002.png", (10, 200, 10))
    ann = {"images": [{"id": 1, "file_name": "000001.png"}, {"id": 2, "file_name": "000002.png"},
                      {"id": 3, "file_name": "unused.png"}],
           "annotations": [{"image_id": 1, "id": 10, "caption": "A red  square."},
                           {"image_id": 2, "id": 11, "caption": "a green square"},
                           {"image_id": 1, "id": 12, "caption": "red block on its own"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(ann))
    return path


def test_coco_loader(coco_files):
    samples = data.load_coco_captions(coco_files, coco_files.parent)
    assert [s.id for s in samples] == ["coco-1", "coco-2"]  # image 3 has no caption
    assert samples[0].captions == ["A red square.", "red block on its own"]
    img = np.asarray(samples[1].load_image())
    assert img.shape == (16, 20, 3) and tuple(img[0, 0]) == (10, 200, 10)
    assert data.load_samples(str(coco_files), task="caption")[0].captions == samples[0].captions


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "'images' and 'annotations'"),
    (json.dumps({"images": [{"id": 1}], "annotations": []}), "file_name"),
    (json.dumps({"images": [{"id": 1, "file_name": "000001.png"}],
                 "annotations": [{"image_id": 7, "caption": "x"}]}), "unknown image_id"),
    (json.dumps({"images": [{"id": 1, "file_name": "000001.png"}],
                 "annotations": [{"image_id": 1, "caption": 5}]}), "string 'caption'"),
    (json.dumps({"images": [{"id": 1, "file_name": "missing.png"}],
                 "annotations": [{"image_id": 1, "caption": "x"}]}), "does not exist"),
])
def test_coco_malformed(coco_files, content, message):
    bad = coco_files.parent / "bad.json"
    bad.write_text(content)
    with pytest.raises(data.DataError, match=message) as err:
        data.load_coco_captions(bad, coco_files.parent)
    assert "bad.json" in str(err.value) or "missing.png" in str(err.value)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_coco_captions(tmp_path / "nope.json", tmp_path)
    with pytest.raises(data.DataError, match="'synthetic' or an existing annotation file"):
        data.load_samples(str(tmp_path / "nope.json"))


@pytest.fixture
def vg_files(tmp_path):
    _write_png(tmp_path / "5.jpg", (0, 0, 255))
    _write_png(tmp_path / "6.jpg", (255, 255, 0))
    qa = [{"id": 5, "qas": [{"question": "What colour is the  wall?", "answer": "Blue.", "qa_id": 1},
                            {"question": "Is it day?", "answer": "yes", "qa_id": 2}]},
          {"id": 6, "qas": [{"question": "What is shown?", "answer": "a yellow wall"}]},
          {"id": 7, "qas": []}]
    path = tmp_path / "question_answers.json"
    path.write_text(json.dumps(qa))
    return path


def test_visual_genome_loader(vg_files):
    samples = data.load_visual_genome_qa(vg_files, vg_files.parent)
    assert [s.id for s in samples] == ["vg-5", "vg-6"]
    assert samples[0].qa == [("What colour is the wall?", "Blue"), ("Is it day?", "yes")]
    assert tuple(np.asarray(samples[1].load_image())[3, 3]) == (255, 255, 0)
    ex = data.vqa_examples(samples)
    assert [e.target for e in ex] == ["Blue", "yes", "a yellow wall"]
    assert data.load_samples(str(vg_files), task="vqa", limit=1)[0].id == "vg-5"


@pytest.mark.parametrize("content, message", [
    (json.dumps({"id": 5}), "JSON list"),
    (json.dumps([{"id": 5}]), "list 'qas'"),
    (json.dumps([{"qas": []}]), "'id' or 'image_id'"),
    (json.dumps([{"id": 5, "qas": [{"question": "q"}]}]), "string 'question' and 'answer'"),
    (json.dumps([{"id": 99, "qas": [{"question": "q", "answer": "a"}]}]), "does not exist"),
    (json.dumps([{"id": 5, "qas": []}]), "no images with QA pairs"),
])
def test_visual_genome_malformed(vg_files, content, message):
    bad = vg_files.parent / "bad_qa.json"
    bad.write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_visual_genome_qa(bad, vg_files.parent)


def test_visual_genome_two_image_folders(tmp_path):
    """VG ships VG_100K and VG_100K_2; both given, or their parent, find every image."""
    root = tmp_path / "vg"
    (root / "VG_100K").mkdir(parents=True)
    (root / "VG_100K_2").mkdir()
    _write_png(root / "VG_100K" / "1.jpg", (1, 2, 3))
    _write_png(root / "VG_100K_2" / "2.jpg", (4, 5, 6))
    qa = root / "question_answers.json"
    qa.write_text(json.dumps([{"id": i, "qas": [{"question": "q?", "answer": "a"}]} for i in (1, 2)]))
    for dirs in ([str(root / "VG_100K"), str(root / "VG_100K_2")], str(root)):
        samples = data.load_samples(str(qa), task="vqa", image_dir=dirs)
        assert [Path(s.image_path).parent.name for s in samples] == ["VG_100K", "VG_100K_2"]
        assert all(np.asarray(s.load_image()).shape == (16, 20, 3) for s in samples)
    with pytest.raises(data.DataError, match="VG_100K.*does not exist") as err:
        data.load_visual_genome_qa(qa, [root / "VG_100K"])
    assert "2.jpg" in str(err.value)
    with pytest.raises(data.DataError, match="not found"):
        data.load_visual_genome_qa(qa, [root / "VG_100K", root / "nope"])
