"""Downloads that survive a workshop: timeout, retries with backoff, progress, atomic write, mirrors.

Thirty people on one Wi-Fi meet every failure a download can have: a host that refuses, a
connection that stalls, a transfer cut in the middle. `download` tries each source in turn and each
one `retries` times, waiting `backoff`, 2·backoff, 4·backoff, ... seconds between tries; every read
has a `timeout`; the bytes go to a temporary file next to the target, which replaces the target only
once it is complete (the announced length arrived) and, if given, `check` accepted it. So the cache
holds a whole file or none, never half of one.

A source that answers 404 does not have the file: it is skipped without retries. When no source
delivered, `DownloadError` says what was tried and what to do offline.

$ENGRAM_MIRROR (optional): a base URL tried before the official hosts, laid out as they are
(`{mirror}/data/dsets/counterfact.json`, `{mirror}/data/stats/gpt2-xl/...`): a workshop can serve
the files from one laptop on the local network.
"""
from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

CHUNK = 1 << 16          # bytes per read
TIMEOUT = 30.0           # seconds a connect or a single read may take
RETRIES = 3              # tries per source
BACKOFF = 1.0            # seconds before a source's 2nd try; doubled before each later one


class DownloadError(RuntimeError):
    """No source delivered the file; the message lists the sources and says what to do offline."""


class NotPublished(DownloadError):
    """Every source answered 404: the file does not exist there (nothing to retry)."""


def cache_dir() -> Path:
    """$ENGRAM_CACHE, default ~/.cache/engramlib: downloads, statistics, Wikipedia paragraphs."""
    return Path(os.environ.get("ENGRAM_CACHE", Path.home() / ".cache" / "engramlib"))


def mirrored(path: str, official: list) -> list:
    """The sources of a file: $ENGRAM_MIRROR/`path` first (when set), then the `official` URLs."""
    mirror = os.environ.get("ENGRAM_MIRROR", "").rstrip("/")
    return ([f"{mirror}/{path.lstrip('/')}"] if mirror else []) + list(official)


def _fetch_once(url: str, tmp: Path, timeout: float, progress: bool, desc: str) -> None:
    """Stream `url` into `tmp`. Raises OSError (incl. timeouts) or IncompleteRead if cut short."""
    request = urllib.request.Request(url, headers={"User-Agent": "engramlib"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total is not None else None
        got = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
                  leave=False) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise http.client.IncompleteRead(b"", total - got)


def download(sources, target, *, check=None, timeout: float | None = None,
             retries: int | None = None, backoff: float | None = None, progress: bool = True,
             what: str | None = None, offline_hint: str = "") -> Path:
    """Download the first source that delivers into `target` (atomically) and return `target`.

    sources: one URL or a list, tried in order (`mirrored` builds the usual list).
    check: optional function(path) that raises ValueError when the content is wrong (format,
        shape); a wrong file counts as a failed try and is never written to `target`.
    timeout: seconds any single connect or read may take; retries: tries per source;
    backoff: seconds before the 2nd try of a source, doubled before each later one (None: the
    module's TIMEOUT, RETRIES, BACKOFF).
    Raises `NotPublished` when every source answered 404, else `DownloadError`."""
    timeout = TIMEOUT if timeout is None else timeout
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF if backoff is None else backoff
    sources = [sources] if isinstance(sources, str) else list(sources)
    target = Path(target)
    what = what or target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    errors, missing = {}, 0                              # url -> its last error
    try:
        for url in sources:
            for attempt in range(retries):
                if attempt:
                    time.sleep(backoff * 2 ** (attempt - 1))
                try:
                    _fetch_once(url, tmp, timeout, progress, what)
                    if check is not None:
                        check(tmp)
                    os.replace(tmp, target)
                    return target
                except urllib.error.HTTPError as err:
                    errors[url] = f"HTTP {err.code}"
                    if err.code == 404:
                        missing += 1
                        break                               # not there: retrying will not help
                except (OSError, http.client.HTTPException, socket.timeout, ValueError) as err:
                    errors[url] = f"{type(err).__name__}: {err}"
                finally:
                    tmp.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    cls = NotPublished if missing == len(sources) else DownloadError
    tried = "; ".join(f"{url}: {error}" for url, error in errors.items()) or "no source"
    raise cls(f"could not download {what} (tried {len(sources)} source(s), {retries} time(s) each: "
              f"{tried}). Offline? {offline_hint or f'copy the file to {target} by hand.'}")
