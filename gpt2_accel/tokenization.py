"""Tokenizers: GPT-2's BPE offline from the bundled files, character level, or any Hugging Face tokenizer.

Every tokenizer is wrapped in :class:`Tokenizer`, which gives the data pipeline fast batch encoding and gives the
run directory standard tokenizer files (``save_pretrained``) so ``AutoTokenizer.from_pretrained(run_dir)`` works.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
GPT2_BPE_DIR = ASSETS / "gpt2_bpe"
EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
# The pre-tokenisation regex of OpenAI's GPT-2 encoder (openai/gpt-2, src/encoder.py); tiktoken uses the same one.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """A tokenizer with the small interface the toolkit needs.

    ``encode_batch`` is the hot path of the data pipeline: for GPT-2's BPE it runs tiktoken's Rust encoder, which
    releases the GIL and uses several threads.
    """

    def __init__(self, name: str, hf_tokenizer, tiktoken_encoding=None):
        self.name = name
        self.hf = hf_tokenizer  # a transformers PreTrainedTokenizerFast; written into run directories
        self._tt = tiktoken_encoding
        eot = hf_tokenizer.eos_token_id
        if eot is None:
            raise ValueError(
                f"tokenizer {name!r} has no end-of-text (eos) token; documents are separated by it when packing. "
                "Pick a tokenizer with an eos_token or set one (tokenizer.eos_token = ...) and save it to a directory"
            )
        self.eot_token_id: int = int(eot)
        self.vocab_size: int = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings are treated as plain text)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tt is not None:
            return self._tt.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self._tt is not None:
            return self._tt.decode(list(ids))
        return self.hf.decode(ids)

    def save_pretrained(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        save_tokenizer(self.hf, directory, model_max_length)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eot={self.eot_token_id})"


def save_tokenizer(hf_tokenizer, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
    """``hf_tokenizer.save_pretrained(directory)``; ``model_max_length`` (the model's n_positions) replaces the
    tokenizer's own default in tokenizer_config.json (1024 for GPT-2's BPE), so transformers truncates at the
    model's context."""
    hf_tokenizer.save_pretrained(directory)
    path = Path(directory) / "tokenizer_config.json"
    if model_max_length is not None and path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["model_max_length"] = int(model_max_length)
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _gpt2_byte_ranks() -> dict[bytes, int]:
    """GPT-2's token bytes -> id, read from the bundled encoder.json (GPT-2's ids are its BPE merge ranks).

    encoder.json spells each token's bytes as text: a byte that prints (other than space) as its own character,
    every other byte, in increasing order, as chr(256 + k) (OpenAI's gpt-2 encoder.py, ``bytes_to_unicode``).
    Read here rather than with tiktoken.load, whose local-file reader needs ``blobfile`` in older releases (0.7-0.9
    checked), which our declared lower bound allows."""
    shown = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    to_byte = {chr(b): b for b in shown}
    to_byte.update({chr(256 + k): b for k, b in enumerate(b for b in range(256) if b not in shown)})
    with open(GPT2_BPE_DIR / "encoder.json", encoding="utf-8") as f:
        vocab = json.load(f)
    return {bytes(to_byte[c] for c in text): i for text, i in vocab.items() if text != EOT}


@cache
def _gpt2_tiktoken():
    import tiktoken

    ranks = _gpt2_byte_ranks()
    return tiktoken.Encoding(
        name="gpt2_bundled", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: GPT2_EOT_ID}
    )


def _gpt2_hf():
    import json

    from transformers import GPT2TokenizerFast

    with open(GPT2_BPE_DIR / "encoder.json", encoding="utf-8") as f:
        vocab = json.load(f)
    with open(GPT2_BPE_DIR / "vocab.bpe", encoding="utf-8") as f:
        merges = [
            tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()
        ]  # line 0 is a version tag
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=EOT, bos_token=EOT, eos_token=EOT)
    tok.model_max_length = 1024
    # transformers 5 silently builds an EMPTY tokenizer from some argument spellings; never ship one.
    assert len(tok) == 50257, f"bundled GPT-2 tokenizer has {len(tok)} tokens, expected 50257"
    return tok


def _char_hf():
    """Character level, as UTF-8 bytes: 256 byte ids plus ``<|endoftext|>`` = 256 (vocab 257).

    nanoGPT's shakespeare_char builds a vocabulary of the characters it sees (65 for Shakespeare); a fixed
    byte vocabulary needs no pass over the data, works when streaming, and equals characters on ASCII text.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = (
        pre_tokenizers.ByteLevel.alphabet()
    )  # the 256 printable stand-ins for bytes (GPT-2 byte-level)
    byte_chars = sorted(byte_chars, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([EOT])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOT, bos_token=EOT, unk_token=EOT)
    assert len(tok) == 257 and tok.eos_token_id == 256
    return tok


@cache
def _byte_table() -> dict[str, int]:
    # GPT-2's reversible byte -> printable-unicode map (openai/gpt-2 encoder.py, bytes_to_unicode), inverted.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _byte_of(ch: str) -> int:
    return _byte_table()[ch]


@cache
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """Return the tokenizer named ``name``.

    - ``"gpt2"``: OpenAI's GPT-2 BPE from the files bundled in the package (no network).
    - ``"char"``: character level (UTF-8 bytes, vocabulary 257 with ``<|endoftext|>`` = 256).
    - anything else: ``transformers.AutoTokenizer.from_pretrained(name)``: a Hub id or a local directory, e.g.
      a run directory of this toolkit.
    """
    if name == "gpt2":
        return Tokenizer("gpt2", _gpt2_hf(), _gpt2_tiktoken())
    if name == "char":
        return Tokenizer("char", _char_hf())
    from transformers import AutoTokenizer

    path = Path(name)
    if (
        path.exists()
        and not (path / "tokenizer.json").exists()
        and not (path / "tokenizer_config.json").exists()
    ):
        raise FileNotFoundError(
            f"tokenizer_name={name!r} is a directory without tokenizer files (tokenizer.json); "
            "use 'gpt2', 'char', a Hub id, or a directory written by save_pretrained"
        )
    try:
        hf = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise OSError(
            f"could not load tokenizer {name!r} ({e.__class__.__name__}). Offline, use 'gpt2' (bundled BPE), 'char', "
            "or a local directory with tokenizer files"
        ) from e
    if _is_gpt2_vocab(hf):  # same vocabulary as GPT-2: keep the fast tiktoken path
        return Tokenizer(name, hf, _gpt2_tiktoken())
    return Tokenizer(name, hf)


def _is_gpt2_vocab(hf) -> bool:
    if len(hf) != 50257 or hf.eos_token_id != GPT2_EOT_ID:
        return False
    probe = "Hello world, it's 2024!\n  indented"
    return hf(probe, add_special_tokens=False)["input_ids"] == _gpt2_tiktoken().encode_ordinary(probe)
