"""A reward model learned from the experts' rankings: Bradley-Terry on fixed image features, as an ensemble.

The experts rank a few dozen groups; an update that trains only on those sees a few hundred pairs.
Classic RLHF (REFERENCES.md section 8) learns a reward model from the human comparisons and then
ranks many more samples than the humans did. This module is that reward model, kept small enough to
retrain in seconds on a CPU whenever an update runs:

- **Comparisons.** Every cross-tier pair of every stored ranking (``optim.preference.rewards.weighted_pairs``),
  weighted by the expert's level (1-3: a loss weight, never a change of label). Tied candidates give
  no pair (as in ImageReward): a tie is not a preference. Imported ratings give, within one prompt,
  every pair of images with different ratings, weighted by the mean of the two rows' levels.
- **Features.** Fixed, cheap and never trained here: the selector's convolutional trunk
  (``SelectorFeatures``), the generator's VAE latents pooled into a small vector (``LatentFeatures``),
  or grey-level statistics of the pixels (``PixelFeatures``); ``featurizer`` builds one by name.
  Which features carry a preference depends on the preference, so by default every fit tries the latents
  and the pixel statistics and keeps the one whose held-out accuracy is higher (``fit_best``): on
  ``tests/benchmarks/bench_reward_model.py`` (40 generated groups, 4-fold cross-validation over groups,
  so 30 train each fit) the latents order held-out pairs 90.1% right for the contrast expert and 99.3%
  for the brightness expert, the pixel statistics 95.0% and 99.0%, the selector trunk 74.4% and 81.0%.
  Each feature is centred on the images the comparisons use and scaled by the root mean square of
  its winner-minus-loser differences (``_standardisation`` says why not by its spread over images).
- **Bradley-Terry.** The reward is a linear function of the standardised features; the loss is the
  weighted mean of ``-log sigmoid(r(winner) - r(loser))`` plus ``l2 * |theta|^2``. Convex, so
  L-BFGS finds the minimum in well under a second for hundreds of pairs.
- **Ensemble.** ``members`` heads, each fitted on a bootstrap of the GROUPS (resampled with
  replacement, so a group drawn twice counts twice); their spread is the model's uncertainty, and
  ``rank`` reports how far the members agree with their mean's ordering. An ensemble of one is a
  plain fit on every group.
- **Held-out check.** ``fit`` first cross-validates over ``folds`` folds of GROUPS (never of pairs:
  the four images of one group are alike, so a pair-level split would test on near-copies of the
  training data): each fold's pairs are ordered by an ensemble fitted on the other folds, and the
  pairwise accuracy of the ensemble mean over every held-out pair is reported, level-weighted and
  unweighted; then it refits every member on all groups. Every ranked pair is tested once, so the
  figure is steadier than one split's few groups. It is what an admin sees before trusting the
  model's rankings. Given each group's modality, the same held-out pairs are also counted per
  modality (``heldout_by_modality``, with a 95% Wilson interval): a model right on 96% of CT pairs
  may be right on 8 of 12 MRI pairs, where an expert could hardly tell the candidates apart.

Saved as safetensors (feature standardisation and the heads) plus JSON (config, metrics, and
``seen``: which rankings and groups it was trained on, as the caller says); never pickle.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from data.files import write_atomically
from optim.preference.rewards import Ranking, level_weight, validate_ranking, weighted_pairs
from optim.selector.model import Selector, as_unit_array, network_input
from optim.verification import wilson_interval

WEIGHTS_FILE = "reward_model.safetensors"
CONFIG_FILE = "reward_model.json"
#: The feature sets ``featurizer`` can build, by name.
FEATURES = ("selector", "latents", "pixels")


@dataclass(frozen=True)
class Comparison:
    """One preference: ``images[winner]`` beat ``images[loser]``."""

    group: str  # the group (or imported prompt) it comes from: held-out splits are by group
    winner: int  # index into the image list given to ``RewardModel.fit``
    loser: int
    weight: float  # the expert level (1-3), a loss weight


def comparisons_from_rankings(
    group_id: str, image_offset: int, candidate_ids: Sequence, rankings: Sequence[tuple[Ranking, int]]
) -> list[Comparison]:
    """Every cross-tier pair of every (ranking, level) of one group; ties give none, the weight is the level.

    Candidate ``candidate_ids[k]`` is image ``image_offset + k`` of the list given to ``fit``. Each
    ranking must rank exactly these candidates (``optim.preference.rewards.validate_ranking``'s errors say which not).
    """
    ids = validate_ranking([candidate_ids])[0]  # normalised ids (numpy integers become int), no repeats
    for tiers, _ in rankings:
        validate_ranking(tiers, ids)
    index = {candidate: image_offset + k for k, candidate in enumerate(ids)}
    return [Comparison(group_id, index[winner], index[loser], weight)
            for winner, loser, weight in weighted_pairs(rankings)]


def comparisons_from_ratings(rows: Iterable[Mapping]) -> list[Comparison]:
    """Pairs from imported ratings: rows are mappings with ``prompt``, ``rating``, ``level`` and ``index``.

    Within one prompt (the pair's group), every two rows with different ratings give a pair, the
    higher rating winning; its weight is the mean of the two rows' levels, as both experts' judgements
    made it. Equal ratings give no pair (a tie), nor do two rows of the same image (``index``: the
    image's place in the list given to ``fit``). A faulty row raises, naming its place in ``rows``.
    """
    by_prompt: dict[str, list[tuple[int, float, float]]] = {}
    for number, row in enumerate(rows):
        try:
            prompt, rating, level, index = row["prompt"], row["rating"], row["level"], row["index"]
        except KeyError as missing:
            raise ValueError(f"ratings row {number}: no {missing.args[0]!r} (rows need prompt, rating, level, index)") from None
        if not isinstance(rating, numbers.Real) or isinstance(rating, bool) or not math.isfinite(rating):
            raise ValueError(f"ratings row {number}: rating {rating!r} is not a finite number")
        if not isinstance(index, numbers.Integral) or isinstance(index, bool) or index < 0:
            raise ValueError(f"ratings row {number}: index {index!r} is not an image index (an integer from 0)")
        try:
            weight = level_weight(level)
        except ValueError as error:
            raise ValueError(f"ratings row {number}: {error}") from None
        by_prompt.setdefault(str(prompt), []).append((int(index), float(rating), weight))
    comparisons = []
    for prompt, rated in by_prompt.items():
        for k, (index_a, rating_a, weight_a) in enumerate(rated):
            for index_b, rating_b, weight_b in rated[k + 1:]:
                if rating_a == rating_b or index_a == index_b:
                    continue
                winner, loser = (index_a, index_b) if rating_a > rating_b else (index_b, index_a)
                comparisons.append(Comparison(prompt, winner, loser, (weight_a + weight_b) / 2))
    return comparisons


# ----------------------------------------------------------------------------- featurizers


class SelectorFeatures:
    """The selector network's trunk (``SelectorNet.features``, globally pooled): 64 numbers an image."""

    name = "selector"

    def __init__(self, selector: Selector):
        self.selector = selector

    @torch.no_grad()
    def __call__(self, images: Sequence) -> torch.Tensor:
        net, captured = self.selector.net, []
        if net is None:
            raise ValueError("the 'selector' features need a selector network; the rule gates alone (--selector gates) "
                             "have none: use the 'latents' or 'pixels' features")
        # The trunk's output as the network computes it in its own forward pass, input scaling included.
        hook = net.features.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            net(network_input([as_unit_array(image) for image in images], self.selector.config.input_size))
        finally:
            hook.remove()
        return captured[0].double()


class LatentFeatures:
    """The generator's VAE latents of each image (``Policy.encode_images``), pooled into a small vector.

    Per latent channel its mean and standard deviation; the covariance of every two channels over
    the image (upper triangle, diagonal included); a coarse 4x4 average pool of every channel. For
    the embedded model's 4-channel latents 4 + 4 + 10 + 64 = 82 numbers. The covariances are there
    because the decoded pixels are roughly linear in the latents, so a preference for contrast (the
    pixels' variance) is roughly a quadratic form of them, which a linear head can only read from
    second moments: on the benchmark's contrast expert they lift held-out accuracy from 86% to 90%.
    """

    name = "latents"

    def __init__(self, policy, batch_size: int = 32):
        self.policy = policy
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence) -> torch.Tensor:
        images = list(images)
        latents = torch.cat([self.policy.encode_images(images[start:start + self.batch_size]).cpu()
                             for start in range(0, len(images), self.batch_size)]).double()
        channels = latents.flatten(2)
        deviations = channels - channels.mean(dim=2, keepdim=True)
        covariance = deviations @ deviations.transpose(1, 2) / channels.shape[2]
        upper = torch.triu_indices(latents.shape[1], latents.shape[1])
        return torch.cat([latents.mean(dim=(2, 3)), latents.std(dim=(2, 3)), covariance[:, upper[0], upper[1]],
                          F.adaptive_avg_pool2d(latents, 4).flatten(1)], dim=1)


class PixelFeatures:
    """Grey-level statistics of each image on the [0, 1] scale: moments, percentiles and a histogram.

    Mean, standard deviation, skewness and excess kurtosis; the 1st, 5th, 25th, 50th, 75th, 95th and
    99th percentiles; a 16-bin histogram (shares of pixels). 27 numbers, no model at all.
    """

    name = "pixels"
    PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
    BINS = 16

    def __call__(self, images: Sequence) -> torch.Tensor:
        rows = []
        for image in images:
            grey = np.nan_to_num(np.clip(as_unit_array(image), 0.0, 1.0)).astype(np.float64).ravel()
            mean, std = grey.mean(), grey.std()
            centred = (grey - mean) / std if std > 0 else np.zeros_like(grey)
            histogram = np.histogram(grey, bins=self.BINS, range=(0.0, 1.0))[0] / grey.size
            rows.append(np.concatenate([[mean, std, (centred ** 3).mean(), (centred ** 4).mean() - 3.0],
                                        np.percentile(grey, self.PERCENTILES), histogram]))
        return torch.from_numpy(np.stack(rows))


class CombinedFeatures:
    """Several featurizers' vectors side by side; named by their names joined with ``+``."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.name = "+".join(part.name for part in self.parts)

    def __call__(self, images: Sequence) -> torch.Tensor:
        images = list(images)
        return torch.cat([part(images).double() for part in self.parts], dim=1)


def featurizer(name: str, policy=None, selector: Selector | None = None):
    """The featurizer called ``name``: one of ``FEATURES``, or several joined with ``+`` (``"latents+pixels"``)."""
    check_features(name)
    parts = []
    for part in name.split("+"):
        if part == "selector":
            if selector is None:
                raise ValueError("the 'selector' features need the selector: featurizer(..., selector=...)")
            parts.append(SelectorFeatures(selector))
        elif part == "latents":
            if policy is None:
                raise ValueError("the 'latents' features need the generator: featurizer(..., policy=...)")
            parts.append(LatentFeatures(policy))
        else:
            parts.append(PixelFeatures())
    return parts[0] if len(parts) == 1 else CombinedFeatures(parts)


def check_features(name: str) -> None:
    """Raise unless ``name`` is one of ``FEATURES`` or several of them, each once, joined with ``+``."""
    parts = str(name).split("+")
    if any(part not in FEATURES for part in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"unknown reward-model features {name!r}; expected one of {', '.join(FEATURES)}, "
                         f"or several joined with '+'")


# ----------------------------------------------------------------------------- fitting


@dataclass
class RewardModelConfig:
    # the feature set (FEATURES, or several joined with "+"); or a tuple of them, each fitted and the one with the
    # highest held-out accuracy kept (``fit_best``)
    features: str | tuple[str, ...] = ("latents", "pixels")
    members: int = 5  # ensemble heads, each on a bootstrap of the groups (1: one plain fit)
    l2: float = 1e-2  # on the head's weights, in standardised feature units
    folds: int = 5  # held-out accuracy by k-fold cross-validation over groups (0 or 1: not measured)
    seed: int = 0  # the held-out split and the bootstraps

    def feature_choices(self) -> tuple[str, ...]:
        """The feature sets to fit: ``features`` itself, or each of the tuple's."""
        return (self.features,) if isinstance(self.features, str) else tuple(self.features)

    def check(self) -> None:
        if not self.feature_choices():
            raise ValueError("features names no feature set; expected one of " + ", ".join(FEATURES))
        for name in self.feature_choices():
            check_features(name)
        if not isinstance(self.members, int) or self.members < 1:
            raise ValueError(f"members must be a whole number of at least 1, got {self.members!r}")
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be at least 0, got {self.l2!r}")
        if not isinstance(self.folds, int) or self.folds < 0:
            raise ValueError(f"folds must be a whole number of at least 0, got {self.folds!r}")


def bradley_terry_loss(rewards: torch.Tensor, winners, losers, weights) -> torch.Tensor:
    """Weighted mean over pairs of ``-log sigmoid(rewards[winner] - rewards[loser])``.

    Written with ``softplus(-margin)``, which is the same number without overflow at large margins.
    """
    weights = torch.as_tensor(weights, dtype=rewards.dtype)
    margins = rewards[torch.as_tensor(winners)] - rewards[torch.as_tensor(losers)]
    return (weights * F.softplus(-margins)).sum() / weights.sum()


def pairwise_accuracy(rewards, comparisons: Sequence[Comparison], weighted: bool = True) -> float:
    """Share of comparisons whose winner has the higher reward (equal rewards count half), level-weighted or not."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return margin_accuracy([rewards[c.winner] - rewards[c.loser] for c in comparisons], comparisons, weighted)


def margin_accuracy(margins, comparisons: Sequence[Comparison], weighted: bool = True) -> float:
    """``pairwise_accuracy`` from each comparison's reward margin (winner minus loser)."""
    margins = np.asarray(margins, dtype=np.float64)
    weights = np.array([c.weight for c in comparisons]) if weighted else np.ones(len(comparisons))
    return float((weights * ((margins > 0) + 0.5 * (margins == 0))).sum() / weights.sum())


def accuracy_by_modality(margins, comparisons: Sequence[Comparison], modality_of: Mapping[str, str]) -> dict[str, dict]:
    """Per modality (``modality_of[c.group]``; comparisons of other groups are left out): ``pairs``, the
    level-weighted ``accuracy`` as ``margin_accuracy`` gives it, and the 95% Wilson interval (``low``,
    ``high``) of the unweighted share ordered right (equal rewards count half), in the order first met."""
    by_modality: dict[str, tuple[list, list]] = {}
    for margin, comparison in zip(margins, comparisons):
        if comparison.group in modality_of:
            held = by_modality.setdefault(modality_of[comparison.group], ([], []))
            held[0].append(margin)
            held[1].append(comparison)
    result = {}
    for modality, (held_margins, held) in by_modality.items():
        low, high = wilson_interval(margin_accuracy(held_margins, held, weighted=False) * len(held), len(held))
        result[modality] = {"pairs": len(held), "accuracy": margin_accuracy(held_margins, held), "low": low, "high": high}
    return result


def group_folds(comparisons: Sequence[Comparison], folds: int, seed: int) -> list[tuple[list, list]]:
    """(training, held-out) comparisons for each of ``folds`` folds: the groups, shuffled by ``seed``, are
    dealt into ``min(folds, groups)`` folds, and each fold's groups are held out once, whole.

    Every comparison is held out exactly once, always by a fit that never saw its group; with fewer than
    two groups, or ``folds`` below 2, there is nothing to hold out and the list is empty.
    """
    groups = list(dict.fromkeys(c.group for c in comparisons))
    folds = min(folds, len(groups))
    if folds < 2:
        return []
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_of = {groups[g]: k % folds for k, g in enumerate(order)}
    return [([c for c in comparisons if fold_of[c.group] != k], [c for c in comparisons if fold_of[c.group] == k])
            for k in range(folds)]


def _fit_head(features: torch.Tensor, comparisons: Sequence[Comparison], weights: Sequence[float], l2: float) -> torch.Tensor:
    """The linear head (D,) minimising the weighted Bradley-Terry loss plus ``l2 * |theta|^2`` (L-BFGS)."""
    winners = [c.winner for c in comparisons]
    losers = [c.loser for c in comparisons]
    theta = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = bradley_terry_loss(features @ theta, winners, losers, weights) + l2 * theta.dot(theta)
        loss.backward()
        return loss

    optimiser.step(closure)
    return theta.detach()


def _standardisation(features: torch.Tensor, comparisons: Sequence[Comparison]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale of each feature: the mean over the images the comparisons use, and the root
    mean square of its winner-minus-loser differences over the comparisons.

    Bradley-Terry sees only differences within a group, and those are small beside the differences
    between prompts (a CT slice against a retinal scan): scaled by its spread across images, a
    feature that orders the candidates of one group would look negligible and the L2 term would
    drown it. A feature that never differs within a pair keeps scale 1.
    """
    used = sorted({c.winner for c in comparisons} | {c.loser for c in comparisons})
    differences = features[[c.winner for c in comparisons]] - features[[c.loser for c in comparisons]]
    scale = differences.pow(2).mean(dim=0).sqrt()
    return features[used].mean(dim=0), torch.where(scale > 1e-12, scale, torch.ones_like(scale))


def _fit_ensemble(features: torch.Tensor, comparisons: Sequence[Comparison], config: RewardModelConfig):
    """(feature mean, feature scale, heads (members, D)); each member on a bootstrap of the groups."""
    mean, scale = _standardisation(features, comparisons)
    standardised = (features - mean) / scale
    groups = list(dict.fromkeys(c.group for c in comparisons))
    heads = []
    for member in range(config.members):
        if config.members == 1:
            counts = dict.fromkeys(groups, 1)
        else:
            drawn = np.random.default_rng([config.seed, member]).integers(len(groups), size=len(groups))
            counts = {groups[i]: int(n) for i, n in zip(*np.unique(drawn, return_counts=True))}
        chosen = [c for c in comparisons if c.group in counts]
        heads.append(_fit_head(standardised, chosen, [c.weight * counts[c.group] for c in chosen], config.l2))
    return mean, scale, torch.stack(heads)


def ensemble_agreement(rewards: torch.Tensor) -> float:
    """The share of (member, candidate pair) orderings of ``rewards`` (N, members) that match the ensemble
    mean's ordering: 1.0 when every member orders every pair as the mean does; a single image gives 1.0."""
    mean = rewards.mean(dim=1)
    first, second = torch.triu_indices(len(mean), len(mean), offset=1)
    if len(first) == 0:
        return 1.0
    agree = torch.sign(rewards[first] - rewards[second]) == torch.sign(mean[first] - mean[second])[:, None]
    return float(agree.double().mean())


def confident_tiers(scores: Sequence[float], min_probability: float = 0.5) -> list[list[int]]:
    """Rows best first in tiers, as an expert ranks: a row shares the previous row's tier when the model is not
    sure it is worse, i.e. when the Bradley-Terry probability that the previous row wins, sigmoid(score gap),
    is below ``min_probability``. 0.5 ties only equal scores.

    Worked check: scores (3.0, 0.0, 1.0, 0.5) at 0.8 (a gap of at least logit 0.8 = 1.386 to break a tier):
    rows by score 0, 2, 3, 1 with gaps 2.0, 0.5, 0.5, so tiers [[0], [2, 3, 1]].
    """
    if not 0.5 <= min_probability < 1:
        raise ValueError(f"the tie probability must be in [0.5, 1), got {min_probability}")
    order = sorted(range(len(scores)), key=lambda row: -scores[row])
    min_gap = math.log(min_probability / (1 - min_probability))
    tiers = [order[:1]] if order else []
    for previous, row in zip(order, order[1:]):
        gap = scores[previous] - scores[row]
        if gap == 0 or gap < min_gap:
            tiers[-1].append(row)
        else:
            tiers.append([row])
    return tiers


class RewardModel:
    """An ensemble of Bradley-Terry heads on fixed, standardised image features (see the module's notes)."""

    def __init__(self, featurizer, config: RewardModelConfig, feature_mean: torch.Tensor, feature_scale: torch.Tensor,
                 heads: torch.Tensor, metrics: dict | None = None):
        if heads.ndim != 2 or heads.shape[1] != feature_mean.shape[0] or feature_scale.shape != feature_mean.shape:
            raise ValueError(f"heads {tuple(heads.shape)} do not match {feature_mean.shape[0]} features")
        self.featurizer = featurizer
        self.config = config
        self.feature_mean = feature_mean.double()
        self.feature_scale = feature_scale.double()
        self.heads = heads.double()
        self.metrics = dict(metrics or {})
        self.seen: dict = {}  # what it was trained on, as the caller said when saving (kept by save and load)

    @classmethod
    def fit(cls, images: Sequence, comparisons: Sequence[Comparison], featurizer,
            config: RewardModelConfig | None = None, features: torch.Tensor | None = None,
            modality_of: Mapping[str, str] | None = None) -> "RewardModel":
        """Measure held-out accuracy by cross-validation over groups, then fit every member on all groups.

        Every comparison is scored by an ensemble fitted on the other folds' groups, so the accuracy
        covers every ranked pair (one held-out split of a few groups swung by +-10 points).

        ``features`` are the images' features when the caller has them already (a benchmark fitting
        many splits of one set); otherwise ``featurizer`` computes them. ``modality_of`` (a comparison's
        group -> its modality) adds the held-out accuracy per modality (``accuracy_by_modality``).
        """
        config = config or RewardModelConfig(features=featurizer.name)
        config.check()
        if not isinstance(config.features, str):
            raise ValueError(f"fit takes one feature set, the config offers {list(config.features)}: fit_best "
                             "fits each and keeps the best")
        if featurizer.name != config.features:
            raise ValueError(f"the featurizer gives {featurizer.name!r} features but the config asks for {config.features!r}")
        comparisons = list(comparisons)
        if not comparisons:
            raise ValueError("no comparisons to learn from: rank at least one group with two or more tiers")
        images = list(images)
        bad = [c for c in comparisons if not (0 <= c.winner < len(images) and 0 <= c.loser < len(images))]
        if bad:
            raise ValueError(f"comparison {bad[0]} names an image outside the {len(images)} given")
        start = time.perf_counter()
        if features is None:
            features = featurizer(images)
        features = features.double()
        if features.shape[0] != len(images):
            raise ValueError(f"{features.shape[0]} feature rows for {len(images)} images")
        feature_seconds = time.perf_counter() - start

        folds = group_folds(comparisons, config.folds, config.seed)
        metrics = {"features": config.features, "members": config.members, "l2": config.l2,
                   "groups": len({c.group for c in comparisons}), "pairs": len(comparisons), "folds": len(folds),
                   "heldout_groups": len({c.group for _, held in folds for c in held}),
                   "heldout_pairs": sum(len(held) for _, held in folds),
                   "heldout_accuracy": None, "heldout_accuracy_unweighted": None, "heldout_by_modality": {}}
        if folds:
            held_all, margins = [], []
            for train, held in folds:
                rewards = cls(featurizer, config, *_fit_ensemble(features, train, config))._member_rewards(features)
                rewards = rewards.mean(dim=1).numpy()
                held_all += held
                margins += [rewards[c.winner] - rewards[c.loser] for c in held]
            metrics["heldout_accuracy"] = margin_accuracy(margins, held_all)
            metrics["heldout_accuracy_unweighted"] = margin_accuracy(margins, held_all, weighted=False)
            metrics["heldout_by_modality"] = accuracy_by_modality(margins, held_all, modality_of or {})
        model = cls(featurizer, config, *_fit_ensemble(features, comparisons, config))
        metrics["train_accuracy"] = pairwise_accuracy(model._member_rewards(features).mean(dim=1).numpy(), comparisons)
        metrics["feature_seconds"] = feature_seconds
        metrics["seconds"] = time.perf_counter() - start
        model.metrics = metrics
        return model

    def _member_rewards(self, features: torch.Tensor) -> torch.Tensor:
        """Each member's reward of each image: (N, members)."""
        return ((features.double() - self.feature_mean) / self.feature_scale) @ self.heads.T

    def member_rewards(self, images: Sequence) -> torch.Tensor:
        """Each member's reward of each image: (N, members)."""
        return self._member_rewards(self.featurizer(list(images)))

    def scores(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Per image, the ensemble's mean reward and its standard deviation across members (the uncertainty)."""
        rewards = self.member_rewards(images)
        return rewards.mean(dim=1).numpy(), rewards.std(dim=1, unbiased=False).numpy()

    def rank(self, ids: Sequence, images: Sequence, min_probability: float = 0.5) -> tuple[list[list], float]:
        """Tiers best first by the ensemble mean (``confident_tiers``: equal means, or means closer than
        ``min_probability`` asks, share a tier), and the members' agreement.

        The agreement is the share of (member, candidate pair) orderings that match the mean's
        ordering: 1.0 when every member orders every pair as the mean does; a group of one gives 1.0.
        """
        ids = list(ids)
        if len(ids) != len(images) or not ids:
            raise ValueError(f"rank needs one id per image, got {len(ids)} ids for {len(images)} images")
        rewards = self.member_rewards(images)
        tiers = confident_tiers(rewards.mean(dim=1).tolist(), min_probability)
        return [[ids[row] for row in tier] for tier in tiers], ensemble_agreement(rewards)

    def save(self, folder: str | Path, seen: dict) -> Path:
        """Heads and standardisation as safetensors, config, metrics and ``seen`` as JSON; returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {"feature_mean": self.feature_mean.contiguous(), "feature_scale": self.feature_scale.contiguous(),
                   "heads": self.heads.contiguous()}
        write_atomically(folder / WEIGHTS_FILE, lambda path: save_file(tensors, str(path)))
        self.seen = dict(seen)
        meta = {"config": asdict(self.config), "metrics": self.metrics, "seen": self.seen}
        write_atomically(folder / CONFIG_FILE, lambda path: path.write_text(json.dumps(meta, indent=2)))
        return folder

    @classmethod
    def load(cls, folder: str | Path, featurizer) -> "RewardModel":
        """The model saved in ``folder``, scoring through ``featurizer`` (which must give the saved features)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        weights, settings = folder / WEIGHTS_FILE, folder / CONFIG_FILE
        if not weights.is_file() or not settings.is_file():
            raise FileNotFoundError(f"{folder} is not a reward-model folder: expected {WEIGHTS_FILE} and {CONFIG_FILE}")
        meta = json.loads(settings.read_text())
        config = RewardModelConfig(**meta["config"])
        if featurizer.name != config.features:
            raise ValueError(f"{folder}: the reward model was trained on {config.features!r} features, "
                             f"the featurizer given gives {featurizer.name!r}")
        tensors = load_file(weights)
        model = cls(featurizer, config, tensors["feature_mean"], tensors["feature_scale"], tensors["heads"], meta["metrics"])
        model.seen = meta["seen"]
        return model


def fit_best(images: Sequence, comparisons: Sequence[Comparison], featurizers: Sequence,
             config: RewardModelConfig | None = None, modality_of: Mapping[str, str] | None = None) -> RewardModel:
    """A model fitted on each featurizer's features (``RewardModel.fit``), the one whose cross-validated held-out
    accuracy is highest kept (the earlier on equal accuracy; the first when nothing could be held out).

    Which features carry a preference depends on the preference: an expert who asks for more contrast is
    read best from grey-level statistics, one who cares where a lesion sits from the latents' layout. Held-out
    groups decide, as they decide whether the model may rank at all. The kept model's metrics list every feature
    set's held-out accuracy (``features_compared``), so the choice is on the record. The kept figure is the larger
    of noisy estimates, so it reads a little high where the feature sets are close. ``featurizers`` are those
    ``config.feature_choices()`` names, in that order.
    """
    config = config or RewardModelConfig()
    names = [f.name for f in featurizers]
    if names != list(config.feature_choices()):
        raise ValueError(f"the featurizers give {names} features but the config asks for {list(config.feature_choices())}")
    models = [RewardModel.fit(images, comparisons, f, replace(config, features=f.name), modality_of=modality_of)
              for f in featurizers]
    best = max(models, key=lambda model: model.metrics["heldout_accuracy"] or 0.0)  # max keeps the first of equals
    best.metrics["features_compared"] = {model.config.features: model.metrics["heldout_accuracy"] for model in models}
    return best
