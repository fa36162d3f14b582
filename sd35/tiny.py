"""A tiny, randomly initialised Stable Diffusion 3 pipeline.

The real SD3.5 weights are gated, many gigabytes and need the Hugging Face hub.
Offline tests and ``make demo`` need something that loads through the very same
``StableDiffusion3Pipeline.from_pretrained`` path, runs in milliseconds on a CPU
and fits in a couple of megabytes; its images are noise, but deterministic noise.

    python -m sd35.tiny DIR [--seed N]
    python -m sd35.tiny DIR --lora [--seed N] [--rank R]   # a random LoRA for it

A tiny LoRA is made the way a training script makes one (peft's ``LoraConfig``
on the transformer, ``save_lora_weights``), with random A and B matrices large
enough to change the image visibly; different seeds give different adapters.
"""

import argparse
import io
import os
import pathlib
import string

import sentencepiece
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_HIDDEN = 32
CLIP_PROJECTION = 16
# The pipeline zero-pads the two concatenated CLIP hidden states up to the T5
# width, so T5 must be at least as wide as both of them together.
T5_WIDTH = 2 * CLIP_HIDDEN
# 2048 px / VAE factor 8 / patch 2 = 128 patches per side: the largest size served.
POS_EMBED_MAX_SIZE = 128

# Gives the T5 tokenizer real multi-character pieces and every printable ASCII character.
T5_CORPUS = (
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a fox in a snowy forest at dawn",
    "portrait of an old sailor, dramatic lighting, highly detailed, 8k",
    "a cat sitting on a red sofa next to a window with plants",
    "cyberpunk city street at night with neon signs and rain",
    "a bowl of ramen with chopsticks, studio photograph",
    string.ascii_letters + string.digits + string.punctuation,
)


def clip_tokenizer() -> CLIPTokenizer:
    # Without merges, byte-level BPE spells every word out symbol by symbol, so
    # the vocabulary is just the 256 byte symbols, their word-final forms and the
    # two specials; any prompt still tokenizes.
    byte = list(bytes_to_unicode().values())
    tokens = [*byte, *(b + "</w>" for b in byte), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer(seed: int) -> T5Tokenizer:
    # Trained in memory and handed over as (piece, score) pairs: loading a
    # spiece.model file would need protobuf.
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(seed)
    with open(os.devnull, "w") as quiet:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(T5_CORPUS),
            model_writer=model,
            logstream=quiet,
            model_type="unigram",
            vocab_size=256,
            hard_vocab_limit=False,
            character_coverage=1.0,
            # T5's layout: <pad>=0, </s>=1, <unk>=2, no <s>.
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            # The tokenizers backend gets no precompiled normalizer, so train on raw text.
            normalization_rule_name="identity",
            num_threads=1,
        )
    spm = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(spm.id_to_piece(i), spm.get_score(i)) for i in range(len(spm))]
    # Sentinels go at the end in reverse, as in the real T5 vocabulary.
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=CLIP_PROJECTION,
        max_position_embeddings=77,
        # Pooling reads the first <|endoftext|>; CLIP's default ids are off this vocab.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_transformer() -> SD3Transformer2DModel:
    # The defaults already match SD3: patch 2, 16 latent channels, 1024 px.
    return SD3Transformer2DModel(
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_PROJECTION,
        pos_embed_max_size=POS_EMBED_MAX_SIZE,
        qk_norm="rms_norm",
    ).eval()


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Standard deviation of the random A and B entries: large enough that an
# adapter moves a 256² image by several levels of 255 at scale 1.
LORA_INIT_STD = 0.5


CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_tiny_lora(
    directory: pathlib.Path,
    seed: int = 0,
    rank: int = 4,
    target_modules: tuple[str, ...] = LORA_TARGETS,
    text_encoder: bool = False,
) -> pathlib.Path:
    """Save a random LoRA for the tiny transformer (and, with ``text_encoder``, the first CLIP encoder) in
    diffusers' format (``pytorch_lora_weights.safetensors``)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):  # the base weights are irrelevant: leave the caller's RNG alone
        transformer = tiny_transformer()
        clip = CLIPTextModelWithProjection(_clip_config(clip_tokenizer())) if text_encoder else None
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules)))
    models = [transformer]
    if clip is not None:
        # transformers' own add_adapter wants peft >= 0.22; peft's wrapper works with the pinned 0.21.
        clip = get_peft_model(clip, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(CLIP_LORA_TARGETS)))
        models.append(clip)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * LORA_INIT_STD)
    directory.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        text_encoder_lora_layers=None if clip is None else get_peft_model_state_dict(clip.base_model.model),
    )
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


def build_tiny_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build the tiny pipeline in memory; the same seed gives the same weights."""
    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer(seed)
    clip_config = _clip_config(tokenizer)
    t5_config = T5Config(
        vocab_size=len(tokenizer_3),
        d_model=T5_WIDTH,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
    )
    # A private RNG stream: same weights for the same seed, caller's RNG untouched.
    # eval() as from_pretrained does, or T5's dropout randomises in-memory output.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = tiny_transformer()
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            norm_num_groups=4,
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
        text_encoders = [CLIPTextModelWithProjection(clip_config).eval() for _ in range(2)]
        text_encoder_3 = T5EncoderModel(t5_config).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        text_encoder_3=text_encoder_3,
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def write_tiny_pipeline(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Save the tiny pipeline to ``directory`` (created or overwritten) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed).save_pretrained(directory)
    # diffusers writes weights as 0600; a container's non-root user must read them.
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random SD3 pipeline (or, with --lora, a LoRA) to DIR.")
    parser.add_argument("directory", metavar="DIR", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", action="store_true", help="write a random LoRA for the tiny model instead")
    parser.add_argument("--rank", type=int, default=4, help="the LoRA's rank (with --lora)")
    args = parser.parse_args(argv)
    if args.lora:
        print(write_tiny_lora(args.directory, args.seed, args.rank))
    else:
        print(write_tiny_pipeline(args.directory, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
