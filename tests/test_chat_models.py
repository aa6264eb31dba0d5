"""The drivers on local image-text-to-text checkpoints: tiny random LLaVA and Qwen2-VL
folders saved with their processors by the test (nothing downloaded) are fine-tuned (all weights,
and LoRA) and attacked with BIM, PGD and APGD; the chat prompt, the label mask, the decoding of
new tokens and Qwen's patch layout."""

import json

import numpy as np
import pytest
import torch

import tiny_models
from prsl_kernels.drivers import chat_models, checkpoints, data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


FOLDERS = {"llava": (tiny_models.save_llava_folder, 32), "qwen2_vl": (tiny_models.save_qwen2_vl_folder, 16),
           "qwen2_5_vl": (tiny_models.save_qwen2_5_vl_folder, 16), "paligemma": (tiny_models.save_paligemma_folder, 16),
           "gemma3": (tiny_models.save_gemma3_folder, 16), "idefics3": (tiny_models.save_idefics3_folder, 16),
           "smolvlm": (tiny_models.save_smolvlm_folder, 16), "llava_next": (tiny_models.save_llava_next_folder, 32)}


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def folder(request, tmp_path_factory):
    """(family, checkpoint folder, the side its images are resized to)."""
    save, side = FOLDERS[request.param]
    texts = [c for s in data.synthetic_dataset(40, seed=1, image_size=32) for c in s.captions]
    return request.param, save(tmp_path_factory.mktemp("ckpt") / request.param, texts), side


def test_folder_loads_as_a_chat_bundle(folder):
    family, path, side = folder
    bundle = checkpoints.load_bundle(path)
    assert isinstance(bundle, chat_models.ChatBundle) and bundle.kind == chat_models.CHAT and bundle.shift_labels
    assert bundle.family is chat_models.FAMILIES[chat_models.family_of(family)]
    assert checkpoints.checkpoint_task(path) is None  # no run info, no architecture default: --task says
    target = "a red circle on the left"
    text = bundle.text_inputs(["", "Question: what colour is it? Answer:"], [target, "red"])
    labels, ids = text["labels"], text["input_ids"]
    config = bundle.model.config
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    for row in range(2):
        counted = labels[row] != -100
        # Only the answer and eos are labels: never the prompt, an image token or padding.
        assert not (ids[row][counted] == image_token).any()
        want = bundle.tokenizer(target if row == 0 else "red", add_special_tokens=False)["input_ids"]
        assert labels[row][counted].tolist() == want + [bundle.tokenizer.eos_token_id]
        # LLaVA: 32 px / 16 px patches, CLS dropped; Qwen2-VL: 16 px / 4 px patches merged 2 x 2;
        # PaliGemma: 16 px / 8 px patches; Gemma 3: 16 px / 4 px patches pooled to 2 x 2;
        # Idefics3 / SmolVLM: one 16 px tile of 4 px patches, pixel-shuffled by 2.
        if family == "llava_next":  # a 2 x 2 base view, 2 x 2 tiles of 2 x 2 unpadded, a newline per row
            assert (ids[row] == image_token).sum() == 4 + 16 + 4
        else:
            assert (ids[row] == image_token).sum() == 4
        token_types = bundle.family.token_types
        if token_types is not None:  # the model's token types: on image tokens, or on the target
            name, where = token_types
            want_types = ids[row] == image_token if where == "image" else counted
            assert torch.equal(text[name][row].bool(), want_types)
    # Generation: left-padded prompts, and only the new tokens come back.
    pixels = bundle.pixel_values([s.image for s in data.synthetic_dataset(2, seed=3, image_size=32)])
    assert pixels.shape == (2, 3, side, side)
    outs = bundle.generate(pixels, ["", ""], max_new_tokens=3)
    assert len(outs) == 2 and all("ASSISTANT" not in o and "Describe" not in o for o in outs)


def test_qwen_patch_layout_is_the_processors():
    """The attacks work on (B, 3, S, S) images; patchified here for Qwen2-VL, they are bit for bit
    what Qwen's image processor makes of the same resized images."""
    from PIL import Image

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(min_pixels=64 ** 2, max_pixels=64 ** 2, patch_size=8, merge_size=2,
                                  temporal_patch_size=2)
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    want = ip(images=images, return_tensors="pt")
    layout = chat_models.QwenPatches
    x = layout.unpatchify(want["pixel_values"], 3, 64, 8, 2, 2)
    assert x.shape == (3, 3, 64, 64)
    assert torch.equal(layout.patchify(x, 8, 2, 2), want["pixel_values"])
    # Channel 0 of image 0 is the processor's normalised red channel of that image.
    red = (torch.tensor(np.asarray(images[0]))[..., 0].float() / 255 - ip.image_mean[0]) / ip.image_std[0]
    torch.testing.assert_close(x[0, 0], red, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [0, 4])
def test_finetune_then_attack_with_each_attack(folder, tmp_path, lora):
    from prsl_kernels.drivers import finetune
    from prsl_kernels.drivers.attack import main as attack

    _, path, _ = folder
    cfg = finetune.FinetuneConfig(output_dir=str(tmp_path / "ft"), model=str(path), train_images=12,
                                  eval_images=4, eval_samples=2, batch_size=4, max_steps=3, lr=0.01,
                                  logging_steps=1, progress=False, max_new_tokens=3, loss="prsl", k=5, b=1.0,
                                  lora=lora)
    finetune.validate_config(cfg)
    out = finetune.train(cfg)
    log = [json.loads(line) for line in (out / finetune.LOG_FILE).read_text().splitlines()]
    trained = [r for r in log if "ce" in r and "penalty" in r]
    assert len(trained) == 3 and all(r["penalty"] > 0 for r in trained)  # PRSL through the fused patch
    if lora:
        assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
        merged = checkpoints.load_bundle(out).model
        base = checkpoints.load_bundle(path).model
        # The adapter changed the attention projections, never the (frozen) LM head.
        assert torch.equal(merged.get_output_embeddings().weight, base.get_output_embeddings().weight)
        assert not torch.equal(merged.get_decoder().layers[0].self_attn.q_proj.weight,
                               base.get_decoder().layers[0].self_attn.q_proj.weight)
    for attack_name in ("bim", "pgd", "apgd"):
        adv = tmp_path / f"attack-{attack_name}"
        attack(["--model", str(out), "--num-samples", "2", "--rounds", "1", "--attack", attack_name, "--steps", "2",
                "--metrics", "exact_match", "--max-new-tokens", "3", "--batch-size", "2", "--output-dir", str(adv),
                "--no-progress"])
        lines = (adv / "ft" / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 2 * 2 and "exact_match" in json.loads(lines[-1])["scores"]["reference"]
        assert (adv / "report.md").is_file()
        if attack_name != "bim":  # pixel space (the eps-ball itself: test_attack.py): valid images
            x = torch.load(adv / "ft" / "state.pt", weights_only=True)["x"]
            assert (x >= 0).all() and (x <= 1).all()


def test_idefics3_prompt_written_without_the_processor_is_the_processors(tmp_path):
    """SmolVLM's processor cannot be built without torchvision, so its prompt's image tokens are
    written by the adapter: the same ids as Idefics3's processor writes for one unsplit image."""
    path = tiny_models.save_idefics3_folder(tmp_path / "idefics3", ["a red circle"])
    with_processor = checkpoints.load_bundle(path)
    without = checkpoints.load_bundle(path)
    without.processor = chat_models._TokenizerAndImages(path)
    assert with_processor._prompt_ids("Describe it.") == without._prompt_ids("Describe it.")


def test_llava_next_layout_is_the_processors(tmp_path):
    """The anyres layout of a square image: the tiles are exactly the processor's; the base view is
    torch's antialiased bicubic of the image, PIL's within rounding (here measured, not assumed)."""
    path = tiny_models.save_llava_next_folder(tmp_path / "next", ["a red circle"])
    bundle = checkpoints.load_bundle(path)
    g = np.random.default_rng(1)
    images = [g.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    want = bundle.image_processor(images=images, return_tensors="pt")
    got = bundle.image_inputs(bundle.pixel_values(images))
    assert got["pixel_values"].shape == want["pixel_values"].shape == (2, 5, 3, 16, 16)
    assert torch.equal(got["pixel_values"][:, 1:], want["pixel_values"][:, 1:])
    assert torch.equal(got["image_sizes"], want["image_sizes"])
    # Normalised units (CLIP's std ~0.27, so one grey level of 255 is ~0.014): PIL rounds its resize
    # to uint8 and treats the borders its own way. Measured: mean 0.004, max 0.014 (one level).
    base_err = (got["pixel_values"][:, 0] - want["pixel_values"][:, 0]).abs()
    assert base_err.mean() < 0.01 and base_err.max() < 0.05, (base_err.mean(), base_err.max())


def test_paligemma_prompts_are_its_own_prefixes(tmp_path):
    """PaliGemma has no chat template: captioning is "caption en", VQA "answer en <question>"."""
    path = tiny_models.save_paligemma_folder(tmp_path / "pg", ["a red circle", "answer en what colour"])
    bundle = checkpoints.load_bundle(path)
    tok = bundle.tokenizer

    def text_of(prompt):
        ids = bundle._prompt_ids(prompt)
        return tok.decode([i for i in ids if i != bundle.model.config.image_token_index], skip_special_tokens=True)

    assert text_of("").strip() == "caption en"
    assert text_of(data.vqa_prompt("what colour is it?")).strip() == "answer en what colour is it?"
