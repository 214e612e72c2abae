"""Fuzz suite: hypothesis-generated malformed checkpoints (header and metadata), npz datasets,
resume states and sweep folders. Every case asserts the contract of docs/errors.md: exit code 1
or 2, exactly one ``error:`` line on stderr, no traceback, and no file changed or left behind.

Every generator injects at least one defect (a case that happened to be valid would train or
attack and change files), so "exit 0" is never an acceptable outcome.

Budget: ``FUZZ_EXAMPLES`` cases per generator (12 in CI, derandomized so a failure reproduces);
``pytest --fuzz-long`` or ``NCEN_FUZZ=long`` runs 300 random cases per generator (for releases).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import fgsm_attack_args, tiny_config, train_flags
from ncen_cli.checkpoint import MAX_CLASSES, save_ensemble
from ncen_cli.cli import app
from ncen_cli.ensemble import MAX_MEMBERS, build_ensemble
from ncen_cli.errors import InterruptedRun
from ncen_cli.training import resume_path, train

LONG = os.environ.get("NCEN_FUZZ", "").lower() == "long"
FUZZ_EXAMPLES = 300 if LONG else 12
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not LONG,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
runner = CliRunner()
TINY = [
    *train_flags(
        epochs=1, batch_size=16, train_limit=16, test_limit=16, threads=True, dataset=None
    ),
    "--no-noise",
]
SWEEP = [
    "sweep",
    "--dataset",
    "synthetic",
    *TINY,
    "--lambda-cos",
    "0",
    "--lambda-norm",
    "0",
    "--attacks",
    "fgsm",
    "--eps",
    "0.1",
    "--attack-limit",
    "4",
]


def _train_on(dataset: str, data_dir: Path, out: Path) -> list[str]:
    """``ncen train`` of the tiny settings on ``dataset`` read from ``data_dir``, into ``out``."""
    return ["train", "--dataset", dataset, "--data-dir", str(data_dir), *TINY, "--out", str(out)]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "special"
        for p in sorted(folder.rglob("*"))
    }


def assert_clean_failure(args: list[str], folder: Path) -> str:
    """Run ``ncen ARGS``; assert exit 1 or 2, one error line, no traceback, ``folder`` unchanged."""
    before = _snapshot(folder)
    result = runner.invoke(app, args)
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert _snapshot(folder) == before
    return lines[0]


# --------------------------------------------------------------------- values of the wrong kind

DEEP_MARK = "\u0000deep"


def _deep_text(depth: int) -> str:
    """JSON text of a list nested ``depth`` levels (deeper than json.dumps itself could write)."""
    return "[" * depth + "0" + "]" * depth


def _dumps(value: object, deep: str | None = None) -> str:
    """json.dumps, with the string DEEP_MARK anywhere in ``value`` replaced by ``deep`` text."""
    text = json.dumps(value)
    return text.replace(json.dumps(DEEP_MARK), deep) if deep is not None else text


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
DEEP = st.integers(40, 200_000).map(_deep_text)  # JSON text


def _not(kinds: tuple[type, ...]) -> st.SearchStrategy:
    return JUNK.filter(
        lambda v: not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds
    )


BAD_METADATA: dict[str, st.SearchStrategy] = {
    "format": st.one_of(JUNK, st.text()).filter(lambda v: v != "ncen-ensemble"),
    "schema_version": st.one_of(
        _not((int,)),
        st.booleans(),
        st.integers(max_value=0),
        st.integers(min_value=2, max_value=2**80),
    ),
    "members": st.one_of(
        _not((list,)),
        st.lists(st.one_of(st.integers(), st.none(), st.floats()), min_size=2, max_size=4),
        st.lists(st.just("resnet20"), max_size=1),
        st.lists(st.just("resnet20"), min_size=MAX_MEMBERS + 1, max_size=3000),
        st.lists(
            st.text(min_size=1, max_size=10).filter(lambda s: not s.startswith("resnet")),
            min_size=2,
            max_size=4,
        ),
    ),
    "input_shape": st.one_of(
        _not((list,)),
        st.lists(st.integers(1, 12), max_size=5).filter(lambda v: len(v) != 3),
        st.tuples(st.integers(-5, 0), st.integers(1, 12), st.integers(1, 12)).map(list),
        st.tuples(st.just(1), st.integers(4097, 2**62), st.just(12)).map(list),
        st.lists(st.one_of(st.text(max_size=3), st.floats(0.5, 3.5)), min_size=3, max_size=3),
    ),
    "num_classes": st.one_of(
        _not((int,)),
        st.booleans(),
        st.integers(max_value=1),
        st.integers(min_value=MAX_CLASSES + 1, max_value=10**15),
    ),
    "activation": st.one_of(
        _not((str,)), st.text(max_size=8).filter(lambda s: s not in ("relu", "leakyrelu"))
    ),
    "combine": st.one_of(
        _not((str,)), st.text(max_size=8).filter(lambda s: s not in ("mean-logits", "mean-prob"))
    ),
    "dataset": _not((str,)),
    "hyperparameters": st.one_of(
        _not((dict,)),
        st.dictionaries(
            st.text(max_size=5),
            st.one_of(st.text(max_size=3), st.none(), st.lists(st.integers())),
            min_size=1,
            max_size=3,
        ),
    ),
    "classes": st.one_of(
        _not((list,)),
        st.lists(st.text(min_size=1, max_size=3), min_size=2, max_size=9).filter(
            lambda v: len(v) != 4
        ),
    ),
}


# --------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict]:
    """A valid 2 x resnet20 checkpoint for the synthetic dataset: its tensors and metadata."""
    path = tmp_path_factory.mktemp("template") / "m.safetensors"
    save_ensemble(
        build_ensemble(["resnet20"] * 2, (1, 12, 12), 4),
        path,
        {
            "dataset": "synthetic",
            "family": "fashionmnist",
            "input_shape": [1, 12, 12],
            "num_classes": 4,
            "classes": ["a", "b", "c", "d"],
        },
    )
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["ncen"])
    return tensors, meta


def _attack(path: Path) -> list[str]:
    return fgsm_attack_args(path, "--out", str(path.parent / "results.json"))


def test_the_template_checkpoint_itself_is_accepted(template, tmp_path):
    tensors, meta = template
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"ncen": json.dumps(meta)})
    result = runner.invoke(app, _attack(tmp_path / "m.safetensors"))
    assert result.exit_code == 0, result.output  # the generators below are what breaks it


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_metadata(template, data):
    tensors, meta = template
    meta = dict(meta)
    key = data.draw(st.sampled_from(sorted(BAD_METADATA) + ["deep", "text", "drop"]), label="key")
    if key == "deep":
        meta[data.draw(st.sampled_from(sorted(meta)))] = DEEP_MARK
        header = _dumps(meta, data.draw(DEEP))
    elif key == "text":  # the ncen entry is not a JSON object at all
        header = data.draw(
            st.one_of(st.text(max_size=30), JUNK.map(json.dumps)).filter(
                lambda t: not t.strip().startswith("{")
            )
        )
    elif key == "drop":
        meta.pop(
            data.draw(
                st.sampled_from(
                    ["format", "schema_version", "members", "input_shape", "num_classes"]
                )
            )
        )
        header = json.dumps(meta)
    else:
        meta[key] = data.draw(BAD_METADATA[key], label=key)
        header = json.dumps(meta)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        save_file(tensors, str(path), metadata={"ncen": header})
        assert_clean_failure(_attack(path), Path(tmp))


def _header(blob: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def _pack(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


DTYPES = ["F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"]


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_header_and_tensors(template, data):
    tensors, meta = template
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        save_file(tensors, str(path), metadata={"ncen": json.dumps(meta)})
        blob = path.read_bytes()
        header, body = _header(blob)
        names = sorted(k for k in header if k != "__metadata__")
        kind = data.draw(
            st.sampled_from(
                [
                    "truncate",
                    "length",
                    "dtype",
                    "shape",
                    "offsets",
                    "rename",
                    "drop",
                    "extra",
                    "garbage",
                ]
            ),
            label="kind",
        )
        name = data.draw(st.sampled_from(names), label="tensor")
        entry = header[name]
        if kind == "truncate":
            blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        elif kind == "length":
            size = data.draw(
                st.integers(0, 2**64 - 1).filter(lambda n: n != len(blob) - 8 - len(body))
            )
            blob = struct.pack("<Q", size) + blob[8:]
        elif kind == "garbage":
            blob = data.draw(st.binary(max_size=200))
        else:
            if kind == "dtype":
                entry["dtype"] = data.draw(
                    st.sampled_from([d for d in DTYPES if d != entry["dtype"]])
                )
            elif kind == "shape":
                entry["shape"] = data.draw(
                    st.lists(st.integers(0, 2**20), max_size=4).filter(
                        lambda s: s != entry["shape"]
                    )
                )
            elif kind == "offsets":
                entry["data_offsets"] = data.draw(
                    st.lists(st.integers(0, len(body) * 2), min_size=2, max_size=2).filter(
                        lambda o: o != entry["data_offsets"]
                    )
                )
            elif kind == "rename":
                header[
                    data.draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in header))
                ] = header.pop(name)
            elif kind == "drop":
                header.pop(name)
            else:
                header[
                    data.draw(
                        st.sampled_from(
                            ["members.2.conv1.weight", "members.0.extra", "optim.0.step", "x"]
                        )
                    )
                ] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
            blob = _pack(header, body)
        path.write_bytes(blob)
        assert_clean_failure(_attack(path), Path(tmp))


def test_a_fifo_named_like_a_checkpoint_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "x.safetensors")
    line = assert_clean_failure(_attack(tmp_path / "x.safetensors"), tmp_path)
    assert "not a regular file" in line


# --------------------------------------------------------------------- npz datasets


def _arrays(n: int, labels: st.SearchStrategy, data) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((n, 12, 12), dtype=np.uint8)
    y = np.array([data.draw(labels) for _ in range(n)], dtype=np.int64)
    return x, y


NPZ_DEFECTS = [
    "negative_label",
    "huge_label",
    "empty",
    "length",
    "x_float",
    "y_float",
    "x_ndim",
    "split_shapes",
    "missing_key",
    "npy",
    "zero_bytes",
    "random_bytes",
    "truncated",
    "object",
    "fifo",
]


@FUZZ
@given(data=st.data())
def test_fuzz_npz_datasets(data):
    defect = data.draw(st.sampled_from(NPZ_DEFECTS), label="defect")
    split = data.draw(st.sampled_from(["train", "test"]), label="split")
    ok_labels = st.integers(0, 3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        arrays = {
            s: _arrays(data.draw(st.integers(1, 8)), ok_labels, data) for s in ("train", "test")
        }
        x, y = arrays[split]
        target = folder / f"{split}.npz"
        if defect == "negative_label":
            y[data.draw(st.integers(0, len(y) - 1))] = data.draw(st.integers(-(2**62), -1))
        elif defect == "huge_label":
            y[data.draw(st.integers(0, len(y) - 1))] = data.draw(st.integers(MAX_CLASSES, 2**62))
        elif defect == "empty":
            x, y = x[:0], y[:0]
        elif defect == "length":
            y = np.concatenate([y, y[:1]]) if data.draw(st.booleans()) else y[:-1]
        elif defect == "x_float":
            x = x.astype(data.draw(st.sampled_from([np.float32, np.float64, np.int16])))
        elif defect == "y_float":
            y = y.astype(np.float32) + 0.5
        elif defect == "x_ndim":
            x = x.reshape(-1) if data.draw(st.booleans()) else x[:, None, None]
        elif defect == "split_shapes":
            x = np.zeros((len(y), data.draw(st.sampled_from([8, 10, 16])), 12), dtype=np.uint8)
        arrays[split] = (x, y)
        for s, (xs, ys) in arrays.items():
            np.savez(folder / f"{s}.npz", x=xs, y=ys)
        if defect == "missing_key":
            np.savez(target, **{data.draw(st.sampled_from(["x", "y"])): x, "z": y})
        elif defect == "npy":
            target.unlink()
            with open(target, "wb") as f:
                np.save(f, x)
        elif defect == "zero_bytes":
            target.write_bytes(b"")
        elif defect == "random_bytes":
            target.write_bytes(data.draw(st.binary(min_size=1, max_size=300)))
        elif defect == "truncated":
            blob = target.read_bytes()
            target.write_bytes(blob[: data.draw(st.integers(1, len(blob) - 1))])
        elif defect == "object":
            np.savez(target, x=np.array([{"a": 1}] * len(y), dtype=object), y=y)
        elif defect == "fifo":
            target.unlink()
            os.mkfifo(target)
        out = folder / "out" / "run.safetensors"
        assert_clean_failure(
            _train_on("npz", folder, out),
            folder,
        )


@pytest.mark.parametrize("label", [10, 255, -1])
def test_fashionmnist_files_with_labels_outside_its_ten_classes(tmp_path, label):
    x = np.zeros((4, 28, 28), dtype=np.uint8)
    for split in ("train", "test"):
        np.savez(tmp_path / f"fashionmnist_{split}.npz", x=x, y=np.array([0, 1, 2, label]))
    out = tmp_path / "o" / "r.safetensors"
    line = assert_clean_failure(
        _train_on("fashionmnist", tmp_path, out),
        tmp_path,
    )
    assert f"label {label} is outside [0, " in line


# --------------------------------------------------------------------- resume states


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-epoch run interrupted after epoch 1 (checkpoint + resume state): a finished run
    deletes its resume state, so the states to fuzz are those of interrupted runs."""
    out = tmp_path_factory.mktemp("run") / "run.safetensors"
    config = tiny_config(
        epochs=2, batch_size=16, train_limit=16, test_limit=16, noise=False, threads=1
    )

    def stop(_record) -> None:
        raise KeyboardInterrupt

    with pytest.raises(InterruptedRun):
        train(config, out, on_epoch=stop)
    assert resume_path(out).exists()
    return out


def _resume_args(out: Path) -> list[str]:
    return ["train", "--resume", str(out), "--device", "cpu", "--threads", "1"]


def test_the_interrupted_run_itself_resumes_cleanly(finished_run, tmp_path):
    shutil.copytree(finished_run.parent, tmp_path / "run")
    result = runner.invoke(app, _resume_args(tmp_path / "run" / finished_run.name))
    assert result.exit_code == 0, result.output


RESUME_KEYS = {
    "epochs_done": st.one_of(
        st.text(max_size=6), st.integers(2, 2**70).map(str), st.just("0"), st.just("-1")
    ).filter(lambda t: not (t.isdigit() and int(t) == 1)),
    "config": st.one_of(st.text(max_size=10), JUNK.map(json.dumps), DEEP),
    "param_groups": st.one_of(
        _not((list,)).map(json.dumps),
        st.lists(_not((dict,)), min_size=1, max_size=2).map(json.dumps),
        st.just(json.dumps([{"lr": 0.1}])),
        st.just(json.dumps([{"params": [0, 1]}])),
        st.text(max_size=10),
    ),
    "history": st.one_of(
        _not((list,)).map(json.dumps),
        st.just("[]"),
        st.lists(
            st.dictionaries(st.text(max_size=4), JUNK, max_size=3), min_size=1, max_size=2
        ).map(json.dumps),
        DEEP,
    ),
}


@FUZZ
@given(data=st.data())
def test_fuzz_resume_states(finished_run, data):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(finished_run.parent, run)
        out = run / finished_run.name
        state = run / (finished_run.name + ".resume.safetensors")
        with safe_open(str(state), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        kind = data.draw(
            st.sampled_from(
                sorted(RESUME_KEYS)
                + ["drop_tensor", "rename_tensor", "dtype", "shape", "rng", "nan", "truncate"]
            ),
            label="kind",
        )
        name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
        if kind in RESUME_KEYS:
            meta[kind] = data.draw(RESUME_KEYS[kind], label=kind)
        elif kind == "drop_tensor":
            tensors.pop(name)
        elif kind == "rename_tensor":
            tensors[
                data.draw(
                    st.sampled_from(["members.9.x", "optim.99999.exp_avg", "rng", "optim.x.y"])
                )
            ] = tensors.pop(name)
        elif kind == "dtype":
            tensors[name] = tensors[name].to(
                torch.float64 if tensors[name].is_floating_point() else torch.float32
            )
        elif kind == "shape":
            tensors[name] = torch.zeros(tensors[name].numel() + 1)
        elif kind == "rng":
            tensors["rng.torch"] = torch.zeros(data.draw(st.integers(0, 64)), dtype=torch.uint8)
        elif kind == "nan":
            key = data.draw(
                st.sampled_from(
                    sorted(
                        k
                        for k in tensors
                        if k.startswith("members.") and tensors[k].is_floating_point()
                    )
                )
            )
            tensors[key] = tensors[key].clone().fill_(float("nan"))
        save_file(tensors, str(state), metadata=meta)
        if kind == "truncate":
            blob = state.read_bytes()
            state.write_bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])
        line = assert_clean_failure(_resume_args(out), Path(tmp))
        assert str(state) in line or "other settings" in line or "resume state" in line


# --------------------------------------------------------------------- sweep folders


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    """A finished one-cell sweep folder made by the command line."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    result = runner.invoke(app, [*SWEEP, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_finished_sweep_itself_reruns_cleanly(finished_sweep, tmp_path):
    shutil.copytree(finished_sweep, tmp_path / "sweep")
    result = runner.invoke(app, [*SWEEP, "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output


MANIFEST_KEYS = {
    "format": JUNK,
    "schema_version": st.one_of(
        _not((int,)), st.booleans(), st.integers(max_value=0), st.integers(2, 2**70)
    ),
    "shared": _not((dict,)),
    "grid": st.one_of(
        _not((dict,)),
        st.fixed_dictionaries(
            {
                "lambda_cos": st.one_of(
                    _not((list,)),
                    st.lists(st.one_of(st.text(max_size=3), st.none()), min_size=1, max_size=3),
                )
            }
        ),
    ),
}
RESULT_KEYS = {
    "id": _not((str,)),
    "shared": _not((dict,)),
    "clean_accuracy": st.one_of(st.text(max_size=3), st.lists(st.integers(), max_size=2)),
    "score": st.one_of(st.text(max_size=3), st.dictionaries(st.text(max_size=2), st.integers())),
    "attacks": st.one_of(
        _not((dict,)),
        st.dictionaries(st.text(max_size=4), st.text(max_size=2), min_size=1, max_size=2),
    ),
    "seconds": st.one_of(st.text(max_size=3), st.none()),
    "checkpoint": st.one_of(
        _not((str,)), st.sampled_from(["../../escape.safetensors", "", "a/b.safetensors", ".."])
    ),
    "epochs": st.one_of(st.text(max_size=3), st.integers(max_value=-1), st.floats()),
}


@FUZZ
@given(data=st.data())
def test_fuzz_sweep_folders(finished_sweep, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sweep"
        shutil.copytree(finished_sweep, folder)
        manifest = folder / "sweep.json"
        result = next(folder.glob("cells/*/result.json"))
        target = data.draw(st.sampled_from(["manifest", "result"]), label="file")
        path, keys = (manifest, MANIFEST_KEYS) if target == "manifest" else (result, RESULT_KEYS)
        content = json.loads(path.read_text())
        kind = data.draw(
            st.sampled_from([*sorted(keys), "drop", "text", "deep", "folder"]), label="kind"
        )
        if kind == "text":
            path.write_text(
                data.draw(
                    st.one_of(st.text(max_size=30), JUNK.map(json.dumps)).filter(
                        lambda t: not t.strip().startswith("{")
                    )
                )
            )
        elif kind == "deep":
            content[data.draw(st.sampled_from(sorted(content)))] = DEEP_MARK
            path.write_text(_dumps(content, data.draw(DEEP)))
        elif kind == "folder":
            path.unlink()
            path.mkdir()
        elif kind == "drop":  # a manifest without "grid" is valid: the run writes it again
            content.pop(data.draw(st.sampled_from(sorted(set(keys) - {"grid"}))))
            path.write_text(json.dumps(content))
        else:
            content[kind] = data.draw(keys[kind], label=kind)
            path.write_text(json.dumps(content))
        assert_clean_failure([*SWEEP, "--out", str(folder)], Path(tmp))


def test_damaged_torchvision_files_are_not_reported_as_a_failed_download(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00\x00\x08\x03 damaged")
    out = tmp_path / "o" / "r.safetensors"
    line = assert_clean_failure(
        _train_on("fashionmnist", tmp_path, out),
        tmp_path,
    )
    assert "damaged" in line and "download failed" not in line


def test_a_tensor_of_another_dtype_is_refused_not_cast(template, tmp_path):
    tensors, meta = template
    name = next(k for k in sorted(tensors) if k.endswith("conv1.weight"))
    tensors = {**tensors, name: tensors[name].to(torch.int32)}  # same size: safetensors accepts
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"ncen": json.dumps(meta)})
    line = assert_clean_failure(_attack(path), tmp_path)
    assert name in line and "int32" in line
