"""Benchmark ncen's training step against a plain step and an authors'-style reference.

One command, one run, every figure side by side::

    python benchmarks/bench_step.py --data-dir ../shared/data --out docs/performance-run.md

Sections (each measured in fresh subprocesses so that peak-memory figures are per method):

1. ``step``: ms/step and images/s for (a) a plain ensemble step (mean CE), (b) ncen jvp (the
   default, forward-mode), (c) ncen exact (double backprop), (d) the naive reference
   (benchmarks/reference.py), for FashionMNIST (1x28x28) and CIFAR-10 (3x32x32) shapes and
   k = 3, 5 resnet20 members, batch 64. (a)-(c) run as ``ncen train`` does on this machine
   (member threads on a multi-core CPU); the reference uses torch's intra-op threads. Where the
   device computes bfloat16 natively (CUDA, or a CPU with AVX512-BF16/AMX), all four also run
   under bf16 autocast (``-bf16``: what ``--precision bf16`` does). The methods are interleaved
   (a, b, c, d, a, ...) after a warm-up round and the median is reported;
   wall time and process CPU time are both given (CPU time is less sensitive to other jobs).
   Peak memory: growth of ``ru_maxrss`` over one step in a fresh process per method (CPU), or
   ``torch.cuda.max_memory_allocated`` (CUDA); for the first shape and k only unless
   ``--memory-all``.
2. ``agree``: jvp against exact parameter gradients (whole, and the regularizer-only part) on one
   fixed batch of 3 x resnet20, at initialisation and after a short NCEn training; with bf16,
   bf16 jvp and exact against float32 exact.
3. ``run``: whole training runs on the same data: ``ncen_cli.training.train`` (jvp, exact,
   and their ``--precision bf16`` runs where bf16 is native) vs the reference training loop
   (``reference.reference_train``, float32 as the authors'), 1 epoch of D + D_noise. With
   ``--device cuda --run-images 60000 --run-test 10000`` this is one full FashionMNIST epoch.
4. ``attack``: PGD-40 on the ensemble vs 40 x (k plain forward+backward input-gradient passes).

Writes a markdown report to ``--out`` (and the raw figures as JSON beside it) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {"fashionmnist": (1, 28, 28), "cifar10": (3, 32, 32)}
FP32_METHODS = ("plain", "jvp", "exact", "reference")
BF16_METHODS = ("plain-bf16", "jvp-bf16", "exact-bf16", "reference-bf16")
BF16 = "-bf16"
FAMILY_LAMBDAS = {"fashionmnist": (0.02, 0.02), "cifar10": (0.06, 0.04)}


# ------------------------------------------------------------------------------------ workers


def _setup(threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    return torch


def _bf16_native(device: str) -> bool:
    """bf16 runs are measured only where the device computes bfloat16 natively."""
    import torch

    from ncen_cli.device import cpu_has_native_bf16

    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def _methods(args) -> tuple[str, ...]:
    return FP32_METHODS + (BF16_METHODS if _bf16_native(args.device) else ())


def _base_method(method: str) -> tuple[str, bool]:
    """'jvp-bf16' -> ('jvp', True)."""
    if method.endswith(BF16):
        return method[: -len(BF16)], True
    return method, False


def _autocast(device, bf16: bool):
    import contextlib

    import torch

    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fns(family: str, k: int, batch: int, methods, device: str, seed: int = 0):
    """Build models once per method and return {method: callable running one full step (and
    waiting for the device)}."""
    import torch
    from reference import SoftmaxMember, make_optimizers, reference_step

    from ncen_cli.archs import build_member
    from ncen_cli.ensemble import build_ensemble
    from ncen_cli.member_parallel import MemberExecutor, plan_threads
    from ncen_cli.registry import DEFENSES
    from ncen_cli.train_step import training_step

    dev = torch.device(device)
    # what `ncen train` does on this machine: member threads on a multi-core CPU
    plan = plan_threads(dev, k, None, None)
    threaded = MemberExecutor(plan.member_threads, plan.intra_op_threads)
    shape = SHAPES[family]
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    lam_cos, lam_norm = FAMILY_LAMBDAS[family]
    fns = {}
    for method in methods:
        torch.manual_seed(seed)
        base, bf16 = _base_method(method)
        if base == "reference":
            members = [SoftmaxMember(build_member("resnet20", shape, 10)).to(dev) for _ in range(k)]
            opts = make_optimizers(members)

            def step(members=members, opts=opts):
                reference_step(members, opts, x, y, lam_cos, lam_norm)

        else:
            ensemble = build_ensemble(["resnet20"] * k, shape, 10).to(dev).train()
            opt = torch.optim.Adam(ensemble.parameters(), lr=1e-3)
            defense = DEFENSES.get("baseline" if base == "plain" else "ncen")
            hp = defense.resolve(family)
            mode = "jvp" if base == "jvp" else "exact"

            def step(ensemble=ensemble, opt=opt, defense=defense, hp=hp, mode=mode):
                opt.zero_grad(set_to_none=True)
                training_step(ensemble, defense, hp, x, y, mode, executor=threaded)
                opt.step()

        def run(step=step, bf16=bf16):
            with _autocast(dev, bf16):  # as `ncen train --precision bf16` wraps its step
                step()
            _sync(dev)

        fns[method] = run
    return fns


def worker_step(args) -> dict:
    torch = _setup(args.threads)
    fns = _step_fns(args.family, args.k, args.batch, _methods(args), args.device)
    for fn in fns.values():  # warm-up round
        for _ in range(args.warmup):
            fn()
    wall = {m: [] for m in fns}
    cpu = {m: [] for m in fns}
    for _ in range(args.reps):
        for method, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[method].append(time.perf_counter() - w0)
            cpu[method].append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu, "threads": torch.get_num_threads()}


def worker_memory(args) -> dict:
    torch = _setup(args.threads)
    fns = _step_fns(args.family, args.k, args.batch, [args.method], args.device)
    fn = fns[args.method]
    cuda = torch.device(args.device).type == "cuda"
    if cuda:  # pragma: no cover - no GPU on the dev box
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"maxrss_delta_mib": (after - before) / 1024, "maxrss_mib": after / 1024}
    if cuda:  # pragma: no cover - no GPU on the dev box
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _flat_grad(module):
    import torch

    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def worker_agree(args) -> dict:
    """jvp (and, with bf16, both modes in bf16) against float32 exact on one fixed batch, at
    initialisation and after ``--train-steps`` NCEn steps on real images: cosines and relative
    errors of the whole parameter gradient and of its regularizer-only part."""
    torch = _setup(args.threads)
    from ncen_cli.data import AugmentConfig, iterate_batches
    from ncen_cli.ensemble import build_ensemble
    from ncen_cli.registry import DEFENSES
    from ncen_cli.train_step import exact_step, jvp_step, training_step

    arrays = _arrays(args, "fashionmnist", train=max(args.train_steps * 64, 64), test=64)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    ensemble = build_ensemble(["resnet20"] * 3, arrays.input_shape, arrays.num_classes)
    ensemble = ensemble.to(dev).train()
    ncen, baseline = DEFENSES.get("ncen"), DEFENSES.get("baseline")
    hp = ncen.resolve("fashionmnist")
    x = (arrays.test_x[:64].float() / 255).to(dev)
    y = arrays.test_y[:64].to(dev)

    def cos(a, b, dim):  # in float64: float32 cosines of long vectors can exceed 1
        return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=dim)

    def grad_of(step, state, defense=ncen, hyperparameters=hp, bf16=False):
        ensemble.load_state_dict(state)
        ensemble.zero_grad(set_to_none=True)
        with _autocast(dev, bf16):
            step(ensemble, defense, hyperparameters, x, y)
        return _flat_grad(ensemble)

    def rows_at(label):
        state = {k: v.clone() for k, v in ensemble.state_dict().items()}
        exact = grad_of(exact_step, state)
        ce = grad_of(exact_step, state, baseline, {})
        share = float((exact - ce).norm() / exact.norm())
        methods = [("fp32", "jvp", jvp_step, False)]
        if _bf16_native(args.device):
            methods += [("bf16", "jvp", jvp_step, True), ("bf16", "exact", exact_step, True)]
        rows = []
        for precision, name, step, bf16 in methods:
            grad = grad_of(step, state, bf16=bf16)
            ce_own = grad_of(exact_step, state, baseline, {}, bf16=bf16)
            reg, reg_exact = grad - ce_own, exact - ce
            rows.append(
                {
                    "state": label,
                    "share": share,
                    "precision": precision,
                    "method": name,
                    "cosine_total": float(cos(grad, exact, dim=0)),
                    "cosine_regularizer": float(cos(reg, reg_exact, dim=0)),
                    "rel_error_total": float((grad - exact).norm() / exact.norm()),
                    "rel_error_regularizer": float((reg - reg_exact).norm() / reg_exact.norm()),
                }
            )
        ensemble.load_state_dict(state)
        return rows

    rows = rows_at("initialisation")
    opt = torch.optim.Adam(ensemble.parameters(), lr=1e-3)
    aug = AugmentConfig(crop_padding=2, noise_sigma=0.15)
    for xb, yb in iterate_batches(arrays.train_x, arrays.train_y, 64, 0, 0, aug, dev):
        opt.zero_grad(set_to_none=True)
        training_step(ensemble, ncen, hp, xb, yb, "exact")
        opt.step()
    rows += rows_at(f"after {args.train_steps} NCEn steps")
    return {"rows": rows}


def _arrays(args, family: str, train: int, test: int):
    """Real images from --data-dir when present, else random uint8 images of the same shape."""
    import torch

    from ncen_cli.data.base import ImageArrays

    if args.data_dir and Path(args.data_dir).is_dir():
        from ncen_cli.data import load_dataset

        arrays = load_dataset(family, args.data_dir, False, train, test, 0)
        return arrays
    gen = torch.Generator().manual_seed(0)
    shape = SHAPES[family]
    return ImageArrays(
        name=f"synthetic-{family}",
        family=family,
        train_x=torch.randint(0, 256, (train, *shape), dtype=torch.uint8, generator=gen),
        train_y=torch.randint(0, 10, (train,), generator=gen),
        test_x=torch.randint(0, 256, (test, *shape), dtype=torch.uint8, generator=gen),
        test_y=torch.randint(0, 10, (test,), generator=gen),
        classes=tuple(str(i) for i in range(10)),
    )


def worker_run(args) -> dict:
    """One whole training run (1 epoch of D + D_noise), timed end to end."""
    torch = _setup(args.threads)
    arrays = _arrays(args, "fashionmnist", args.run_images, args.run_test)
    lam_cos, lam_norm = FAMILY_LAMBDAS["fashionmnist"]
    c0 = time.process_time()
    method, bf16 = _base_method(args.method)
    if method == "reference":
        from reference import reference_train

        result = reference_train(
            arrays,
            ["resnet20"] * 3,
            epochs=1,
            batch_size=64,
            lambda_cos=lam_cos,
            lambda_norm=lam_norm,
            device=args.device,
        )
    else:
        import tempfile

        from ncen_cli.training import TrainConfig, train

        config = TrainConfig(
            members=["resnet20"] * 3,
            dataset="fashionmnist",
            defense="ncen",
            epochs=1,
            batch_size=64,
            device=args.device,
            threads=torch.get_num_threads(),
            double_backprop=method,
            precision="bf16" if bf16 else "fp32",
            download=False,
        )
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            out = train(config, Path(tmp) / "bench.safetensors", arrays=arrays)
            seconds = time.perf_counter() - started
        result = {"seconds": seconds, "test_accuracy": out.history[-1].test_accuracy}
    result["cpu_seconds"] = time.process_time() - c0
    result["images"] = 2 * len(arrays.train_x)
    result["source"] = arrays.name
    return result


def worker_attack(args) -> dict:
    """PGD-40 (no early stop) vs 40 x k plain member forward+backward input-gradient passes."""
    torch = _setup(args.threads)
    from ncen_cli.attacks.base import AttackSettings
    from ncen_cli.attacks.pgd import ATTACK
    from ncen_cli.ensemble import build_ensemble

    dev = torch.device(args.device)
    torch.manual_seed(0)
    shape = SHAPES["fashionmnist"]
    ensemble = build_ensemble(["resnet20"] * 3, shape, 10).to(dev).eval()
    for p in ensemble.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, *shape, generator=gen).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(dev)
    steps = args.attack_steps
    settings = AttackSettings(
        eps=0.1, steps=steps, step_size=0.1, random_start=True, extra={"early_stop": False}
    )

    def pgd():
        ATTACK.perturb(ensemble, x, y, settings, torch.Generator(dev).manual_seed(1))
        _sync(dev)

    def plain():
        for _ in range(steps):
            for member in ensemble.members:
                xi = x.detach().requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(member(xi), y, reduction="sum")
                torch.autograd.grad(loss, xi)
        _sync(dev)

    fns = {"pgd": pgd, "plain": plain}
    times = {n: [] for n in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.attack_reps):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    return {"wall": times}


WORKERS = {
    "step": worker_step,
    "memory": worker_memory,
    "agree": worker_agree,
    "run": worker_run,
    "attack": worker_attack,
}


# ------------------------------------------------------------------------------------ driver


def _spawn(args, worker: str, **extra) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker]
    for key, value in {**_common(args), **extra}.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            cmd += [flag, *map(str, value)]
        else:
            cmd += [flag, str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"worker {worker} {extra} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _common(args) -> dict:
    return {
        "threads": args.threads,
        "reps": args.reps,
        "warmup": args.warmup,
        "batch": args.batch,
        "data_dir": args.data_dir,
        "device": args.device,
    }


def _log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _median(values) -> float:
    return statistics.median(values)


def _save_partial(args, results: dict) -> None:
    """What is measured so far, beside --out, in case a long run is cut short."""
    if args.out:
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(results, indent=1))


def drive(args) -> None:
    started = time.perf_counter()
    results: dict = {"step": {}, "memory": {}, "agree": None, "run": {}, "attack": None}
    results["machine"] = args.machine
    results["command"] = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:])
    configs = [(f, k) for f in args.families for k in args.ks]
    if "agree" in args.sections:
        _log("jvp vs exact agreement")
        results["agree"] = _spawn(args, "agree", train_steps=args.train_steps)
        _save_partial(args, results)
    if "step" in args.sections:
        for family, k in configs:
            _log(f"step timing {family} k={k}")
            results["step"][f"{family}/k{k}"] = _spawn(args, "step", family=family, k=k)
            _save_partial(args, results)
            if (family, k) != configs[0] and not args.memory_all:
                continue
            for method in _methods(args):
                results["memory"][f"{family}/k{k}/{method}"] = _spawn(
                    args, "memory", family=family, k=k, method=method
                )
    if "run" in args.sections:
        for rep in range(args.run_reps):
            bf16 = ("jvp-bf16", "exact-bf16") if _bf16_native(args.device) else ()
            for method in ("reference", "jvp", "exact", *bf16):
                _log(f"whole run {method} (rep {rep + 1})")
                results["run"].setdefault(method, []).append(
                    _spawn(
                        args,
                        "run",
                        method=method,
                        run_images=args.run_images,
                        run_test=args.run_test,
                    )
                )
                _save_partial(args, results)
    if "attack" in args.sections:
        _log("attack throughput")
        results["attack"] = _spawn(
            args, "attack", attack_steps=args.attack_steps, attack_reps=args.attack_reps
        )
    results["seconds"] = time.perf_counter() - started
    text = report(results, args)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    sys.stdout.write(text)


def report(results: dict, args) -> str:
    import torch

    lines = [
        "## Benchmark run",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {results['machine']}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"threads {args.threads or torch.get_num_threads()}",
        f"- wall time of the whole benchmark: {results.get('seconds', float('nan')) / 60:.1f} min",
        "",
    ]
    if results["step"]:
        lines += [
            f"### Training step (batch {args.batch}, resnet20 members; median of {args.reps} "
            f"interleaved repetitions after {args.warmup} warm-up)",
            "",
            "| shape | k | method | ms/step (wall) | images/s | ms/step (CPU) | plain steps "
            "(wall) | vs reference (wall) | vs reference (CPU) | peak RSS growth (MiB) |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, res in results["step"].items():
            family, k = key.split("/")
            ref_w = _median(res["wall"]["reference"])
            ref_c = _median(res["cpu"]["reference"])
            for method in res["wall"]:
                w = _median(res["wall"][method])
                c = _median(res["cpu"][method])
                plain = _median(res["wall"]["plain-bf16" if method.endswith(BF16) else "plain"])
                mem = results["memory"].get(f"{key}/{method}", {})
                lines.append(
                    f"| {family} | {k[1:]} | {method} | {w * 1e3:.0f} | {args.batch / w:.0f} | "
                    f"{c * 1e3:.0f} | {w / plain:.2f} | {w / ref_w:.2f} | {c / ref_c:.2f} | "
                    f"{mem.get('maxrss_delta_mib', float('nan')):.0f} |"
                )
        lines.append("")
    if results["agree"]:
        agree = results["agree"]
        lines += [
            "### jvp vs exact parameter gradient (one fixed batch of 64 test images, 3 x resnet20, "
            "train-mode BatchNorm)",
            "",
            "R part: the gradient minus the mean-CE-only gradient of the same precision. Every "
            "row is compared with float32 exact at the same state.",
            "",
            "| state | ||grad R|| / ||grad|| | precision | method | cosine (CE + R) | "
            "cosine (R part only) | relative error (CE + R) | relative error (R part) |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for row in agree["rows"]:
            lines.append(
                f"| {row['state']} | {row['share']:.4f} | {row['precision']} | {row['method']} "
                f"| {row['cosine_total']:.7f} | {row['cosine_regularizer']:.7f} | "
                f"{row['rel_error_total']:.1e} | {row['rel_error_regularizer']:.1e} |"
            )
        lines.append("")
    if results["run"]:
        ref = _median([r["seconds"] for r in results["run"]["reference"]])
        ref_cpu = _median([r["cpu_seconds"] for r in results["run"]["reference"]])
        first = results["run"]["reference"][0]
        lines += [
            f"### Whole training run (3 x resnet20, 1 epoch of {first['images']} images = "
            f"D + D_noise of {first['images'] // 2} `{first['source']}` images, batch "
            f"64, evaluation on {args.run_test} test images; median of {args.run_reps})",
            "",
            "| run | seconds (wall) | vs reference | CPU seconds | vs reference (CPU) | "
            "test accuracy | target |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        targets = {"exact": 0.85, "jvp": 0.5}
        for method, runs in results["run"].items():
            s = _median([r["seconds"] for r in runs])
            c = _median([r["cpu_seconds"] for r in runs])
            acc = _median([r["test_accuracy"] for r in runs])
            target = targets.get(_base_method(method)[0])
            verdict = ""
            if target:
                verdict = f"<= {target}: {'met' if s / ref <= target else 'NOT met'}"
            lines.append(
                f"| {method} | {s:.1f} | {s / ref:.2f} | {c:.1f} | {c / ref_cpu:.2f} | "
                f"{acc:.3f} | {verdict} |"
            )
        lines.append("")
    if results["attack"]:
        a = results["attack"]["wall"]
        pgd, plain = _median(a["pgd"]), _median(a["plain"])
        lines += [
            f"### Attack throughput (PGD-{args.attack_steps}, no early stop, 3 x resnet20, "
            f"batch {args.batch}, FashionMNIST shape)",
            "",
            "| what | seconds | images/s | speed vs k plain passes |",
            "| --- | ---: | ---: | ---: |",
            f"| PGD-{args.attack_steps} on the ensemble | {pgd:.2f} | {args.batch / pgd:.1f} | "
            f"{plain / pgd:.2f} |",
            f"| {args.attack_steps} x 3 plain member forward+backward | {plain:.2f} | "
            f"{args.batch / plain:.1f} | 1.00 |",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--family", default="fashionmnist", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="exact", help=argparse.SUPPRESS)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["step", "agree", "run", "attack"],
        choices=["step", "agree", "run", "attack"],
    )
    parser.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ks", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=os.environ.get("NCEN_SHARED_DATA"))
    parser.add_argument(
        "--memory-all",
        action="store_true",
        help="peak memory for every shape and k (default: the first only)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=15,
        help="NCEn steps before the 'trained' agreement check",
    )
    parser.add_argument("--run-images", type=int, default=640)
    parser.add_argument("--run-test", type=int, default=500)
    parser.add_argument("--run-reps", type=int, default=1)
    parser.add_argument("--attack-steps", type=int, default=40)
    parser.add_argument("--attack-reps", type=int, default=2)
    parser.add_argument("--machine", default="2-core CPU dev box, shared with other jobs")
    parser.add_argument("--out", default=None, help="write the markdown report here (+ .json)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))  # noqa: T201 - worker protocol on stdout
        return
    drive(args)


if __name__ == "__main__":
    main()
