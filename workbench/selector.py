"""The selector's command line: train it on a ratings CSV, or judge image files.

    python -m workbench.selector train --ratings data/demo/medical_ratings.csv --out DIR
    python -m workbench.selector score [--model DIR] [--prompt "CT: ..."] IMAGE...

The model itself (gates, network, verdicts) is ``optim/selector/model.py``; training is
``optim/selector/training.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.images import ImageReadError, read_image
from data.modalities import display_name
from optim.selector.model import Selector
from optim.selector.training import TrainingConfig, train_selector


# ---------------------------------------------------------------------- command line


def _score_command(args) -> int:
    selector = Selector.load(args.model)
    failed = 0
    for path in args.images:
        try:
            image = read_image(path)
        except ImageReadError as error:
            print(f"{path}: unreadable: {error}")
            failed += 1
            continue
        verdict = selector.judge([image], prompt=args.prompt, modality=args.modality)[0]
        probabilities = ", ".join(f"{display_name(m)} {p:.2f}" for m, p in verdict.modality_probabilities.items())
        print(f"{path}: {verdict.summary()}" + (f" [{probabilities}]" if probabilities else ""))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.selector", description="Train or run the selector.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train on a ratings CSV and write weights and a validation report")
    train.add_argument("--ratings", required=True, help="ratings CSV: image_path,rating,modality,expert_level,prompt; "
                       "the selector learns the modalities it names")
    train.add_argument("--out", required=True, help="folder for selector.safetensors and selector.json")
    train.add_argument("--data-root", default=None, help="folder image paths resolve in (default: the CSV's folder)")
    train.add_argument("--epochs", type=int, default=TrainingConfig.epochs)
    train.add_argument("--seed", type=int, default=TrainingConfig.seed)
    train.add_argument("--rating-min", type=float, default=1.0)
    train.add_argument("--rating-max", type=float, default=3.0)
    score = commands.add_parser("score", help="judge image files")
    score.add_argument("images", nargs="+")
    score.add_argument("--model", default=None, help="selector folder (default: the embedded one), or 'gates' for the rule gates alone")
    score.add_argument("--prompt", default=None, help="the prompt the images were drawn for")
    score.add_argument("--modality", default=None, help="or the modality they should show (one the selector knows, e.g. CT)")
    args = parser.parse_args(argv)
    try:
        if args.command == "score":
            return _score_command(args)
        if Path(args.out).exists() and not Path(args.out).is_dir():  # before training, not after
            raise ValueError(f"--out {args.out} is a file; the selector is written into a folder")
        config = TrainingConfig(epochs=args.epochs, seed=args.seed, rating_min=args.rating_min, rating_max=args.rating_max)
        report = train_selector(args.ratings, args.out, config, data_root=args.data_root)
        print(json.dumps(report, indent=2))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
