"""Proof that rankings move the generator: rounds of generate, rank, update with a simulated expert.

The simulated expert prefers CONTRAST: its score of an image is the standard deviation of its grey
levels (on the 0-1 scale), and it ranks a group by that score, best first, tying candidates whose
scores differ by less than 0.002. A radiologist asking for "more contrast" is a common and plain
preference, and the score is computed from the image alone, so the expert knows nothing of seeds,
versions or log-probs.

For GRPO and for DPO separately, starting from the embedded default model each time:
  - ``--groups`` rounds: the rejection sampler draws a group of 4 survivors for the next prompt,
    the expert ranks it, and every ``--groups-per-update`` groups an update runs on the new groups
    with the library's default settings (``UpdateConfig``);
  - on fixed evaluation seeds (``--eval`` samples over the prompts), the base and the final version
    draw seed-matched images: reported are the expert's mean score of each, the win-rate of the
    final version (ties count half), the KL of the final version's step kernels from the base's,
    the selector's pass rate of each, and the wall time per update.
Bar (issue 4): within 30 groups of 4, win-rate at least 70% and pass rate down at most 10 points.

    python tests/benchmarks/bench_learning.py [--algorithms grpo dpo] [--groups 30] [--eval 32]
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.phantoms import all_prompts  # noqa: E402
from optim.groups import RankedGroup  # noqa: E402
from optim.policy import Policy  # noqa: E402
from optim.selector import Selector  # noqa: E402
from optim.update import UpdateConfig, apply_update, kl_between, step_kernels  # noqa: E402
from optim.versions import VersionStore  # noqa: E402
from workbench.sampler import RejectionSampler, SamplerConfig  # noqa: E402

TIE = 0.002


def expert_score(image) -> float:
    """The simulated expert's preference: contrast, the std of grey levels on the 0-1 scale."""
    return float(np.asarray(image.convert("L"), dtype=np.float32).std() / 255.0)


def expert_ranking(ids: list[str], images: list) -> list[list[str]]:
    """Tiers best first; candidates within TIE of the previous one's score share its tier."""
    order = sorted(zip(ids, map(expert_score, images)), key=lambda pair: -pair[1])
    tiers = [[order[0][0]]]
    last = order[0][1]
    for candidate, score in order[1:]:
        if last - score < TIE:
            tiers[-1].append(candidate)
        else:
            tiers.append([candidate])
        last = score
    return tiers


def evaluate(policy: Policy, selector: Selector, prompts: list[str], count: int, steps: int):
    """Expert scores, images' selector verdicts and chains on fixed seeds: ``count`` samples."""
    scores, passed, trajectories = [], [], []
    for k in range(count // 4):
        prompt = prompts[k % len(prompts)]
        samples = policy.sample(prompt, n=4, seed=10_000 + k, steps=steps)
        scores += [expert_score(image) for image in samples.images]
        passed += [v.passed for v in selector.judge(samples.images, prompt=prompt)]
        trajectories.append(samples.trajectory)
    return np.array(scores), np.array(passed), trajectories


def run(algorithm: str, args, prompts: list[str]) -> dict:
    policy, selector = Policy.load(), Selector.load()
    store = VersionStore(Path(tempfile.mkdtemp()) / "versions")
    policy.open_versions(store)
    config = UpdateConfig(algorithm=algorithm)
    if args.learning_rate is not None:  # to try other settings; the defaults are UpdateConfig's
        config.learning_rate = args.learning_rate
    base_scores, base_passed, eval_chains = evaluate(policy, selector, prompts, args.eval, args.steps)
    eval_groups = [RankedGroup(f"eval{k}", [str(i) for i in range(4)], t) for k, t in enumerate(eval_chains)]
    base_kernels = step_kernels(policy, eval_groups)
    sampler = RejectionSampler(policy, selector, SamplerConfig(survivors=4, batch_size=4, max_draws=12))
    pending, update_times, messages = [], [], []
    for g in range(args.groups):
        prompt = prompts[g % len(prompts)]
        result = sampler.draw(prompt, seed=g, steps=args.steps)
        if len(result.survivors) < 2:
            continue
        ids = [f"c{c.index}" for c in result.survivors]
        tiers = expert_ranking(ids, [c.image for c in result.survivors])
        pending.append(RankedGroup(f"g{g}", ids, result.trajectory, [(tiers, 3)]))
        if len(pending) == args.groups_per_update or g == args.groups - 1:
            started = time.perf_counter()
            update = apply_update(policy, store, pending, config)
            update_times.append(time.perf_counter() - started)
            messages.append(update.message)
            print(f"  [{algorithm}] after group {g + 1}: {update.message}", flush=True)
            pending = []
    scores, passed, _ = evaluate(policy, selector, prompts, args.eval, args.steps)
    wins = np.mean((scores > base_scores) + 0.5 * (scores == base_scores))
    return {
        "algorithm": algorithm,
        "groups": args.groups,
        "updates": len(update_times),
        "final_version": policy.version,
        "expert_score_base": float(base_scores.mean()),
        "expert_score_final": float(scores.mean()),
        "win_rate": float(wins),
        "kl_final_from_base": kl_between(base_kernels, step_kernels(policy, eval_groups)),
        "pass_rate_base": float(base_passed.mean()),
        "pass_rate_final": float(passed.mean()),
        "seconds_per_update": float(np.mean(update_times)),
        "config": asdict(config),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "dpo"])
    parser.add_argument("--groups", type=int, default=30)
    parser.add_argument("--groups-per-update", type=int, default=5)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=None, help="override UpdateConfig's default")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompts = all_prompts()
    results = []
    for algorithm in args.algorithms:
        started = time.perf_counter()
        result = run(algorithm, args, prompts)
        result["wall_time_s"] = time.perf_counter() - started
        results.append(result)
        print(f"{algorithm}: expert score {result['expert_score_base']:.4f} -> {result['expert_score_final']:.4f}, "
              f"win-rate {result['win_rate']:.0%} (bar 70%), KL from base {result['kl_final_from_base']:.4g}, "
              f"pass rate {result['pass_rate_base']:.0%} -> {result['pass_rate_final']:.0%} (bar: at most 10 points down), "
              f"{result['seconds_per_update']:.1f} s per update, {result['wall_time_s']:.0f} s in all", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
