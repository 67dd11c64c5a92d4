"""A bench's scratch folder: removed when the bench ends well, kept (and named on
stderr) when it fails, so its logs can be read; never left behind by a good run."""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    except BaseException:
        print(f"kept for inspection: {path}", file=sys.stderr)
        raise
    shutil.rmtree(path, ignore_errors=True)
