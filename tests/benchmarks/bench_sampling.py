"""Sampling with trajectories and log-probs against the plain diffusers pipeline, in one process.

Both sides run the same UNet (with its LoRA adapters attached), the same DDIM schedule, steps,
batch, guidance and eta; rounds alternate so load on the machine hits both alike. Prints the
minimum and median wall time of each and their ratios ours / pipeline (aim: at most 1.10).

    python tests/benchmarks/bench_sampling.py [--rounds 5] [--n 4] [--steps 20]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from optim.policy import Policy  # noqa: E402

PROMPT = "CT: axial slice of the abdomen with a large bright lesion on the left"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args()
    policy = Policy.load()

    def pipeline_call():
        generators = [torch.Generator().manual_seed(i) for i in range(args.n)]
        policy.pipeline(
            PROMPT,
            num_images_per_prompt=args.n,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            eta=1.0,
            generator=generators,
        )

    def ours():
        policy.sample(PROMPT, n=args.n, seed=0, steps=args.steps, guidance=args.guidance, eta=1.0)

    timings = {"pipeline": [], "ours": []}
    pipeline_call(), ours()  # warm-up
    for _ in range(args.rounds):
        for name, run in (("pipeline", pipeline_call), ("ours", ours)):
            started = time.perf_counter()
            with torch.no_grad():
                run()
            timings[name].append(time.perf_counter() - started)
    print(f"device {policy.device}, torch threads {torch.get_num_threads()}, {args.n} candidates x {args.steps} steps")
    for name, label in (("pipeline", "StableDiffusionPipeline.__call__"), ("ours", "Policy.sample (+trajectory, log-probs)")):
        print(f"{label:40s} min {min(timings[name]):.3f} s  median {statistics.median(timings[name]):.3f} s")
    # the minimum is the least disturbed by other load on a shared machine; the median shows the spread
    print(f"ratio ours / pipeline: min {min(timings['ours']) / min(timings['pipeline']):.3f}, "
          f"median {statistics.median(timings['ours']) / statistics.median(timings['pipeline']):.3f}")


if __name__ == "__main__":
    main()
