"""The drivers on a local image-text-to-text checkpoint (issue 17): a tiny random LLaVA folder saved
with its processor by the test (nothing downloaded) is fine-tuned (all weights, and LoRA) and
attacked with BIM, PGD and APGD; the chat prompt, the label mask and the decoding of new tokens."""

import json

import pytest
import torch

import tiny_models
from prsl_kernels.drivers import chat_models, data, models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    texts = [c for s in data.synthetic_dataset(40, seed=1, image_size=32) for c in s.captions]
    return tiny_models.save_llava_folder(tmp_path_factory.mktemp("ckpt") / "llava", texts)


def test_llava_folder_loads_as_a_chat_bundle(llava_dir):
    bundle = models.load_bundle(llava_dir)
    assert isinstance(bundle, chat_models.ChatBundle) and bundle.kind == chat_models.CHAT and bundle.shift_labels
    assert models.checkpoint_task(llava_dir) is None  # no run info, no architecture default: --task says
    target = "a red circle on the left"
    text = bundle.text_inputs(["", "Question: what colour is it? Answer:"], [target, "red"])
    labels, ids = text["labels"], text["input_ids"]
    image_token = bundle.model.config.image_token_index
    for row in range(2):
        counted = labels[row] != -100
        # Only the answer and eos are labels: never the prompt, an image token or padding.
        assert not (ids[row][counted] == image_token).any()
        want = bundle.tokenizer(target if row == 0 else "red", add_special_tokens=False)["input_ids"]
        assert labels[row][counted].tolist() == want + [bundle.tokenizer.eos_token_id]
        assert (ids[row] == image_token).sum() == 4  # 32 px / 16 px patches, CLS dropped
    # Generation: left-padded prompts, and only the new tokens come back.
    pixels = bundle.pixel_values([s.image for s in data.synthetic_dataset(2, seed=3, image_size=32)])
    assert pixels.shape == (2, 3, 32, 32)
    outs = bundle.generate(pixels, ["", ""], max_new_tokens=3)
    assert len(outs) == 2 and all("ASSISTANT" not in o and "Describe" not in o for o in outs)


@pytest.mark.parametrize("lora", [0, 4])
def test_finetune_then_attack_with_each_attack(llava_dir, tmp_path, lora):
    from prsl_kernels.drivers import finetune
    from prsl_kernels.drivers.attack import main as attack

    cfg = finetune.FinetuneConfig(output_dir=str(tmp_path / "ft"), model=str(llava_dir), train_images=12,
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
        merged = models.load_bundle(out).model
        base = models.load_bundle(llava_dir).model
        # The adapter changed the attention projections, never the (frozen) LM head.
        assert torch.equal(merged.get_output_embeddings().weight, base.get_output_embeddings().weight)
        assert not torch.equal(merged.model.language_model.layers[0].self_attn.q_proj.weight,
                               base.model.language_model.layers[0].self_attn.q_proj.weight)
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
