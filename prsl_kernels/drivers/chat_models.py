"""Image-text-to-text checkpoints in the drivers: one small adapter per model family.

A local folder that transformers' ``AutoModelForImageTextToText`` and ``AutoProcessor`` load
becomes a :class:`ChatBundle`, the drivers' :class:`models.ModelBundle` for chat VLMs:

* the prompt is the processor's chat template around one image and the instruction (the
  family's captioning instruction, or the VQA question), with the generation prompt appended
  (PaliGemma, which has no template: the instruction after the image tokens);
* a training row is ``prompt + target + eos``; the labels are ``-100`` on the prompt (image
  tokens included) and on padding, and the logits are causal (shifted, as HF's own loss);
* generation decodes only the new tokens.

What differs between families is one :class:`Family` entry of :data:`FAMILIES` (adding a family is
adding an entry): its captioning instruction, its LoRA target modules, the token types its
model reads, and its image layout (:class:`ImageLayout`: the attacks work on ``(B, 3, H, W)``
normalised images, which the layout turns into the model's image arguments, differentiably, so
the pixel-space perturbation applies to the image before the processor's normalisation as for
ViT-GPT2 and BLIP-2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .models import ModelBundle, pad_rows

CHAT = "chat-vlm"


class ImageLayout:
    """How a family's processor lays out an image: ``(B, 3, H, W)`` normalised pixels (the
    attacks' space) to the model's image arguments, and the image tokens of one image. This base
    is the plain layout (LLaVA): the model takes the pixels as they are, and the processor
    expands the prompt's image token itself."""

    def images(self, bundle, images) -> torch.Tensor:
        return bundle.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def model_inputs(self, bundle, pixels: torch.Tensor) -> dict:
        return {"pixel_values": pixels}

    def prompt_ids(self, bundle, text: str) -> list[int]:
        size = bundle.image_processor.crop_size if getattr(bundle.image_processor, "crop_size", None) else \
            bundle.image_processor.size
        height, width = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
        blank = np.zeros((height, width, 3), dtype=np.uint8)  # only the number of image tokens is used
        # The tokenizer's own special tokens (e.g. Llama's BOS), as the processor adds them at inference.
        return bundle.processor(text=[text], images=[blank])["input_ids"][0]


class QwenPatches(ImageLayout):
    """Qwen2-VL / Qwen2.5-VL: the processor resizes each image to a multiple of ``patch * merge``
    and flattens it into ``(grid_h * grid_w, C * temporal * patch * patch)`` patches. The drivers
    resize every image to one square side (the processor's largest area), so a batch is one
    ``(B, 3, S, S)`` tensor, and patchify it here, differentiably, for the model: the pixel-space
    attacks perturb the image, not the patches. ``patchify(unpatchify(p)) == p`` is tested against
    the processor's own output."""

    def _geometry(self, bundle):
        ip = bundle.image_processor
        factor = ip.patch_size * ip.merge_size
        size = ip.size
        # SizeDict (transformers 5) or a dict: longest_edge is the largest area, in pixels.
        max_pixels = size["longest_edge"] if isinstance(size, dict) else size.longest_edge
        side = max(factor, int(max_pixels ** 0.5) // factor * factor)
        return ip.patch_size, ip.merge_size, ip.temporal_patch_size, side

    def images(self, bundle, images) -> torch.Tensor:
        from PIL import Image

        patch, merge, temporal, side = self._geometry(bundle)
        square = [Image.fromarray(np.asarray(im)).convert("RGB").resize((side, side), Image.BICUBIC) for im in images]
        out = bundle.image_processor(images=square, return_tensors="pt")
        return self.unpatchify(out["pixel_values"], len(square), side, patch, merge, temporal)

    @staticmethod
    def unpatchify(flat, batch, side, patch, merge, temporal):
        grid = side // patch
        x = flat.reshape(batch, grid // merge, grid // merge, merge, merge, 3, temporal, patch, patch)[..., 0, :, :]
        # (B, gh/m, gw/m, m, m, C, P, P) -> (B, C, gh/m, m, P, gw/m, m, P)
        return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(batch, 3, side, side)

    @staticmethod
    def patchify(x, patch, merge, temporal):
        batch, channels, height, width = x.shape
        gh, gw = height // patch, width // patch
        t = x.reshape(batch, channels, gh // merge, merge, patch, gw // merge, merge, patch)
        t = t.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, P, P)
        t = t.unsqueeze(6).expand(*t.shape[:6], temporal, patch, patch)  # a still image: every frame alike
        return t.reshape(batch * gh * gw, channels * temporal * patch * patch)

    def model_inputs(self, bundle, pixels: torch.Tensor) -> dict:
        patch, merge, temporal, _ = self._geometry(bundle)
        grid = torch.tensor([[1, pixels.shape[2] // patch, pixels.shape[3] // patch]] * pixels.shape[0],
                            device=pixels.device)
        return {"pixel_values": self.patchify(pixels, patch, merge, temporal), "image_grid_thw": grid}

    def prompt_ids(self, bundle, text: str) -> list[int]:
        patch, merge, _, side = self._geometry(bundle)
        n = (side // patch) ** 2 // merge ** 2
        pad = bundle.model.config.image_token_id
        ids = bundle.tokenizer(text)["input_ids"]
        at = ids.index(pad)
        return ids[:at] + [pad] * n + ids[at + 1:]


class SingleTile(ImageLayout):
    """Idefics3 / SmolVLM: the processor splits large images into tiles plus a global image; the
    drivers switch the splitting off and resize every image to the processor's largest tile side
    ``S``, so each image is one ``S x S`` tile, ``(B, 1, 3, S, S)`` with an all-valid
    ``pixel_attention_mask`` (the model's view of a batch of single square images)."""

    @staticmethod
    def _side(bundle):
        size = bundle.image_processor.max_image_size
        return size["longest_edge"] if isinstance(size, dict) else size.longest_edge

    def images(self, bundle, images) -> torch.Tensor:
        from PIL import Image

        side = self._side(bundle)
        square = [[Image.fromarray(np.asarray(im)).convert("RGB").resize((side, side), Image.BICUBIC)]
                  for im in images]
        out = bundle.image_processor(images=square, do_image_splitting=False, return_tensors="pt")
        return out["pixel_values"][:, 0]

    def model_inputs(self, bundle, pixels: torch.Tensor) -> dict:
        mask = torch.ones((pixels.shape[0], 1, *pixels.shape[2:]), dtype=torch.bool, device=pixels.device)
        return {"pixel_values": pixels[:, None], "pixel_attention_mask": mask}

    def prompt_ids(self, bundle, text: str) -> list[int]:
        if isinstance(bundle.processor, _TokenizerAndImages):  # SmolVLM's processor needs torchvision
            return bundle.tokenizer(text.replace("<image>", self.image_string(bundle)))["input_ids"]
        side = self._side(bundle)
        blank = np.zeros((side, side, 3), dtype=np.uint8)
        return bundle.processor(text=[text], images=[[blank]], do_image_splitting=False)["input_ids"][0]

    def image_string(self, bundle) -> str:
        """What Idefics3's processor writes for one unsplit image (tested against it)."""
        config = bundle.model.config
        patch = config.vision_config.patch_size
        n = (self._side(bundle) // patch) ** 2 // config.scale_factor ** 2
        return "<fake_token_around_image><global-img>" + "<image>" * n + "<fake_token_around_image>"


class AnyRes(ImageLayout):
    """LLaVA-NeXT's "anyres": a base view of the whole image plus the tiles of the image resized
    to the best grid point. The drivers resize every image to the largest *square* grid point
    ``F x F``, so the tiles are exact ``S x S`` crops of it (``S``: the processor's crop size), and
    the base view is the image downsampled to ``S`` (here, differentiably, by torch's antialiased
    bicubic, which follows PIL's kernel: within rounding of the processor's own base view; exact
    when ``F == S``). ``image_sizes`` is ``(F, F)``."""

    @staticmethod
    def _geometry(bundle):
        ip = bundle.image_processor
        side = ip.crop_size["height"] if isinstance(ip.crop_size, dict) else ip.crop_size.height
        squares = [h for h, w in ip.image_grid_pinpoints if h == w and h % side == 0]
        if not squares:
            raise NotImplementedError("LLaVA-NeXT layout: the processor has no square grid point; the drivers "
                                      "resize images to one")
        return side, max(squares)

    def images(self, bundle, images) -> torch.Tensor:
        from PIL import Image

        side, full = self._geometry(bundle)
        square = [Image.fromarray(np.asarray(im)).convert("RGB").resize((full, full), Image.BICUBIC) for im in images]
        tiles = bundle.image_processor(images=square, return_tensors="pt")["pixel_values"][:, 1:]
        n = full // side
        # (B, n*n, 3, S, S) row-major tiles -> (B, 3, F, F)
        x = tiles.reshape(len(square), n, n, 3, side, side).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(len(square), 3, full, full)

    def model_inputs(self, bundle, pixels: torch.Tensor) -> dict:
        side, full = self._geometry(bundle)
        batch, n = pixels.shape[0], full // side
        tiles = pixels.reshape(batch, 3, n, side, n, side).permute(0, 2, 4, 1, 3, 5).reshape(batch, n * n, 3, side,
                                                                                             side)
        base = pixels if full == side else torch.nn.functional.interpolate(
            pixels, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        sizes = torch.tensor([[full, full]] * batch, device=pixels.device)
        return {"pixel_values": torch.cat([base[:, None], tiles], 1), "image_sizes": sizes}

    def prompt_ids(self, bundle, text: str) -> list[int]:
        _, full = self._geometry(bundle)
        blank = np.zeros((full, full, 3), dtype=np.uint8)
        return bundle.processor(text=[text], images=[blank])["input_ids"][0]


@dataclass(frozen=True)
class Family:
    """How the drivers use one family of image-text-to-text checkpoints."""
    model_types: tuple[str, ...]
    caption_instruction: str = "Describe the image in one sentence."
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    layout: ImageLayout = ImageLayout()
    # The processor's chat template around the prompt; False: the prompt as it is (PaliGemma's
    # "caption en" / question prefixes), after the image token the processor expands.
    chat: bool = True
    # The model's own VQA prompt around the question (None: the drivers' "Question: ... Answer:").
    question_format: str | None = None
    # Token-type ids the model reads: (input name, "image" on image tokens | "suffix" on the target).
    # Qwen-VL's M-RoPE positions need the image ones; PaliGemma's prefix-LM mask the suffix ones.
    token_types: tuple[str, str] | None = None


FAMILIES = {
    "llava": Family(model_types=("llava",)),
    "llava_next": Family(model_types=("llava_next",), layout=AnyRes()),
    "qwen2_vl": Family(model_types=("qwen2_vl", "qwen2_5_vl"), layout=QwenPatches(),
                       token_types=("mm_token_type_ids", "image")),
    "paligemma": Family(model_types=("paligemma",), caption_instruction="caption en", chat=False,
                        question_format="answer en {question}", token_types=("token_type_ids", "suffix")),
    "idefics3": Family(model_types=("idefics3", "smolvlm"), layout=SingleTile()),
    # Gemma 3: image tokens attend to each other bidirectionally, marked by their token types.
    "gemma3": Family(model_types=("gemma3",), token_types=("token_type_ids", "image")),
}
MODEL_TYPES = {t: name for name, fam in FAMILIES.items() for t in fam.model_types}


def family_of(model_type: str) -> str | None:
    return MODEL_TYPES.get(model_type)


class ChatBundle(ModelBundle):
    """A chat VLM with its processor (see the module docstring)."""

    def __init__(self, model, processor, family: str, max_target_tokens: int | None = None):
        self.processor, self.family = processor, FAMILIES[family]
        self._prompts = {}  # prompt -> ids: the processor runs once per distinct prompt, not per row
        super().__init__(model, processor.tokenizer, processor.image_processor, CHAT,
                         max_target_tokens if max_target_tokens is not None else 48)

    @property
    def shift_labels(self) -> bool:
        return True

    def _prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the chat prompt for one image and ``prompt`` (the captioning instruction
        when empty), the image tokens expanded as the processor expands them for a real image."""
        if prompt not in self._prompts:
            self._prompts[prompt] = self._make_prompt_ids(prompt)
        return list(self._prompts[prompt])

    def _make_prompt_ids(self, prompt: str) -> list[int]:
        from .data import vqa_question

        instruction = prompt or self.family.caption_instruction
        question = vqa_question(instruction) if self.family.question_format else None
        if question is not None:
            instruction = self.family.question_format.format(question=question)
        if self.family.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = self.processor.image_token + instruction  # one image token: the processor expands it
        return list(self.family.layout.prompt_ids(self, text))

    def pixel_values(self, images) -> torch.Tensor:
        return self.family.layout.images(self, images)

    def image_inputs(self, pixels: torch.Tensor) -> dict:
        return self.family.layout.model_inputs(self, pixels)

    def text_inputs(self, prompts: Sequence[str], targets: Sequence[str] | None) -> dict:
        eos = self.tokenizer.eos_token_id
        rows, label_rows = [], []
        for i, prompt in enumerate(prompts):
            p = list(self._prompt_ids(prompt))
            t = (self._ids(targets[i])[: self.max_target_tokens] + [eos]) if targets is not None else []
            rows.append(p + t)
            label_rows.append([-100] * len(p) + t if t else [])
        ids, mask, labels = pad_rows(rows, label_rows, self.tokenizer.pad_token_id, left=targets is None)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.family.token_types is not None:
            name, where = self.family.token_types
            config = self.model.config
            image_token = getattr(config, "image_token_id", None) or config.image_token_index
            # "suffix": the target's tokens (every labelled position; -100 is also padding and prompt).
            out[name] = (ids == image_token).long() if where == "image" else (labels != -100).long()
        if targets is not None:
            out["labels"] = labels
        return out

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompts: Sequence[str] | None = None, *,
                 max_new_tokens: int = 24, num_beams: int = 1) -> list[str]:
        prompts = list(prompts) if prompts is not None else [""] * pixel_values.shape[0]
        text = self.text_inputs(prompts, None)
        device = next(self.model.parameters()).device
        gen = self._generation_config(max_new_tokens, num_beams)
        images = self.image_inputs(pixel_values.to(device, next(self.model.parameters()).dtype))
        seqs = self.model.generate(**images, **{key: value.to(device) for key, value in text.items()},
                                   generation_config=gen)
        new = seqs[:, text["input_ids"].shape[1]:]  # decoder-only: the prompt comes back first
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def save_processor(self, path):
        self.processor.save_pretrained(path)


def load_chat_bundle(path, family: str, *, processor_path=None, max_target_tokens=None) -> ChatBundle:
    """A local image-text-to-text checkpoint of ``family`` with its processor (beside it, or in
    ``processor_path``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    source = processor_path or path
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except (AttributeError, ImportError, ValueError, OSError):
        processor = None
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        # Qwen2-VL's processor insists on a video processor, which needs torchvision (and a folder
        # without processor_config.json loads as a bare tokenizer): the tokenizer, with its chat
        # template, and the image processor are all the drivers use.
        processor = _TokenizerAndImages(source)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    return ChatBundle(model, processor, family, max_target_tokens)


class _TokenizerAndImages:
    """A processor's two parts the drivers use, loaded on their own."""

    def __init__(self, path):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


__all__ = ["CHAT", "FAMILIES", "Family", "ChatBundle", "family_of", "load_chat_bundle"]
