"""The hosted GPU box: sampling against diffusers' own pipeline, and one update's time and peak memory.

Builds pipelines of real models' sizes with RANDOM weights from configs (nothing is downloaded) and
saves each as a local diffusers folder, loaded as any host's checkpoint would be
(``Policy.load(folder, dtype=...)``):

- ``sd15``: SD 1.5's UNet (block_out_channels 320/640/1280/1280, cross-attention 768, 860M
  parameters), SD's VAE, a 12-layer 768-wide CLIP text encoder; 512 px, epsilon prediction;
- ``sd21``: SD 2.1's UNet (cross-attention 1024, attention_head_dim 5/10/20/20, linear projection,
  upcast attention), the same VAE, a 12-layer 1024-wide text encoder; 768 px, v-prediction;
- ``sdxl``: SDXL base's UNet (320/640/1280, transformer depths 1/2/10, cross-attention 2048, text-time
  conditioning; 2.6B parameters), CLIP-L (12 x 768) and CLIP-G (32 x 1280, pooled projection 1280), SDXL's
  VAE; 1024 px, epsilon prediction, stochastic DDIM;
- ``sd35m``: SD 3.5 Medium's MMDiT (24 blocks, 1536 wide, dual attention in the first 13, RMS-normed q/k;
  2.2B parameters), CLIP-L and CLIP-G with projections, T5-XXL's encoder (24 x 4096, 4.6B parameters with
  the local tokenizer's vocabulary, saved in bf16; ``--no-t5`` leaves it out, as SD 3 allows), a 16-channel
  VAE; 1024 px, the Flow-GRPO SDE.

Per model and dtype it prints:

- sampling, 4 candidates x 20 steps, CFG 5, eta 1: ``Policy.sample`` (trajectory and log-probs
  included) against the family's own ``__call__`` (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
  ``StableDiffusion3Pipeline``) on a plain pipeline (no adapters) loaded in the same dtype in the same
  process, with the same DDIM schedule (SD, SDXL) or the checkpoint's flow schedule (its ODE: no noise
  draws); rounds alternate; min and median;
- one GRPO and one DPO update (``optim.preference.update.apply_update``, the default ``UpdateConfig`` except the
  KL budget, lifted so every optimizer step runs) on ``--groups`` ranked group(s) of 4 sampled at that
  resolution, inside ``Policy.training()`` (gradient checkpointing): seconds and peak GiB
  (``torch.cuda.max_memory_allocated``, the weights included).

Random weights say nothing about images; they time the same arithmetic as trained ones. The tokenizers
are built locally (``optim.tokenizer``) with 77 tokens, as CLIP's (T5's: 256, as SD 3's pipeline uses).

    python tests/benchmarks/bench_gpu.py [--models sd15 sd21 sdxl sd35m] [--dtypes fp32 fp16 bf16] [--parts sample update]
        [--update-dtypes bf16] [--rounds 3] [--groups 1] [--root /tmp/bench-gpu] [--json results.json] [--tiny] [--no-t5]

``--tiny`` shrinks every model (same structure; SDXL and SD 3.5 to ``tests/family_models.TINY``) to check
the script on a CPU in a minute or two. SDXL and SD 3.5 Medium are built by ``tests/family_models.build``.
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.phantoms import all_prompts  # noqa: E402
from optim.preference.groups import RankedGroup  # noqa: E402
from optim.policy import DTYPES, Policy  # noqa: E402
from optim.tokenizer import build_clip_tokenizer  # noqa: E402
from optim.preference.update import UpdateConfig, apply_update  # noqa: E402
from optim.versions import VersionStore  # noqa: E402
from tests import family_models  # noqa: E402

PROMPT = "CT: axial slice of the abdomen with a large bright lesion on the left"
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
UNET = dict(in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
MODELS = {
    "sd15": dict(pixels=512, prediction_type="epsilon", text_width=768,
                 unet=dict(UNET, cross_attention_dim=768, attention_head_dim=8)),
    "sd21": dict(pixels=768, prediction_type="v_prediction", text_width=1024,
                 unet=dict(UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                           upcast_attention=True)),
}
VAE_1024 = dict(VAE, sample_size=1024)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, max_length=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")
FAMILY_MODELS = {  # built by tests/family_models.build; "family" names its builder
    "sdxl": dict(family="sdxl", pixels=1024, spec=dict(
        clip=CLIP_L, clip_2=CLIP_G,
        unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  transformer_layers_per_block=(1, 2, 10), projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
                  norm_num_groups=32),
        vae=dict(VAE_1024, scaling_factor=0.13025, force_upcast=True),
        scheduler=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       steps_offset=1, timestep_spacing="leading"))),
    "sd35m": dict(family="sd3", pixels=1024, spec=dict(
        clip=dict(CLIP_L, projection_dim=768), clip_2=CLIP_G,
        t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu", max_length=256),
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(13))),
        vae=dict(VAE_1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False),
        scheduler=dict(num_train_timesteps=1000, shift=3.0))),
}


def shrink(spec: dict) -> dict:
    """The same structure at a CPU's size: 32-wide blocks, 64 px, a 2-layer text encoder (SDXL, SD 3.5:
    ``tests/family_models.TINY``, 32 px)."""
    if "family" in spec:
        family = spec["family"]
        return dict(spec, pixels=family_models.TINY[family]["vae"]["sample_size"],
                    spec=dict(family_models.TINY[family], t5=spec["spec"].get("t5") and family_models.TINY[family].get("t5")))
    width = 64
    unet = dict(spec["unet"], block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=width,
                attention_head_dim=8 if isinstance(spec["unet"]["attention_head_dim"], int) else (2, 2, 4, 4))
    return dict(spec, pixels=64, text_width=width, text_layers=2, unet=unet,
                vae=dict(VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1))


def build(name: str, spec: dict, root: Path) -> Path:
    """Write the model as a local diffusers folder (random weights, fixed seed); reused if already there."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = root / name
    if (folder / "model_index.json").exists():
        return folder
    started = time.perf_counter()
    if "family" in spec:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        family_models.build(spec["family"], folder, spec["spec"], device=device,
                            save_dtype=torch.bfloat16 if spec["spec"].get("t5") and spec["pixels"] >= 1024 else None)
        print(f"built {name}: {spec['pixels']} px, in {time.perf_counter() - started:.0f} s", flush=True)
        release()
        return folder
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(all_prompts() + [PROMPT], root / f"{name}-tokenizer", max_length=77)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random initialisation of 860M parameters is quick on the GPU
        unet = UNet2DConditionModel(sample_size=spec["pixels"] // 8, **spec["unet"])
        vae = AutoencoderKL(sample_size=spec["pixels"], **spec.get("vae", VAE))
        width = spec["text_width"]
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=spec.get("text_layers", 12),
            num_attention_heads=width // 64, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(prediction_type=spec["prediction_type"], **SCHEDULER)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    parameters = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"built {name}: UNet {parameters:.0f}M parameters, {spec['pixels']} px, in {time.perf_counter() - started:.0f} s",
          flush=True)
    del pipeline, unet, vae, text_encoder
    release()
    return folder


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def plain_pipeline(folder: Path, dtype: str, device, family: str = "sd"):
    """diffusers' own pipeline from the same folder in the same dtype, with the policy's DDIM schedule (the
    checkpoint's flow schedule for SD 3)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if family != "sd":
        return family_models.diffusers_pipeline(family, folder, DTYPES[dtype]).to(device)

    pipeline = StableDiffusionPipeline.from_pretrained(folder, dtype=DTYPES[dtype], safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False, thresholding=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def bench_sampling(policy: Policy, folder: Path, dtype: str, args, family: str = "sd") -> dict:
    pipeline = plain_pipeline(folder, dtype, policy.device, family)
    settings = dict(steps=args.steps, guidance=args.guidance, eta=1.0)

    def diffusers_call():
        if family != "sd":
            family_models.diffusers_call(family, pipeline, args.n, args.steps, args.guidance, policy.image_size())
            return
        generators = [torch.Generator().manual_seed(i) for i in range(args.n)]
        pipeline(PROMPT, num_images_per_prompt=args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 eta=1.0, generator=generators)

    def ours():
        samples = policy.sample(PROMPT, n=args.n, seed=0, **settings)
        finite.append(bool(torch.isfinite(samples.trajectory.log_probs).all()))

    finite: list[bool] = []
    timings = {"diffusers": [], "ours": []}
    diffusers_call(), ours()  # warm-up
    for _ in range(args.rounds):
        for name, run in (("diffusers", diffusers_call), ("ours", ours)):
            synchronize()
            started = time.perf_counter()
            with torch.no_grad():
                run()
            synchronize()
            timings[name].append(time.perf_counter() - started)
    del pipeline
    release()
    result = {f"{name}_{stat.__name__}_s": stat(values) for name, values in timings.items() for stat in (min, statistics.median)}
    result["ratio_min"] = result["ours_min_s"] / result["diffusers_min_s"]
    result["ratio_median"] = result["ours_median_s"] / result["diffusers_median_s"]
    result["log_probs_finite"] = all(finite)
    return result


def ranked_groups(policy: Policy, args) -> list[RankedGroup]:
    """``--groups`` groups of ``--n`` candidates sampled now, each ranked best-to-worst in row order."""
    groups = []
    for g in range(args.groups):
        trajectory = policy.sample(PROMPT, n=args.n, seed=100 + g, steps=args.steps, guidance=args.guidance).trajectory
        ids = [f"c{i}" for i in range(args.n)]
        groups.append(RankedGroup(f"g{g}", ids, trajectory, rankings=[([[c] for c in ids], 3)]))
    return groups


def bench_update(policy: Policy, groups: list[RankedGroup], algorithm: str, root: Path) -> dict:
    store = VersionStore(root / f"versions-{algorithm}")
    policy.open_versions(store)
    config = UpdateConfig(algorithm=algorithm, kl_budget=float("inf"))
    release()
    reset_peak()
    synchronize()
    started = time.perf_counter()
    result = apply_update(policy, store, groups, config)  # inside policy.training(): gradient checkpointing
    synchronize()
    seconds = time.perf_counter() - started
    steps = result.metrics.get("optimizer_steps_taken", len(result.metrics.get("steps", [])))
    return {"seconds": seconds, "peak_gib": peak_gib(), "applied": result.applied, "optimizer_steps": steps,
            "seconds_per_optimizer_step": seconds / max(steps, 1), "message": result.message}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS) + list(FAMILY_MODELS), choices=list(MODELS) + list(FAMILY_MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES)[::-1], choices=list(DTYPES), help="sampling dtypes")
    parser.add_argument("--update-dtypes", nargs="*", default=None, choices=list(DTYPES),
                        help="dtypes the updates run in (default: the sampling dtypes)")
    parser.add_argument("--parts", nargs="+", default=["sample", "update"], choices=["sample", "update"])
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "dpo"], choices=["grpo", "dpo"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=4, help="candidates per group")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--groups", type=int, default=1, help="ranked groups per update")
    parser.add_argument("--root", default="/tmp/bench-gpu", help="where the model folders are built (reused)")
    parser.add_argument("--json", default=None, help="also append every result here, one JSON object a line")
    parser.add_argument("--tiny", action="store_true", help="shrunken models, to check the script on a CPU")
    parser.add_argument("--no-t5", action="store_true", help="SD 3.5 Medium without its T5-XXL text encoder")
    args = parser.parse_args()
    update_dtypes = args.dtypes if args.update_dtypes is None else args.update_dtypes
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}; {args.n} candidates x {args.steps} steps, CFG {args.guidance}", flush=True)

    def report(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps({"device": device, **record}) + "\n")

    for name in args.models:
        spec = {**MODELS, **FAMILY_MODELS}[name]
        if args.no_t5 and "family" in spec:
            spec = dict(spec, spec=dict(spec["spec"], t5=None))
        spec = shrink(spec) if args.tiny else spec
        family = spec.get("family", "sd")
        folder = build(name + ("-no-t5" if args.no_t5 and family == "sd3" else "") + ("-tiny" if args.tiny else ""), spec, root)
        for dtype in dict.fromkeys(args.dtypes + update_dtypes):
            started = time.perf_counter()
            policy = Policy.load(folder, dtype=dtype)
            where = {"model": name, "pixels": spec["pixels"], "dtype": dtype, "load_s": time.perf_counter() - started}
            if "sample" in args.parts and dtype in args.dtypes:
                report({**where, "part": "sample", **bench_sampling(policy, folder, dtype, args, family)})
            if "update" in args.parts and dtype in update_dtypes:
                groups = ranked_groups(policy, args)
                for algorithm in args.algorithms:
                    try:
                        result = bench_update(policy, groups, algorithm, root / f"{folder.name}-{dtype}")
                    except torch.cuda.OutOfMemoryError as error:
                        result = {"out_of_memory": str(error).split("\n")[0], "peak_gib": peak_gib()}
                        release()
                    report({**where, "part": algorithm, "groups": args.groups, **result})
            del policy
            release()


if __name__ == "__main__":
    main()
