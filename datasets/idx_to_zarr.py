#!/usr/bin/env python
"""Turn a directory of MNIST-style IDX files into distnet ``train`` and ``test`` stores.

    python datasets/idx_to_zarr.py /usr/share/datasets/fashion-mnist data/fashion-mnist
    python datasets/idx_to_zarr.py ~/mnist data/mnist --chunk-samples 4096

Looks (recursively) for train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]; writes OUT/train and OUT/test
(uint8, scale 1/255, Zstd chunks) and prints what it wrote. Same as
``distnet data convert idx SRC_DIR OUT``.
"""

from __future__ import annotations

import argparse
import sys

from distnet.data import DatasetError, convert_idx_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", help="directory holding the IDX files")
    parser.add_argument("out_dir", help="where OUT/train and OUT/test go (path or fsspec URL)")
    parser.add_argument("--chunk-samples", type=int, default=4096)
    args = parser.parse_args(argv)
    try:
        stores = convert_idx_dir(args.src_dir, args.out_dir, args.chunk_samples)
    except (DatasetError, OSError) as exc:
        print(f"idx_to_zarr: error: {exc}", file=sys.stderr)
        return 1
    for split, ds in stores.items():
        print(
            f"{split}: {ds.path} x {ds.shape} {ds.dtype}, {ds.num_classes} classes, "
            f"{ds.num_chunks} chunks"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
