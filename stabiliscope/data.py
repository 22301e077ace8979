"""Token corpora and batch sampling for the training runs.

A `Corpus` is a stream of int64 token ids split into a training part and a
validation part. Text sources (the built-in corpus, a text file or a folder of
files) are tokenized at the byte level, so the vocabulary is always the 256
byte values and no tokenizer is needed. Text may use any 8-bit encoding and
need not be valid UTF-8, but a text file that contains a NUL byte is taken
for binary data (a checkpoint, an archive, UTF-16 text) and rejected. A
nanoGPT-style `.bin` file already contains token ids as little-endian uint16
values and keeps them as they are.

The split is deterministic: the last `val_fraction` of the stream is the
validation part. `sample_batch` draws random training windows from a CPU
`torch.Generator`, so a given seed yields the same batches on every device.
`iter_eval_batches` walks consecutive windows for the validation loss.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stabiliscope.errors import DataError

logger = logging.getLogger(__name__)

BYTE_VOCAB_SIZE = 256

BUILTIN_CORPUS_NAME = "builtin:pydoc_data.topics"

_BIN_SUFFIX = ".bin"
_ACCEPTED_PATHS = (
    "a text file, a folder of text files or a .bin file of uint16 token ids"
)
_ACCEPTED_TEXT = (
    "text without NUL bytes (UTF-8 or another 8-bit encoding), or a .bin file of uint16 token ids"
)


@dataclass(frozen=True)
class Corpus:
    """A token stream split into training and validation parts.

    The dataclass is frozen, but the tensors themselves are mutable. Callers
    must treat them as read-only because `train` and `val` are views of one
    shared tensor.
    """

    name: str
    """Source label: `"builtin:pydoc_data.topics"` or the data path as passed."""

    train: torch.Tensor
    """1-D int64 token ids for training."""

    val: torch.Tensor
    """1-D int64 token ids for the validation loss."""

    vocab_size: int
    """Vocabulary size: 256 for byte-level text, the maximum token id + 1 for `.bin`."""


def encode_text(text: str) -> torch.Tensor:
    """Encode `text` as UTF-8 and return the bytes as int64 token ids 0..255."""
    return _bytes_to_tokens(text.encode("utf-8"))


def decode_tokens(tokens: torch.Tensor | Iterable[int]) -> str:
    """Decode byte token ids to text, replacing invalid UTF-8 with U+FFFD.

    Raises DataError when an id is outside the byte range 0..255.
    """
    if isinstance(tokens, torch.Tensor):
        values = tokens.detach().cpu().reshape(-1).tolist()
    else:
        values = [int(token) for token in tokens]

    out_of_range = [value for value in values if not 0 <= value < BYTE_VOCAB_SIZE]
    if out_of_range:
        raise DataError(
            f"invalid byte token id {out_of_range[0]}: text decoding expects "
            f"ids in 0..{BYTE_VOCAB_SIZE - 1}"
        )
    return bytes(values).decode("utf-8", errors="replace")


def builtin_corpus(val_fraction: float = 0.1) -> Corpus:
    """Build the corpus of CPython's reference documentation topics.

    The text comes from `pydoc_data.topics`, which CPython installs with the
    standard library, so nothing is downloaded. It is about 465,000 characters
    of English prose with code examples in Python 3.11.7. Its exact content
    differs between Python versions. Each call returns new tensors, so callers
    cannot change the cached text.
    """
    _validate_val_fraction(val_fraction)
    tokens = _bytes_to_tokens(_builtin_corpus_bytes())
    return _split_corpus(BUILTIN_CORPUS_NAME, tokens, BYTE_VOCAB_SIZE, val_fraction)


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
) -> Corpus:
    """Load and split the corpus at `path`, or the built-in corpus when it is None.

    A path with the suffix `.bin` is read as little-endian uint16 token ids.
    Any other file is read as raw bytes, which need not be valid UTF-8. A folder
    contributes every file below it, joined by a newline byte. Raises DataError
    when the path is missing, empty, unreadable or of an unsupported kind, when
    a text file contains a NUL byte, and when `val_fraction` is outside (0, 0.5].
    """
    _validate_val_fraction(val_fraction)
    if path is None:
        return builtin_corpus(val_fraction)

    name = os.fspath(path)
    if name == "":
        raise DataError(f"data path is an empty string; pass {_ACCEPTED_PATHS}")
    data_path = Path(name)

    if not data_path.exists():
        raise DataError(f"data path {name!r} not found; pass {_ACCEPTED_PATHS}")
    if data_path.is_dir():
        tokens = _bytes_to_tokens(_read_folder_bytes(data_path, name))
        vocab_size = BYTE_VOCAB_SIZE
    elif not data_path.is_file():
        raise DataError(
            f"data path {name!r} is neither a regular file nor a folder; "
            f"pass {_ACCEPTED_PATHS}"
        )
    elif data_path.suffix.lower() == _BIN_SUFFIX:
        tokens = _read_bin_tokens(data_path, name)
        vocab_size = int(tokens.max().item()) + 1 if tokens.numel() else 0
    else:
        tokens = _bytes_to_tokens(_read_file_bytes(data_path, name))
        vocab_size = BYTE_VOCAB_SIZE

    if tokens.numel() == 0:
        raise DataError(
            f"data path {name!r} contains no tokens; pass a non-empty file or folder"
        )
    return _split_corpus(name, tokens, vocab_size, val_fraction)


def check_sequence_fits(corpus: Corpus, seq_len: int) -> None:
    """Raise DataError unless both splits contain at least `seq_len + 1` tokens.

    One training sequence needs `seq_len` input tokens plus one more token for
    the last shifted target.
    """
    _validate_positive("--seq-len", seq_len)

    needed = seq_len + 1
    train_count = corpus.train.numel()
    val_count = corpus.val.numel()
    if train_count < needed or val_count < needed:
        raise DataError(
            f"data {corpus.name!r} has {train_count} training tokens and "
            f"{val_count} validation tokens; a sequence of --seq-len {seq_len} "
            f"needs at least {needed} in each. Use more data or a smaller --seq-len"
        )


def sample_batch(
    tokens: torch.Tensor,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `batch_size` random windows of `tokens` and return inputs and targets.

    Both tensors have shape `(batch_size, seq_len)` and dtype int64, and
    `y[:, t]` is the token that follows `x[:, t]`. The start offsets are drawn
    uniformly with replacement from `generator`, which must be a CPU generator.
    The same generator state therefore yields the same batch on any `device`.
    """
    _validate_positive("batch_size", batch_size)
    _validate_positive("seq_len", seq_len)
    _validate_token_stream(tokens, seq_len)
    if generator.device.type != "cpu":
        raise DataError(
            f"sample_batch needs a CPU torch.Generator, got one on {generator.device}; "
            "create it with torch.Generator() and pass `device` for the batch instead"
        )

    # Valid starts s satisfy s + seq_len < len(tokens), so the last target exists.
    start_count = tokens.numel() - seq_len
    starts = torch.randint(start_count, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = tokens[starts.to(tokens.device)[:, None] + offsets.to(tokens.device)]

    # One transfer for inputs and targets together, then split on the device.
    windows = _move_to_device(windows, device)
    inputs = windows[:, :-1].contiguous()
    targets = windows[:, 1:].contiguous()
    return inputs, targets


def iter_eval_batches(
    tokens: torch.Tensor,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield consecutive, non-overlapping windows of `tokens` as `(x, y)` batches.

    Window i contains the inputs `tokens[i * seq_len:(i + 1) * seq_len]` and the
    targets shifted by one token, so each token is predicted at most once. The
    windows start at the first token and use no randomness. The iterator yields
    at most `max_batches` batches of `batch_size` windows, and the last batch
    contains fewer when the windows run out. Tokens after the last full window are
    not used. The arguments are checked when this function is called, not on
    the first `next()`.
    """
    _validate_positive("batch_size", batch_size)
    _validate_positive("seq_len", seq_len)
    _validate_positive("max_batches", max_batches)
    _validate_token_stream(tokens, seq_len)

    window_count = min((tokens.numel() - 1) // seq_len, batch_size * max_batches)
    covered = window_count * seq_len
    inputs = tokens[:covered].reshape(window_count, seq_len)
    targets = tokens[1 : covered + 1].reshape(window_count, seq_len)
    logger.debug(
        "evaluating %d windows of %d tokens in batches of %d",
        window_count,
        seq_len,
        batch_size,
    )
    return _generate_eval_batches(inputs, targets, batch_size, device)


def _generate_eval_batches(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    device: str | torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, inputs.shape[0], batch_size):
        stop = start + batch_size
        yield (
            _move_to_device(inputs[start:stop], device),
            _move_to_device(targets[start:stop], device),
        )


def _move_to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Copy `tensor` to `device`, asynchronously from pinned memory for CUDA."""
    target = torch.device(device)
    if target.type != "cuda":
        return tensor.to(target)

    # NOTE: the CPU-only tests do not run this CUDA branch.
    if tensor.device.type == "cpu":
        # PyTorch's caching host allocator records the async copy and does not reuse
        # the pinned buffer before it ends (ATen/cuda/CachingHostAllocator.h).
        tensor = tensor.pin_memory()
    return tensor.to(target, non_blocking=True)


def _validate_val_fraction(val_fraction: float) -> None:
    is_number = isinstance(val_fraction, numbers.Real) and not isinstance(
        val_fraction, bool
    )
    if not is_number or not 0 < val_fraction <= 0.5:
        raise DataError(
            f"invalid validation fraction {val_fraction!r}; "
            "expected a number greater than 0 and at most 0.5"
        )


def _validate_positive(option: str, value: int) -> None:
    is_integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_integer or value < 1:
        raise DataError(f"{option} must be an integer of at least 1, got {value!r}")


def _validate_token_stream(tokens: torch.Tensor, seq_len: int) -> None:
    if tokens.dim() != 1:
        raise DataError(
            f"expected a 1-D tensor of token ids, got shape {tuple(tokens.shape)}"
        )
    if tokens.numel() < seq_len + 1:
        raise DataError(
            f"{tokens.numel()} tokens are too few for seq_len {seq_len}; "
            f"a sequence needs at least {seq_len + 1}"
        )


def _split_corpus(
    name: str,
    tokens: torch.Tensor,
    vocab_size: int,
    val_fraction: float,
) -> Corpus:
    """Split off the last `val_fraction` of `tokens`, rounded down, as validation."""
    total = tokens.numel()
    val_count = math.floor(total * val_fraction)
    train_count = total - val_count
    logger.debug(
        "corpus %s: %d tokens, %d training, %d validation, vocabulary %d",
        name,
        total,
        train_count,
        val_count,
        vocab_size,
    )
    return Corpus(
        name=name,
        train=tokens[:train_count],
        val=tokens[train_count:],
        vocab_size=vocab_size,
    )


def _bytes_to_tokens(data: bytes) -> torch.Tensor:
    # astype copies, so the tensor owns writable memory separate from `data`.
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


@functools.lru_cache(maxsize=1)
def _builtin_corpus_bytes() -> bytes:
    """Return the pydoc topics in sorted key order, separated by a blank line."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise DataError(
            "the built-in corpus needs the standard module pydoc_data.topics, "
            f"which this Python installation lacks ({error}); pass a data path instead"
        ) from error

    text = "\n\n".join(topics[key].rstrip("\n") for key in sorted(topics))
    return text.encode("utf-8")


def _read_file_bytes(path: Path, name: str) -> bytes:
    """Read a text file's bytes; raise DataError when it is unreadable or contains a NUL byte."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"failed to read data file {name!r}: {error.strerror}"
        ) from error

    # Text in any 8-bit encoding has no NUL bytes, whereas checkpoints,
    # archives, images and UTF-16 text almost always do.
    nul_offset = data.find(b"\x00")
    if nul_offset >= 0:
        raise DataError(
            f"data file {str(path)!r} looks binary (a NUL byte at offset {nul_offset}); "
            f"expected {_ACCEPTED_TEXT}"
        )
    return data


def _read_bin_tokens(path: Path, name: str) -> torch.Tensor:
    """Read a `.bin` file of little-endian uint16 token ids as int64 tokens."""
    try:
        byte_count = path.stat().st_size
        if byte_count % 2 != 0:
            raise DataError(
                f"data file {name!r} has {byte_count} bytes, but a .bin file of "
                "uint16 token ids needs an even byte count; check that it was "
                "written as uint16"
            )
        # NOTE: the whole file is held in memory as int64, 4 times its size on disk.
        ids = np.fromfile(path, dtype="<u2")
    except OSError as error:
        raise DataError(
            f"failed to read data file {name!r}: {error.strerror}"
        ) from error
    return torch.from_numpy(ids.astype(np.int64))


def _read_folder_bytes(folder: Path, name: str) -> bytes:
    """Concatenate the files below `folder`, joined by a newline byte.

    Files are ordered by their relative path, compared one component at a
    time. Names that start with "." are skipped, both files and folders.
    Symbolic links to files are read, but links to folders are not followed,
    which rules out cycles.
    """
    files = _list_folder_files(folder)
    if not files:
        raise DataError(
            f"data folder {name!r} contains no files (names starting with '.' "
            f"are skipped); pass {_ACCEPTED_PATHS}"
        )

    bin_files = [
        relative for relative in files if relative.suffix.lower() == _BIN_SUFFIX
    ]
    if bin_files:
        logger.warning(
            "data folder %s contains %d .bin files (first: %s); they are read as raw "
            "bytes, not as uint16 token ids. Pass a .bin file itself to load token ids",
            name,
            len(bin_files),
            bin_files[0],
        )

    contents = [_read_file_bytes(folder / relative, name) for relative in files]
    logger.debug("data folder %s: %d files", name, len(files))
    return b"\n".join(contents)


def _list_folder_files(folder: Path) -> list[Path]:
    """Return the relative paths of the non-hidden files below `folder`, sorted."""
    def raise_data_error(error: OSError) -> None:
        raise DataError(
            f"failed to read data folder {error.filename!r}: {error.strerror}"
        ) from error

    files = []
    walk = os.walk(folder, onerror=raise_data_error)
    for directory, subdirectories, filenames in walk:
        # Pruning in place stops os.walk from descending into hidden folders.
        subdirectories[:] = [
            entry for entry in subdirectories if not entry.startswith(".")
        ]
        for filename in filenames:
            file_path = Path(directory, filename)
            if filename.startswith(".") or not file_path.is_file():
                continue
            files.append(file_path.relative_to(folder))
    return sorted(files, key=lambda relative: relative.parts)
