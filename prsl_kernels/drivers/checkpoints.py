"""Checkpoint folders: which kind of model a folder holds, and loading it as a bundle.

:func:`load_bundle` sits above both model modules: a ViT-GPT2 or BLIP-2 folder becomes a
:class:`models.ModelBundle`, an image-text-to-text folder of a family in
:data:`chat_models.FAMILIES` a :class:`chat_models.ChatBundle`, and a LoRA adapter its base with
the adapter merged. The run record ``prsl_finetune.json`` that ``prsl-finetune`` writes beside a
model is read here too.
"""

from __future__ import annotations

import json
from pathlib import Path

from .chat_models import FAMILIES, family_of, load_chat_bundle
from .models import PRESETS, ModelBundle, model_kind


def processor_dir(path, processor_path=None) -> Path:
    """Where the tokenizer and image processor of checkpoint ``path`` live: ``processor_path`` if
    given, else ``path``, else the run folder above a Trainer ``checkpoint-N`` (older runs saved the
    image processor only there)."""
    path = Path(path)
    if processor_path is not None:
        proc = Path(processor_path)
        if not (proc / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"--processor {proc} holds no image processor (preprocessor_config.json)")
        return proc
    if (path / "preprocessor_config.json").is_file():
        return path
    if (path.parent / "preprocessor_config.json").is_file() and (path / "trainer_state.json").is_file():
        return path.parent
    raise FileNotFoundError(f"{path} holds no image processor (preprocessor_config.json); pass the folder that "
                            "does with --processor DIR (for a Trainer checkpoint-N: its run's output directory)")


def check_blip2_config(config, tokenizer, path) -> None:
    """BLIP-2 checkpoints must carry the ``<image>``-token layout (transformers >= 4.47): the
    collator writes ``image_token_index`` once per query token. Older snapshots lack it."""
    index = getattr(config, "image_token_index", None)
    vocab = config.get_text_config().vocab_size
    fix = ("Convert it once as Hugging Face did for its hub checkpoints: add the token to the tokenizer "
           "(`tokenizer.add_tokens([AddedToken('<image>', normalized=False, special=True)], special_tokens=True)`), "
           "grow the embeddings if needed (`model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)`), "
           "set `model.config.image_token_index = tokenizer.convert_tokens_to_ids('<image>')`, and save model and "
           "tokenizer back (save_pretrained).")
    if index is None:
        raise ValueError(f"{path}: this BLIP-2 checkpoint has no `image_token_index` in its config.json (an older "
                         f"snapshot, before transformers put one <image> token per query token in the input). {fix}")
    if not 0 <= index < vocab:
        raise ValueError(f"{path}: image_token_index {index} is outside the language model's vocabulary ({vocab}). "
                         f"{fix}")
    token = tokenizer.convert_ids_to_tokens(int(index)) if index < len(tokenizer) else None
    if token is None:
        raise ValueError(f"{path}: image_token_index {index} is not a token of the saved tokenizer "
                         f"({len(tokenizer)} tokens). {fix}")


def load_bundle(path, *, max_target_tokens: int | None = None, processor_path=None) -> ModelBundle:
    """Load a local checkpoint directory (``prsl-finetune`` output or a compatible HF checkpoint).

    ``processor_path``: where the tokenizer and image processor live, if not beside the model
    (see :func:`processor_dir`).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration
    from transformers import VisionEncoderDecoderModel

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_adapter(path, max_target_tokens, processor_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model checkpoint directory (no config.json); "
                                f"use a local HF checkpoint or a preset: {', '.join(PRESETS)}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(config.model_type)
    if family is not None:
        return load_chat_bundle(path, family, processor_path=processor_path, max_target_tokens=max_target_tokens)
    cls = {"vision-encoder-decoder": VisionEncoderDecoderModel, "blip-2": Blip2ForConditionalGeneration}.get(
        config.model_type)
    if cls is None:
        raise ValueError(f"{path}: unsupported model type {config.model_type!r} (expected vision-encoder-decoder, "
                         f"blip-2 or an image-text-to-text family: {', '.join(FAMILIES)})")
    proc = processor_dir(path, processor_path)
    tokenizer = AutoTokenizer.from_pretrained(proc, local_files_only=True)
    if config.model_type == "blip-2":
        check_blip2_config(config, tokenizer, path)   # before the (possibly multi-GB) weights load
    model = cls.from_pretrained(path, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(proc, local_files_only=True)
    _ensure_special_tokens(model, tokenizer)
    return ModelBundle(model, tokenizer, image_processor, model_kind(model), max_target_tokens)


def _load_adapter(path, max_target_tokens, processor_path):
    """A PEFT (LoRA) adapter saved by ``prsl-finetune --lora``: its base checkpoint (recorded in
    ``adapter_config.json``) with the adapter merged in, and the processor saved beside the adapter."""
    from peft import PeftModel

    base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the adapter's base checkpoint {base!r} is not a local folder")
    has_processor = any((Path(path) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    bundle = load_bundle(base, max_target_tokens=max_target_tokens,
                         processor_path=processor_path or (path if has_processor else None))
    bundle.model = PeftModel.from_pretrained(bundle.model, path).merge_and_unload()
    return bundle


def checkpoint_task(path) -> str | None:
    """The task a checkpoint was trained for: its (or, for ``checkpoint-N``, its run's)
    ``prsl_finetune.json``, else its architecture (BLIP-2 -> vqa, VisionEncoderDecoder -> caption)."""
    path = Path(path)
    for d in (path, path.parent):
        task = read_run_info(d).get("task")
        if task:
            return task
    cfg = path / "config.json"
    if cfg.is_file():
        kind = json.loads(cfg.read_text()).get("model_type")
        return {"blip-2": "vqa", "vision-encoder-decoder": "caption"}.get(kind)
    return None


def _ensure_special_tokens(model, tokenizer):
    """Real GPT-2 / OPT tokenizers may lack a pad token: reuse eos (labels mask padding anyway)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.eos_token


def read_run_info(path) -> dict:
    """The ``prsl_finetune.json`` written next to a fine-tuned model ({} if absent)."""
    f = Path(path) / "prsl_finetune.json"
    return json.loads(f.read_text()) if f.is_file() else {}


__all__ = ["load_bundle", "checkpoint_task", "processor_dir", "check_blip2_config", "read_run_info"]
