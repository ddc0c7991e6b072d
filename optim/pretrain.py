"""Train the embedded default generator from scratch on the procedural phantoms.

The result is a tiny but genuine Stable-Diffusion-family model, ``UNet2DConditionModel`` +
``AutoencoderKL`` + ``CLIPTextModel`` + a locally built ``CLIPTokenizer`` + ``DDIMScheduler``,
saved with ``save_pretrained`` (safetensors) so ``StableDiffusionPipeline.from_pretrained(path)``
loads it exactly as it loads a real checkpoint. Training runs in two stages:

1. the VAE learns to compress 64x64 phantoms to 4x16x16 latents (reconstruction + a small KL);
2. the UNet and the text encoder learn, together, to denoise those latents given the prompt,
   with 10% of prompts dropped to "" so classifier-free guidance works.

Reproduce the committed weights with (about 25 minutes on 2 CPU cores)::

    python -m optim.pretrain --out data/pretrained/generator --stop-after 1000

The output folder is rewritten every ``--save-every`` steps, so an interrupted run still leaves a
loadable model behind.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from data.phantoms import all_prompts, phantom_set, stack_images
from optim.tokenizer import build_clip_tokenizer


@dataclass
class PretrainConfig:
    out: str = "data/pretrained/generator"
    seed: int = 0
    n_images: int = 12000  # phantoms with seeds 0..n_images-1; evaluation uses seeds far above
    resolution: int = 64
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1  # share of prompts replaced by "" for classifier-free guidance
    ema_decay: float = 0.999
    save_every: int = 500
    stop_after: int = 0  # stop after this many UNet steps (0: all), keeping the schedule of unet_steps


def build_components(tokenizer_dir: str | Path, resolution: int = 64) -> dict:
    """Fresh, untrained components of the default generator, sized for a laptop CPU."""
    tokenizer = build_clip_tokenizer(all_prompts(), tokenizer_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)


def phantom_tensor(phantoms) -> torch.Tensor:
    """Phantoms as a (N, 3, H, W) tensor in [-1, 1], the range Stable Diffusion's VAE expects."""
    gray = torch.from_numpy(stack_images(phantoms))
    return (gray * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


class EMA:
    """Exponential moving average of a model's weights: smoother samples from short training.

    The average starts at the initial weights, so early on it is mostly those random weights. As
    Adam does for its moments, ``averaged()`` removes that start exactly: after N updates
    ``(shadow - decay**N * initial) / (1 - decay**N)`` is the average of the trained weights alone.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.initial = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        for averaged, current in zip(self.shadow.parameters(), model.parameters()):
            averaged.lerp_(current, 1.0 - self.decay)

    @torch.no_grad()
    def averaged(self) -> torch.nn.Module:
        """A copy of the model holding the bias-corrected average."""
        start_weight = self.decay**self.updates
        corrected = copy.deepcopy(self.shadow)
        for parameter, initial in zip(corrected.parameters(), self.initial):
            parameter.sub_(start_weight * initial).div_(1.0 - start_weight)
        return corrected


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: PretrainConfig, log) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(cfg.seed)
    vae.train()
    for step in range(cfg.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr)
        batch = images[torch.randint(len(images), (cfg.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch)
        loss = loss + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256):
    """Posterior means and standard deviations of every image, computed once for stage 2."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(images[start : start + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(components: dict, latents, prompts: list[str], cfg: PretrainConfig, save, log) -> None:
    unet, text_encoder, tokenizer = components["unet"], components["text_encoder"], components["tokenizer"]
    scheduler = components["scheduler"]
    means, stds = latents
    scale = components["vae"].config.scaling_factor
    token_ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    alphas = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in range(cfg.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, cfg.unet_steps, cfg.unet_lr)
        index = torch.randint(len(means), (cfg.unet_batch,), generator=generator)
        x0 = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
        ids = token_ids[index].clone()
        dropped = torch.rand(cfg.unet_batch, generator=generator) < cfg.caption_dropout
        ids[dropped] = empty_ids
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        if step % 50 == 0:
            rate = (step + 1) / (time.time() - started)
            log(f"unet step {step}/{cfg.unet_steps} loss {loss.item():.4f} ({rate:.2f} steps/s)")
        last = step == cfg.unet_steps - 1 or step + 1 == cfg.stop_after
        if (step + 1) % cfg.save_every == 0 or last:
            save(ema_unet.averaged(), ema_text.averaged(), step + 1)
        if last:
            break


def save_pipeline(components: dict, unet, text_encoder, out: str | Path) -> None:
    pipeline = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=text_encoder,
        tokenizer=components["tokenizer"],
        unet=unet,
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out, safe_serialization=True)


def pretrain(cfg: PretrainConfig) -> None:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out.parent / "pretrain.log", "a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"config {json.dumps(asdict(cfg))}")
    components = build_components(out / "tokenizer", cfg.resolution)
    phantoms = phantom_set(cfg.n_images, first_seed=0, resolution=cfg.resolution)
    images = phantom_tensor(phantoms)
    train_vae(components["vae"], images, cfg, log)
    means, stds = encode_latents(components["vae"], images)
    # Stable Diffusion scales latents to unit variance; record the factor in the VAE's config.
    scaling = 1.0 / means.std().item()
    components["vae"].register_to_config(scaling_factor=scaling)
    log(f"latent scaling factor {scaling:.4f}")

    def save(unet, text_encoder, step):
        save_pipeline(components, unet, text_encoder, out)
        (out / "training.json").write_text(json.dumps({"config": asdict(cfg), "unet_steps_done": step}, indent=2))
        log(f"saved pipeline to {out} at unet step {step}")

    train_unet(components, (means, stds), [p.prompt for p in phantoms], cfg, save, log)
    log("done")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = PretrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    pretrain(PretrainConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
