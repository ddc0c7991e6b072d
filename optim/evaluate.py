"""Check the default generator against its quality bar, and draw the sample grid for the README.

A small CNN with two heads (modality, finding present) is trained on phantoms whose seeds lie far
above the generator's training seeds, so it has never seen the generator's data. It then judges
generated samples at the default settings:

- modality accuracy: the share of samples it labels as the prompted modality (bar: 90%);
- finding effect: how often it sees a finding in samples whose prompt names one, against
  samples whose prompt names none.

    python -m optim.evaluate --per-modality 20 --out data/pretrained/evaluation.json --grid docs/samples.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.modalities import MODALITIES
from data.phantoms import FINDINGS, make_phantom, phantom_set, stack_images
from optim.policy import ModelLoadError, Policy

HELD_OUT_SEED = 1_000_000  # the generator trains on seeds below 12 000


class PhantomClassifier(nn.Module):
    """Grayscale 64x64 image -> (modality logits, finding logit)."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width in (16, 32, 64, 64):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.modality = nn.Linear(channels, len(MODALITIES))
        self.finding = nn.Linear(channels, 1)

    def forward(self, x):
        h = self.features(x)
        return self.modality(h), self.finding(h).squeeze(1)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur and noise, so the classifier judges anatomy rather than phantom-exact texture."""
    if torch.rand((), generator=generator) < 0.5:
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x + 0.03 * torch.randn(x.shape, generator=generator)


def train_classifier(n_images: int = 6000, steps: int = 600, seed: int = 0) -> PhantomClassifier:
    phantoms = phantom_set(n_images, first_seed=HELD_OUT_SEED)
    images = torch.from_numpy(stack_images(phantoms))
    modality = torch.tensor([MODALITIES.index(p.modality) for p in phantoms])
    finding = torch.tensor([float(p.finding is not None) for p in phantoms])
    torch.manual_seed(seed)
    model = PhantomClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(n_images, (64,), generator=generator)
        modality_logits, finding_logit = model(_augment(images[index], generator))
        loss = F.cross_entropy(modality_logits, modality[index])
        loss = loss + F.binary_cross_entropy_with_logits(finding_logit, finding[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def to_gray_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("L"), np.float32) / 255.0 for im in images]))[:, None]


def evaluation_prompts(per_modality: int) -> list[tuple[str, str, bool]]:
    """(prompt, modality, names a finding) triples: half with a finding, half without."""
    rows = []
    for modality in MODALITIES:
        for i in range(per_modality):
            finding = None if i % 2 == 0 else FINDINGS[modality][(i // 2) % len(FINDINGS[modality])]
            rows.append((make_phantom(modality, i, finding).prompt, modality, finding is not None))
    return rows


@torch.no_grad()
def classifier_accuracy(classifier: PhantomClassifier, n: int = 400) -> dict:
    """How well the judge itself does on fresh phantoms: its verdicts on samples mean no more."""
    phantoms = phantom_set(n, first_seed=2 * HELD_OUT_SEED)
    modality_logits, finding_logit = classifier(torch.from_numpy(stack_images(phantoms)))
    modality = torch.tensor([MODALITIES.index(p.modality) for p in phantoms])
    finding = torch.tensor([p.finding is not None for p in phantoms])
    return {
        "classifier_modality_accuracy_on_phantoms": (modality_logits.argmax(1) == modality).float().mean().item(),
        "classifier_finding_accuracy_on_phantoms": ((finding_logit > 0) == finding).float().mean().item(),
    }


@torch.no_grad()
def evaluate(policy: Policy, classifier: PhantomClassifier, per_modality: int = 20, seed: int = 0, steps: int = 20):
    rows = evaluation_prompts(per_modality)
    images = [policy.sample(prompt, n=1, seed=seed + i, steps=steps).images[0] for i, (prompt, _, _) in enumerate(rows)]
    modality_logits, finding_logit = classifier(to_gray_tensor(images))
    predicted = [MODALITIES[i] for i in modality_logits.argmax(1).tolist()]
    seen = (finding_logit > 0).tolist()
    correct = [p == m for p, (_, m, _) in zip(predicted, rows)]
    report = {
        "samples": len(rows),
        "modality_accuracy": float(np.mean(correct)),
        "per_modality_accuracy": {m: float(np.mean([c for c, r in zip(correct, rows) if r[1] == m])) for m in MODALITIES},
        "finding_seen_when_prompted": float(np.mean([s for s, r in zip(seen, rows) if r[2]])),
        "finding_seen_when_not_prompted": float(np.mean([s for s, r in zip(seen, rows) if not r[2]])),
        **classifier_accuracy(classifier),
    }
    return report, images, rows


def save_grid(images, path: str | Path, columns: int) -> None:
    from PIL import Image

    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate the default generator against its quality bar.")
    parser.add_argument("--model", default=None)
    parser.add_argument("--per-modality", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (the control room's --steps)")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--grid", default=None, help="write a PNG grid of the samples here")
    args = parser.parse_args(argv)
    try:
        policy = Policy.load(args.model)  # first: a folder that is not a model fails before the judge trains (a minute)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    classifier = train_classifier()
    report, images, _ = evaluate(policy, classifier, args.per_modality, steps=args.steps)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.grid:
        save_grid(images, args.grid, columns=args.per_modality)
    return 0


if __name__ == "__main__":
    sys.exit(main())
