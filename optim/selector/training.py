"""Training the selector's network on an experts' ratings CSV, with a held-out validation report.

What the earlier selector got wrong, and what is done here instead:

- The target is the normalised rating (r - min) / (max - min), so "bad" is learnable: a rating of
  1 pulls the quality score toward 0, not toward 1.
- Expert level (1-3) is the per-row LOSS WEIGHT. It never changes the label.
- A row whose image shows another modality than its prompt asks for was rated low for the
  mismatch, not for the image; it teaches the modality head but not the quality head (the
  modality check rejects such images on its own).
- A blank or broken image shows no modality, whatever the CSV says; images that fail the gates
  teach the quality head only, and modality accuracy is measured on held-out images that pass them.
- The validation split is by IMAGE, not by row: an image rated by two experts is never on both
  sides, so the report is not flattered by images the network has seen.
- The modalities are the CSV's own (``data.modalities.modality_name``): the built-in four first, in
  their order, then the others alphabetically; the modality head has one output per name and the
  names are saved with the weights. A new name shown by fewer than ``min_modality_images`` images
  cannot be learned and is often a misspelling: its rows are reported as faults and left out.

The report: Spearman correlation of the quality score with the held-out ratings (rows whose image
matches its prompt's modality), Spearman of the combined score quality x P(asked modality) on all
held-out rows, and modality accuracy on the held-out images that pass the gates.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from tqdm import tqdm

from data.images import read_image, to_display
from data.modalities import MODALITIES, modality_of_prompt
from data.ratings import RatingsConfig, RowError, read_ratings
from optim.preference.rewards import level_weight
from optim.selector.model import Selector, SelectorConfig, SelectorNet, gate_reasons, network_input


@dataclass
class TrainingConfig:
    epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    channels: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    rating_min: float = 1.0
    rating_max: float = 3.0
    min_modality_images: int = 3  # fewer images of a new modality name: its rows are faults (too few to learn; a typo?)


@dataclass
class Examples:
    """Unique images once, and the rating rows that point at them."""

    images: torch.Tensor  # (I, 1, S, S) on the [0, 1] display scale
    modality: torch.Tensor  # (I,) index into ``modalities``: what the image shows
    gates_pass: torch.Tensor  # (I,) bool: the image passes the rule-based gates (so it shows a modality)
    row_image: torch.Tensor  # (R,) index into images
    score: torch.Tensor  # (R,) normalised rating in [0, 1]
    rating: np.ndarray  # (R,) raw rating, for the report
    weight: torch.Tensor  # (R,) expert level, the quality loss weight
    prompt_matches: torch.Tensor  # (R,) bool: the image shows the modality the prompt asks for
    asked: torch.Tensor  # (R,) index of the prompt's modality, -1 when it names none
    modalities: tuple[str, ...] = MODALITIES  # the modality head's names, from the CSV

    def rows(self, images: set[int]) -> torch.Tensor:
        return torch.tensor([r for r, i in enumerate(self.row_image.tolist()) if i in images], dtype=torch.long)


def load_examples(csv_path, data_root, config: TrainingConfig, gates: SelectorConfig) -> tuple[Examples, list[str]]:
    """Read and validate the CSV (bad rows reported, not fatal) and decode each image once.

    A new selector: any modality name is accepted, and the modalities are the CSV's own."""
    ratings = read_ratings(csv_path, data_root, RatingsConfig(config.rating_min, config.rating_max, modalities=None))
    rows, errors = ratings.rows, list(ratings.errors)
    images_per_modality = rows.groupby("modality")["path"].nunique()
    rare = images_per_modality[(images_per_modality < config.min_modality_images)
                               & ~images_per_modality.index.isin(MODALITIES)]  # the built-in names are no misspelling
    for row, modality in rows.loc[rows["modality"].isin(rare.index), ["row", "modality"]].itertuples(index=False):
        errors.append(RowError(row, "modality", f"{modality!r} is shown by only {rare[modality]} image(s); a modality "
                                                f"needs at least {config.min_modality_images} to be learned (a misspelling?)"))
    rows = rows[~rows["modality"].isin(rare.index)]
    if len(rows) == 0:
        report = "\n".join(f"  {e}" for e in sorted(errors, key=lambda e: e.row))
        raise ValueError(f"{csv_path}: no usable rows to train on\n{report}")
    seen = set(rows["modality"])
    modalities = tuple(m for m in MODALITIES if m in seen) + tuple(sorted(seen - set(MODALITIES)))
    paths = sorted(set(rows["path"]))
    index = {path: i for i, path in enumerate(paths)}
    shown = rows.groupby("path")["modality"].first()
    asked = [modality_of_prompt(p, modalities) for p in rows["prompt"]]
    arrays = [to_display(read_image(p)) for p in paths]
    examples = Examples(
        images=network_input(arrays, gates.input_size),
        modality=torch.tensor([modalities.index(shown[p]) for p in paths]),
        gates_pass=torch.tensor([not gate_reasons(a, gates) for a in arrays]),
        row_image=torch.tensor([index[p] for p in rows["path"]]),
        score=torch.tensor(rows["score"].to_numpy(), dtype=torch.float32),
        rating=rows["rating"].to_numpy(dtype=float),
        weight=torch.tensor([level_weight(level) for level in rows["expert_level"]], dtype=torch.float32),
        prompt_matches=torch.tensor([a is None or a == m for a, m in zip(asked, rows["modality"])]),
        asked=torch.tensor([modalities.index(a) if a else -1 for a in asked]),
        modalities=modalities,
    )
    return examples, [str(e) for e in sorted(errors, key=lambda e: e.row)]


def split_images(count: int, fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """Images (not rows) into training and validation sets."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = max(1, round(count * fraction))
    return set(order[held:]), set(order[:held])


def training_loss(net: SelectorNet, examples: Examples, rows: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Level-weighted BCE of the quality logit against the normalised rating, plus modality CE."""
    image_rows = examples.row_image[rows]
    images = examples.images[image_rows]
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    quality_logits, modality_logits = net(images)
    weight = examples.weight[rows] * examples.prompt_matches[rows]
    per_row = nn.functional.binary_cross_entropy_with_logits(quality_logits, examples.score[rows], reduction="none")
    quality_loss = (weight * per_row).sum() / weight.sum().clamp(min=1e-6)
    shows_modality = examples.gates_pass[image_rows].float()
    per_image = nn.functional.cross_entropy(modality_logits, examples.modality[image_rows], reduction="none")
    modality_loss = (shows_modality * per_image).sum() / shows_modality.sum().clamp(min=1.0)
    return quality_loss + modality_loss


def validation_report(selector: Selector, examples: Examples, held_images: set[int]) -> dict:
    """The figures the issue asks for, on held-out images only."""
    images = sorted(held_images)
    arrays = [examples.images[i, 0].numpy() for i in images]
    quality, probabilities = selector.scores(arrays)
    position = {image: k for k, image in enumerate(images)}
    rows = examples.rows(held_images).tolist()
    matched = [r for r in rows if examples.prompt_matches[r]]
    row_quality = np.array([quality[position[int(examples.row_image[r])]] for r in rows])
    asked_probability = np.array(
        [probabilities[position[int(examples.row_image[r])], int(examples.asked[r])] if examples.asked[r] >= 0 else 1.0 for r in rows]
    )
    matched_mask = np.array([bool(examples.prompt_matches[r]) for r in rows])
    predicted = probabilities.argmax(1)
    judged = examples.gates_pass[images].numpy()
    return {
        "validation_images": len(images),
        "validation_rows": len(rows),
        "quality_spearman": float(spearmanr(row_quality[matched_mask], examples.rating[matched]).statistic),
        "quality_spearman_rows": len(matched),
        "combined_spearman": float(spearmanr(row_quality * asked_probability, examples.rating[rows]).statistic),
        "modality_accuracy": float(np.mean((predicted == examples.modality[images].numpy())[judged])),
        "modality_images": int(judged.sum()),
    }


def train_selector(csv_path, out, config: TrainingConfig = TrainingConfig(), data_root=None) -> dict:
    """Train, validate on held-out images, save weights and report under ``out``; returns the report."""
    torch.manual_seed(config.seed)
    selector_config = SelectorConfig()
    examples, row_errors = load_examples(csv_path, data_root, config, selector_config)
    train_images, held_images = split_images(len(examples.images), config.val_fraction, config.seed)
    train_rows = examples.rows(train_images)
    net = SelectorNet(config.channels, modalities=len(examples.modalities))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    progress = tqdm(range(config.epochs), desc="training selector", unit="epoch")
    for _ in progress:
        net.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        total = 0.0
        for batch in order.split(config.batch_size):
            flip = torch.rand(len(batch), generator=generator) < 0.5
            loss = training_loss(net, examples, batch, flip)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        schedule.step()
        progress.set_postfix(loss=f"{total / len(train_rows):.3f}")
    selector = Selector(net.eval(), selector_config, modalities=examples.modalities)
    report = validation_report(selector, examples, held_images)
    report.update(
        ratings=str(csv_path),
        training_images=len(train_images),
        training_rows=len(train_rows),
        modalities=list(examples.modalities),
        rejected_csv_rows=row_errors,
        training=asdict(config),
    )
    selector.report = report
    selector.save(out, config.channels)
    return report
