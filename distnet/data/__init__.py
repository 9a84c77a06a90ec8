"""Zarr dataset stores, converters and the sharded streaming loader.

>>> from distnet.data import convert_digits, open_dataset, StreamLoader
>>> convert_digits("data/digits")                       # writes data/digits/{train,test}
>>> ds = open_dataset("data/digits/train")
>>> for x, y in StreamLoader(ds, global_batch_size=128, rank=0, world_size=2): ...
"""

from distnet.data.convert import (
    convert_digits,
    convert_idx,
    convert_idx_dir,
    convert_npy,
    digits_arrays,
    iter_idx,
    read_idx,
    stratified_split,
)
from distnet.data.loader import StreamLoader
from distnet.data.store import FORMAT_VERSION, Dataset, DatasetError, open_dataset
from distnet.data.writer import DatasetWriter, write_dataset, write_dataset_blocks

__all__ = [
    "FORMAT_VERSION",
    "Dataset",
    "DatasetError",
    "DatasetWriter",
    "StreamLoader",
    "convert_digits",
    "convert_idx",
    "convert_idx_dir",
    "convert_npy",
    "digits_arrays",
    "iter_idx",
    "read_idx",
    "stratified_split",
    "open_dataset",
    "write_dataset",
    "write_dataset_blocks",
]
