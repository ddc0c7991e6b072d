"""Stable Diffusion XL: the SD UNet recipe with two text encoders, pooled embeddings and size conditioning.

Everything but the conditioning is Stable Diffusion's (``stable_diffusion.py``): epsilon prediction,
stochastic DDIM in place of the checkpoint's Euler scheduler, the DDIM DPO error, LoRA on the attention
projections.

- Conditioning: the pipeline's own ``encode_prompt``: the penultimate hidden states of both CLIP text
  encoders concatenated (2048 wide for SDXL), and the second encoder's pooled projection (1280). The
  empty prompt's embeddings are zeros where the checkpoint says so (``force_zeros_for_empty_prompt``),
  as diffusers' pipeline does.
- ``add_time_ids``: original size, crop corner and target size, ``(S, S, 0, 0, S, S)`` at the model's
  size S (1024 for SDXL), for the conditional and unconditional halves alike.
- The VAE: SDXL's overflows in fp16, so with ``dtype="fp16"`` and ``force_upcast`` in its config it
  runs in fp32 (as diffusers' pipeline upcasts it); bf16 and fp32 run it in the model's dtype.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from optim.generators.stable_diffusion import StableDiffusion
from optim.trajectory import Condition


class StableDiffusionXL(StableDiffusion):
    family = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    pipeline_options: ClassVar[dict] = {}

    def __init__(self, pipeline, model_path, device, lora_rank: int = 4):
        super().__init__(pipeline, model_path, device, lora_rank)
        self.text_encoder_2 = pipeline.text_encoder_2
        self.tokenizer_2 = pipeline.tokenizer_2
        if self.vae_dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)
            self.vae_dtype = torch.float32

    @torch.no_grad()
    def encode_condition(self, prompt: str) -> tuple[Condition, Condition]:
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        # stored in fp32; exact back in the model's dtype
        return Condition(embeds.float(), pooled.float()), Condition(negative.float(), negative_pooled.float())

    def unet_kwargs(self, condition: Condition, n: int) -> dict:
        if condition.pooled is None:
            raise ValueError("SDXL's UNet needs the pooled prompt embeddings: this conditioning has none")
        size = self.image_size()
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=self.device).expand(n, -1)
        return {"added_cond_kwargs": {"text_embeds": condition.pooled, "time_ids": time_ids}}
