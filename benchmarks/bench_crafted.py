"""Per-step cost of the defenses that craft their training inputs, relative to a plain step.

    python benchmarks/bench_crafted.py --data-dir DIR --reps 5 [--precision bf16]

Methods, each one whole training step as ``ncen train`` runs it (crafting, forward, backward, Adam
update) on the same real batch (FashionMNIST, 1x28x28, batch 64) of 3 x resnet20, with the
defense's default hyperparameters:

* ``plain``: ``baseline`` (mean member CE);
* ``adv-train``: PGD-10 adversarial training (+ the plain step on the PGD batch);
* ``ncen+adv-train``: NCEn's exact double-backprop step on the PGD batch;
* ``dverge`` (needs ncen-extra): 10-step feature distillation per member, then each member on the
  other members' distilled images (2 B images per member); ``dverge-clean``: with ``clean=1``.

The methods are interleaved (plain, adv-train, ..., plain, ...) after one warm-up round, so a
drifting shared host affects them alike; the report gives each one's median wall and process-CPU
time per step and its ratio to ``plain``'s. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from ncen_cli.crafting import craft_batch, crafting_generator, get_defense
from ncen_cli.defenses.base import CraftContext
from ncen_cli.device import Runtime
from ncen_cli.ensemble import build_ensemble
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import training_step

METHODS = {
    "plain": ("baseline", {}),
    "adv-train": ("adv-train", {}),
    "ncen+adv-train": ("ncen+adv-train", {}),
    "dverge": ("dverge", {}),
    "dverge-clean": ("dverge", {"clean": 1.0}),
}


def _batch(data_dir: str | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data_dir is None:  # no data: random images of the same shape (the cost is shape-bound)
        gen = torch.Generator().manual_seed(0)
        return torch.rand(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,))
    from ncen_cli.data import load_dataset

    arrays = load_dataset("fashionmnist", data_dir, False, batch, 10, 0)
    return arrays.train_x[:batch].float() / 255, arrays.train_y[:batch]


def _step(name: str, overrides: dict, runtime: Runtime, x: torch.Tensor, y: torch.Tensor):
    """One training step of ``name`` as a closure, on its own 3 x resnet20 ensemble."""
    defense = get_defense(name)
    hp = defense.resolve("fashionmnist", overrides)
    torch.manual_seed(0)
    ensemble = build_ensemble(["resnet20"] * 3, (1, 28, 28), 10).train()
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-3)
    counter = iter(range(10**9))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        index = next(counter)
        with runtime.autocast():
            xb, yb = x, y
            if defense.member_inputs is not None:
                context = CraftContext(crafting_generator(0, 0, index), 0, 0, index)
                xb, yb = craft_batch(defense, ensemble, x, y, hp, context)
            training_step(ensemble, defense, hp, xb, yb)
        optimizer.step()

    return step


def measure(args) -> dict[str, dict[str, float]]:
    """Median wall / CPU seconds per step of every available method, interleaved."""
    runtime = Runtime.create("cpu", args.precision, args.threads, False, 0)
    with runtime.applied():  # --threads for the measurement only
        x, y = _batch(args.data_dir, args.batch)
        available = [m for m, (d, _) in METHODS.items() if d.split("+")[-1] in DEFENSES.names()]
        steps = {m: _step(METHODS[m][0], METHODS[m][1], runtime, x, y) for m in available}
        times: dict[str, list[tuple[float, float]]] = {m: [] for m in available}
        for rep in range(args.reps + 1):
            for m in available:
                wall, cpu = time.perf_counter(), time.process_time()
                steps[m]()
                if rep > 0:  # round 0 warms up
                    times[m].append((time.perf_counter() - wall, time.process_time() - cpu))
        med = {
            m: {
                "wall": statistics.median(t[0] for t in ts),
                "cpu": statistics.median(t[1] for t in ts),
            }
            for m, ts in times.items()
        }
        for m in med:
            med[m]["wall_ratio"] = med[m]["wall"] / med["plain"]["wall"]
            med[m]["cpu_ratio"] = med[m]["cpu"] / med["plain"]["cpu"]
        return med


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--machine", default="2-core CPU dev box, shared with other jobs")
    args = parser.parse_args(argv)
    med = measure(args)
    lines = [
        f"machine: {args.machine}; {platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, precision {args.precision}; 3 x resnet20, "
        f"FashionMNIST batch {args.batch}, median of {args.reps} interleaved steps",
        "",
        "| method | wall s/step | CPU s/step | wall / plain | CPU / plain |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m, r in med.items():
        lines.append(
            f"| {m} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['wall_ratio']:.2f} | "
            f"{r['cpu_ratio']:.2f} |"
        )
    print("\n".join(lines))  # noqa: T201 - a script's report


if __name__ == "__main__":
    main()
