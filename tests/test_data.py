"""Data pipeline: prepare (manifest, determinism, split rule, budgets, resume) and the readers
(ShardCache verification, TrainBatches' worker-count-independent order, eval windows)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from raygpt.cli import main
from raygpt.config import DataConfig, RunSpec, load_spec
from raygpt.data.batches import TrainBatches, count_eval_windows, eval_batches
from raygpt.data.cache import ShardCache
from raygpt.data.manifest import FORMAT, SPLITS, load_manifest, manifest_hash
from raygpt.data.prepare import assign_split, chinchilla_tokens, prepare
from raygpt.data.sources import open_source
from raygpt.errors import RaygptError
from raygpt.storage import Storage
from raygpt.tokenizer import EOT_ID, decode

WORDS = ("the model reads tokens from shards while workers train and evaluate loss on held out text "
         "every step of the schedule warms up then decays over many batches of sequences").split()


def make_documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Document {seed}-{i}. " + " ".join(rng.choice(WORDS, size=int(rng.integers(20, 120))))
            for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder of .txt, .jsonl and .parquet documents, and the documents in source order
    (files sorted by relative path: notes/*.txt, part1.jsonl, part2.parquet)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "notes").mkdir()
    notes = make_documents(20, seed=1)
    for i, text in enumerate(notes):
        (root / "notes" / f"{i:02d}.txt").write_text(text)
    lines = make_documents(300, seed=2)
    (root / "part1.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines)))
    table = make_documents(300, seed=3)
    pq.write_table(pa.table({"id": list(range(len(table))), "text": table}), root / "part2.parquet")
    return root, notes + lines + table


def data_spec(source, output, **data) -> RunSpec:
    defaults = dict(tokens=30_000, shard_tokens=8192, val_tokens=3000, test_tokens=4000,
                    heldout_permille=200, num_proc=1)
    return RunSpec(data=DataConfig(source=str(source), output=str(output), **{**defaults, **data}))


def documents_of(tokens: np.ndarray) -> list[list[int]]:
    """Split a token stream at EOTs (each document ends with one)."""
    ends = np.flatnonzero(tokens == EOT_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends)]


def split_tokens(root: Path, manifest: dict, split: str) -> np.ndarray:
    parts = [np.fromfile(root / s["name"], dtype="<u2") for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, np.uint16)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(data_spec(corpus[0], out), Storage())


# ---------------------------------------------------------------------------------------------
# prepare


def test_manifest_records_shards_with_their_sha256(prepared):
    out, manifest = prepared
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert (manifest["format"], manifest["tokenizer"], manifest["dtype"], manifest["eot_id"]) == (FORMAT, "gpt2", "uint16", EOT_ID)
    assert manifest["heldout_permille"] == 200 and manifest["raygpt_version"] == "0.1.0"
    assert manifest["budget"] == {"train_tokens": 30_000, "chinchilla": None, "val_tokens": 3000, "test_tokens": 4000}
    assert not manifest["source_exhausted"]
    train = manifest["splits"]["train"]
    assert train["tokens"] == 30_000 and [s["tokens"] for s in train["shards"]] == [8192, 8192, 8192, 5424]
    assert [s["name"] for s in train["shards"]] == [f"train_{i:06d}.bin" for i in range(4)]
    assert manifest["splits"]["val"]["tokens"] == 3000 and manifest["splits"]["test"]["tokens"] == 4000
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            data = (out / shard["name"]).read_bytes()
            assert len(data) == 2 * shard["tokens"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for split in SPLITS for s in manifest["splits"][split]["shards"]])
    assert load_manifest(str(out), Storage()) == manifest
    assert manifest_hash(manifest) == manifest_hash(json.loads(json.dumps(manifest)))


def test_documents_in_source_order_separated_by_eot_and_held_out_by_content(corpus, prepared):
    out, manifest = prepared
    expected = {split: [t for t in corpus[1] if assign_split(t, 200) == split] for split in SPLITS}
    for split in SPLITS:
        docs = documents_of(split_tokens(out, manifest, split))
        # every complete document of the split, in source order, each followed by EOT;
        # the budget cuts the stream inside the last one
        assert [decode(d) for d in docs] == expected[split][:len(docs)]
        assert len(docs) in (manifest["splits"][split]["documents"], manifest["splits"][split]["documents"] - 1)
    train_text = decode(split_tokens(out, manifest, "train").tolist())
    heldout = expected["val"] + expected["test"]
    assert len(heldout) > 50 and not any(doc in train_text for doc in heldout)


def test_identical_output_for_any_number_of_tokenizer_threads(corpus, prepared, tmp_path):
    out, manifest = prepared
    again = prepare(data_spec(corpus[0], tmp_path, num_proc=2), Storage())
    assert again == manifest
    assert all((tmp_path / s["name"]).read_bytes() == (out / s["name"]).read_bytes()
               for split in SPLITS for s in manifest["splits"][split]["shards"])


def test_test_split_does_not_depend_on_the_train_budget(corpus, prepared, tmp_path):
    out, manifest = prepared
    small = prepare(data_spec(corpus[0], tmp_path, tokens=5000), Storage())
    assert small["splits"]["train"]["tokens"] == 5000
    assert small["splits"]["test"] == manifest["splits"]["test"]
    assert small["splits"]["val"] == manifest["splits"]["val"]


def test_source_exhausted_and_chinchilla_budget(corpus, tmp_path):
    assert chinchilla_tokens("gpt2-small") == 3_260_190_720  # 20 x 163,009,536 (untied, no qkv bias)
    with pytest.raises(RaygptError, match="data.chinchilla: expected one of 'gpt2-small', .*got 'gpt3'"):
        load_spec(None, ["data.chinchilla=gpt3"])  # the spec names presets, so prepare never sees another
    manifest = prepare(data_spec(corpus[0], tmp_path, tokens=None, chinchilla="tiny"), Storage())
    assert manifest["budget"]["train_tokens"] == 20 * 3_243_776
    assert manifest["source_exhausted"] and manifest["splits"]["train"]["tokens"] < 20 * 3_243_776
    trained = sum(1 for t in corpus[1] if assign_split(t, 200) == "train")
    assert manifest["splits"]["train"]["documents"] == trained


def test_rerun_skips_stored_shards_and_resumes_an_interrupted_run(corpus, tmp_path):
    source = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t}) for t in corpus[1]]
    source.write_text("\n".join(lines[:400] + ["{broken"] + lines[400:]) + "\n")
    out = tmp_path / "out"
    with pytest.raises(RaygptError, match=r"docs.jsonl:401: not valid JSON"):
        prepare(data_spec(source, out, tokens=None, shard_tokens=2048), Storage())
    assert not (out / "manifest.json").exists()  # unfinished, by definition
    progress = json.loads((out / "prepare-progress.json").read_text())["shards"]
    assert len(progress) >= 3  # shards finished before the bad line, recorded as stored
    stamps = {name: (out / name).stat().st_mtime_ns for name in progress}

    source.write_text("\n".join(lines) + "\n")
    output = Console(file=open(os.devnull, "w"), record=True, width=120)
    manifest = prepare(data_spec(source, out, tokens=None, shard_tokens=2048), Storage(), console=output)
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert not (out / "prepare-progress.json").exists()
    text = output.export_text()
    assert "skipped (already stored)" in text
    row = next(line for line in text.splitlines() if line.strip("│ ").startswith("train"))
    written, skipped = (int(v) for v in row.split("│")[-3:-1])
    assert skipped == sum(1 for n in progress if n.startswith("train")) and written + skipped == len(
        manifest["splits"]["train"]["shards"])

    # A second full run writes nothing; a damaged shard is rewritten, the others are not.
    victim = out / manifest["splits"]["train"]["shards"][1]["name"]
    victim.write_bytes(b"\x00" * victim.stat().st_size)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert prepare(data_spec(source, out, tokens=None, shard_tokens=2048), Storage()) == manifest
    changed = [p.name for p in out.glob("*.bin") if p.stat().st_mtime_ns != stamps[p.name]]
    assert changed == [victim.name]
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == manifest["splits"]["train"]["shards"][1]["sha256"]


def test_smaller_rerun_removes_stale_shards(corpus, tmp_path):
    prepare(data_spec(corpus[0], tmp_path, tokens=30_000), Storage())
    manifest = prepare(data_spec(corpus[0], tmp_path, tokens=10_000), Storage())
    assert sorted(p.name for p in tmp_path.glob("train_*.bin")) == [s["name"] for s in manifest["splits"]["train"]["shards"]]


def test_txt_paragraphs_and_bad_sources(tmp_path):
    story = tmp_path / "story.txt"
    story.write_text("First paragraph.\n\nSecond one,\nstill second.\n  \nThird.\n")
    documents = open_source(DataConfig(source=str(story), txt_documents="paragraphs")).documents
    assert list(documents()) == ["First paragraph.", "Second one,\nstill second.", "Third."]
    assert list(open_source(DataConfig(source=str(story))).documents()) == [story.read_text()]
    with pytest.raises(RaygptError, match="is neither fineweb, fineweb-edu, stdlib, nor an existing file"):
        open_source(DataConfig(source=str(tmp_path / "nope.jsonl")))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(RaygptError, match=r"rows.jsonl:1: no 'text' key; set data.text_column"):
        list(open_source(DataConfig(source=str(tmp_path / "rows.jsonl"))).documents())
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(RaygptError, match=r"t.parquet: no 'text' column \(columns: body\)"):
        list(open_source(DataConfig(source=str(tmp_path / "t.parquet"))).documents())


def test_stdlib_corpus_is_announced_and_parsed_not_imported():
    source = open_source(DataConfig(source="stdlib"))
    assert "standard library" in source.description and "not web text" in source.description
    first = list(itertools.islice(source.documents(), 3))
    assert first == list(itertools.islice(open_source(DataConfig(source="stdlib")).documents(), 3))
    assert first[0].startswith("__future__\n\nRecord of phased-in incompatible language changes.")


def test_hub_source_unreachable_is_one_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RaygptError, match="cannot reach HuggingFaceFW/fineweb on the Hugging Face hub.*--source stdlib"):
        open_source(DataConfig(source="fineweb"))


def test_cli_prepare_and_bad_input(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    status = main(["data", "prepare", "--source", str(corpus[0]), "--output", str(out), "--tokens", "5000",
                   "--num-proc", "1", "--set", "data.shard_tokens=2048", "--set", "data.heldout_permille=200",
                   "--set", "data.val_tokens=1000", "--set", "data.test_tokens=1000"])
    assert status == 0
    manifest = load_manifest(str(out), Storage())
    assert [s["tokens"] for s in manifest["splits"]["train"]["shards"]] == [2048, 2048, 904]
    assert "22 local file(s)" in capsys.readouterr().out

    status = main(["data", "prepare", "--source", str(tmp_path / "missing"), "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("raygpt data: error: data.source:") and "missing" in err
    assert main(["data", "prepare", "--source", "stdlib", "--tokens", "0", "--output", str(tmp_path / "y")]) == 2
    assert "data.tokens: must be positive, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Readers, on datasets written here by hand (random tokens: every window is unique)


def write_dataset(root: Path, splits: dict[str, list[np.ndarray]]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "tokenizer": "gpt2", "dtype": "uint16", "eot_id": EOT_ID, "splits": {}}
    for split in SPLITS:
        shards = []
        for i, tokens in enumerate(splits.get(split, [])):
            data = tokens.astype("<u2").tobytes()
            (root / f"{split}_{i:06d}.bin").write_bytes(data)
            shards.append({"name": f"{split}_{i:06d}.bin", "tokens": len(tokens), "sha256": hashlib.sha256(data).hexdigest()})
        manifest["splits"][split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


T = 8


@pytest.fixture
def random_dataset(tmp_path) -> tuple[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    # 13, 7 and 20 sequences of T+1 tokens at stride T (plus a remainder that no window uses)
    train = [rng.integers(0, 50000, n * T + 1 + extra, dtype=np.uint16) for n, extra in ((13, 3), (7, 0), (20, 5))]
    test = [rng.integers(0, 50000, n, dtype=np.uint16) for n in (30, 45, 11)]
    return write_dataset(tmp_path / "ds", {"train": train, "test": test}), train


def test_global_batch_is_the_same_for_any_number_of_workers(random_dataset, tmp_path):
    uri, train = random_dataset
    batches = TrainBatches(uri, Storage(), seq_len=T, seed=1337, global_batch_size=8, cache_dir=tmp_path)
    assert (batches.sequences_per_epoch, batches.steps_per_epoch) == (40, 5)
    for step in (0, 3, 4, 5, 11):
        ids = batches.sequence_ids(step)
        expected = np.stack([train[s][q * T:q * T + T + 1] for s, q in ids]).astype(np.int64)
        for world in (1, 2, 4):
            xs, ys = [], []
            for rank in range(world):
                for x, y in batches.micro_batches(step, rank, world, micro_batch_size=2 if world < 4 else 1):
                    assert x.dtype == y.dtype == torch.int64 and x.is_contiguous()
                    assert torch.equal(x[:, 1:], y[:, :-1])
                    xs.append(x)
                    ys.append(y)
            assert torch.equal(torch.cat(xs), torch.from_numpy(expected[:, :-1]))
            assert torch.equal(torch.cat(ys), torch.from_numpy(expected[:, 1:]))


def test_any_worker_count_covers_the_global_batch_in_shares_that_differ_by_one_micro_batch(random_dataset):
    from raygpt.data.batches import micro_batch_share

    assert [list(micro_batch_share(8, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    uri, _ = random_dataset
    batches = TrainBatches(uri, Storage(), seq_len=T, seed=1337, global_batch_size=8)
    for step in (0, 6):
        whole = torch.cat([x for x, _ in batches.micro_batches(step, 0, 1, 1)])
        for world in (3, 5, 7, 8):
            shares = [batches.micro_batches(step, rank, world, 1) for rank in range(world)]
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert torch.equal(torch.cat([x for share in shares for x, _ in share]), whole)
            assert sum(batches.share_digest(step, r, world, 1) for r in range(world)) == \
                batches.share_digest(step, 0, 1, 1)
        assert batches.share_digest(step, 0, 1, 1) != batches.share_digest(step + 1, 0, 1, 1)
    batches.close()


def test_each_epoch_visits_every_sequence_once_in_a_seeded_order(random_dataset):
    uri, _ = random_dataset
    batches = TrainBatches(uri, Storage(), seq_len=T, seed=1337, global_batch_size=8)
    epoch = np.concatenate([batches.sequence_ids(s) for s in range(5)])
    assert len({tuple(i) for i in epoch}) == 40  # disjoint slices, complete coverage
    assert sorted(map(tuple, epoch.tolist())) == [(s, q) for s, n in enumerate((13, 7, 20)) for q in range(n)]
    assert [batches.epoch_of(s) for s in (4, 5, 9, 10)] == [0, 1, 1, 2]
    next_epoch = np.concatenate([batches.sequence_ids(s) for s in range(5, 10)])
    assert not np.array_equal(epoch, next_epoch)
    # the hierarchical shuffle: one shard at a time, sequences permuted inside it
    assert (np.diff(epoch[:, 0]) != 0).sum() == 2
    other = TrainBatches(uri, Storage(), seq_len=T, seed=1338, global_batch_size=8)
    assert not np.array_equal(other.sequence_ids(0), batches.sequence_ids(0))
    again = TrainBatches(uri, Storage(), seq_len=T, seed=1337, global_batch_size=8)
    assert np.array_equal(again.sequence_ids(7), batches.sequence_ids(7))
    # Pinned, so a change of generator (numpy, or this code) that would silently change every
    # run's data order fails here.
    assert batches.sequence_ids(0).tolist() == PINNED_STEP0


PINNED_STEP0 = [[2, 0], [2, 8], [2, 12], [2, 17], [2, 11], [2, 18], [2, 13], [2, 2]]


def test_bad_batch_shapes_are_clear_errors(random_dataset):
    uri, _ = random_dataset
    batches = TrainBatches(uri, Storage(), seq_len=T, seed=0, global_batch_size=8)
    with pytest.raises(RaygptError, match="global batch of 8 sequences does not split into micro batches of 3"):
        batches.micro_batches(0, 0, 3, 3)
    with pytest.raises(RaygptError, match="a global batch of 1 micro batches leaves worker 1 of 2 none"):
        batches.micro_batches(0, 1, 2, 8)
    with pytest.raises(RaygptError, match="fewer than one global batch of 64"):
        TrainBatches(uri, Storage(), seq_len=T, seed=0, global_batch_size=64)


def test_corrupt_or_missing_shard_and_missing_manifest(random_dataset, tmp_path):
    uri, _ = random_dataset
    shard = Path(uri) / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(RaygptError, match=r"train_000001.bin: sha256 mismatch \(corrupt shard\)"):
        ShardCache(uri, Storage()).tokens("train", 1)
    assert len(ShardCache(uri, Storage()).tokens("train", 0)) == 13 * T + 4
    shard.unlink()
    with pytest.raises(RaygptError, match=r"train_000001.bin: shard missing \(listed in manifest.json\)"):
        ShardCache(uri, Storage()).tokens("train", 1)
    with pytest.raises(RaygptError, match=r"manifest.json: not found: .* is not a prepared dataset, or its prepare did not finish"):
        TrainBatches(str(tmp_path / "empty"), Storage(), seq_len=T, seed=0, global_batch_size=8)
    (Path(uri) / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(RaygptError, match="not a raygpt dataset manifest"):
        load_manifest(uri, Storage())


def test_eval_windows_cover_the_split_once_across_shards_and_workers(random_dataset):
    uri, _ = random_dataset
    stream = np.concatenate([np.fromfile(Path(uri) / f"test_{i:06d}.bin", dtype="<u2") for i in range(3)])
    manifest = load_manifest(uri, Storage())
    assert count_eval_windows(manifest, "test", T) == (86 - 1) // T == 10
    whole = list(eval_batches(uri, Storage(), "test", T, batch_size=4))
    assert [len(x) for x, _ in whole] == [4, 4, 2]
    x = torch.cat([b[0] for b in whole])
    y = torch.cat([b[1] for b in whole])
    assert torch.equal(x.flatten(), torch.from_numpy(stream[:80].astype(np.int64)))  # windows cross shard ends
    assert torch.equal(y.flatten(), torch.from_numpy(stream[1:81].astype(np.int64)))
    shares = [list(eval_batches(uri, Storage(), "test", T, 2, rank=r, world_size=3)) for r in range(3)]
    assert [sum(len(b[0]) for b in s) for s in shares] == [count_eval_windows(manifest, "test", T, None, r, 3)
                                                          for r in range(3)] == [4, 3, 3]
    rows = {r: torch.cat([b[0] for b in s]) for r, s in enumerate(shares)}
    assert all(torch.equal(rows[i % 3][i // 3], x[i]) for i in range(10))
    assert count_eval_windows(manifest, "test", T, max_tokens=33) == 4
    assert sum(len(b[0]) for b in eval_batches(uri, Storage(), "test", T, 8, max_tokens=33)) == 4
    with pytest.raises(RaygptError, match="the val split has 0 tokens"):
        eval_batches(uri, Storage(), "val", T, 8)


# ---------------------------------------------------------------------------------------------
# S3


@pytest.mark.integration
def test_prepare_to_s3_and_train_from_it(s3_env, corpus, prepared, tmp_path):
    local_out, local_manifest = prepared
    uri = f"s3://raygpt-test/data-{os.urandom(4).hex()}"
    manifest = prepare(data_spec(corpus[0], uri), Storage())
    assert manifest["splits"] == local_manifest["splits"]

    cache = tmp_path / "cache"
    remote = TrainBatches(uri, Storage(), seq_len=64, seed=5, global_batch_size=16, cache_dir=cache)
    local = TrainBatches(str(local_out), Storage(), seq_len=64, seed=5, global_batch_size=16)
    for step in (0, 1, remote.steps_per_epoch):
        for (xr, yr), (xl, yl) in zip(remote.micro_batches(step, 1, 2, 4), local.micro_batches(step, 1, 2, 4)):
            assert torch.equal(xr, xl) and torch.equal(yr, yl)
    remote.close()
    cached = cache / manifest_hash(manifest)[:16]
    assert {p.name for p in cached.glob("*.bin")} <= {s["name"] for s in manifest["splits"]["train"]["shards"]}
    assert len(list(cached.glob("*.bin"))) >= 2

    # A bounded cache keeps only the shards in use and the newest download.
    bounded = TrainBatches(uri, Storage(), seq_len=64, seed=5, global_batch_size=16, cache_dir=tmp_path / "small",
                           max_cached_shards=1)
    for step in range(bounded.steps_per_epoch):
        bounded.micro_batches(step, 0, 1, 16)
    bounded.close()
    assert len(list((tmp_path / "small").glob("*/*.bin"))) <= 2 < len(manifest["splits"]["train"]["shards"])

    x, y = next(eval_batches(uri, Storage(), "test", 64, 4, cache_dir=cache))
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])

    Storage().write_bytes(f"{uri}/test_000000.bin", b"\x01\x00" * manifest["splits"]["test"]["shards"][0]["tokens"])
    with pytest.raises(RaygptError, match=r"s3://raygpt-test/data-\w+/test_000000.bin: sha256 mismatch \(corrupt shard\)"):
        ShardCache(uri, Storage(), cache_dir=tmp_path / "fresh").tokens("test", 0)


@pytest.mark.integration
def test_shards_are_hashed_before_training_starts_when_local_or_small(s3_env, random_dataset, monkeypatch, tmp_path):
    """The rule: a local dataset, or one in S3 of at most HASH_BEFORE_START_BYTES, is hashed
    whole by ``check_dataset`` (before Ray starts); a larger one in S3 shard by shard before
    each shard's first use."""
    import raygpt.data.manifest as dataset

    local, _ = random_dataset
    remote = f"s3://raygpt-test/hashed-{os.urandom(4).hex()}"
    Storage().upload(local, remote)
    for uri in (local, remote):
        assert dataset.hashed_before_start(uri, load_manifest(uri, Storage()))
        dataset.check_dataset(uri, Storage())
    shard = Path(local) / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A  # the same size: only the digest can tell
    shard.write_bytes(bytes(data))
    Storage().write_bytes(f"{remote}/train_000001.bin", bytes(data))
    for uri in (local, remote):
        with pytest.raises(RaygptError, match=rf"^{uri}/train_000001.bin: sha256 mismatch \(corrupt shard\)"):
            dataset.check_dataset(uri, Storage())

    monkeypatch.setattr(dataset, "HASH_BEFORE_START_BYTES", 0)  # the remote copy is now "large"
    assert not dataset.hashed_before_start(remote, load_manifest(remote, Storage()))
    dataset.check_dataset(remote, Storage())  # sizes only
    with pytest.raises(RaygptError, match=r"train_000001.bin: sha256 mismatch \(corrupt shard\)"):
        ShardCache(remote, Storage(), cache_dir=tmp_path / "cache").tokens("train", 1)  # at its first use
    with pytest.raises(RaygptError, match=r"train_000001.bin: sha256 mismatch"):
        dataset.check_dataset(local, Storage())  # a local one, whatever its size


@pytest.mark.integration
def test_a_bounded_cache_never_evicts_a_shard_another_worker_on_the_node_reads(s3_env, corpus, tmp_path):
    import subprocess
    import sys

    uri = f"s3://raygpt-test/data-{os.urandom(4).hex()}"
    manifest = prepare(data_spec(corpus[0], uri), Storage())
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert len(names) >= 3
    # Another rank on this node (a live process) has mapped the first shard...
    other = ShardCache(uri, Storage(), cache_dir=tmp_path, max_cached_shards=1)
    other.tokens("train", 0)
    folder = other.cache_dir
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        (folder / f".in-use-{os.getpid()}").rename(folder / f".in-use-{sleeper.pid}")
        (folder / f".in-use-{dead.stdout.strip()}").write_text(names[1])  # a crashed worker's stale list
        # ...while this one, bounded to one shard, reads the others.
        mine = ShardCache(uri, Storage(), cache_dir=tmp_path, max_cached_shards=1)
        mine.release(set())
        for index in range(1, len(names)):
            mine.tokens("train", index)
            mine.release({("train", index)})
        kept = {p.name for p in folder.glob("*.bin")}
        assert names[0] in kept  # in use by the live process
        assert names[1] not in kept  # only a dead process listed it
        assert not (folder / f".in-use-{dead.stdout.strip()}").exists()
    finally:
        sleeper.kill()


def test_a_manifest_whose_split_total_is_not_its_shards_sum_is_refused(prepared, tmp_path):
    out, manifest = prepared
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads(json.dumps(manifest))
    manifest["splits"]["train"]["tokens"] *= 100  # would plan 100x the steps
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RaygptError, match=r"not a raygpt dataset manifest \(splits.train.tokens is 3000000, but its "
                                          r"shards hold 30,000 tokens\)"):
        load_manifest(str(broken), Storage())
