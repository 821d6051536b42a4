"""Subword tokenization and token-budget batching for the trainer.

Conventions the model, the training loop and the translator rely on:

* One sentencepiece model is shared by source and target (the decoder ties its input and output
  embeddings, and one vocabulary keeps copied identifiers and numbers aligned). Special ids are
  fixed: ``PAD_ID=0, UNK_ID=1, BOS_ID=2, EOS_ID=3``.
* A pair ``(x, y)`` of subword ids becomes ``src = x + [EOS]``, ``tgt_in = [BOS] + y`` and
  ``tgt_out = y + [EOS]`` (the fairseq layout: the source ends with EOS, the decoder reads
  BOS + y and predicts y + EOS). ``max_len`` bounds these model-side lengths, so x and y are cut
  to ``max_len - 1`` ids.
* Masks are True at padding, like ``torch.nn.MultiheadAttention``'s ``key_padding_mask``.
"""
from __future__ import annotations

import dataclasses
import io
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .atomic import atomic_path

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "Batch",
    "Tokenizer",
    "batches_by_tokens",
    "collate",
    "encode_pairs",
]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """A trained sentencepiece model: ``encode(str) -> ids`` and ``decode(ids) -> str``,
    without special tokens (``collate`` adds BOS/EOS)."""

    def __init__(self, processor, model_path: str | os.PathLike):
        self._sp = processor
        self.model_path = Path(model_path)
        self.pad_id, self.unk_id = processor.pad_id(), processor.unk_id()
        self.bos_id, self.eos_id = processor.bos_id(), processor.eos_id()
        self.vocab_size = processor.get_piece_size()
        self._special = {self.pad_id, self.bos_id, self.eos_id}

    @classmethod
    def train(cls, texts: Iterable[str], prefix: str | os.PathLike, vocab_size: int, *,
              model_type: str = "unigram", character_coverage: float = 1.0,
              seed: int = 0) -> Tokenizer:
        """Train on ``texts`` (both sides of the train split) and save ``<prefix>.model``.

        Deterministic: one thread, every sentence used (no sampling or shuffling of the input),
        a fixed generator seed and no file paths inside the model, so the same texts give a
        byte-identical model file. ``vocab_size`` is an upper bound (``hard_vocab_limit`` off):
        a tiny corpus gets a smaller vocabulary instead of an error. Full character coverage
        means every character of the train split has a piece (no UNK on train). The ``identity``
        normalisation keeps ``decode(encode(s)) == s`` for text made of known characters (the
        corpus is already whitespace-normalised), so BLEU compares against the exact references.
        """
        import sentencepiece as spm

        if not isinstance(vocab_size, int) or vocab_size < 8:
            raise ValueError(f"vocab_size must be an int >= 8, got {vocab_size!r}")
        sentences = list(texts)
        bad = next((i for i, t in enumerate(sentences) if not isinstance(t, str) or not t.strip()), None)
        if not sentences or bad is not None:
            got = "no texts" if not sentences else f"text {bad} = {sentences[bad]!r}"
            raise ValueError(f"texts must be non-empty strings, got {got}")
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, character_coverage=character_coverage,
                hard_vocab_limit=False, num_threads=1, input_sentence_size=0,
                shuffle_input_sentence=False, normalization_rule_name="identity",
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, minloglevel=2)
        except RuntimeError as err:  # sentencepiece reports bad settings as RuntimeError
            raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}, "
                             f"{len(sentences)} texts): {err}") from None
        path = Path(f"{os.fspath(prefix)}.model")
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.getvalue())
        return cls.load(path)

    @classmethod
    def load(cls, model_path: str | os.PathLike) -> Tokenizer:
        import sentencepiece as spm

        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {model_path}: no such file")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(model_file=str(model_path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"tokenizer model {model_path}: not a sentencepiece model ({err})") from None
        return cls(processor, model_path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def pieces(self) -> tuple[str, ...]:
        """Every piece, by id: two tokenizers with equal pieces map text to the same ids."""
        return tuple(self._sp.id_to_piece(i) for i in range(self.vocab_size))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; PAD/BOS/EOS are dropped (cutting at EOS is the decoder's job)."""
        return self._sp.decode([int(i) for i in ids if int(i) not in self._special])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


@dataclasses.dataclass
class Batch:
    """One padded batch. ``ntokens`` counts the non-pad target tokens (the CE normaliser)."""

    src: torch.Tensor               # (B, S) long, x + EOS
    tgt_in: torch.Tensor            # (B, T) long, BOS + y
    tgt_out: torch.Tensor           # (B, T) long, y + EOS
    src_padding_mask: torch.Tensor  # (B, S) bool, True = padding
    tgt_padding_mask: torch.Tensor  # (B, T) bool, True = padding (same for tgt_in and tgt_out)
    ntokens: int

    @property
    def nsentences(self) -> int:
        return self.src.shape[0]

    def to(self, device, non_blocking: bool = False) -> Batch:
        tensors = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                   for f in dataclasses.fields(self) if f.name != "ntokens"}
        return Batch(**tensors, ntokens=self.ntokens)


def _padded(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    # One tensor() call on padded lists: ~10x faster than filling a tensor row by row.
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = PAD_ID,
            bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> Batch:
    """Pad ``(x, y)`` id pairs into a Batch: src = x + EOS, tgt_in = BOS + y, tgt_out = y + EOS.

    ``y`` may be empty (translation input): tgt_in is then just BOS.
    """
    if not items:
        raise ValueError("items must hold at least one (source_ids, target_ids) pair, got none")
    src = [list(x) + [eos_id] for x, _ in items]
    tgt_in = [[bos_id] + list(y) for _, y in items]
    tgt_out = [list(y) + [eos_id] for _, y in items]
    src_lens = torch.tensor([len(r) for r in src])
    tgt_lens = torch.tensor([len(r) for r in tgt_in])
    positions_s = torch.arange(int(src_lens.max()))
    positions_t = torch.arange(int(tgt_lens.max()))
    return Batch(
        src=_padded(src, pad_id), tgt_in=_padded(tgt_in, pad_id), tgt_out=_padded(tgt_out, pad_id),
        src_padding_mask=positions_s[None, :] >= src_lens[:, None],
        tgt_padding_mask=positions_t[None, :] >= tgt_lens[:, None],
        ntokens=int(tgt_lens.sum()))


def encode_pairs(pairs: Iterable[tuple[str, str]], tokenizer: Tokenizer,
                 max_len: int) -> list[tuple[list[int], list[int]]]:
    """Subword ids of each pair, cut so that src (x + EOS) and tgt (BOS + y) have at most
    ``max_len`` positions."""
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (one id plus BOS/EOS), got {max_len!r}")
    keep = max_len - 1
    return [(tokenizer.encode(src)[:keep], tokenizer.encode(tgt)[:keep]) for src, tgt in pairs]


def _cost(item: tuple[Sequence[int], Sequence[int]]) -> int:
    """Positions the pair occupies: the longer of src (x + EOS) and tgt (BOS + y)."""
    return max(len(item[0]), len(item[1])) + 1


def check_token_budget(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], max_tokens: int,
                       source: str) -> None:
    """Raise naming ``source:line`` for the first pair longer than a ``max_tokens`` batch.

    ``encoded[i]`` is line ``i + 1`` of ``source`` (``encode_pairs`` cuts, never drops), so
    a budget error can point at the sentence instead of an index.
    """
    for number, item in enumerate(encoded, start=1):
        cost = _cost(item)
        if cost > max_tokens:
            raise ValueError(f"{source}:{number}: the pair spans {cost} positions, more than "
                             f"max_tokens={max_tokens}; raise max_tokens or lower max_len")


def batches_by_tokens(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], max_tokens: int,
                      shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1, *,
                      equal_shards: bool = True, pad_id: int = PAD_ID, bos_id: int = BOS_ID,
                      eos_id: int = EOS_ID) -> list[Batch]:
    """Group pairs of similar length into batches of at most ``max_tokens`` padded positions.

    The budget counts padding: a batch of B pairs whose longest side (src or tgt) spans L
    positions costs ``B * L`` (both the (B, S) and the (B, T) tensors fit in it). Pairs are
    sorted by length (ties in a random order when ``shuffle``), filled greedily, and the batch
    order is shuffled; the randomness comes from ``(seed, epoch)`` only, so every epoch is
    reproducible and every rank sees the same global order.

    With ``world_size > 1`` the global batch list is cut to a multiple of ``world_size`` (at
    most ``world_size - 1`` batches dropped per epoch, different ones each shuffled epoch) and
    rank r takes batches r, r + world_size, ...: all ranks get the same number of batches, and
    step i of a DDP run sees global batches ``i*world_size ... i*world_size + world_size - 1``,
    exactly what one process accumulating ``world_size`` batches per step sees.
    ``equal_shards=False`` deals every batch instead (shard sizes may differ by one, a rank may
    get none): for evaluation, where ranks only meet in a final all-reduce and dropping
    sentences would bias the score.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if not encoded:
        raise ValueError("encoded must hold at least one pair, got none")
    costs = [_cost(item) for item in encoded]
    longest = max(range(len(costs)), key=costs.__getitem__)
    if costs[longest] > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} is smaller than pair {longest}, which spans "
                         f"{costs[longest]} positions; raise max_tokens or lower max_len")

    rng = random.Random(f"a2d-batches:{seed}:{epoch}")  # str seeds hash with SHA-512: stable
    order = list(range(len(encoded)))
    if shuffle:
        rng.shuffle(order)  # the stable sort below keeps this order among equal lengths
    order.sort(key=lambda i: (costs[i], len(encoded[i][1]), len(encoded[i][0])))

    groups: list[list[int]] = [[]]
    for i in order:  # ascending cost: the newest item is always the batch's longest
        if groups[-1] and (len(groups[-1]) + 1) * costs[i] > max_tokens:
            groups.append([])
        groups[-1].append(i)
    if shuffle:
        rng.shuffle(groups)

    usable = len(groups) // world_size * world_size if equal_shards else len(groups)
    if usable == 0:
        raise ValueError(f"{len(groups)} batches cannot be shared by world_size={world_size} "
                         f"ranks; lower max_tokens={max_tokens} or use fewer ranks")
    return [collate([encoded[i] for i in group], pad_id, bos_id, eos_id)
            for group in groups[rank:usable:world_size]]
