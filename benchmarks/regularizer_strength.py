"""How strongly each defense pulls on the parameters at its paper weights.

Trains 3 x resnet20 for a few baseline steps on real FashionMNIST, then, on the next batch, prints
||grad_theta R|| / ||grad_theta CE|| for each defense (R: the defense's weighted terms, from the
exact training step; CE: the members' mean cross-entropy), with the terms' values.

    python benchmarks/regularizer_strength.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from ncen_cli.data import load_dataset
from ncen_cli.data.pipeline import iterate_batches
from ncen_cli.ensemble import build_ensemble
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import exact_step

DEFENSE_NAMES = ("gpmr", "gpmr-per-sample", "ncen", "ncen-official", "gal")


def parameter_gradient(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    arrays = load_dataset(
        "fashionmnist", args.data_dir, download=False, train_limit=4000, seed=args.seed
    )
    ensemble = build_ensemble(["resnet20"] * 3, arrays.input_shape, arrays.num_classes)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-3)
    batches = iterate_batches(arrays.train_x, arrays.train_y, args.batch_size, args.seed, 0)
    baseline = DEFENSES.get("baseline")
    for _ in range(args.warmup_steps):
        x, y = next(batches)
        optimizer.zero_grad()
        exact_step(ensemble, baseline, {}, x, y)
        optimizer.step()
    x, y = next(batches)
    model = copy.deepcopy(ensemble)
    exact_step(model, baseline, {}, x, y)
    ce = parameter_gradient(model)
    for name in DEFENSE_NAMES:
        defense = DEFENSES.get(name)
        hyperparameters = defense.resolve("fashionmnist")
        model = copy.deepcopy(ensemble)
        out = exact_step(model, defense, hyperparameters, x, y)
        ratio = float((parameter_gradient(model) - ce).norm() / ce.norm())
        terms = " ".join(f"{k}={float(v):.4g}" for k, v in out.terms.items())
        sys.stdout.write(f"{name:16s} ratio={ratio:.4g}  {terms}  ({hyperparameters})\n")


if __name__ == "__main__":
    main()
