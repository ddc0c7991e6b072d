"""Sampling with trajectories and log-probs against each family's own diffusers pipeline, on the tiny models.

For every family (SD 1.x/2.x, SDXL, SD 3 / 3.5, FLUX) the tiny random-weight pipeline of
``tests/family_models.py`` is built as a local folder and loaded as a checkpoint. ``Policy.sample`` (the
workbench's sampler: per-candidate seeds, the stochastic step with its log-probability, every latent
kept) is timed against the family's own ``__call__`` on the same size, steps, batch and guidance, twice:

- ``pipeline+lora``: ``policy.pipeline`` itself, the same denoiser with the same LoRA adapters attached
  (and for SD / SDXL the same DDIM scheduler): what the trajectory recording costs;
- ``pipeline``: a plain pipeline loaded from the folder, no adapters: what the adapters cost on top.

The flow families' own pipelines run the Euler ODE (no noise draws), the workbench the SDE. On these
tiny models (32 px, a few MB) a LoRA matrix is as wide as the layer it adapts and fixed costs weigh more
than on real ones; ``bench_gpu.py`` measures the real sizes. Rounds alternate, so load on a shared
machine hits all sides alike; the minimum is the least disturbed.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_families.py [--families sd sdxl sd3 flux] [--rounds 5]
        [--n 4] [--steps 10] [--root /tmp/bench-families]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from optim.policy import Policy  # noqa: E402
from tests.family_models import FAMILIES, PROMPT, build, diffusers_call, diffusers_pipeline  # noqa: E402


def bench(family: str, args) -> dict:
    folder = build(family, Path(args.root) / family)
    policy = Policy.load(folder)
    plain = diffusers_pipeline(family, folder)
    size = policy.image_size()
    runs = {
        "ours": lambda: policy.sample(PROMPT, n=args.n, seed=0, steps=args.steps, guidance=args.guidance, eta=1.0),
        "pipeline+lora": lambda: diffusers_call(family, policy.pipeline, args.n, args.steps, args.guidance, size),
        "pipeline": lambda: diffusers_call(family, plain, args.n, args.steps, args.guidance, size),
    }
    timings = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            with torch.no_grad():
                run()
            timings[name].append(time.perf_counter() - started)
    result = {"family": family, "class": type(policy).__name__, "pixels": size}
    for name, values in timings.items():
        result[f"{name}_min_s"], result[f"{name}_median_s"] = min(values), statistics.median(values)
    for other in ("pipeline+lora", "pipeline"):
        result[f"ratio_vs_{other}_min"] = result["ours_min_s"] / result[f"{other}_min_s"]
        result[f"ratio_vs_{other}_median"] = result["ours_median_s"] / result[f"{other}_median_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--root", default="/tmp/bench-families", help="where the tiny model folders are built (reused)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.n} candidates x {args.steps} steps, "
          f"guidance {args.guidance}, {args.rounds} rounds")
    print(f"{'family':8s} {'ours':>9s} {'pipe+lora':>10s} {'pipeline':>9s}   ratio vs pipe+lora (min / median)   vs pipeline")
    for family in args.families:
        r = bench(family, args)
        print(f"{family:8s} {r['ours_min_s']:8.3f}s {r['pipeline+lora_min_s']:9.3f}s {r['pipeline_min_s']:8.3f}s   "
              f"{r['ratio_vs_pipeline+lora_min']:.3f} / {r['ratio_vs_pipeline+lora_median']:.3f}"
              f"{'':22s}{r['ratio_vs_pipeline_min']:.3f} / {r['ratio_vs_pipeline_median']:.3f}", flush=True)


if __name__ == "__main__":
    main()
