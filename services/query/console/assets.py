"""Static files of the console: its own CSS and script, and the chart library's files,
served from the installed packages (``chartkick`` ships Chartkick.js and Chart.js with its
date adapter). Nothing is fetched at run time and nothing third-party is in this
repository. Each file is read once, gzipped once, and served with an ETag."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import metadata, resources
from importlib.resources.abc import Traversable

OWN = "services.query.console"
CHART_PACKAGE = "chartkick"
CHART_DIR = ("django", "static", "chartkick")
CHART_FILES = ("Chart.bundle.js", "chartkick.js")
"""In load order: Chart.js (with its date adapter), then Chartkick on top of it."""
OWN_FILES = ("console.css", "console.js")
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class AssetMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    media_type: str


def _load(file: Traversable, name: str) -> Asset:
    try:
        body = file.read_bytes()
    except OSError as exc:
        raise AssetMissing(
            f"the console's file {name} is missing from the installed packages ({exc}); "
            "reinstall scoremesh (pip install -c constraints.txt -e .)"
        ) from exc
    suffix = name[name.rfind(".") :]
    return Asset(
        body=body,
        gzipped=gzip.compress(body, compresslevel=6, mtime=0),
        etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
        media_type=MEDIA_TYPES[suffix],
    )


class Assets:
    """``own/<file>`` and ``chart/<file>``, loaded on first use."""

    def __init__(self) -> None:
        self._cache: dict[str, Asset] = {}
        self.chart_version = metadata.version(CHART_PACKAGE)

    def get(self, path: str) -> Asset | None:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        group, _, name = path.partition("/")
        if group == "own" and name in OWN_FILES:
            file = resources.files(OWN).joinpath("static", name)
        elif group == "chart" and name in CHART_FILES:
            file = resources.files(CHART_PACKAGE).joinpath(*CHART_DIR, name)
        else:
            return None
        asset = self._cache[path] = _load(file, name)
        return asset
