"""WebDataset shards: resolving a shard spec to URLs, and reading one shard's samples robustly.

A sample is the run of consecutive tar members sharing a key (``KEY.jpg``, ``KEY.txt``, ``KEY.json``), the key
being the member path up to the first dot of its file name, as in webdataset. Reading never raises on bad data:
undecodable images, missing captions and a tar that breaks off are skipped and counted in :class:`ShardStats`.
I/O errors re-open the shard and skip what was already read, at most ``retries`` times; then the shard fails
with its URL in the message.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from rdistill.errors import InputError

log = logging.getLogger(__name__)

_KEY_EXT = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")
_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardSpecError(InputError, ValueError):
    """A shard spec that matches nothing, or cannot be listed."""


class ShardReadError(RuntimeError):
    """A shard that could not be read after its retries."""


def resolve_shards(spec: str) -> list[str]:
    """A directory, glob, brace pattern (``data/{00000..00099}.tar``) or single URL -> sorted list of shard URLs.

    Brace patterns expand without listing storage (a missing shard fails when it is read, naming it); globs and
    directories are listed through fsspec.
    """
    import braceexpand

    urls: list[str] = []
    for pattern in braceexpand.braceexpand(spec) if "{" in spec else [spec]:
        fs, path = fsspec.core.url_to_fs(pattern)
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
            urls += [_url(fs, p) for p in found if p.endswith(_SUFFIXES)]
        elif "{" in spec:
            urls.append(pattern)
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path, maxdepth=1) if p.endswith(_SUFFIXES))
            if not found:
                raise ShardSpecError(f"{spec}: directory holds no .tar shards")
            urls += [_url(fs, p) for p in found]
        elif fs.exists(path):
            urls.append(pattern)
        else:
            raise ShardSpecError(f"{spec}: no such file or directory")
    if not urls:
        raise ShardSpecError(f"{spec}: matches no .tar shards")
    if len(set(urls)) != len(urls):
        raise ShardSpecError(f"{spec}: names some shards more than once")
    return urls


def _url(fs, path: str) -> str:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return path if "file" in protocols else fs.unstrip_protocol(path)


@dataclass
class ShardStats:
    """Counts for one shard. ``samples`` were read; ``skipped`` says why the others were not usable."""

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    retries: int = 0
    error: str = ""

    def to_dict(self) -> dict:
        return {"samples": self.samples, "skipped": dict(self.skipped), "retries": self.retries, "error": self.error}


@dataclass(frozen=True)
class SampleFormat:
    """Which members make a sample: ``image_keys`` in order of preference, the caption's text or JSON member."""

    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption_key: str = "txt"
    json_key: str = "json"
    json_caption_field: str = "caption"

    @classmethod
    def from_config(cls, c) -> SampleFormat:
        keys = tuple(k.strip().lower().lstrip(".") for k in c.image_keys.split(",") if k.strip())
        return cls(keys, c.caption_key.lower(), c.json_key.lower(), c.json_caption_field)


@dataclass
class RawSample:
    key: str
    image: bytes
    caption: str


def _members(url: str, skip: int) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular members of the tar at ``url``, after the first ``skip`` of them."""
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        seen = 0
        for m in tar:
            if not m.isfile():
                continue
            seen += 1
            if seen <= skip:
                continue
            yield m.name, tar.extractfile(m).read()


def iter_members(url: str, stats: ShardStats, retries: int = 3, backoff_s: float = 1.0) -> Iterator[tuple[str, bytes]]:
    """Members of one shard. Stops quietly (counted as ``unreadable_tar``) where the tar breaks off or is not a
    tar; retries I/O errors from where it stopped; raises :class:`ShardReadError` naming ``url`` after ``retries``.
    """
    done = 0
    while True:
        try:
            for item in _members(url, done):
                done += 1
                yield item
            if done == 0:  # a well-formed tar with no members: what img2dataset writes when every download failed
                stats.skipped["empty_shard"] += 1
            return
        except (tarfile.TarError, EOFError, UnicodeDecodeError) as e:
            if done == 0 and "empty file" in str(e):
                stats.skipped["empty_shard"] += 1
            else:
                stats.skipped["unreadable_tar"] += 1
                log.warning("%s: tar unreadable after %d members (%s); keeping what was read", url, done, e)
            return
        except FileNotFoundError:
            raise ShardReadError(f"{url}: shard not found") from None
        except OSError as e:
            if stats.retries >= retries:
                raise ShardReadError(f"{url}: read failed after {retries} retries: {e}") from e
            stats.retries += 1
            log.warning("%s: I/O error after %d members (%s); retry %d of %d", url, done, e, stats.retries, retries)
            time.sleep(backoff_s * stats.retries)


def iter_samples(url: str, fmt: SampleFormat, stats: ShardStats, retries: int = 3) -> Iterator[RawSample]:
    """Samples of one shard with an image and a non-empty caption; every other sample is counted in ``stats``."""
    key, parts = None, {}
    for name, data in iter_members(url, stats, retries):
        m = _KEY_EXT.match(name)
        if m is None:
            stats.skipped["unnamed_member"] += 1
            continue
        k, ext = m.group(1), m.group(2).lower()
        if k != key:
            if key is not None:
                yield from _sample(key, parts, fmt, stats)
            key, parts = k, {}
        parts[ext] = data
    if key is not None:
        yield from _sample(key, parts, fmt, stats)


def _sample(key: str, parts: dict, fmt: SampleFormat, stats: ShardStats) -> Iterator[RawSample]:
    image = next((parts[k] for k in fmt.image_keys if k in parts), None)
    if image is None:
        stats.skipped["no_image"] += 1
        return
    caption = _caption(parts, fmt)
    if not caption:
        stats.skipped["no_caption"] += 1
        return
    yield RawSample(key, image, caption)


def _caption(parts: dict, fmt: SampleFormat) -> str:
    text = parts.get(fmt.caption_key)
    if text is not None:
        try:
            caption = text.decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = ""
        if caption:
            return caption
    raw = parts.get(fmt.json_key)
    if raw is not None:
        try:
            value = json.loads(raw).get(fmt.json_caption_field)
        except (ValueError, AttributeError):
            return ""
        if isinstance(value, str):
            return value.strip()
    return ""


def decode_image(data: bytes):
    """Bytes -> an RGB PIL image, fully decoded; raises ``ValueError`` on anything PIL cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(str(e)) from e
