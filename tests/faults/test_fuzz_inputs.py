"""Bad input, by property (hypothesis): malformed and truncated IDX and npy files, corrupted and
missing Zarr chunks, labels beyond num_classes, tampered checkpoints. Every case gives one clear
message (naming the file, array or chunk), a non-zero exit, no traceback from deep inside a
library, and no partial output left looking complete."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers.data import chunk_file, write_idx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distnet import cli
from distnet.data import DatasetError, StreamLoader, open_dataset, write_dataset

pytestmark = pytest.mark.fuzz
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_cli(*argv: str) -> tuple[int, str]:
    """``distnet ARGV`` in this process: (exit code, stderr). Any exception is a test failure."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
    return code, err.getvalue()


def assert_no_complete_store(path: Path) -> None:
    """A failed conversion leaves nothing that opens as a store."""
    if path.exists():
        with pytest.raises(DatasetError):
            open_dataset(str(path))


def mutate(data: bytes, draw: st.DataObject) -> bytes:
    """A truncation, some flipped bytes, or both."""
    kind = draw.draw(st.sampled_from(["truncate", "flip", "both", "header"]))
    out = bytearray(data)
    if kind in ("flip", "both", "header"):
        hi = 16 if kind == "header" else len(out)
        for _ in range(draw.draw(st.integers(1, 4))):
            i = draw.draw(st.integers(0, min(hi, len(out)) - 1))
            out[i] = draw.draw(st.integers(0, 255))
    if kind in ("truncate", "both"):
        out = out[: draw.draw(st.integers(0, len(out) - 1))]
    return bytes(out)


@FUZZ
@given(data=st.data(), gz=st.booleans(), target=st.sampled_from(["images", "labels"]))
def test_malformed_idx_files_fail_cleanly_or_convert_exactly(data, gz, target):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 5, 5)).astype(np.uint8)
    y = rng.integers(0, 10, 40).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, labels = write_idx(tmp / "img.idx", x, False), write_idx(tmp / "lab.idx", y, False)
        victim = images if target == "images" else labels
        bad = mutate(victim.read_bytes(), data)
        victim.write_bytes(gzip.compress(bad) if gz else bad)
        out = tmp / "out"
        code, err = run_cli(
            "data", "convert", "idx", str(images), str(out), "--labels", str(labels)
        )
        if code == 0:  # the mutation left a valid file (e.g. a changed pixel): it converted it
            ds = open_dataset(str(out))  # same header: same shape, every chunk readable
            assert ds.shape == x.shape and len(ds) == len(y)
            ds.check()
        else:
            assert code == 2 and "Traceback" not in err
            assert err.startswith("distnet data: error: ") and victim.name in err, err
            assert len(err.strip().splitlines()) == 1
            assert_no_complete_store(out)


@FUZZ
@given(data=st.data())
def test_malformed_npy_files_fail_cleanly(data):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "x.npy"
        buf = io.BytesIO()
        np.save(buf, np.arange(60, dtype=np.float32).reshape(20, 3))
        path.write_bytes(mutate(buf.getvalue(), data))
        code, err = run_cli("data", "convert", "npy", str(path), str(tmp / "out"))
        if code != 0:
            assert code == 2 and "x.npy" in err and "Traceback" not in err, err
            assert_no_complete_store(tmp / "out")


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    code, err = run_cli("data", "convert", "npy", str(path), str(tmp_path / "out"))
    assert code == 2 and "obj.npy" in err
    assert_no_complete_store(tmp_path / "out")


@pytest.fixture(scope="module")
def store_bytes(tmp_path_factory):
    """A small labelled store; each test copies it before damaging it."""
    root = tmp_path_factory.mktemp("store") / "s"
    x = np.arange(64 * 6, dtype=np.uint8).reshape(64, 6)
    write_dataset(str(root), x, np.arange(64) % 5, chunk_samples=16, attrs={"num_classes": 5})
    return root


def copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    array=st.sampled_from(["x", "y"]),
    chunk=st.integers(0, 3),
    damage=st.sampled_from(["delete", "garbage", "truncate"]),
)
def test_damaged_chunks_are_named_by_check_and_by_the_loader(store_bytes, array, chunk, damage):
    with tempfile.TemporaryDirectory() as tmp:
        store = copy_store(store_bytes, Path(tmp) / "s")
        f = chunk_file(store, array, chunk)
        if damage == "delete":
            f.unlink()
        elif damage == "garbage":
            f.write_bytes(b"\x00not a chunk" * 3)
        else:
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        code, err = run_cli("data", "info", str(store), "--check")
        assert code == 2 and f"array {array!r} chunk {chunk}" in err, err
        loader = StreamLoader(str(store), 8, seed=0, shuffle=False)
        with pytest.raises(DatasetError, match=f"array '{array}' chunk {chunk}"):
            for _ in loader:
                pass
        loader.close()


def test_labels_beyond_num_classes_are_named_before_training(tmp_path):
    store = tmp_path / "s"
    y = np.arange(40) % 5
    y[33] = 7  # chunk 2 (16 samples per chunk)
    write_dataset(str(store), np.zeros((40, 4), np.uint8), y, 16, attrs={"num_classes": 5})
    code, err = run_cli("data", "info", str(store), "--check")
    assert code == 2 and "array 'y' chunk 2" in err and "label outside 0..4" in err, err
    job = tmp_path / "j.toml"
    job.write_text(
        f"[data]\ntrain = '{store}'\nbatch_size = 8\n[model]\ntype = 'mlp'\nhidden = [4]\n"
        f"[finetune]\nepochs = 1\n[run]\nout = '{tmp_path / 'run'}'\npictures = false\n"
    )
    code, err = run_cli("train", str(job))
    assert code == 2 and "array 'y' chunk 2" in err and "label" in err, err


def small_checkpoint(path: Path):
    from distnet.nn import Dense, Sequential
    from distnet.optim import Adam
    from distnet.train import save_checkpoint

    model = Sequential(Dense(4, 3))
    opt = Adam(model, lr=0.01)
    save_checkpoint(path, model, opt, step=3)
    return model, opt


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), value=json_values)
def test_a_tampered_manifest_is_refused_or_harmless(data, value):
    """Property: any one value of the manifest replaced (at the top or one level down) either
    loads to the very same parameters or raises CheckpointError/FileNotFoundError naming it."""
    from distnet.train import CheckpointError, load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ck"
        model, opt = small_checkpoint(path)
        manifest = json.loads((path / "manifest.json").read_text())
        key = data.draw(st.sampled_from(sorted(manifest)))
        if isinstance(manifest[key], dict) and manifest[key] and data.draw(st.booleans()):
            sub = data.draw(st.sampled_from(sorted(manifest[key])))
            manifest[key][sub] = value
        else:
            manifest[key] = value
        (path / "manifest.json").write_text(json.dumps(manifest))
        want = model.flat_params().copy()
        model.flat_params()[:] = 0
        try:
            load_checkpoint(path, model, opt)
        except (CheckpointError, FileNotFoundError) as e:
            assert str(path) in str(e)
        else:
            np.testing.assert_array_equal(model.flat_params(), want)


def test_a_negative_generator_field_is_refused(tmp_path):
    """Hypothesis found it: a -1 in the generator's state raised numpy's OverflowError."""
    from distnet.train import CheckpointError, load_checkpoint

    path = tmp_path / "ck"
    model, opt = small_checkpoint(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["rng"]["uinteger"] = -1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, model, opt)


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_tampered_or_damaged_arrays_are_refused(tmp_path, damage):
    from distnet.train import CheckpointError, load_checkpoint, save_checkpoint

    path = tmp_path / "ck"
    model, opt = small_checkpoint(path)
    (arrays,) = path.glob("arrays-*.npz")
    raw = bytearray(arrays.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # a well-formed npz with other values under the same names
        other = tmp_path / "other"
        model.flat_params()[:] += 1
        save_checkpoint(other, model, opt, step=3)
        raw = bytearray(next(other.glob("arrays-*.npz")).read_bytes())
    arrays.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="differ from the manifest's sha256"):
        load_checkpoint(path, model, opt)


def test_an_array_of_the_wrong_shape_is_named(tmp_path):
    from distnet.nn import Dense, Sequential
    from distnet.train import CheckpointError, load_checkpoint

    path = tmp_path / "ck"
    small_checkpoint(path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, Sequential(Dense(5, 3)))


def test_train_refuses_a_tampered_checkpoint_in_its_run_directory(tmp_path):
    from distnet.data import convert_digits

    convert_digits(tmp_path / "data", test_fraction=0.25, seed=0, chunk_samples=256)
    job = tmp_path / "j.toml"
    job.write_text(
        "[data]\ntrain = 'data/train'\n[model]\ntype = 'mlp'\nhidden = [8]\n"
        "[finetune]\nepochs = 1\n[run]\nout = 'run'\npictures = false\n"
    )
    assert run_cli("train", str(job))[0] == 0
    (arrays,) = (tmp_path / "run" / "stages").glob("*/arrays-*.npz")
    raw = bytearray(arrays.read_bytes())
    raw[-40] ^= 0xFF
    arrays.write_bytes(bytes(raw))
    code, err = run_cli("train", str(job))
    assert code == 2 and str(arrays) in err and "sha256" in err, err
