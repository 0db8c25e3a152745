"""The data pipeline against references: a hand-packed token stream, an uninterrupted run, the other ranks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from gpt2_accel import data as D
from gpt2_accel.cli.prepare import main as prepare_main
from gpt2_accel.recipe import DataArguments
from gpt2_accel.tokenization import get_tokenizer

T = 16  # block size: tiny windows keep every test fast


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def _docs(n: int = 120, start: int = 0) -> list[str]:
    # Distinct documents, each with a unique marker so coverage and overlap can be read back from the tokens.
    return [
        f"Document number {i} says: the {i % 7} quick foxes jumped {i * 3} times."
        for i in range(start, start + n)
    ]


def _write_jsonl(path, docs, extra=False):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "id": i} if extra else {"text": d}) + "\n")
    return str(path)


def _args(name, **kw) -> DataArguments:
    kw.setdefault("validation_split_percentage", 0.0)
    kw.setdefault("dataloader_num_workers", 0)
    return DataArguments(dataset_name=name, **kw)


def _reference_windows(tok, docs, block_size=T) -> np.ndarray:
    """Hand-packed reference: each document's tokens + <|endoftext|>, windows of T+1 with stride T."""
    stream = np.array([t for d in docs for t in [*tok.encode(d), tok.eot_token_id]], dtype=np.int64)
    n = (len(stream) - 1) // block_size
    return np.stack([stream[i * block_size : i * block_size + block_size + 1] for i in range(n)])


def _marks(tok, windows) -> set[int]:
    """The document numbers found in windows (read without the repeated last token)."""
    return {int(m) for m in re.findall(r"number (\d+)", tok.decode(windows[:, :-1].flatten().tolist()))}


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _loader(args, tok, **kw):
    base = dict(block_size=T, batch_size=4, rank=0, world_size=1, seed=0)
    base.update(kw)
    return D.build_train_loader(args, tok, **base)


# -------------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
def test_packing_matches_hand_packed_stream(tmp_path, tok, fmt):
    docs = _docs(60)
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "d.jsonl", docs)
    else:
        import datasets

        ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
        if fmt == "parquet":
            path = str(tmp_path / "d.parquet")
            ds.to_parquet(path)
        else:
            ds.save_to_disk(str(tmp_path / "saved"))
            path = str(next((tmp_path / "saved").glob("*.arrow")))
    ref = _reference_windows(tok, docs)
    got = torch.cat(_take(_loader(_args(path), tok), len(ref) // 4)).numpy()
    assert got.dtype == np.int64 and got.shape[1] == T + 1
    np.testing.assert_array_equal(got, ref[: len(got)])
    # windows overlap by exactly one token: every token is a target once
    assert (got[:-1, -1] == got[1:, 0]).all()


def test_text_file_is_one_document_split_in_paragraphs(tmp_path, tok):
    text = "First para\nline two\n\nSecond para\n\n\nThird para\n\n"
    (tmp_path / "a.txt").write_text(text * 3)
    (tmp_path / "b.txt").write_text("Other file\n")
    loader = _loader(_args(str(tmp_path / "*.txt")), tok, batch_size=1)
    ids = torch.cat([b[0, :-1] for b in _take(loader, 12)]).tolist()
    eot = tok.eot_token_id
    # <|endoftext|> only at the end of each file (not after every line or paragraph); newlines are kept
    ref_a = (
        tok.encode("First para\nline two\n\n")
        + tok.encode("Second para\n\n\n")
        + tok.encode("Third para\n\n")
    )
    assert ids[: 3 * len(ref_a) + 1] == ref_a * 3 + [eot]
    assert ids.count(eot) >= 2 and "\n\n" in tok.decode(ids)


def test_not_streaming_gives_the_same_batches(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", _docs(50))
    a, b = (_take(_loader(_args(path, streaming=s), tok), 12) for s in (True, False))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_bundled_shakespeare_and_mixture_weights(tmp_path, tok):
    a = _write_jsonl(tmp_path / "a.jsonl", ["alpha " * 5] * 50)
    b = _write_jsonl(tmp_path / "b.jsonl", ["omega " * 5] * 50)
    loader = _loader(_args([a, b], dataset_weights=[3.0, 1.0]), tok, batch_size=8)
    text = tok.decode(torch.cat(_take(loader, 20))[:, :-1].flatten().tolist())
    na, nb = text.count("alpha"), text.count("omega")
    assert 2.0 < na / nb < 4.5  # ~3:1 documents drawn
    shak = _take(_loader(_args("bundled:shakespeare"), tok), 1)[0]
    assert "Midsummer" in tok.decode(shak[0].tolist())


# -------------------------------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_ranks_are_disjoint_and_cover_the_data(tmp_path, tok, fmt):
    docs = _docs(80)
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "d.jsonl", docs)
    else:
        path = str(tmp_path / "d.txt")
        (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n")
    n_tokens = sum(len(tok.encode(d)) + 1 for d in docs)
    seen, windows = [], []
    for rank in (0, 1):
        loader = _loader(_args(path), tok, rank=rank, world_size=2)
        # one epoch of this rank: about half of the tokens
        # a bit more than one epoch of this rank (about half of the tokens)
        batches = torch.cat(_take(loader, n_tokens // (2 * T * 4) + 2))
        windows.append({tuple(w) for w in batches.tolist()})
        seen.append(_marks(tok, batches))
    assert not windows[0] & windows[1]  # no window trained on twice
    assert not seen[0] & seen[1]  # each document is read by one rank
    assert seen[0] | seen[1] == set(range(len(docs)))  # and every document by some rank


# -------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_is_exact_streaming(tmp_path, tok, workers):
    a = _write_jsonl(tmp_path / "a.jsonl", _docs(300))
    b = str(tmp_path / "b.txt")
    (tmp_path / "b.txt").write_text("\n\n".join(_docs(50, start=1000)))
    args = _args(
        [a, b], dataset_weights=[2.0, 1.0], dataloader_num_workers=workers, validation_split_percentage=10
    )
    k, m = 23, 30  # k batches cross chunk boundaries and an epoch of b.txt
    full = _take(_loader(args, tok), k + m)
    first = _loader(args, tok)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = _loader(args, tok)
    resumed.load_state_dict([state])
    it = iter(resumed)
    again = [next(it) for _ in range(m // 2)]
    # a second interruption, right after a resume
    state2 = json.loads(json.dumps(resumed.state_dict()))
    resumed2 = _loader(args, tok)
    resumed2.load_state_dict([state2])
    again += _take(resumed2, m - m // 2)
    for x, y in zip(full[k:], again, strict=True):
        assert torch.equal(x, y)


def test_resume_is_exact_for_each_rank(tmp_path, tok):
    args = _args(
        [_write_jsonl(tmp_path / "a.jsonl", _docs(200)), "bundled:shakespeare"], validation_split_percentage=5
    )
    for rank in (0, 1):
        full = _take(_loader(args, tok, rank=rank, world_size=2), 14)
        first = _loader(args, tok, rank=rank, world_size=2)
        _take(first, 9)
        states = [None, None]
        states[rank] = first.state_dict()
        states[1 - rank] = states[rank] | {"rank": 1 - rank}  # the other rank's (unused) entry
        resumed = _loader(args, tok, rank=rank, world_size=2)
        resumed.load_state_dict(states)
        assert all(torch.equal(x, y) for x, y in zip(full[9:], _take(resumed, 5), strict=True))


def test_resume_streaming_other_world_size_is_a_clear_error(tmp_path, tok):
    args = _args(_write_jsonl(tmp_path / "a.jsonl", _docs(40)))
    states = []
    for rank in (0, 1):
        loader = _loader(args, tok, rank=rank, world_size=2)
        _take(loader, 2)
        states.append(loader.state_dict())
    fresh = _loader(args, tok)
    with pytest.raises(ValueError, match=r"same number of processes.*gpt2-accel prepare"):
        fresh.load_state_dict(states)


# -------------------------------------------------------------------------------------------------- validation
def test_validation_holdout_is_disjoint_and_world_size_independent(tmp_path, tok):
    docs = _docs(200)
    args = _args(_write_jsonl(tmp_path / "a.jsonl", docs), validation_split_percentage=20)
    val = D.build_eval_windows(args, tok, block_size=T, max_samples=30, rank=0, world_size=1)
    assert val.shape == (30, T + 1)
    r0 = D.build_eval_windows(args, tok, block_size=T, max_samples=30, rank=0, world_size=2)
    r1 = D.build_eval_windows(args, tok, block_size=T, max_samples=30, rank=1, world_size=2)
    assert torch.equal(r0, val[0::2]) and torch.equal(r1, val[1::2])
    all_val = D.build_eval_windows(args, tok, block_size=T, max_samples=10_000, rank=0, world_size=1)
    assert len(all_val) < 10_000  # fewer windows than asked: all of them
    train = torch.cat(_take(_loader(args, tok), 60))
    val_docs, train_docs = _marks(tok, all_val), _marks(tok, train)
    assert 10 < len(val_docs) < 70 and not val_docs & train_docs
    # a separate validation source wins
    other = _write_jsonl(tmp_path / "v.jsonl", _docs(20, start=5000))
    args2 = _args(args.dataset_name, validation_dataset_name=other)
    other_val = D.build_eval_windows(args2, tok, block_size=T, max_samples=4, rank=0, world_size=1)
    assert _marks(tok, other_val) <= set(range(5000, 5020))


# -------------------------------------------------------------------------------------------------- token files
def test_prepare_then_shards_resume_across_world_sizes(tmp_path, tok):
    src = _write_jsonl(tmp_path / "a.jsonl", _docs(300))
    out = tmp_path / "prep"
    assert prepare_main([src, "--output", str(out), "--shard-size", "1000", "--num-proc", "1"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["vocab_size"] == 50257 and index["eot_token_id"] == 50256
    assert len(index["splits"]["train"]["shards"]) > 2 and index["splits"]["validation"]["tokens"] > 0
    # the shards hold the documents' tokens in order, minus the held-out ones
    train = np.concatenate(
        [D._memmap_tokens(str(out / s["file"])) for s in index["splits"]["train"]["shards"]]
    )
    kept = [d for d in _docs(300) if D._holdout_key(d) >= 5.0]
    assert train.tolist() == [t for d in kept for t in [*tok.encode(d), tok.eot_token_id]]

    args = _args(str(out))
    # uninterrupted world size 1, global batch 8 (batch 4 x grad_accum 2)
    single = torch.cat(_take(_loader(args, tok, batch_size=4, grad_accum=2), 10))  # 5 global batches
    # world size 2, batch 4: rank r takes its slice of each global batch of 8
    two = [_loader(args, tok, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    its = [iter(x) for x in two]
    for g in range(3):
        got = torch.cat([next(its[0]), next(its[1])])
        assert torch.equal(got, single[g * 8 : (g + 1) * 8])
    states = [json.loads(json.dumps(x.state_dict())) for x in two]
    resumed = _loader(args, tok, batch_size=4, grad_accum=2)
    resumed.load_state_dict(states)  # saved by 2 processes, resumed by 1
    assert torch.equal(torch.cat(_take(resumed, 4)), single[24:40])
    bad = _loader(args, tok, batch_size=5)  # 24 samples consumed: not a whole number of batches of 5
    with pytest.raises(ValueError, match="global batch"):
        bad.load_state_dict(states)
    val = D.build_eval_windows(args, tok, block_size=T, max_samples=5, rank=0, world_size=1)
    assert val.shape == (5, T + 1)
    with pytest.raises(ValueError, match=r"prepared with tokenizer 'gpt2'.*set tokenizer_name to 'gpt2'"):
        _loader(args, get_tokenizer("char"))


def test_prepare_resumes_after_interruption(tmp_path, tok):
    src = _write_jsonl(tmp_path / "a.jsonl", _docs(1000))  # 4 chunks of 256 documents
    full, part = tmp_path / "full", tmp_path / "part"
    D.prepare([src], str(full), shard_size=700, num_proc=1, progress=False)
    D.prepare([src], str(part), shard_size=700, num_proc=1, progress=False, _stop_after_shards=1)
    assert not json.loads((part / "index.json").read_text())["complete"]
    first = (part / "train_000000.bin").stat().st_mtime_ns
    D.prepare([src], str(part), shard_size=700, num_proc=1, progress=False)
    assert (part / "train_000000.bin").stat().st_mtime_ns == first  # completed shards kept, not redone
    a, b = (json.loads((d / "index.json").read_text()) for d in (full, part))
    assert a["splits"] == b["splits"]
    for s in a["splits"]["train"]["shards"] + a["splits"]["validation"]["shards"]:
        assert (full / s["file"]).read_bytes() == (part / s["file"]).read_bytes()


def test_nanogpt_and_llmc_bins(tmp_path, tok):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50257, 5000, dtype=np.uint16), rng.integers(0, 50257, 800, dtype=np.uint16)
    nano = tmp_path / "nano"
    nano.mkdir()
    train.tofile(nano / "train.bin")
    val.tofile(nano / "val.bin")
    llmc = tmp_path / "llmc"
    llmc.mkdir()
    D.write_shard(str(llmc / "web_train_000001.bin"), train)
    D.write_shard(str(llmc / "web_val_000000.bin"), val)
    for name in (str(nano / "train.bin"), str(nano), str(llmc / "web_train_*.bin")):
        b = _take(_loader(_args(name), tok), 3)
        windows = {tuple(train[i * T : i * T + T + 1].tolist()) for i in range((len(train) - 1) // T)}
        assert all(tuple(w) in windows for w in torch.cat(b).tolist())
        ev = D.build_eval_windows(_args(name), tok, block_size=T, max_samples=3, rank=0, world_size=1)
        assert ev[0].tolist() == val[: T + 1].tolist()


# -------------------------------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path, tok, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"dataset_name='/nope/x.jsonl'.*no such file"):
        _loader(_args("/nope/x.jsonl"), tok)
    path = _write_jsonl(tmp_path / "a.jsonl", _docs(5), extra=True)
    with pytest.raises(ValueError, match=r"text_column='body'.*columns are \['text', 'id'\]"):
        _loader(_args(path, text_column="body"), tok)
    with pytest.raises(ValueError, match=r"text_column='id'.*not text"):
        _loader(_args(path, text_column="id"), tok)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        _loader(_args(str(tmp_path / "empty.jsonl")), tok)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        _loader(_args(str(tmp_path / "e.txt")), tok)
    with pytest.raises(
        ValueError, match="block_size=2048 is longer than the model's context n_positions=1024"
    ):
        D.check_block_size(2048, 1024)

    class Big:
        name, vocab_size, eot_token_id = "big", 100_000, 99_999

    with pytest.raises(ValueError, match=r"vocab_size=100000.*uint16"):
        D.check_uint16(Big())
    with pytest.raises(
        ValueError, match=r"plain text, which has only a 'train' split.*validation_split_percentage"
    ):
        D.build_eval_windows(
            _args("bundled:shakespeare", validation_split="validation"),
            tok,
            block_size=T,
            max_samples=2,
            rank=0,
            world_size=1,
        )
    with pytest.raises(ValueError, match="unknown bundled dataset"):
        _loader(_args("bundled:nope"), tok)


def test_hub_call_is_formed_right_and_unreachable_hub_is_clear(tmp_path, tok, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset
    local = _write_jsonl(tmp_path / "a.jsonl", _docs(10))

    def fake(path, name=None, **kw):
        calls.append((path, name, kw))
        return real("json", data_files=[local], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    args = _args("HuggingFaceFW/fineweb-edu", dataset_config_name="sample-10BT")
    _take(_loader(args, tok), 1)
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", {"split": "train", "streaming": True})
    monkeypatch.setattr(datasets, "load_dataset", real)

    def offline(*a, **kw):  # what datasets raises when the Hub cannot be reached (without its slow retries)
        raise ConnectionError("Couldn't reach 'someone/nothing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        FileNotFoundError, match=r"dataset_name='someone/nothing' could not be loaded.*local files"
    ):
        _loader(_args("someone/nothing"), tok)


def test_state_dict_is_json_and_tracks_consumed_batches_not_prefetched(tmp_path, tok):
    args = _args(_write_jsonl(tmp_path / "a.jsonl", _docs(100)), dataloader_num_workers=1)
    loader = _loader(args, tok)
    it = iter(loader)
    next(it)
    s1 = loader.state_dict()
    next(it)
    s2 = loader.state_dict()
    assert s1["batches"] == 1 and s2["batches"] == 2  # the worker prefetches, the state follows consumption
    assert json.loads(json.dumps(s2)) == s2


def test_gpt2_bpe_data_path_equals_the_hf_tokenizer_it_writes():
    """The pipeline encodes GPT-2 text with tiktoken on ranks read from the bundled files; run directories carry
    transformers' GPT2TokenizerFast built from the same files. Both must give the same ids, both ways."""
    from gpt2_accel.tokenization import GPT2_BPE_DIR

    tok = get_tokenizer("gpt2")
    text = (GPT2_BPE_DIR.parent / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:20000]
    samples = [*text.split("\n\n")[:200], " leading  spaces\ttabs\n\n\nnewlines ", "naïve café — “quotes” 😀 中文",
               "it's we'll they've I'm", "\x00\x07 bytes \u00ad\u200b"]  # fmt: skip
    fast = tok.encode_batch(samples)
    want = tok.hf(samples, add_special_tokens=False)["input_ids"]
    assert fast == want
    assert all(tok.decode(ids) == s for ids, s in zip(fast, samples, strict=True))
    # special-token strings stay plain text in the pipeline (transformers' tokenizer would make them the eot id)
    assert tok.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
