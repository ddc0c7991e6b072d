"""How well the reward model learns a simulated expert's rankings: held-out pairwise accuracy per feature set.

From the embedded default generator, the rejection sampler (with the embedded selector, 20 steps)
draws ``--groups`` groups of 4 over the phantoms' prompts (``data.phantoms.all_prompts``, the group
number choosing the prompt in turn and seeding the draw). Each simulated expert of
``data.simulated_experts.EXPERTS`` ranks every group at level 3; a group whose four candidates all
tie gives no pair and drops out. For each feature set and each expert, the reward model
(``optim.preference.reward_model``, default settings otherwise) measures its held-out accuracy as ``fit`` always
does, by cross-validation over ``--folds`` folds OF GROUPS (each pair is ordered by an ensemble that
never saw its group), repeated over ``--repeats`` shuffles of the groups: reported are the mean and
the minimum of the level-weighted held-out accuracy over the repeats, the training groups per fold,
the time to compute the features of all images once, and the mean fit time (every fold's fit and the
refit on all groups, features precomputed).

Bar (issue 10): at least 80% held-out pairwise accuracy on the simulated expert's groups with 30
training groups.

    python tests/benchmarks/bench_reward_model.py [--groups 40] [--folds 4] [--repeats 5]
        [--features selector latents pixels latents+pixels] [--cache DIR] [--json FILE] [--device cpu]

``--cache DIR`` keeps the drawn groups (PNG and a JSON of prompts) so another run can skip the draws.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.phantoms import all_prompts  # noqa: E402
from data.simulated_experts import EXPERTS  # noqa: E402
from optim.policy import Policy  # noqa: E402
from optim.preference.reward_model import (RewardModel, RewardModelConfig, comparisons_from_rankings,  # noqa: E402
                                           featurizer)
from optim.selector.model import Selector  # noqa: E402
from workbench.sampler import RejectionSampler, SamplerConfig  # noqa: E402

LEVEL = 3


def draw_groups(policy: Policy, selector: Selector, count: int, steps: int) -> list[tuple[str, list]]:
    """``count`` groups (prompt, survivor images) from the rejection sampler; groups of fewer than 2 are left out."""
    prompts = all_prompts()
    sampler = RejectionSampler(policy, selector, SamplerConfig(survivors=4, batch_size=4, max_draws=12))
    groups = []
    for g in range(count):
        result = sampler.draw(prompts[g % len(prompts)], seed=g, steps=steps)
        if len(result.survivors) >= 2:
            groups.append((result.prompt, [c.image for c in result.survivors]))
        print(f"  group {g + 1}/{count}: {result.message()}", flush=True)
    return groups


def cached_groups(cache: Path | None, policy: Policy, selector: Selector, count: int, steps: int):
    """The groups kept in ``cache`` when it holds this many drawn with these steps, else freshly drawn (and kept)."""
    index = cache / "groups.json" if cache else None
    if index and index.is_file():
        kept = json.loads(index.read_text())
        if kept["count"] == count and kept["steps"] == steps:
            return [(prompt, [Image.open(cache / name).copy() for name in names]) for prompt, names in kept["groups"]]
    groups = draw_groups(policy, selector, count, steps)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        names = []
        for g, (_, images) in enumerate(groups):
            names.append([f"g{g}_c{k}.png" for k in range(len(images))])
            for name, image in zip(names[-1], images):
                image.save(cache / name)
        index.write_text(json.dumps({"count": count, "steps": steps,
                                     "groups": [[prompt, n] for (prompt, _), n in zip(groups, names)]}))
    return groups


def expert_comparisons(groups: list[tuple[str, list]], expert) -> list:
    """Every group ranked by the simulated expert at level 3, as comparisons into the flat image list."""
    comparisons, offset = [], 0
    for g, (_, images) in enumerate(groups):
        ids = [f"c{k}" for k in range(len(images))]
        comparisons += comparisons_from_rankings(f"g{g}", offset, ids, [(expert.rank(ids, images), LEVEL)])
        offset += len(images)
    return comparisons


def measure(images, comparisons, featurize, features, args) -> dict:
    """Cross-validated held-out accuracy over ``args.repeats`` shuffles, the features computed once beforehand."""
    fits = [RewardModel.fit(images, comparisons, featurize,
                            RewardModelConfig(features=featurize.name, seed=repeat, folds=args.folds),
                            features=features).metrics
            for repeat in range(args.repeats)]
    accuracies = [fit["heldout_accuracy"] for fit in fits]
    return {
        "heldout_accuracy_mean": float(np.mean(accuracies)),
        "heldout_accuracy_min": float(np.min(accuracies)),
        "heldout_accuracy_unweighted_mean": float(np.mean([fit["heldout_accuracy_unweighted"] for fit in fits])),
        "groups": fits[0]["groups"], "train_groups_per_fold": fits[0]["groups"] * (1 - 1 / fits[0]["folds"]),
        "heldout_pairs": fits[0]["heldout_pairs"],
        "fit_seconds_mean": float(np.mean([fit["seconds"] for fit in fits])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=40)
    parser.add_argument("--folds", type=int, default=4, help="cross-validation folds of groups (4: 30 of 40 train)")
    parser.add_argument("--repeats", type=int, default=5, help="shuffles of the groups into folds")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--features", nargs="+", default=["selector", "latents", "pixels", "latents+pixels"])
    parser.add_argument("--cache", type=Path, default=None, help="keep (or reuse) the drawn groups here")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--device", default=None, help="where the generator runs (default: Policy.load's choice)")
    args = parser.parse_args()
    policy, selector = Policy.load(device=args.device), Selector.load()
    started = time.perf_counter()
    groups = cached_groups(args.cache, policy, selector, args.groups, args.steps)
    print(f"{len(groups)} groups, {sum(len(images) for _, images in groups)} images "
          f"({time.perf_counter() - started:.0f} s to draw or load)", flush=True)
    images = [image for _, group in groups for image in group]
    comparisons = {name: expert_comparisons(groups, expert) for name, expert in EXPERTS.items()}
    results = []
    for features_name in args.features:
        started = time.perf_counter()
        featurize = featurizer(features_name, policy=policy, selector=selector)
        features = featurize(images)
        feature_seconds = time.perf_counter() - started
        for expert, expert_pairs in comparisons.items():
            result = {"features": features_name, "dimension": features.shape[1], "expert": expert,
                      "feature_seconds": feature_seconds, **measure(images, expert_pairs, featurize, features, args)}
            results.append(result)
            print(f"{features_name:>15} {expert:>10}: held-out accuracy {result['heldout_accuracy_mean']:.1%} mean, "
                  f"{result['heldout_accuracy_min']:.1%} min over {args.repeats} shuffles (bar 80%); "
                  f"{result['train_groups_per_fold']:.0f} training groups per fold, "
                  f"{result['heldout_pairs']} held-out pairs; features {feature_seconds:.1f} s for "
                  f"{len(images)} images, fit {result['fit_seconds_mean']:.2f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
