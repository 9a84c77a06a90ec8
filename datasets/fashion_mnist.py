#!/usr/bin/env python
"""Fashion-MNIST as distnet stores, without root.

    python datasets/fashion_mnist.py data/fashion-mnist              # fetch Debian's package
    python datasets/fashion_mnist.py data/fashion-mnist --idx ~/fmnist   # IDX files you have

Without ``--idx`` it downloads Debian's ``dataset-fashion-mnist`` package as an ordinary user
(``apt-get download``, into a temporary folder), unpacks it with ``dpkg -x`` (no install,
no root) and converts the four IDX files it holds. With ``--idx DIR`` it converts the
``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-
ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]`` found under DIR. Writes OUT/train and
OUT/test (uint8, scale 1/255); ``--keep DIR`` keeps the unpacked package there.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from distnet.data import DatasetError, convert_idx_dir

PACKAGE = "dataset-fashion-mnist"


def fetch_debian_package(into: Path, package: str = PACKAGE) -> Path:
    """``apt-get download`` then ``dpkg -x`` into ``into``; returns the unpacked root."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise OSError(f"{tool} not found: on a non-Debian system pass --idx DIR instead")
    into.mkdir(parents=True, exist_ok=True)
    download = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    if download.returncode != 0:
        raise OSError(
            f"apt-get download {package} failed ({download.stderr.strip()[-300:]}); "
            "is the package in your apt sources (apt-cache policy "
            f"{package})? Or pass --idx DIR with the four IDX files"
        )
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise OSError(f"apt-get download {package} wrote no .deb into {into}")
    root = into / "root"
    unpack = subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    if unpack.returncode != 0:
        raise OSError(f"dpkg -x {debs[-1]} failed: {unpack.stderr.strip()[-300:]}")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where OUT/train and OUT/test go")
    parser.add_argument("--idx", metavar="DIR", help="convert IDX files from DIR instead")
    parser.add_argument("--keep", metavar="DIR", help="unpack the package here and keep it")
    parser.add_argument("--chunk-samples", type=int, default=4096)
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="fashion-mnist-") as tmp:
            src = Path(args.idx) if args.idx else fetch_debian_package(Path(args.keep or tmp))
            stores = convert_idx_dir(str(src), args.out_dir, args.chunk_samples)
    except (DatasetError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"fashion_mnist: error: {exc}", file=sys.stderr)
        return 1
    for split, ds in stores.items():
        print(f"{split}: {ds.path} x {ds.shape} {ds.dtype}, {ds.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
