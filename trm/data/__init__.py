"""Datasets: the reference's directory format, builders, augmentation and the resumable sample stream.

``python -m trm.data --help`` lists the commands (build sudoku, import-sudoku-csv, inspect).
"""

from trm.data.format import DatasetError, DatasetMetadata, SplitData, load_split, write_split
from trm.data.stream import SampleStream
from trm.data.sudoku import build_sudoku

__all__ = ["DatasetError", "DatasetMetadata", "SplitData", "SampleStream", "build_sudoku", "load_split", "write_split"]
