"""gzip -9 and xz -9e bits-per-byte of a prepared dataset's validation text: the bars a trained model must beat.

    python bench/gzip_baseline.py DATASET_DIR_OR_RUN_DIR

The val text is recovered exactly by decoding val.bin (documents are separated by the EOT token)
and compressed as one stream, the way `gzip -9 val.txt` and `xz -9e val.txt` would (Python's gzip and
lzma modules at those settings).
"""

from __future__ import annotations

import gzip
import json
import lzma
import sys
from pathlib import Path

import numpy as np

from lmforge.data.tokenizer import Tokenizer


def val_text(dataset_dir: Path) -> bytes:
    """The val split's text, as UTF-8."""
    meta = json.loads((dataset_dir / "meta.json").read_text())
    tok = Tokenizer.from_file(dataset_dir / "tokenizer.json")
    ids = np.fromfile(dataset_dir / "val.bin", dtype=np.dtype(meta["dtype"]))
    cuts = np.flatnonzero(ids == meta["eot_id"])
    docs, start = [], 0
    for end in cuts:
        docs.append(tok.decode(ids[start:end].tolist()))
        start = end + 1
    return "".join(docs).encode("utf-8")


def compressor_bits_per_byte(dataset_dir: Path) -> dict[str, float]:
    """{"gzip -9": bits/byte, "xz -9e": bits/byte, "bytes": n} of the val text."""
    text = val_text(dataset_dir)
    xz = lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)
    return {"gzip -9": 8 * len(gzip.compress(text, compresslevel=9)) / len(text),
            "xz -9e": 8 * len(xz) / len(text), "bytes": len(text)}


if __name__ == "__main__":
    path = Path(sys.argv[1])
    if (path / "config.yaml").is_file():  # a run directory: its dataset
        import yaml

        path = Path(yaml.safe_load((path / "config.yaml").read_text())["data"]["dataset_dir"])
    result = compressor_bits_per_byte(path)
    print(f"on {result['bytes']:,} val bytes of {path}: gzip -9 {result['gzip -9']:.4f}, "
          f"xz -9e {result['xz -9e']:.4f} bits/byte")
