"""Fingerprints of input files: what a rerun compares to notice input that changed in place."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import fsspec


def is_local(fs) -> bool:
    return "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)


def file_version(fs, info: dict) -> int | str | None:
    """What changes when a file is rewritten: ``mtime_ns`` locally, else the backend's modification time or ETag
    from an fsspec ``info`` dict."""
    if is_local(fs):
        return os.stat(info["name"]).st_mtime_ns
    for k in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag", "created"):
        if info.get(k) is not None:
            return str(info[k])
    return None


def fingerprint_urls(urls: list[str], threads: int = 32) -> dict[str, dict]:
    """``url -> {"size", "version"}`` for each file (remote ones asked in parallel); a file that cannot be
    listed gets ``None`` for both and fails later, when it is read, with its name."""

    def one(url: str) -> dict:
        fs, path = fsspec.core.url_to_fs(url)
        try:
            if is_local(fs):
                st = os.stat(path)
                return {"size": st.st_size, "version": st.st_mtime_ns}
            info = fs.info(path)
        except (FileNotFoundError, OSError):
            return {"size": None, "version": None}
        return {"size": int(info.get("size") or 0), "version": file_version(fs, info)}

    if len(urls) > 1 and not is_local(fsspec.core.url_to_fs(urls[0])[0]):
        with ThreadPoolExecutor(threads) as pool:
            return dict(zip(urls, pool.map(one, urls)))
    return {url: one(url) for url in urls}
