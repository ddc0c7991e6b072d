"""Which denoising steps carry a trained version's change, and which its loss of variety.

A LoRA trained on some steps of the chain acts on every step (its weights do not know the timestep).
This samples the evaluation seeds of ``bench_learning.py`` with the version's adapters switched on only
in a window of steps (the base model everywhere else) and reports, per window, the simulated expert's
effect size and the change of diversity against the base model. Point it at the work directory of a
control room (a ``bench_learning.py`` run leaves one in the temporary folder, named ``bench-learning-*``):

    python tests/benchmarks/bench_step_windows.py WORKDIR --expert brightness [--windows 0-2 3-9 10-19] [--eval 64]
"""

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_learning import evaluate  # noqa: E402
from data.diversity import diversity, diversity_change  # noqa: E402
from data.phantoms import all_prompts  # noqa: E402
from data.simulated_experts import EXPERTS  # noqa: E402
from workbench.room import ControlRoom, RoomConfig  # noqa: E402


@contextlib.contextmanager
def adapters_only_on(policy, steps: set[int]):
    """Sample with the adapters on at the chain's steps ``steps`` and the base model (adapters off) elsewhere."""
    trained_step = policy.step

    def step(chains, j, latents, noise=None, prev_sample=None):
        if j in steps:
            return trained_step(chains, j, latents, noise=noise, prev_sample=prev_sample)
        with policy.reference():
            return trained_step(chains, j, latents, noise=noise, prev_sample=prev_sample)

    policy.step = step
    try:
        yield
    finally:
        del policy.step  # the class's method again


def window(text: str) -> range:
    """``"3-9"``: steps 3 to 9, both included."""
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", help="a control room's work directory; its current version is compared with the base")
    parser.add_argument("--expert", default="brightness", choices=list(EXPERTS))
    parser.add_argument("--windows", nargs="+", default=["0-2", "3-9", "0-9", "10-19"], type=window)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--steps", type=int, default=RoomConfig.steps)
    args = parser.parse_args()
    room = ControlRoom(workdir=args.workdir, config=RoomConfig(steps=args.steps))
    expert, prompts = EXPERTS[args.expert], all_prompts()
    print(f"{args.workdir}: {room.policy.version} against the base model, {args.eval} samples, {args.steps} steps")
    with room.policy.reference():  # the adapters off at every step
        base_scores, _, base_greys, _ = evaluate(room, expert, prompts, args.eval)
    spread, base_diversity = base_scores.std(ddof=1), diversity(base_greys)
    for steps in [range(args.steps)] + args.windows:
        with adapters_only_on(room.policy, set(steps)):
            scores, _, greys, _ = evaluate(room, expert, prompts, args.eval)
        print(f"adapters on steps {steps.start}-{steps.stop - 1}: effect size {(scores - base_scores).mean() / spread:+.2f}, "
              f"diversity {diversity_change(base_diversity, diversity(greys)):+.1%}", flush=True)


if __name__ == "__main__":
    main()
