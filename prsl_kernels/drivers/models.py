"""Models for the drivers: tiny presets, loading checkpoints, batching, generation.

Two families, as in the paper:
  * ``"encoder-decoder"``: ``VisionEncoderDecoderModel`` (ViT + GPT-2). The
    decoder input is ``[bos] + text`` and ``logits[:, t]`` predicts
    ``labels[:, t]`` (no shift).
  * ``"blip2"``: ``Blip2ForConditionalGeneration`` with an OPT decoder. The
    input is ``<image> * num_query_tokens + [bos] + prompt + target + [eos]``
    and the logits are causal (``logits[:, t]`` predicts ``labels[:, t + 1]``).

Image-text-to-text checkpoints (LLaVA, ...) are a third kind, one adapter per family:
``chat_models.py``. Loading a checkpoint folder of any kind: ``checkpoints.py``.

A :class:`ModelBundle` holds a model with its tokenizer and image processor
and knows how to batch examples, align logits with labels, and generate.
Tiny presets are built from the same classes with random weights and a
byte-level BPE tokenizer trained offline on the data's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .data import Example

PRESETS = ("tiny-vit-gpt2", "tiny-blip2-opt")
TINY_VOCAB_SIZE = 512  # byte-level BPE trained on the data's text
PAD, BOS, EOS, IMAGE = "<pad>", "<bos>", "<eos>", "<image>"
ENCODER_DECODER, BLIP2 = "encoder-decoder", "blip2"
# Normalisation of the presets' image processors: pixels in [0, 1] map to [-1, 1].
PRESET_MEAN = PRESET_STD = (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int = TINY_VOCAB_SIZE):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    The full 256-byte alphabet is kept so any text encodes (no unknown tokens);
    merges are learnt from ``texts`` up to ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, BOS, EOS, IMAGE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   extra_special_tokens={"image_token": IMAGE})


# --------------------------------------------------------------------------- presets


@dataclass
class TinySize:
    """Dimensions of a tiny preset (defaults: d=128, 2+2 layers, patch 8, 64x64 images)."""
    hidden: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    patch: int = 8
    image_size: int = 64
    max_text: int = 128         # decoder positions (prompt + target)
    num_query_tokens: int = 8   # BLIP-2 only


def preset_image_processor(preset: str, image_size: int):
    try:  # transformers 5.x without torchvision: the PIL processors, named explicitly (no fallback warning)
        from transformers import BlipImageProcessorPil as BlipImageProcessor
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor, ViTImageProcessor

    # Synthetic images already have the model's size: skipping the resize keeps the collator cheap.
    kw = dict(size={"height": image_size, "width": image_size}, image_mean=list(PRESET_MEAN),
              image_std=list(PRESET_STD), do_rescale=True, do_normalize=True)
    if preset == "tiny-vit-gpt2":
        return ViTImageProcessor(do_resize=True, **kw)
    return BlipImageProcessor(do_resize=True, do_convert_rgb=True, **kw)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (grid*grid, dim), row-major, entries in [-1, 1].

    ViT's position embeddings start at std 0.02, some 20x below the patch embeddings
    of these images, and barely grow: a tiny ViT-GPT2 trained from scratch learned
    colour and size but placed objects at chance (0.14 of 9 positions after 2000
    steps). Starting from these codes it placed every object right after 600 steps.
    """
    if dim % 4:
        raise ValueError(f"hidden ({dim}) must divide by 4 for 2-D sine-cosine position codes")
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angle = axis[:, None] * freq[None, :]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)


def make_tiny_model(preset: str, tokenizer, size: TinySize | None = None, seed: int = 0):
    """A randomly initialised preset model (deterministic by ``seed``) and its image processor.

    Dropout is off: the synthetic data is small and clean, and runs stay bit-reproducible
    (``--resume`` equals an uninterrupted run).
    """
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              GPT2Config, GPT2LMHeadModel, OPTConfig, ViTConfig, ViTModel,
                              VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    s = size or TinySize()
    if s.hidden % s.heads or s.image_size % s.patch:
        raise ValueError(f"hidden ({s.hidden}) must divide by heads ({s.heads}) and image_size "
                         f"({s.image_size}) by patch ({s.patch})")
    vocab = len(tokenizer)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if preset == "tiny-vit-gpt2":
        enc = ViTConfig(image_size=s.image_size, patch_size=s.patch, hidden_size=s.hidden,
                        num_hidden_layers=s.encoder_layers, num_attention_heads=s.heads,
                        intermediate_size=4 * s.hidden)
        dec = GPT2Config(vocab_size=vocab, n_positions=s.max_text, n_embd=s.hidden, n_layer=s.decoder_layers,
                         n_head=s.heads, add_cross_attention=True, is_decoder=True, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        config.decoder_start_token_id = tokenizer.bos_token_id
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        model = VisionEncoderDecoderModel(config=config, encoder=ViTModel(enc),
                                          decoder=GPT2LMHeadModel(dec))
    else:
        vision = Blip2VisionConfig(image_size=s.image_size, patch_size=s.patch, hidden_size=s.hidden,
                                   num_hidden_layers=s.encoder_layers, num_attention_heads=s.heads,
                                   intermediate_size=4 * s.hidden)
        qformer = Blip2QFormerConfig(hidden_size=s.hidden, num_hidden_layers=2, num_attention_heads=s.heads,
                                     intermediate_size=4 * s.hidden, encoder_hidden_size=s.hidden,
                                     cross_attention_frequency=1, vocab_size=vocab,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        text = OPTConfig(vocab_size=vocab, hidden_size=s.hidden, num_hidden_layers=s.decoder_layers,
                         ffn_dim=4 * s.hidden, num_attention_heads=s.heads, word_embed_proj_dim=s.hidden,
                         max_position_embeddings=s.max_text + s.num_query_tokens, dropout=0.0,
                         attention_dropout=0.0, **ids)
        config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                             text_config=text.to_dict(), num_query_tokens=s.num_query_tokens,
                             image_token_index=tokenizer.convert_tokens_to_ids(IMAGE))
        model = Blip2ForConditionalGeneration(config)
    if preset == "tiny-vit-gpt2":  # BLIP-2's vision tower already draws its position embeddings at std 1
        with torch.no_grad():
            position = model.encoder.embeddings.position_embeddings
            position[0, 1:] = sincos_2d(s.hidden, s.image_size // s.patch)
            position[0, :1] = 0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if preset == "tiny-vit-gpt2":
        model.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    return model, preset_image_processor(preset, s.image_size)


# --------------------------------------------------------------------------- bundle


def model_kind(model) -> str:
    t = getattr(model.config, "model_type", "")
    if t == "vision-encoder-decoder":
        return ENCODER_DECODER
    if t in ("blip-2", "blip_2"):
        if not model.config.use_decoder_only_language_model:
            raise ValueError("only BLIP-2 checkpoints with a decoder-only language model (OPT) are supported")
        return BLIP2
    raise ValueError(f"unsupported model type {t!r}: expected a VisionEncoderDecoderModel or BLIP-2 OPT checkpoint")


@dataclass
class ModelBundle:
    """A model with its tokenizer and image processor, and the family's batching rules."""
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    kind: str
    max_target_tokens: int | None = None  # None: from the model's positions (default_max_target_tokens)

    def __post_init__(self):
        if self.max_target_tokens is None:
            self.max_target_tokens = default_max_target_tokens(self.model, self.kind)

    # ---- images
    @property
    def image_mean(self) -> torch.Tensor:
        return torch.tensor(self.image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)

    @property
    def image_std(self) -> torch.Tensor:
        return torch.tensor(self.image_processor.image_std, dtype=torch.float32).view(3, 1, 1)

    def pixel_values(self, images) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised float32 pixels from PIL images / HxWx3 uint8 arrays."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def image_inputs(self, pixels: torch.Tensor) -> dict:
        """The model's image arguments for ``(B, 3, H, W)`` normalised pixels."""
        return {"pixel_values": pixels}

    def pixel_range(self):
        """The normalised-space bounds of valid pixels [0, 1], per channel ``(lo, hi)`` each ``(3, 1, 1)``."""
        return (0 - self.image_mean) / self.image_std, (1 - self.image_mean) / self.image_std

    # ---- text
    @property
    def shift_labels(self) -> bool:
        """True when logits[:, t] predicts labels[:, t + 1] (causal LMs such as BLIP-2's OPT)."""
        return self.kind == BLIP2

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def text_inputs(self, prompts: Sequence[str], targets: Sequence[str] | None) -> dict:
        """Token tensors for a batch (no pixels): teacher-forced if ``targets``, else generation prompts.

        Returns ``input_ids``/``attention_mask`` (BLIP-2) or ``decoder_input_ids``/
        ``decoder_attention_mask`` (encoder-decoder), plus ``labels`` when ``targets``
        is given (``-100`` on prompt, image and padding positions).
        """
        tok = self.tokenizer
        pad, bos, eos = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
        rows, label_rows = [], []
        for i, prompt in enumerate(prompts):
            p = self._ids(prompt)
            t = (self._ids(targets[i])[: self.max_target_tokens] + [eos]) if targets is not None else []
            if self.kind == ENCODER_DECODER:
                ids = [bos] + p + t[:-1] if t else [bos] + p
                lab = [-100] * len(p) + t
            else:
                image = [self.model.config.image_token_index] * self.model.config.num_query_tokens
                ids = image + [bos] + p + t
                # position 0 (an image token) is never a target: so counting labels != -100
                # equals counting shifted targets (what Trainer's num_items_in_batch does).
                lab = [-100] * (len(image) + 1 + len(p)) + t
            rows.append(ids)
            label_rows.append(lab)
        ids, mask, labels = pad_rows(rows, label_rows, pad, left=targets is None)
        if self.kind == ENCODER_DECODER:
            out = {"decoder_input_ids": ids, "decoder_attention_mask": mask}
        else:
            out = {"input_ids": ids, "attention_mask": mask}
        if targets is not None:
            out["labels"] = labels
        return out

    def batch(self, examples: Sequence[Example], with_labels: bool = True) -> dict:
        """Model inputs for ``examples``: pixels + tokens (+ labels)."""
        out = self.image_inputs(self.pixel_values([e.sample.image if e.sample.image is not None
                                                  else e.sample.load_image() for e in examples]))
        out.update(self.text_inputs([e.prompt for e in examples],
                                    [e.target for e in examples] if with_labels else None))
        return out

    def align(self, logits: torch.Tensor, labels: torch.Tensor):
        """``(logits, targets)`` with ``logits[:, t]`` predicting ``targets[:, t]`` (no logits copy)."""
        from ..hf import align_labels
        return logits, align_labels(labels, shift=self.shift_labels)

    # ---- generation
    def generation_settings(self) -> dict:
        """``num_beams`` and ``max_new_tokens`` from the checkpoint's generation config where it sets
        them (an encoder-decoder's ``max_length`` counts the decoder start token), else 1 and 24."""
        gc = self.model.generation_config
        given = gc.to_diff_dict()
        beams = int(given.get("num_beams") or 1)
        if given.get("max_new_tokens"):
            new = int(given["max_new_tokens"])
        elif given.get("max_length") and self.kind == ENCODER_DECODER:
            new = max(1, int(given["max_length"]) - 1)
        else:
            new = 24
        return {"num_beams": beams, "max_new_tokens": new}

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompts: Sequence[str] | None = None, *,
                 max_new_tokens: int = 24, num_beams: int = 1) -> list[str]:
        """Greedy (or beam) outputs for a batch of normalised pixels; ``prompts`` for VQA.

        The checkpoint's generation config applies (e.g. ``no_repeat_ngram_size``,
        ``length_penalty``), except that decoding is deterministic (no sampling) and
        ``max_new_tokens`` / ``num_beams`` are the ones given here (``max_length`` is dropped, so
        transformers does not warn on every call that both are set).
        """
        prompts = list(prompts) if prompts is not None else [""] * pixel_values.shape[0]
        text = self.text_inputs(prompts, None)
        device = next(self.model.parameters()).device
        gen = self._generation_config(max_new_tokens, num_beams)
        pixel_values = pixel_values.to(device, next(self.model.parameters()).dtype)
        # generate() merges the model's own config into ours: its max_length too, which is what
        # makes transformers warn on every call. Lift it for the call (restored after).
        own_max_length, self.model.generation_config.max_length = self.model.generation_config.max_length, None
        try:
            if self.kind == ENCODER_DECODER:
                # transformers warns that "the attention mask is not set" when pad == eos (GPT-2's
                # tokenizer): that check looks at the encoder's input, here pixels, which have no
                # mask; the decoder's prompt gets its mask.
                with _quiet_generation_logger("attention mask is not set"):
                    seqs = self.model.generate(pixel_values=pixel_values, generation_config=gen,
                                               decoder_input_ids=text["decoder_input_ids"].to(device),
                                               decoder_attention_mask=text["decoder_attention_mask"].to(device))
            else:
                seqs = self.model.generate(pixel_values=pixel_values, input_ids=text["input_ids"].to(device),
                                           attention_mask=text["attention_mask"].to(device), generation_config=gen)
        finally:
            self.model.generation_config.max_length = own_max_length
        prompt_len = text["decoder_input_ids" if self.kind == ENCODER_DECODER else "input_ids"].shape[1]
        if seqs.shape[1] >= prompt_len and torch.equal(seqs[:, :prompt_len].cpu(),
                                                       text["decoder_input_ids" if self.kind == ENCODER_DECODER
                                                            else "input_ids"]):
            seqs = seqs[:, prompt_len:]
        return [t.strip() for t in self.tokenizer.batch_decode(seqs, skip_special_tokens=True)]

    def _generation_config(self, max_new_tokens: int, num_beams: int):
        """The checkpoint's generation config, deterministic, with these lengths and beams."""
        import copy

        gen = copy.deepcopy(self.model.generation_config)
        gen.max_length = None
        gen.update(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                   pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        for name in ("temperature", "top_p", "top_k"):  # sampling-only settings: unused, and warned about
            setattr(gen, name, None)
        return gen

    # ---- persistence
    def save_processor(self, path):
        """The tokenizer and image processor, what :func:`load_bundle` reads beside a model."""
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def save(self, path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.save_processor(path)


def pad_rows(rows, label_rows, pad, *, left):
    """``(input_ids, attention_mask, labels)`` of token rows: generation prompts left-padded (new
    tokens follow every row's prompt), training rows right-padded; labels ``-100`` on padding."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
        if lab:
            labels[i, sl.start:sl.start + len(lab)] = torch.tensor(lab)
    return ids, mask, labels


class _quiet_generation_logger:
    """Drops records of transformers' generation logger that contain ``text`` (nothing else)."""

    def __init__(self, text):
        import logging

        self.text = text
        self.logger = logging.getLogger("transformers.generation.utils")

    def filter(self, record):
        return self.text not in record.getMessage()

    def __enter__(self):
        self.logger.addFilter(self)

    def __exit__(self, *exc):
        self.logger.removeFilter(self)


class quiet_transformers:
    """No per-load progress bars ("Loading weights", "Writing model shards") or info logs from
    transformers on the console while models load and train; restored afterwards."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._hf = hf_logging
        self._bars = hf_logging.is_progress_bar_enabled()
        self._level = hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        if self._bars:
            self._hf.enable_progress_bar()
        self._hf.set_verbosity(self._level)


def default_max_target_tokens(model, kind: str, cap: int = 48) -> int:
    """Target tokens kept per example: ``cap``, or fewer when the decoder's positions must also
    hold the prompt (32 reserved) and, for BLIP-2, the query tokens. A function of the model
    alone, so a reloaded checkpoint batches exactly as the run that trained it."""
    text = model.config.decoder if kind == ENCODER_DECODER else model.config.get_text_config()
    positions = getattr(text, "n_positions", None) or getattr(text, "max_position_embeddings", 512)
    reserved = 32 + (model.config.num_query_tokens if kind == BLIP2 else 0)
    return max(1, min(cap, positions - reserved))


def tiny_bundle(preset: str, texts: Sequence[str], *, size: TinySize | None = None, seed: int = 0,
                vocab_size: int = TINY_VOCAB_SIZE) -> ModelBundle:
    """A fresh tiny preset: tokenizer trained on ``texts``, random weights (by ``seed``)."""
    tokenizer = train_tokenizer(texts, vocab_size)
    model, processor = make_tiny_model(preset, tokenizer, size, seed)
    return ModelBundle(model, tokenizer, processor, model_kind(model))


__all__ = ["PRESETS", "TINY_VOCAB_SIZE", "TinySize", "ModelBundle", "train_tokenizer", "make_tiny_model", "tiny_bundle",
           "model_kind", "quiet_transformers", "ENCODER_DECODER", "BLIP2"]
