"""Pipelines of every generator family built from configs with RANDOM weights, saved as local diffusers folders.

The way diffusers' own tests build tiny pipelines (nothing downloaded): the tokenizers are built locally
from the phantom prompts' words (``optim.tokenizer``), every network from a small config. ``TINY`` holds
CPU-sized configs (32 px images, 16 x 16 latents, one or two blocks: a few MB, a sampling step in
milliseconds) for the tests; ``tests/benchmarks/bench_gpu.py`` passes real-sized ones (SDXL, SD 3.5
Medium) to the same builders.

    build("sdxl", folder)                         # tiny
    build("sd", folder, set_alpha_to_one=True)    # a scheduler whose last DDIM step has zero variance
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from data.phantoms import all_prompts

FAMILIES = ("sd", "sdxl", "sd3", "flux")
PROMPT = "CT: axial slice of the abdomen with a large bright lesion on the left"

TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
TINY = {
    "sd": dict(
        clip=dict(hidden_size=32, num_hidden_layers=2, max_length=16),
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        vae=dict(TINY_VAE, latent_channels=4, scaling_factor=0.18215),
        scheduler=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    ),
    "sdxl": dict(
        clip=dict(hidden_size=32, num_hidden_layers=2, max_length=16),
        clip_2=dict(hidden_size=32, num_hidden_layers=2, projection_dim=32),
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                  projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8),
        vae=dict(TINY_VAE, latent_channels=4, scaling_factor=0.13025, force_upcast=True),
        scheduler=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       steps_offset=1, timestep_spacing="leading"),
    ),
    "sd3": dict(  # SD 3.5 Medium's structure: dual attention in the first block, RMS-normed q and k
        clip=dict(hidden_size=32, num_hidden_layers=2, projection_dim=32, max_length=16),
        clip_2=dict(hidden_size=32, num_hidden_layers=2, projection_dim=32),
        t5=dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=1, max_length=24),
        transformer=dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                         qk_norm="rms_norm", dual_attention_layers=(0,)),
        vae=dict(TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
    ),
    "flux": dict(  # FLUX.1-dev's structure: guidance embedding, joint and single-stream blocks
        clip=dict(hidden_size=32, num_hidden_layers=2, max_length=16),
        t5=dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=1, max_length=24),
        transformer=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                         axes_dims_rope=(4, 4, 8)),
        vae=dict(TINY_VAE, latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False),
        scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096),
    ),
}


def _clip(tokenizer, spec: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width = spec["hidden_size"]
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=spec.get("intermediate_size", 4 * width),
                            num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=max(1, width // 64) if width >= 64 else 2,
                            max_position_embeddings=tokenizer.model_max_length, projection_dim=spec.get("projection_dim", width),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act=spec.get("hidden_act", "quick_gelu"))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, spec: dict):
    from transformers import T5Config, T5EncoderModel

    fields = {k: v for k, v in spec.items() if k != "max_length"}
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **fields))


def build(family: str, folder: str | Path, spec: dict | None = None, set_alpha_to_one: bool = False, seed: int = 0,
          device: str = "cpu", save_dtype: torch.dtype | None = None) -> Path:
    """Write a ``family`` pipeline (``TINY[family]`` unless ``spec``) with random weights to ``folder``; reused if there.

    ``save_dtype``: cast the networks before saving (a real-sized T5 in bf16 halves the disk and the load).
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    from optim.tokenizer import build_clip_tokenizer, build_t5_tokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    spec = copy.deepcopy(spec or TINY[family])
    prompts = all_prompts() + [PROMPT]
    work = folder.parent / f".{folder.name}-tokenizers"
    clip_tokenizer = build_clip_tokenizer(prompts, work / "clip", max_length=spec["clip"]["max_length"])
    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(**spec["vae"])
        if family == "sd":
            scheduler = DDIMScheduler(**dict(spec["scheduler"], set_alpha_to_one=set_alpha_to_one or spec["scheduler"]["set_alpha_to_one"]))
            pipeline = StableDiffusionPipeline(
                vae=vae, text_encoder=_clip(clip_tokenizer, spec["clip"], False), tokenizer=clip_tokenizer,
                unet=UNet2DConditionModel(**spec["unet"]), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        elif family == "sdxl":
            pipeline = StableDiffusionXLPipeline(
                vae=vae, text_encoder=_clip(clip_tokenizer, spec["clip"], False),
                text_encoder_2=_clip(clip_tokenizer, spec["clip_2"], True), tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer,
                unet=UNet2DConditionModel(**spec["unet"]), scheduler=EulerDiscreteScheduler(**spec["scheduler"]))
        elif family == "sd3":
            t5_tokenizer = build_t5_tokenizer(prompts, work / "t5", max_length=(spec.get("t5") or {}).get("max_length", 256))
            pipeline = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**spec["transformer"]),
                scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]), vae=vae,
                text_encoder=_clip(clip_tokenizer, spec["clip"], True), tokenizer=clip_tokenizer,
                text_encoder_2=_clip(clip_tokenizer, spec["clip_2"], True), tokenizer_2=clip_tokenizer,
                text_encoder_3=_t5(t5_tokenizer, spec["t5"]) if spec.get("t5") else None, tokenizer_3=t5_tokenizer)
        elif family == "flux":
            t5_tokenizer = build_t5_tokenizer(prompts, work / "t5", max_length=spec["t5"]["max_length"])
            pipeline = FluxPipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]), vae=vae,
                text_encoder=_clip(clip_tokenizer, spec["clip"], False), tokenizer=clip_tokenizer,
                text_encoder_2=_t5(t5_tokenizer, spec["t5"]), tokenizer_2=t5_tokenizer,
                transformer=FluxTransformer2DModel(**spec["transformer"]))
        else:
            raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if save_dtype is not None:
        pipeline.to(dtype=save_dtype)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def diffusers_pipeline(family: str, folder: Path, dtype: torch.dtype = torch.float32):
    """The family's own diffusers pipeline from ``folder``, with the scheduler the workbench samples with
    (DDIM for SD and SDXL; the checkpoint's flow-matching scheduler otherwise)."""
    import json

    from diffusers import DDIMScheduler, DiffusionPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    options = {name: None for name, value in index.items() if isinstance(value, list) and value and value[0] is None}
    if family == "sd":
        options["requires_safety_checker"] = False
    pipeline = DiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **options)
    if family in ("sd", "sdxl"):
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False, thresholding=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def diffusers_call(family: str, pipeline, n: int, steps: int, guidance: float, size: int, seed: int = 0):
    """Sample ``n`` images with the family's own pipeline, as the workbench would (same size, steps, guidance)."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    options = dict(num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   height=size, width=size)
    if family in ("sd", "sdxl"):
        options["eta"] = 1.0
    if family == "sd3":
        options["max_sequence_length"] = min(256, pipeline.tokenizer_3.model_max_length)
    if family == "flux":
        options["max_sequence_length"] = min(512, pipeline.tokenizer_2.model_max_length)
    return pipeline(PROMPT, **options).images
