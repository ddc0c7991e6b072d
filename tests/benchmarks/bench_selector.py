"""The selector's cost and behaviour on the default generator's own candidates, in one process.

1. Time: judging a group (gates + network) against drawing it, per candidate, rounds alternating
   so load on the machine hits both alike. Aim: selector / generation at most 0.05.
2. Behaviour on every prompt of the default model (``--n`` candidates each): the pass rate of
   well-formed candidates judged against their own prompt, and the share rejected when judged
   against each other modality (the issue's bar: at least 90%), with the reasons counted.

    python tests/benchmarks/bench_selector.py [--rounds 5] [--n 8] [--steps 20]
"""

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.modalities import MODALITIES, modality_of_prompt  # noqa: E402
from data.phantoms import all_prompts  # noqa: E402
from optim.policy import Policy  # noqa: E402
from optim.selector.model import Selector  # noqa: E402

PROMPT = "CT: axial slice of the abdomen with a large bright lesion on the left"


def timing(policy: Policy, selector: Selector, rounds: int, n: int, steps: int) -> None:
    images = policy.sample(PROMPT, n=n, seed=0, steps=steps).images
    selector.judge(images, prompt=PROMPT)  # warm-up
    generate, judge = [], []
    for round_ in range(rounds):
        started = time.perf_counter()
        images = policy.sample(PROMPT, n=n, seed=round_, steps=steps).images
        generate.append((time.perf_counter() - started) / n)
        started = time.perf_counter()
        selector.judge(images, prompt=PROMPT)
        judge.append((time.perf_counter() - started) / n)
    print(f"per candidate ({n} per group, {steps} steps): generation min {min(generate) * 1e3:.1f} ms, "
          f"median {statistics.median(generate) * 1e3:.1f} ms; selector min {min(judge) * 1e3:.2f} ms, "
          f"median {statistics.median(judge) * 1e3:.2f} ms")
    print(f"ratio selector / generation: min {min(judge) / min(generate):.4f}, "
          f"median {statistics.median(judge) / statistics.median(generate):.4f}  (aim: at most 0.05)")


def behaviour(policy: Policy, selector: Selector, n: int, steps: int) -> None:
    passed = drawn = rejected_wrong = judged_wrong = 0
    reasons = Counter()
    for seed, prompt in enumerate(all_prompts()):
        images = policy.sample(prompt, n=n, seed=seed, steps=steps).images
        verdicts = selector.judge(images, prompt=prompt)
        passed += sum(v.passed for v in verdicts)
        drawn += len(verdicts)
        reasons.update(r.split(" (")[0].split(" below")[0] for v in verdicts for r in v.reasons)
        for other in MODALITIES:
            if other != modality_of_prompt(prompt):
                wrong = selector.judge(images, modality=other)
                rejected_wrong += sum(not v.passed for v in wrong)
                judged_wrong += len(wrong)
    print(f"own prompt: {passed} of {drawn} candidates pass ({passed / drawn:.1%}); reasons: {dict(reasons) or 'none'}")
    print(f"another modality's prompt: {rejected_wrong} of {judged_wrong} rejected ({rejected_wrong / judged_wrong:.1%}; bar 90%)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    policy, selector = Policy.load(), Selector.load()
    timing(policy, selector, args.rounds, 4, args.steps)
    behaviour(policy, selector, args.n, args.steps)


if __name__ == "__main__":
    main()
