"""Tests for stabiliscope.data against real files in pytest's tmp_path."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from stabiliscope.data import (
    BYTE_VOCAB_SIZE,
    Corpus,
    builtin_corpus,
    check_sequence_fits,
    decode_tokens,
    encode_text,
    iter_eval_batches,
    load_corpus,
    sample_batch,
)
from stabiliscope.errors import DataError


@pytest.fixture(scope="module")
def builtin() -> Corpus:
    return builtin_corpus()


def _all_tokens(corpus: Corpus) -> torch.Tensor:
    return torch.cat([corpus.train, corpus.val])


def _all_bytes(corpus: Corpus) -> bytes:
    return bytes(_all_tokens(corpus).tolist())


# Built-in corpus


def test_builtin_corpus_metadata(builtin: Corpus) -> None:
    assert builtin.name == "builtin:pydoc_data.topics"
    assert builtin.vocab_size == BYTE_VOCAB_SIZE == 256
    assert builtin.train.dtype == torch.int64
    assert builtin.val.dtype == torch.int64
    assert builtin.train.dim() == 1
    assert builtin.val.dim() == 1


def test_builtin_corpus_is_english_text(builtin: Corpus) -> None:
    data = _all_bytes(builtin)
    text = data.decode("utf-8")

    assert len(data) > 400_000
    assert data.count(b" the ") > 1000
    assert "\ufffd" not in decode_tokens(_all_tokens(builtin))
    assert "assert" in text
    assert int(_all_tokens(builtin).max()) < 256


def test_builtin_corpus_split_sizes(builtin: Corpus) -> None:
    total = builtin.train.numel() + builtin.val.numel()

    assert builtin.val.numel() == math.floor(total * 0.1)
    assert builtin.train.numel() == total - builtin.val.numel()


def test_builtin_corpus_is_deterministic(builtin: Corpus) -> None:
    again = builtin_corpus()

    assert torch.equal(again.train, builtin.train)
    assert torch.equal(again.val, builtin.val)


def test_builtin_corpus_returns_fresh_tensors() -> None:
    first = builtin_corpus()
    original = int(first.train[0])
    first.train[0] = original + 1

    assert int(builtin_corpus().train[0]) == original


def test_builtin_corpus_split_follows_val_fraction(builtin: Corpus) -> None:
    half = builtin_corpus(val_fraction=0.5)
    total = half.train.numel() + half.val.numel()

    assert half.val.numel() == total // 2
    assert torch.equal(_all_tokens(half), _all_tokens(builtin))


def test_load_corpus_none_is_builtin(builtin: Corpus) -> None:
    loaded = load_corpus(None)

    assert loaded.name == builtin.name
    assert torch.equal(loaded.train, builtin.train)
    assert torch.equal(loaded.val, builtin.val)


# Text files and folders


def test_text_file_keeps_invalid_utf8(tmp_path) -> None:
    data = bytes(range(1, 256)) + b"\xff\xfe\x80 not utf-8 \xc3"
    path = tmp_path / "raw.txt"
    path.write_bytes(data)

    corpus = load_corpus(path)

    assert corpus.name == str(path)
    assert corpus.vocab_size == 256
    assert corpus.train.dtype == torch.int64
    assert _all_bytes(corpus) == data
    assert corpus.val.numel() == len(data) // 10


def test_text_file_accepts_str_path(tmp_path) -> None:
    path = tmp_path / "notes.md"
    path.write_bytes(b"hello world\n" * 20)

    corpus = load_corpus(str(path), val_fraction=0.25)

    assert corpus.name == str(path)
    assert _all_bytes(corpus) == b"hello world\n" * 20
    assert corpus.val.numel() == 60


def test_folder_concatenates_in_sorted_order(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "2.txt").write_bytes(b"B2")
    (tmp_path / "b" / "1.txt").write_bytes(b"B1")
    (tmp_path / "a.txt").write_bytes(b"A")
    (tmp_path / "a" / "z.txt").write_bytes(b"AZ")

    corpus = load_corpus(tmp_path)

    # Paths compare component by component, so a/z.txt sorts before a.txt.
    assert _all_bytes(corpus) == b"AZ\nA\nB1\nB2"
    assert corpus.vocab_size == 256


def test_folder_skips_hidden_files_and_folders(tmp_path) -> None:
    (tmp_path / "doc.txt").write_bytes(b"visible")
    (tmp_path / ".hidden.txt").write_bytes(b"secret file")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_bytes(b"secret folder")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".env").write_bytes(b"secret nested")
    (tmp_path / "sub" / "more.txt").write_bytes(b"nested")

    corpus = load_corpus(tmp_path)

    assert _all_bytes(corpus) == b"visible\nnested"


def test_hidden_root_folder_is_read(tmp_path) -> None:
    root = tmp_path / ".data"
    root.mkdir()
    (root / "text.txt").write_bytes(b"inside a hidden root")

    corpus = load_corpus(root)

    assert _all_bytes(corpus) == b"inside a hidden root"


# .bin token files


def test_bin_file_round_trip(tmp_path) -> None:
    ids = np.array([0, 300, 65535, 7, 256, 1, 2, 3, 4, 5], dtype="<u2")
    path = tmp_path / "train.bin"
    ids.tofile(path)

    corpus = load_corpus(path)

    assert corpus.vocab_size == 65536
    assert corpus.train.dtype == torch.int64
    assert _all_tokens(corpus).tolist() == ids.tolist()
    assert corpus.val.tolist() == [5]


def test_bin_vocab_size_from_max_id(tmp_path) -> None:
    path = tmp_path / "small.bin"
    np.array([3, 300, 12, 299], dtype="<u2").tofile(path)

    corpus = load_corpus(path, val_fraction=0.5)

    assert corpus.vocab_size == 301
    assert corpus.train.tolist() == [3, 300]
    assert corpus.val.tolist() == [12, 299]


def test_bin_file_is_little_endian(tmp_path) -> None:
    path = tmp_path / "endian.bin"
    path.write_bytes(b"\x01\x02\x00\x01")

    corpus = load_corpus(path, val_fraction=0.5)

    assert _all_tokens(corpus).tolist() == [0x0201, 0x0100]


def test_bin_file_odd_size_rejected(tmp_path) -> None:
    path = tmp_path / "broken.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03")

    with pytest.raises(DataError) as caught:
        load_corpus(path)

    message = str(caught.value)
    assert str(path) in message
    assert "5 bytes" in message
    assert "even byte count" in message


def test_empty_bin_file_rejected(tmp_path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")

    with pytest.raises(DataError, match="contains no tokens") as caught:
        load_corpus(path)

    assert str(path) in str(caught.value)


def test_bin_inside_folder_read_as_bytes(tmp_path, caplog) -> None:
    (tmp_path / "ids.bin").write_bytes(b"\x01\x02")

    with caplog.at_level("WARNING", logger="stabiliscope.data"):
        corpus = load_corpus(tmp_path)

    assert _all_tokens(corpus).tolist() == [1, 2]
    assert corpus.vocab_size == 256
    assert "read as raw bytes" in caplog.text


# Invalid paths


def test_missing_path_rejected(tmp_path) -> None:
    path = tmp_path / "absent.txt"

    with pytest.raises(DataError, match="not found") as caught:
        load_corpus(path)

    assert str(path) in str(caught.value)


def test_empty_string_path_rejected() -> None:
    with pytest.raises(DataError, match="empty string"):
        load_corpus("")


def test_empty_file_rejected(tmp_path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")

    with pytest.raises(DataError, match="contains no tokens") as caught:
        load_corpus(path)

    assert str(path) in str(caught.value)


def test_empty_folder_rejected(tmp_path) -> None:
    with pytest.raises(DataError, match="contains no files") as caught:
        load_corpus(tmp_path)

    assert str(tmp_path) in str(caught.value)


def test_folder_of_hidden_files_rejected(tmp_path) -> None:
    (tmp_path / ".only-hidden").write_bytes(b"text")

    with pytest.raises(DataError, match="contains no files"):
        load_corpus(tmp_path)


def test_folder_of_empty_files_rejected(tmp_path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")

    # One file joins to zero bytes, so there are no tokens.
    with pytest.raises(DataError, match="contains no tokens"):
        load_corpus(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_path_rejected(tmp_path) -> None:
    path = tmp_path / "pipe"
    os.mkfifo(path)

    expected = "neither a regular file nor a folder"
    with pytest.raises(DataError, match=expected) as caught:
        load_corpus(path)

    assert str(path) in str(caught.value)


# val_fraction


@pytest.mark.parametrize(
    "val_fraction", [0, 0.0, -0.1, 0.51, 1.0, float("nan"), True, "0.1"]
)
def test_val_fraction_out_of_range(tmp_path, val_fraction) -> None:
    path = tmp_path / "text.txt"
    path.write_bytes(b"x" * 100)

    with pytest.raises(DataError) as caught:
        load_corpus(path, val_fraction=val_fraction)

    message = str(caught.value)
    assert repr(val_fraction) in message
    assert "0.5" in message


def test_val_fraction_checked_for_builtin() -> None:
    with pytest.raises(DataError, match="0.75"):
        builtin_corpus(val_fraction=0.75)


# check_sequence_fits


def test_sequence_fits_in_both_splits(tmp_path) -> None:
    path = tmp_path / "text.txt"
    path.write_bytes(b"y" * 100)
    corpus = load_corpus(path, val_fraction=0.5)

    check_sequence_fits(corpus, seq_len=49)


def test_sequence_too_long_rejected(tmp_path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(b"z" * 44)
    corpus = load_corpus(path)

    with pytest.raises(DataError) as caught:
        check_sequence_fits(corpus, seq_len=64)

    message = str(caught.value)
    expected_counts = f"data {str(path)!r} has 40 training tokens and 4 validation"
    assert expected_counts in message
    assert "--seq-len 64 needs at least 65 in each" in message


def test_sequence_too_long_for_val_only(tmp_path) -> None:
    path = tmp_path / "text.txt"
    path.write_bytes(b"z" * 100)
    corpus = load_corpus(path, val_fraction=0.1)

    with pytest.raises(DataError, match="10 validation tokens"):
        check_sequence_fits(corpus, seq_len=10)


@pytest.mark.parametrize("seq_len", [0, -3])
def test_sequence_length_below_one_rejected(builtin: Corpus, seq_len: int) -> None:
    with pytest.raises(DataError, match=f"got {seq_len}"):
        check_sequence_fits(builtin, seq_len)


# sample_batch


def test_sample_batch_shapes_and_dtype() -> None:
    tokens = torch.arange(1000, dtype=torch.int64)

    generator = torch.Generator().manual_seed(0)

    x, y = sample_batch(tokens, batch_size=8, seq_len=16, generator=generator)

    assert x.shape == (8, 16)
    assert y.shape == (8, 16)
    assert x.dtype == torch.int64
    assert y.dtype == torch.int64
    assert x.device.type == "cpu"
    assert x.is_contiguous()
    assert y.is_contiguous()


def test_sample_batch_targets_are_shifted() -> None:
    # With tokens 0..n-1, every row is a run of consecutive ids starting at its offset.
    tokens = torch.arange(500, dtype=torch.int64)

    generator = torch.Generator().manual_seed(1)

    x, y = sample_batch(tokens, batch_size=32, seq_len=10, generator=generator)

    assert torch.equal(y, x + 1)
    assert torch.equal(x, x[:, :1] + torch.arange(10))
    assert int(x.min()) >= 0
    assert int(y.max()) <= 499


def test_sample_batch_uses_every_start() -> None:
    # 3 tokens and seq_len 2 allow only start 0, but 4 tokens allow starts 0 and 1.
    generator = torch.Generator().manual_seed(2)

    only_x, _ = sample_batch(torch.arange(3), 16, 2, generator)
    both_x, _ = sample_batch(torch.arange(4), 64, 2, generator)

    assert set(only_x[:, 0].tolist()) == {0}
    assert set(both_x[:, 0].tolist()) == {0, 1}


def test_sample_batch_same_seed_same_batch() -> None:
    tokens = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(9))

    x1, y1 = sample_batch(tokens, 4, 32, torch.Generator().manual_seed(123))
    x2, y2 = sample_batch(tokens, 4, 32, torch.Generator().manual_seed(123))

    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)


def test_sample_batch_different_seed_differs() -> None:
    tokens = torch.arange(100_000, dtype=torch.int64)

    x1, _ = sample_batch(tokens, 4, 32, torch.Generator().manual_seed(123))
    x2, _ = sample_batch(tokens, 4, 32, torch.Generator().manual_seed(124))

    assert not torch.equal(x1, x2)


def test_sample_batch_advances_generator() -> None:
    tokens = torch.arange(100_000, dtype=torch.int64)
    generator = torch.Generator().manual_seed(5)

    first, _ = sample_batch(tokens, 4, 32, generator)
    second, _ = sample_batch(tokens, 4, 32, generator)

    assert not torch.equal(first, second)


def test_sample_batch_too_few_tokens_rejected() -> None:
    with pytest.raises(DataError, match="10 tokens are too few"):
        sample_batch(torch.arange(10), 2, 10, torch.Generator())


@pytest.mark.parametrize(("batch_size", "seq_len"), [(0, 4), (2, 0), (-1, 4)])
def test_sample_batch_invalid_sizes_rejected(batch_size: int, seq_len: int) -> None:
    with pytest.raises(DataError, match="must be an integer of at least 1"):
        sample_batch(torch.arange(100), batch_size, seq_len, torch.Generator())


def test_sample_batch_rejects_2d_tokens() -> None:
    with pytest.raises(DataError, match="1-D"):
        sample_batch(torch.zeros(4, 50, dtype=torch.int64), 2, 4, torch.Generator())


# iter_eval_batches


def test_eval_batches_cover_consecutive_windows() -> None:
    tokens = torch.arange(103, dtype=torch.int64)

    batches = list(iter_eval_batches(tokens, batch_size=3, seq_len=10, max_batches=100))

    # (103 - 1) // 10 = 10 windows: batches of 3, 3, 3 and 1.
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 1]
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert torch.equal(inputs.reshape(-1), torch.arange(100))
    assert torch.equal(targets, inputs + 1)


def test_eval_batches_respect_max_batches() -> None:
    tokens = torch.arange(1000, dtype=torch.int64)

    batches = list(iter_eval_batches(tokens, batch_size=4, seq_len=8, max_batches=2))

    assert len(batches) == 2
    assert [tuple(x.shape) for x, _ in batches] == [(4, 8), (4, 8)]
    assert batches[1][0][0, 0].item() == 32


def test_eval_batches_are_deterministic() -> None:
    tokens = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(3))

    first = list(iter_eval_batches(tokens, 5, 16, 10))
    second = list(iter_eval_batches(tokens, 5, 16, 10))

    assert len(first) == len(second) == 10
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)


def test_eval_batches_validate_on_call() -> None:
    # The error comes before iteration starts.
    with pytest.raises(DataError, match="max_batches"):
        iter_eval_batches(torch.arange(100), 2, 4, max_batches=0)

    with pytest.raises(DataError, match="too few"):
        iter_eval_batches(torch.arange(4), 2, 4, max_batches=1)


# encode_text and decode_tokens


def test_encode_decode_round_trip() -> None:
    text = "naïve café, 東京 ✓"

    tokens = encode_text(text)

    assert tokens.dtype == torch.int64
    assert bytes(tokens.tolist()) == text.encode("utf-8")
    assert decode_tokens(tokens) == text


def test_decode_replaces_invalid_utf8() -> None:
    assert decode_tokens([104, 105, 0xFF]) == "hi\ufffd"


def test_decode_rejects_non_byte_ids() -> None:
    with pytest.raises(DataError, match="invalid byte token id 300"):
        decode_tokens(torch.tensor([65, 300]))
