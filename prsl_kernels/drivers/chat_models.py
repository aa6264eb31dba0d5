"""Image-text-to-text checkpoints in the drivers: one small adapter per model family.

A local folder that transformers' ``AutoModelForImageTextToText`` and ``AutoProcessor`` load
becomes a :class:`ChatBundle`, the drivers' :class:`models.ModelBundle` for chat VLMs:

* the prompt is the processor's chat template around one image and the instruction (the
  family's captioning instruction, or the VQA question), with the generation prompt appended;
* a training row is ``prompt + target + eos``; the labels are ``-100`` on the prompt (image
  tokens included) and on padding, and the logits are causal (shifted, as HF's own loss);
* generation decodes only the new tokens.

What differs between families is one :class:`Family` entry of :data:`FAMILIES` (adding a family is
adding an entry): its captioning instruction, its LoRA target modules, and the attack's image
layout. Only families whose processor returns ``(B, 3, H, W)`` normalised pixels are entered so
far, so the attacks' pixel-space perturbation applies to the image before the normalisation as
for ViT-GPT2 and BLIP-2; a family with patch-flattened pixels (Qwen2-VL) needs a differentiable
patchify in its entry first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .models import ModelBundle, pad_rows

CHAT = "chat-vlm"


@dataclass(frozen=True)
class Family:
    """How the drivers use one family of image-text-to-text checkpoints."""
    model_types: tuple[str, ...]
    caption_instruction: str = "Describe the image in one sentence."
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


FAMILIES = {
    "llava": Family(model_types=("llava",)),
}
MODEL_TYPES = {t: name for name, fam in FAMILIES.items() for t in fam.model_types}


def family_of(model_type: str) -> str | None:
    return MODEL_TYPES.get(model_type)


class ChatBundle(ModelBundle):
    """A chat VLM with its processor (see the module docstring)."""

    def __init__(self, model, processor, family: str, max_target_tokens: int | None = None):
        self.processor, self.family = processor, FAMILIES[family]
        super().__init__(model, processor.tokenizer, processor.image_processor, CHAT,
                         max_target_tokens if max_target_tokens is not None else 48)

    @property
    def shift_labels(self) -> bool:
        return True

    def _prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the chat prompt for one image and ``prompt`` (the captioning instruction
        when empty), image tokens expanded as the processor expands them for a real image."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt or self.family.caption_instruction}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        size = self.image_processor.crop_size if getattr(self.image_processor, "crop_size", None) else \
            self.image_processor.size
        height, width = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
        blank = np.zeros((height, width, 3), dtype=np.uint8)  # only the number of image tokens is used
        # The tokenizer's own special tokens (e.g. Llama's BOS), as the processor adds them at inference.
        return self.processor(text=[text], images=[blank])["input_ids"][0]

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
        if targets is not None:
            out["labels"] = labels
        return out

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompts: Sequence[str] | None = None, *,
                 max_new_tokens: int = 24, num_beams: int = 1) -> list[str]:
        import copy

        prompts = list(prompts) if prompts is not None else [""] * pixel_values.shape[0]
        text = self.text_inputs(prompts, None)
        device = next(self.model.parameters()).device
        gen = copy.deepcopy(self.model.generation_config)
        gen.max_length = None
        gen.update(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                   pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        for name in ("temperature", "top_p", "top_k"):
            setattr(gen, name, None)
        seqs = self.model.generate(pixel_values=pixel_values.to(device, next(self.model.parameters()).dtype),
                                   input_ids=text["input_ids"].to(device),
                                   attention_mask=text["attention_mask"].to(device), generation_config=gen)
        new = seqs[:, text["input_ids"].shape[1]:]  # decoder-only: the prompt comes back first
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def save_processor(self, path):
        self.processor.save_pretrained(path)


def load_chat_bundle(path, family: str, *, processor_path=None, max_target_tokens=None) -> ChatBundle:
    """A local image-text-to-text checkpoint of ``family`` with its processor (beside it, or in
    ``processor_path``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    processor = AutoProcessor.from_pretrained(processor_path or path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    return ChatBundle(model, processor, family, max_target_tokens)


__all__ = ["CHAT", "FAMILIES", "Family", "ChatBundle", "family_of", "load_chat_bundle"]
