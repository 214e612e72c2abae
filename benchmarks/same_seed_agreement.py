"""Same seed, same batches: how far apart do `exact` and `jvp` training runs end, in float32 and in
float64? (issue 15's same-seed acceptance, separated from float32 rounding.)

Both modes compute the same parameter gradient exactly; they differ only in the order of the
floating-point operations. Over many Adam steps that rounding difference is amplified, so a
float32 comparison measures rounding, not the method. The same run in float64 shows what is left
when rounding is 2^-29 times smaller::

    python benchmarks/same_seed_agreement.py --data-dir ../shared/data

Per dtype: 3 x resnet20 seeded (seed 0), the first ``--images`` FashionMNIST training images in
batches of 64 for ``--epochs`` epochs (no augmentation or D_noise, so that both modes see the
same tensors), Adam lr 1e-3, NCEn at lambda_cos = lambda_norm = 0.5 (the issue's command), one
step = ``ncen_cli.train_step.training_step``. Prints (and with ``--out`` writes as JSON) the
relative L2 distance of all parameters and BatchNorm buffers between the exact and the jvp run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ncen_cli.data import load_dataset
from ncen_cli.ensemble import build_ensemble
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import training_step

HYPERPARAMETERS = {"lambda_cos": 0.5, "lambda_norm": 0.5}


def train_once(
    mode: str, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor, epochs: int
) -> torch.Tensor:
    """All parameters and buffers, flattened, after training in ``mode`` on x (N, 1, 28, 28)."""
    torch.manual_seed(0)
    ensemble = build_ensemble(["resnet20"] * 3, (1, 28, 28), 10).to(dtype).train()
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-3)
    defense = DEFENSES.get("ncen")
    for _ in range(epochs):
        for start in range(0, len(x), 64):
            optimizer.zero_grad(set_to_none=True)
            xb, yb = x[start : start + 64].to(dtype), y[start : start + 64]
            training_step(ensemble, defense, HYPERPARAMETERS, xb, yb, mode)
            optimizer.step()
    state = [t.detach().double().flatten() for t in ensemble.state_dict().values()]
    return torch.cat([t for t in state if t.is_floating_point()])


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arrays = load_dataset("fashionmnist", args.data_dir, False, args.images, None, 0)
    x = arrays.train_x.float() / 255.0
    rows = []
    for dtype in (torch.float32, torch.float64):
        started = time.perf_counter()
        exact = train_once("exact", dtype, x, arrays.train_y, args.epochs)
        jvp = train_once("jvp", dtype, x, arrays.train_y, args.epochs)
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "relative_l2_jvp_vs_exact": relative_distance(jvp, exact),
                "steps": args.epochs * -(-len(x) // 64),
                "seconds": time.perf_counter() - started,
            }
        )
        sys.stdout.write(json.dumps(rows[-1]) + "\n")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"images": len(x), "epochs": args.epochs, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
