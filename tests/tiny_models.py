"""Tiny random-weight Hugging Face models, each with a training batch, for fast CPU tests.

``build(name)`` returns ``(model, batch)``: the model (eval mode, eager attention, cast to ``dtype``)
and keyword tensors for ``model(**batch)``, ``labels`` included. Everything is built from config
classes, so nothing is downloaded.

What the architectures share:

* text: vocab ``V`` = 96, hidden ``H`` = 32, 1 decoder layer (2 where the architecture needs a second
  kind of layer), 2 attention heads of 16 and one key/value head;
* vision: 16x16-pixel images, 1 encoder layer, 4 to 16 patches, 4 to 10 image tokens per image;
* batch: 2 rows of ``head + 3 prompt + 8 answer`` tokens, where ``head`` holds BOS and the image
  placeholders the architecture expects; row 1 is right-padded by 2. ``labels`` repeat
  ``input_ids`` (the models shift them) with -100 on the head, the prompt, the padding and
  2 random answer tokens per row.

Ids 0-2 are PAD/BOS/EOS, ordinary text is drawn from ``[4, V - 8)`` and the top ids are the image
placeholder and its markers, so labels never hold a special token.
"""

from typing import Callable, NamedTuple

import torch
import transformers

V, H = 96, 32
PAD, BOS, EOS = 0, 1, 2
IMG, BOI, EOI, VIDEO = V - 1, V - 2, V - 3, V - 4  # image placeholder, begin/end-of-image, video
TEXT = (4, V - 8)
N_PROMPT, N_ANSWER, N_PAD = 3, 8, 2
IMAGE = 16  # pixels per side
# Random-weight logits have std ~0.1 (max ~0.5): a cap this low really bends them (Gemma's own is 30).
SOFTCAP = 0.5


class Spec(NamedTuple):
    cls: type
    config: transformers.PreTrainedConfig
    batch: Callable[[torch.Generator, torch.dtype], dict]
    fix: Callable | None = None  # run on the fresh model, under the same seed


_BUILDERS: dict[str, Callable[[], Spec]] = {}


def _arch(name, *classes):
    """Register a builder, only if the installed transformers has all the classes it needs."""
    def register(fn):
        if all(hasattr(transformers, c) for c in classes):
            _BUILDERS[name] = fn
        return fn
    return register


# --------------------------------------------------------------------------- shared pieces

def _special():
    return dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def _decoder(**kw):
    """Llama-style decoder sizes: 1 layer, 2 heads of 16, one key/value head."""
    return dict(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, **_special()) | kw


def _vit(**kw):
    """ViT-style encoder sizes: 1 layer, 2 heads, 16x16 images."""
    return dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=2,
                image_size=IMAGE) | kw


def _tokens(g, head, answer_type_ids=False):
    """input_ids/attention_mask/labels for two rows of ``head + prompt + answer``, row 1 right-padded.

    ``answer_type_ids`` adds PaliGemma's token_type_ids: 0 on the (bidirectional) prefix, 1 after.
    """
    head = torch.tensor(head)
    n_prefix = len(head) + N_PROMPT
    text = torch.randint(*TEXT, (2, N_PROMPT + N_ANSWER), generator=g)
    ids = torch.cat([head.expand(2, -1), text], 1)
    mask = torch.ones_like(ids)
    mask[1, -N_PAD:] = 0
    ids[mask == 0] = PAD
    labels = ids.clone()
    labels[:, :n_prefix] = -100
    labels[mask == 0] = -100
    for row in range(2):
        answer = torch.nonzero(labels[row] != -100).squeeze(1)
        labels[row, answer[torch.randperm(len(answer), generator=g)[:2]]] = -100
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if answer_type_ids:
        batch["token_type_ids"] = (torch.arange(ids.shape[1]) >= n_prefix).long().expand(2, -1).clone()
    return batch


def _pixels(g, dtype, *shape):
    # Drawn in float64 whatever the dtype, so that every dtype sees the same images.
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _text_only(cls, config):
    return Spec(cls, config, lambda g, dtype: _tokens(g, [BOS]))


def _redraw(*params, std=0.02):
    """Give parameters that a fresh model starts at zero a random spread (the callers say why)."""
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, std)


# --------------------------------------------------------------------------- text LMs

@_arch("gpt2", "GPT2LMHeadModel")
def _gpt2():
    """GPT-2 with 1 layer of width 32 and 64 positions."""
    return _text_only(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=H, n_layer=1, n_head=2, **_special()))


@_arch("opt", "OPTForCausalLM")
def _opt():
    """OPT with 1 layer of width 32."""
    return _text_only(transformers.OPTForCausalLM, transformers.OPTConfig(
        vocab_size=V, hidden_size=H, word_embed_proj_dim=H, ffn_dim=2 * H, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, **_special()))


@_arch("llama", "LlamaForCausalLM")
def _llama():
    """Llama, 1 layer."""
    return _text_only(transformers.LlamaForCausalLM, transformers.LlamaConfig(**_decoder()))


@_arch("mistral", "MistralForCausalLM")
def _mistral():
    """Mistral, 1 layer."""
    return _text_only(transformers.MistralForCausalLM, transformers.MistralConfig(**_decoder(head_dim=H // 2)))


@_arch("qwen2", "Qwen2ForCausalLM")
def _qwen2():
    """Qwen2, 1 layer."""
    return _text_only(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**_decoder()))


@_arch("qwen3", "Qwen3ForCausalLM")
def _qwen3():
    """Qwen3 (q/k norms), 1 layer."""
    return _text_only(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**_decoder(head_dim=H // 2)))


@_arch("gemma2", "Gemma2ForCausalLM")
def _gemma2():
    """Gemma 2, 1 layer; logits soft-capped at SOFTCAP after the LM head."""
    return _text_only(transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**_gemma2_text()))


def _gemma2_text():
    return _decoder(head_dim=H // 2, query_pre_attn_scalar=H // 2, final_logit_softcapping=SOFTCAP)


@_arch("phi3", "Phi3ForCausalLM")
def _phi3():
    """Phi-3 (fused qkv and gate_up projections), 1 layer."""
    return _text_only(transformers.Phi3ForCausalLM, transformers.Phi3Config(**_decoder()))


@_arch("cohere", "CohereForCausalLM")
def _cohere():
    """Cohere, 1 layer; logits multiplied by logit_scale = 0.5 after the LM head."""
    return _text_only(transformers.CohereForCausalLM, transformers.CohereConfig(**_decoder(logit_scale=0.5)))


@_arch("granite", "GraniteForCausalLM")
def _granite():
    """Granite, 1 layer; logits divided by logits_scaling = 2 after the LM head."""
    return _text_only(transformers.GraniteForCausalLM, transformers.GraniteConfig(**_decoder(logits_scaling=2.0)))


# --------------------------------------------------------------------------- vision-language models

@_arch("llava", "LlavaForConditionalGeneration")
def _llava():
    """LLaVA: CLIP tower with 8x8 patches (4 patches + CLS) and a Llama decoder; 4 image tokens."""
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_vit(patch_size=8, projection_dim=H)),
        text_config=transformers.LlamaConfig(**_decoder()),
        image_token_index=IMG, image_seq_length=4, vision_feature_layer=-1)  # -1: the one layer is used

    def batch(g, dtype):
        return _tokens(g, [BOS] + [IMG] * 4) | dict(pixel_values=_pixels(g, dtype, 2, 3, IMAGE, IMAGE))
    return Spec(transformers.LlavaForConditionalGeneration, config, batch)


@_arch("llava_next", "LlavaNextForConditionalGeneration")
def _llava_next():
    """LLaVA-NeXT with a single 16x16 'anyres' grid point: per image a base view and one crop, each
    of 2x2 patches, give 4 + 4 tokens plus 2 row-newlines = 10 image tokens."""
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**_vit(patch_size=8, projection_dim=H)),
        text_config=transformers.LlamaConfig(**_decoder()),
        image_token_index=IMG, image_seq_length=10, vision_feature_layer=-1,
        image_grid_pinpoints=[[IMAGE, IMAGE]])

    def batch(g, dtype):
        return _tokens(g, [BOS] + [IMG] * 10) | dict(
            pixel_values=_pixels(g, dtype, 2, 2, 3, IMAGE, IMAGE),  # (images, base + crops, C, H, W)
            image_sizes=torch.tensor([[IMAGE, IMAGE]] * 2))
    return Spec(transformers.LlavaNextForConditionalGeneration, config, batch)


def _qwen_vl_batch(patch):
    """Qwen-VL inputs: each image a 1x4x4 grid of flattened patches, merged 2x2 into 4 tokens."""
    def batch(g, dtype):
        b = _tokens(g, [BOI] + [IMG] * 4 + [EOI])
        b["mm_token_type_ids"] = (b["input_ids"] == IMG).int()  # drives the 3D (M-RoPE) positions
        return b | dict(pixel_values=_pixels(g, dtype, 2 * 16, 3 * 2 * patch * patch),
                        image_grid_thw=torch.tensor([[1, 4, 4]] * 2))
    return batch


def _qwen_vl_ids():
    return dict(image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=BOI, vision_end_token_id=EOI)


@_arch("qwen2_vl", "Qwen2VLForConditionalGeneration")
def _qwen2_vl():
    """Qwen2-VL: 1-block vision tower with 4x4-pixel patches, 1-layer decoder with M-RoPE."""
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=H, hidden_size=H, num_heads=2, mlp_ratio=2, patch_size=4),
        text_config=_decoder(rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3])),
        **_qwen_vl_ids())
    return Spec(transformers.Qwen2VLForConditionalGeneration, config, _qwen_vl_batch(4))


@_arch("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
def _qwen2_5_vl():
    """Qwen2.5-VL: 2-block vision tower (one in 8x8-pixel windows, one full), 1-layer M-RoPE decoder."""
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=H, intermediate_size=2 * H, out_hidden_size=H, num_heads=2,
                           patch_size=4, window_size=8, fullatt_block_indexes=[1]),
        text_config=_decoder(rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3])),
        **_qwen_vl_ids())
    return Spec(transformers.Qwen2_5_VLForConditionalGeneration, config, _qwen_vl_batch(4))


@_arch("qwen3_vl", "Qwen3VLForConditionalGeneration")
def _qwen3_vl():
    """Qwen3-VL: 1-block vision tower with 4x4 position embeddings and one deepstack layer,
    2-layer decoder with interleaved M-RoPE."""
    config = transformers.Qwen3VLConfig(
        vision_config=dict(depth=1, hidden_size=H, intermediate_size=2 * H, out_hidden_size=H, num_heads=2,
                           patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        # 2 layers: the deepstack features join after layer 0, and a last layer must carry them to the answer.
        text_config=_decoder(num_hidden_layers=2, head_dim=H // 2, rope_parameters=dict(
            rope_type="default", mrope_section=[4, 2, 2], mrope_interleaved=True)),
        **_qwen_vl_ids())
    return Spec(transformers.Qwen3VLForConditionalGeneration, config, _qwen_vl_batch(4))


def _paligemma(text_config):
    config = transformers.PaliGemmaConfig(
        vision_config=transformers.SiglipVisionConfig(**_vit(patch_size=8, vision_use_head=False)),
        text_config=text_config, image_token_index=IMG, projection_dim=H, hidden_size=H, vocab_size=V)

    def batch(g, dtype):
        # PaliGemma's prompt: image tokens, then BOS and the prefix, attended bidirectionally.
        return _tokens(g, [IMG] * 4 + [BOS], answer_type_ids=True) | dict(
            pixel_values=_pixels(g, dtype, 2, 3, IMAGE, IMAGE))
    return Spec(transformers.PaliGemmaForConditionalGeneration, config, batch)


@_arch("paligemma", "PaliGemmaForConditionalGeneration")
def _paligemma1():
    """PaliGemma: SigLIP tower with 8x8 patches (4 image tokens) and a 1-layer Gemma decoder."""
    return _paligemma(transformers.GemmaConfig(**_decoder(head_dim=H // 2)))


@_arch("paligemma2", "PaliGemmaForConditionalGeneration", "Gemma2Config")
def _paligemma2():
    """PaliGemma 2: as PaliGemma with a Gemma 2 decoder, whose final_logit_softcapping PaliGemma applies itself."""
    return _paligemma(transformers.Gemma2Config(**_gemma2_text()))


@_arch("gemma3", "Gemma3ForConditionalGeneration")
def _gemma3():
    """Gemma 3: SigLIP tower with 4x4 patches (a 4x4 grid) average-pooled to 2x2 = 4 image tokens,
    1-layer decoder. final_logit_softcapping is set, but Gemma3ForConditionalGeneration (unlike
    Gemma3ForCausalLM) does not apply it, at least in transformers 5.24."""
    config = transformers.Gemma3Config(
        vision_config=transformers.SiglipVisionConfig(**_vit(patch_size=4, vision_use_head=False)),
        text_config=transformers.Gemma3TextConfig(**_decoder(head_dim=H // 2, query_pre_attn_scalar=H // 2,
                                                             final_logit_softcapping=SOFTCAP)),
        mm_tokens_per_image=4, image_token_index=IMG, boi_token_index=BOI, eoi_token_index=EOI)

    def batch(g, dtype):
        b = _tokens(g, [BOS, BOI] + [IMG] * 4 + [EOI])
        b["token_type_ids"] = (b["input_ids"] == IMG).long()  # image tokens attend to each other
        return b | dict(pixel_values=_pixels(g, dtype, 2, 3, IMAGE, IMAGE))

    def fix(model):
        # The projection starts at zero, which would cut the image off from the text.
        _redraw(model.model.multi_modal_projector.mm_input_projection_weight)
    return Spec(transformers.Gemma3ForConditionalGeneration, config, batch, fix)


def _idefics3_like(config_cls, model_cls):
    config = config_cls(
        vision_config=_vit(patch_size=4), text_config=transformers.LlamaConfig(**_decoder()),
        image_token_id=IMG, scale_factor=2)

    def batch(g, dtype):
        # <fake_token_around_image> (BOI here) wraps the 16 patches pixel-shuffled into 4 tokens.
        return _tokens(g, [BOS, BOI] + [IMG] * 4 + [BOI]) | dict(
            pixel_values=_pixels(g, dtype, 2, 1, 3, IMAGE, IMAGE),  # (rows, images per row, C, H, W)
            pixel_attention_mask=torch.ones(2, 1, IMAGE, IMAGE, dtype=torch.bool))
    return Spec(model_cls, config, batch)


@_arch("idefics3", "Idefics3ForConditionalGeneration")
def _idefics3():
    """Idefics3: 1-layer SigLIP-style tower with 4x4 patches, pixel shuffle 2 -> 4 image tokens, Llama decoder."""
    return _idefics3_like(transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration)


@_arch("smolvlm", "SmolVLMForConditionalGeneration")
def _smolvlm():
    """SmolVLM: the Idefics3 layout (4x4 patches, pixel shuffle 2 -> 4 image tokens), Llama decoder."""
    return _idefics3_like(transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration)


@_arch("internvl", "InternVLForConditionalGeneration")
def _internvl():
    """InternVL: 1-layer InternViT with 4x4 patches (+ CLS, dropped), pixel shuffle 0.5 -> 4 image
    tokens, 1-layer Qwen2 decoder."""
    config = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(**_vit(patch_size=4)),
        text_config=transformers.Qwen2Config(**_decoder()),
        image_token_id=IMG, image_seq_length=4)

    def batch(g, dtype):
        return _tokens(g, [BOS, BOI] + [IMG] * 4 + [EOI]) | dict(pixel_values=_pixels(g, dtype, 2, 3, IMAGE, IMAGE))
    return Spec(transformers.InternVLForConditionalGeneration, config, batch)


@_arch("mllama", "MllamaForConditionalGeneration")
def _mllama():
    """Mllama (Llama 3.2 Vision): 1 local + 1 global vision layer on one 16x16 tile of 4x4 patches,
    2-layer decoder whose second layer cross-attends to the image. Cannot tie its word embeddings:
    the input embedding has 8 rows more than the LM head."""
    vision = transformers.MllamaVisionConfig(
        hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
        image_size=IMAGE, patch_size=4, max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=[0], vision_output_dim=2 * H)  # last state + 1 intermediate, concatenated
    text = transformers.MllamaTextConfig(**_decoder(num_hidden_layers=2, cross_attention_layers=[1]))
    # Like the real <|image|> (id = vocab size), the placeholder sits in the 8 extra embedding rows,
    # outside the LM head; it is only a marker, the image enters through cross-attention.
    image = V
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=image)

    def batch(g, dtype):
        b = _tokens(g, [BOS, image])
        # Every token from the image placeholder on sees the image (one image, one tile per row).
        seen = (torch.arange(b["input_ids"].shape[1]) >= 1).long()
        return b | dict(
            pixel_values=_pixels(g, dtype, 2, 1, 1, 3, IMAGE, IMAGE),  # (rows, images, tiles, C, H, W)
            aspect_ratio_ids=torch.ones(2, 1, dtype=torch.long),  # 1 = the [1, 1] layout; 0 pads
            aspect_ratio_mask=torch.ones(2, 1, 1, dtype=torch.long),
            cross_attention_mask=seen[None, :, None, None].expand(2, -1, 1, 1).clone())

    def fix(model):
        # Its tanh gates start at 0: the cross-attention's would hide the image from the text, the
        # vision tower's would leave the position/tile embeddings without gradient.
        layer, vision = model.model.language_model.layers[1], model.model.vision_model
        _redraw(layer.cross_attn_attn_gate, layer.cross_attn_mlp_gate, vision.gated_positional_embedding.gate,
                vision.pre_tile_positional_embedding.gate, vision.post_tile_positional_embedding.gate, std=0.5)
    return Spec(transformers.MllamaForConditionalGeneration, config, batch, fix)


@_arch("blip2", "Blip2ForConditionalGeneration")
def _blip2():
    """BLIP-2: 1-layer ViT with 8x8 patches, 1-layer Q-Former with 4 query tokens (= 4 image tokens),
    1-layer OPT decoder."""
    config = transformers.Blip2Config(
        # The vision config's default initializer_range is 1e-10, which would make every image look the same.
        vision_config=transformers.Blip2VisionConfig(**_vit(patch_size=8, initializer_range=0.02)),
        qformer_config=transformers.Blip2QFormerConfig(
            hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * H,
            encoder_hidden_size=H, cross_attention_frequency=1, vocab_size=V),
        text_config=transformers.OPTConfig(
            vocab_size=V, hidden_size=H, word_embed_proj_dim=H, ffn_dim=2 * H, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=64, **_special()),
        num_query_tokens=4, image_token_index=IMG)

    def batch(g, dtype):
        return _tokens(g, [IMG] * 4 + [BOS]) | dict(pixel_values=_pixels(g, dtype, 2, 3, IMAGE, IMAGE))

    def fix(model):
        # Query tokens start at zero, where the Q-Former's first LayerNorm has a ~1/sqrt(eps) gradient.
        _redraw(model.query_tokens, std=1.0)
    return Spec(transformers.Blip2ForConditionalGeneration, config, batch, fix)


# --------------------------------------------------------------------------- API

ARCHITECTURES: list[str] = list(_BUILDERS)


def build(name: str, *, seed: int = 0, dtype=torch.float64, tie_word_embeddings: bool | None = None):
    """The tiny ``name`` model (eval mode, eager attention, ``dtype``) and its training batch.

    Both are deterministic given ``seed``. ``tie_word_embeddings`` None keeps the architecture's
    default; True/False forces the LM head to share (or not) the input embedding matrix.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    spec = _BUILDERS[name]()
    config = spec.config
    config._attn_implementation = "eager"  # plain-matmul attention (float64-safe), set on the sub-configs too
    if tie_word_embeddings is not None:
        # The composite models read the top-level flag, their language models the text config's.
        config.tie_word_embeddings = tie_word_embeddings
        config.get_text_config().tie_word_embeddings = tie_word_embeddings
    torch.manual_seed(seed)
    model = spec.cls(config)
    if spec.fix is not None:
        spec.fix(model)
    model = model.to(dtype).eval()
    if tie_word_embeddings is not None:
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if tied != tie_word_embeddings:
            raise ValueError(f"{name}: could not {'tie' if tie_word_embeddings else 'untie'} the word embeddings")
    return model, spec.batch(torch.Generator().manual_seed(seed), dtype)


# --------------------------------------------------------------------------- checkpoint folders


def save_llava_folder(path, texts, *, seed=0, image_size=32):
    """A tiny random LLaVA checkpoint saved with its processor (a tokenizer trained on ``texts``
    with an ``<image>`` token and a chat template, a CLIP image processor), as a user's local
    LLaVA folder is laid out; nothing is downloaded."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from prsl_kernels.drivers.models import train_tokenizer

    tokenizer = train_tokenizer(list(texts) + ["Describe the image in one sentence. USER ASSISTANT"], vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=16)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="default",
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_qwen2_5_vl_folder(path, texts, *, seed=0, image_size=16):
    """:func:`save_qwen2_vl_folder` with a Qwen2.5-VL model (windowed vision attention)."""
    return save_qwen2_vl_folder(path, texts, seed=seed, image_size=image_size, version="2.5")


def save_qwen2_vl_folder(path, texts, *, seed=0, image_size=16, version="2"):
    """A tiny random Qwen2-VL checkpoint saved with a tokenizer (Qwen's vision tokens and a chat
    template) and Qwen's image processor (4-pixel patches merged 2 x 2, images of at most
    ``image_size``^2 pixels). Qwen2VLProcessor itself needs torchvision (its video processor), so
    the two parts are saved on their own, as the drivers load them without it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from prsl_kernels.drivers.models import train_tokenizer

    tokenizer = train_tokenizer(list(texts) + ["Describe the image in one sentence. user assistant"], vocab_size=300)
    vision_tokens = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": vision_tokens + ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
        "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=image_size ** 2, max_pixels=image_size ** 2, patch_size=4,
                                               merge_size=2, temporal_patch_size=2)
    ids = tokenizer.convert_tokens_to_ids(vision_tokens)
    if version == "2":
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = dict(depth=1, embed_dim=H, hidden_size=H, num_heads=2, mlp_ratio=2, patch_size=4)
    else:
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=H, intermediate_size=2 * H, out_hidden_size=H, num_heads=2, patch_size=4,
                      window_size=8, fullatt_block_indexes=[1])
    config = config_cls(
        vision_config=vision,
        text_config=_decoder(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3])),
        vision_start_token_id=ids[0], image_token_id=ids[1], vision_end_token_id=ids[2], video_token_id=ids[3])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def save_paligemma_folder(path, texts, *, seed=0, image_size=16):
    """A tiny random PaliGemma checkpoint (SigLIP 8-pixel patches: 4 image tokens, a Gemma decoder)
    saved with its processor (no chat template: PaliGemma's prompts are prefixes such as
    "caption en")."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    from prsl_kernels.drivers.models import train_tokenizer

    tokenizer = train_tokenizer(list(texts) + ["caption en"], vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // 8) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    text = transformers.GemmaConfig(**(_decoder(head_dim=H // 2) | dict(vocab_size=len(tokenizer), **special)))
    config = transformers.PaliGemmaConfig(
        vision_config=transformers.SiglipVisionConfig(**_vit(patch_size=8, image_size=image_size,
                                                             vision_use_head=False)),
        text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=H,
        hidden_size=H, vocab_size=len(tokenizer))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_gemma3_folder(path, texts, *, seed=0, image_size=16):
    """A tiny random Gemma 3 checkpoint (SigLIP 4-pixel patches pooled to 4 image tokens, a 1-layer
    decoder) saved with its processor: a tokenizer whose named special tokens (begin / end of
    image, the soft image token) Gemma3Processor reads, and a Gemma-style chat template."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    from prsl_kernels.drivers.models import train_tokenizer

    base = train_tokenizer(list(texts) + ["Describe the image in one sentence. user model"], vocab_size=300)
    names = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    base.add_special_tokens({"additional_special_tokens": list(names.values()) + ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token=base.pad_token,
                                        bos_token=base.bos_token, eos_token=base.eos_token, extra_special_tokens=names)
    template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                image_seq_length=4)
    boi, image, eoi = tokenizer.convert_tokens_to_ids(list(names.values()))
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    config = transformers.Gemma3Config(
        vision_config=transformers.SiglipVisionConfig(**_vit(patch_size=4, image_size=image_size,
                                                             vision_use_head=False)),
        text_config=transformers.Gemma3TextConfig(**(_decoder(head_dim=H // 2, query_pre_attn_scalar=H // 2)
                                                     | dict(vocab_size=len(tokenizer), **special))),
        mm_tokens_per_image=4, image_token_index=image, boi_token_index=boi, eoi_token_index=eoi)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    _redraw(model.model.multi_modal_projector.mm_input_projection_weight)  # starts at zero: no image otherwise
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_idefics3_folder(path, texts, *, seed=0, image_size=16, smolvlm=False):
    """A tiny random Idefics3 (or SmolVLM) checkpoint: 4-pixel patches pixel-shuffled into 4 image
    tokens, a Llama decoder; saved with its processor (tiles of at most ``image_size`` pixels)."""
    from prsl_kernels.drivers.models import train_tokenizer

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    tokenizer = train_tokenizer(list(texts) + ["Describe the image in one sentence. User Assistant"], vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                "<global-img>", "<end_of_utterance>"]})
    template = ("{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size})
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=_vit(patch_size=4, image_size=image_size),
        text_config=transformers.LlamaConfig(**(_decoder() | dict(vocab_size=len(tokenizer), **special))),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    if smolvlm:
        # SmolVLMProcessor needs a video processor, hence torchvision: its parts are saved on their own,
        # as the drivers load them without it.
        tokenizer.chat_template = template
        tokenizer.save_pretrained(path)
        image_processor.save_pretrained(path)
    else:
        transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                       image_seq_len=4).save_pretrained(path)
    return path


def save_smolvlm_folder(path, texts, *, seed=0, image_size=16):
    """:func:`save_idefics3_folder` with SmolVLM's classes."""
    return save_idefics3_folder(path, texts, seed=seed, image_size=image_size, smolvlm=True)


def save_llava_next_folder(path, texts, *, seed=0, image_size=16, grid=32):
    """A tiny random LLaVA-NeXT checkpoint: CLIP 8-pixel patches on ``image_size`` views, one square
    ``grid`` x ``grid`` anyres grid point (a base view and 2 x 2 tiles per image); saved with its
    processor (LLaVA's chat template)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from prsl_kernels.drivers.models import train_tokenizer

    tokenizer = train_tokenizer(list(texts) + ["Describe the image in one sentence. USER ASSISTANT"], vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=[[grid, grid]])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template)
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**_vit(patch_size=8, image_size=image_size, projection_dim=H)),
        text_config=transformers.LlamaConfig(**(_decoder() | dict(vocab_size=len(tokenizer), **special))),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_grid_pinpoints=[[grid, grid]])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
