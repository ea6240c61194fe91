"""gzip -9 bits-per-byte of a prepared dataset's validation text: the bar a trained model must beat.

    python bench/gzip_baseline.py DATASET_DIR_OR_RUN_DIR

The val text is recovered exactly by decoding val.bin (documents are separated by the EOT token)
and compressed as one stream, the way `gzip -9 val.txt` would.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

from lmforge.data.tokenizer import Tokenizer


def gzip_bits_per_byte(dataset_dir: Path) -> tuple[float, int]:
    meta = json.loads((dataset_dir / "meta.json").read_text())
    tok = Tokenizer.from_file(dataset_dir / "tokenizer.json")
    ids = np.fromfile(dataset_dir / "val.bin", dtype=np.dtype(meta["dtype"]))
    cuts = np.flatnonzero(ids == meta["eot_id"])
    docs, start = [], 0
    for end in cuts:
        docs.append(tok.decode(ids[start:end].tolist()))
        start = end + 1
    text = "".join(docs).encode("utf-8")
    return 8 * len(gzip.compress(text, compresslevel=9)) / len(text), len(text)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    if (path / "config.yaml").is_file():  # a run directory: its dataset
        import yaml

        path = Path(yaml.safe_load((path / "config.yaml").read_text())["data"]["dataset_dir"])
    bpb, n = gzip_bits_per_byte(path)
    print(f"gzip -9 on {n:,} val bytes of {path}: {bpb:.4f} bits/byte")
