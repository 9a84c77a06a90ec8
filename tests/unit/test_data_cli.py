"""``distnet data ...`` and ``distnet bench loader`` as a user runs them."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from helpers.data import chunk_file, write_idx

from distnet.cli import main

pytestmark = pytest.mark.timeout(60)


def test_convert_digits_and_info(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["data", "convert", "digits", str(out), "--seed", "1"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["data", "info", str(out / "train"), "--check"]) == 0
    text = capsys.readouterr().out
    assert "(1347, 64) uint8" in text and "classes: 10" in text and "on disk" in text
    assert main(["data", "info", str(out / "test"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["samples"] == 450 and sum(d["class_counts"]) == 450 and d["bytes_on_disk"] > 0


def test_convert_idx_and_npy(tmp_path, capsys):
    imgs = np.zeros((20, 4, 4), np.uint8)
    write_idx(tmp_path / "i", imgs, gz=True)
    write_idx(tmp_path / "l", np.arange(20, dtype=np.uint8) % 2, gz=True)
    args = [
        "data",
        "convert",
        "idx",
        str(tmp_path / "i.gz"),
        str(tmp_path / "s"),
        "--labels",
        str(tmp_path / "l.gz"),
        "--split",
        "train",
        "--chunk-samples",
        "8",
    ]
    assert main(args) == 0
    assert "3 chunks of 8" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", np.ones((12, 3), np.uint8))
    assert (
        main(
            [
                "data",
                "convert",
                "npy",
                str(tmp_path / "x.npy"),
                str(tmp_path / "n"),
                "--scale",
                "0.5",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "n"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scale"] == 0.5


@pytest.mark.parametrize("case", ["no-store", "no-file", "corrupt", "bad-option"])
def test_bad_input_is_an_error_not_a_traceback(tmp_path, capsys, case):
    if case == "no-store":
        argv = ["data", "info", str(tmp_path)]
    elif case == "no-file":
        argv = ["data", "convert", "idx", str(tmp_path / "missing"), str(tmp_path / "o")]
    elif case == "corrupt":
        main(["data", "convert", "digits", str(tmp_path / "d")])
        chunk_file(tmp_path / "d" / "train", "x", 1).write_bytes(b"garbage")
        argv = ["data", "info", str(tmp_path / "d" / "train"), "--check"]
    else:
        argv = ["data", "info", "memory://x", "--storage-option", "novalue"]
    capsys.readouterr()
    assert main(argv) == 2  # bad input (the exit-code table of distnet.cli)
    err = capsys.readouterr().err
    assert err.startswith("distnet data: error:") and "Traceback" not in err
    if case == "corrupt":
        assert "array 'x' chunk 1" in err


def test_bench_loader_small(tmp_path, capsys):
    from distnet.bench import loader as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        [
            "--samples",
            "3000",
            "--chunk-samples",
            "512",
            "--rounds",
            "2",
            "--hidden",
            "64",
            "--epochs",
            "1",
            "--json",
            str(out),
        ]
    )
    assert bench.run(args) == 0
    res = json.loads(out.read_text())
    assert res["plain_samples_per_s"] > 0 and res["loader_samples_per_s"] > 0
    assert res["ratio_min"] <= res["ratio_median"] <= res["ratio_max"]
    assert res["stall"]["batches"] == -(-3000 // 256)
    assert "ratio loader/plain" in capsys.readouterr().out
