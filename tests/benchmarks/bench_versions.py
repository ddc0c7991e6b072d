"""Which update moved which modality: every version of a control room against the base, on the evaluation seeds.

``bench_learning.py`` reports where the last version ended; this says which update took each modality there.
For each version in the work directory, oldest first, it draws the seed-matched evaluation samples of
``bench_learning.py`` and prints, against the base model's, the simulated expert's effect size and blind A/B
tally over all samples and per modality, beside what the update trained on (its expert-ranked groups by
modality, its AI-ranked groups). A ``bench_learning.py`` run prints its work directory and leaves it in the
temporary folder (``bench-learning-*``):

    python tests/benchmarks/bench_versions.py WORKDIR --expert contrast [--eval 64]

A version names its base model by a fingerprint of the model folder's files, so any checkout with the same
embedded model opens the room's versions.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_learning import evaluate, movement  # noqa: E402
from data.modalities import prompt_modality  # noqa: E402
from data.phantoms import all_prompts  # noqa: E402
from data.simulated_experts import EXPERTS  # noqa: E402
from workbench.room import ControlRoom, RoomConfig  # noqa: E402


def trained_on(room: ControlRoom, metrics: dict) -> str:
    """An update's groups in words: ``CT x4, MRI x1 + AI CT x3, OCT x1``."""
    groups = [room.store.get_group(g) for g in metrics.get("groups", [])]

    def count(source: str) -> str:
        return ", ".join(f"{m} x{n}" for m, n in Counter(prompt_modality(g["prompt"]) for g in groups
                                                        if g["source"] == source).items())

    ai = count("ai")
    return count("human") + (f" + AI {ai}" if ai else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", help="a control room's work directory (a bench_learning.py run's)")
    parser.add_argument("--expert", default="contrast", choices=list(EXPERTS))
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--steps", type=int, default=RoomConfig.steps)
    args = parser.parse_args()
    room = ControlRoom(workdir=args.workdir, config=RoomConfig(steps=args.steps))
    expert, prompts = EXPERTS[args.expert], all_prompts()

    def scores_of(version):
        """The expert's scores of the seed-matched evaluation samples drawn by ``version``."""
        room.policy.use_version(room.version_store, version.id)
        return evaluate(room, expert, prompts, args.eval)[0]

    base, *updated = room.version_store.list()  # oldest first: v0 is the base model
    base_scores = scores_of(base)
    print(f"{base.id} (base): {args.expert} score {base_scores.mean():.4f}", flush=True)
    for version in updated:
        overall, by_modality = movement(base_scores, scores_of(version), expert, prompts)
        modalities = "; ".join(f"{m} {x['effect_size']:+.2f} ({x['blind_ab']['wins']}/{x['blind_ab']['same']}/"
                               f"{x['blind_ab']['losses']})" for m, x in by_modality.items())
        print(f"{version.id} on {trained_on(room, version.metrics)}: effect size {overall['effect_size']:+.2f}, "
              f"win-rate {overall['win_rate']:.0%}; per modality (better/same/worse): {modalities}", flush=True)


if __name__ == "__main__":
    main()
