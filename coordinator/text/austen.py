"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``, read without R.

The package keeps its data as an R lazy-load database: ``data/Rdata.rdx`` (gzip; an RDS index of
variable -> (offset, length) in the .rdb) and ``data/Rdata.rdb`` (per variable: a 4-byte big-endian
length, then a zlib stream holding the serialized R object: a character vector, one line of text per
element). The R objects are parsed with the PyPI package ``rdata`` (a coordinator dependency).

Nothing is downloaded at run time: ``tools/setup.sh`` fetches the package with ``apt-get download``
and unpacks it with ``dpkg -x`` (installing it would pull in R).
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from coordinator.errors import CoordinatorError
from edge_agent.exitcodes import ExitCode

AUSTEN_ENV = "SNAKE_AUSTEN_DIR"  # the package's data directory (holding Rdata.rdx and Rdata.rdb)
_PACKAGE_DATA = Path("usr/lib/R/site-library/janeaustenr/data")
SEARCH_ROOTS = (Path("/"), Path(__file__).resolve().parents[2] / ".data" / "janeaustenr")  # apt, tools/setup.sh
# R variable -> title, in publication order (the order janeaustenr's austen_books() uses): source ids 0..5
NOVELS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


class TextDataError(CoordinatorError):
    """A text corpus cannot be found or read; the message says what to do."""

    exit_code: ClassVar[ExitCode] = ExitCode.DATA


def _rdata() -> Any:
    try:
        import rdata
    except ImportError as exc:
        raise TextDataError("reading janeaustenr needs the PyPI package rdata (pip install rdata==1.1.0)") from exc
    return rdata


def _parse_r(raw: bytes) -> Any:
    rdata = _rdata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": lazy-load entries have no RDS magic
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Every character-vector variable of an R lazy-load database (the .rdx and .rdb bytes)."""
    try:
        index = _parse_r(gzip.decompress(rdx))
        variables: Mapping[Any, Any] = index["variables"]
    except (OSError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise TextDataError(f"not an R lazy-load index: {exc}") from exc
    out: dict[str, list[str]] = {}
    for name, (offset, length) in variables.items():
        entry = rdb[int(offset) : int(offset) + int(length)]
        try:
            (size,) = struct.unpack(">I", entry[:4])
            raw = zlib.decompress(entry[4:])
        except (struct.error, zlib.error) as exc:
            raise TextDataError(f"R lazy-load entry {name!r} is corrupt: {exc}") from exc
        if len(raw) != size:
            raise TextDataError(f"R lazy-load entry {name!r} holds {len(raw)} bytes, its header says {size}")
        value = _parse_r(raw)
        out[str(name)] = ["" if line is None else str(line) for line in list(value)]
    return out


def find_austen_dir(explicit: Path | None = None) -> Path:
    """The janeaustenr data directory: ``explicit``, else ``$SNAKE_AUSTEN_DIR``, else an installed or
    unpacked package (``/usr/lib/R/...`` or ``.data/janeaustenr/usr/lib/R/...`` in the repo)."""
    candidates = [Path(p) for p in (explicit, os.environ.get(AUSTEN_ENV)) if p]
    candidates += [root / _PACKAGE_DATA for root in SEARCH_ROOTS]
    for candidate in candidates:
        if (candidate / "Rdata.rdx").is_file() and (candidate / "Rdata.rdb").is_file():
            return candidate
    raise TextDataError(
        "Jane Austen's novels not found (looked in " + ", ".join(map(str, candidates)) + "). Run tools/setup.sh "
        "(it runs `apt-get download r-cran-janeaustenr` and unpacks it with `dpkg -x` into .data/janeaustenr), or "
        f"point ${AUSTEN_ENV} at the package's data directory."
    )


def load_austen(directory: Path | None = None) -> dict[str, str]:
    """Title -> full text (lines joined by newlines) of the six novels, in publication order."""
    root = find_austen_dir(directory)
    try:
        variables = read_lazyload((root / "Rdata.rdx").read_bytes(), (root / "Rdata.rdb").read_bytes())
    except OSError as exc:
        raise TextDataError(f"cannot read {root}: {exc}") from exc
    missing = sorted(set(NOVELS) - set(variables))
    if missing:
        raise TextDataError(f"{root}: the package lacks {missing}; found {sorted(variables)}")
    return {title: "\n".join(variables[name]) for name, title in NOVELS.items()}
