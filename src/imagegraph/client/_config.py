"""Where the client connects and who it says it is."""

from __future__ import annotations

import os
from pathlib import Path

from imagegraph import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
API_PREFIX = "/api/v1"
USER_AGENT = f"imagegraph-python/{__version__}"
API_KEY_ENV = "IMAGEGRAPH_API_KEY"
DATA_DIR_ENV = "IMAGEGRAPH_DATA_DIR"
ADMIN_KEY_FILE = "admin.key"


def default_api_key(data_dir: Path | None = None) -> str | None:
    """The API key to use when none is given: `IMAGEGRAPH_API_KEY`, else the admin key a
    local server wrote to `<data dir>/admin.key`, where the data directory is `data_dir`,
    else `IMAGEGRAPH_DATA_DIR`, else `~/.imagegraph`. None if there is neither."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key:
        return key
    if data_dir is None:
        data_dir = Path(os.environ.get(DATA_DIR_ENV) or "~/.imagegraph")
    try:
        key = (data_dir.expanduser() / ADMIN_KEY_FILE).read_text().strip()
    except OSError:
        return None
    return key or None


def api_base_url(base_url: str) -> str:
    """The API root for a server's base URL (given with or without `/api/v1`)."""
    url = base_url.rstrip("/")
    if not url.endswith(API_PREFIX):
        url += API_PREFIX
    return url + "/"


def client_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
