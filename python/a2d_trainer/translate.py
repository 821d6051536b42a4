"""Greedy and beam-search decoding for ``Seq2SeqTransformer``.

Both decoders encode the source once and re-run the decoder over the whole prefix at
every step (no key/value cache): simple, exactly the training computation, and cheap
enough at the sentence lengths of the corpora here. Output lengths are capped per
sentence at ``max_len_a * source_length + max_len_b`` tokens, where EOS is forced.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .model import Seq2SeqTransformer


def _length_limits(src_padding_mask: torch.Tensor, max_len_a: float, max_len_b: int) -> List[int]:
    src_lengths = (~src_padding_mask).sum(1).tolist()
    return [max(1, int(max_len_a * n + max_len_b)) for n in src_lengths]


def _next_token_logprobs(model: Seq2SeqTransformer, tokens, memory, src_padding_mask) -> torch.Tensor:
    """fp32 log-probabilities of the next token; only the last position is projected
    onto the vocabulary (the projection dominates the decoder's cost)."""
    states, _ = model.decoder_states(tokens, memory, src_padding_mask)
    return torch.log_softmax(model.output_logits(states[:, -1]).float(), dim=-1)


def _forbid_specials(lprobs: torch.Tensor, pad_id: int, bos_id: int) -> None:
    lprobs[:, pad_id] = float("-inf")
    if bos_id != pad_id:
        lprobs[:, bos_id] = float("-inf")


@torch.no_grad()
def greedy_search(model: Seq2SeqTransformer, src: torch.Tensor, src_padding_mask: torch.Tensor,
                  bos_id: int, eos_id: int, pad_id: int, max_len_a: float = 1.5,
                  max_len_b: int = 10) -> List[List[int]]:
    """Token ids of the argmax translation of each source row (no BOS/EOS)."""
    limits = torch.tensor(_length_limits(src_padding_mask, max_len_a, max_len_b), device=src.device)
    memory, _ = model.encode(src, src_padding_mask)
    b = src.size(0)
    tokens = torch.full((b, 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    for step in range(int(limits.max())):
        lprobs = _next_token_logprobs(model, tokens, memory, src_padding_mask)
        _forbid_specials(lprobs, pad_id, bos_id)
        nxt = lprobs.argmax(-1)
        nxt = torch.where(step + 1 >= limits, torch.full_like(nxt, eos_id), nxt)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    out = []
    for row in tokens[:, 1:].tolist():
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src: torch.Tensor, src_padding_mask: torch.Tensor,
                bos_id: int, eos_id: int, pad_id: int, beam: int = 5, length_penalty: float = 1.0,
                max_len_a: float = 1.5, max_len_b: int = 10) -> List[List[int]]:
    """Beam search; finished hypotheses are ranked by ``log p / length**length_penalty``
    (length counts the EOS), and a sentence stops once it has ``beam`` of them."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    device = src.device
    b = src.size(0)
    limits = _length_limits(src_padding_mask, max_len_a, max_len_b)
    memory, _ = model.encode(src, src_padding_mask)
    memory = memory.repeat_interleave(beam, dim=0)
    mask = src_padding_mask.repeat_interleave(beam, dim=0)
    tokens = torch.full((b * beam, 1), bos_id, dtype=torch.long, device=device)
    # Only the first beam of each sentence is alive at step 0 (all beams are equal).
    scores = torch.full((b, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: List[List[tuple]] = [[] for _ in range(b)]
    active = [True] * b
    for step in range(max(limits)):
        lprobs = _next_token_logprobs(model, tokens, memory, mask)
        _forbid_specials(lprobs, pad_id, bos_id)
        vocab = lprobs.size(-1)
        for i, limit in enumerate(limits):
            if step + 1 >= limit:  # force EOS at the length limit
                rows = lprobs[i * beam:(i + 1) * beam]
                eos = rows[:, eos_id].clone()
                rows.fill_(float("-inf"))
                rows[:, eos_id] = eos
        cand = (scores.view(-1, 1) + lprobs).view(b, beam * vocab)
        top_scores, top_idx = cand.topk(min(2 * beam, beam * vocab), dim=1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        new_rows, new_tokens, new_scores = [], [], []
        prefix = tokens.tolist()
        for i in range(b):
            keep = []
            for rank, (score, idx) in enumerate(zip(top_scores[i], top_idx[i])):
                if score == float("-inf"):
                    break
                origin, tok = divmod(idx, vocab)
                row = i * beam + origin
                if tok == eos_id:
                    # Only an EOS among the best `beam` candidates ends a hypothesis (as in
                    # fairseq): so beam=1 is exactly greedy search.
                    if rank < beam and active[i] and len(finished[i]) < beam:
                        hyp = prefix[row][1:]
                        finished[i].append((score / (len(hyp) + 1) ** length_penalty, hyp))
                elif len(keep) < beam:
                    keep.append((row, tok, score))
                if len(keep) == beam:
                    break
            if len(finished[i]) >= beam or not keep:
                active[i] = False
            while len(keep) < beam:  # dead slots: keep shapes, never extended
                keep.append((i * beam, pad_id, float("-inf")))
            for row, tok, score in keep:
                new_rows.append(row)
                new_tokens.append(tok)
                new_scores.append(score if active[i] else float("-inf"))
        if not any(active):
            break
        rows = torch.tensor(new_rows, device=device)
        tokens = torch.cat([tokens[rows], torch.tensor(new_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device).view(b, beam)
    results = []
    for i in range(b):
        if finished[i]:
            results.append(max(finished[i], key=lambda h: h[0])[1])
        else:  # cannot happen with EOS forced at the limit; keep the best live prefix
            results.append([t for t in tokens[i * beam, 1:].tolist() if t != pad_id])
    return results


def read_sentences(path) -> List[str]:
    """Lines of a UTF-8 file to translate (empty lines kept: they translate to empty lines);
    an error names ``file:line`` for bad bytes."""
    from .corpus import read_lines

    return read_lines(path, "input", allow_empty=True)


def translate_sentences(model: Seq2SeqTransformer, tokenizer, sentences: Sequence[str], beam: int = 1,
                        batch_size: int = 64, length_penalty: float = 1.0, max_len_a: float = 1.5,
                        max_len_b: int = 10, device=None) -> List[str]:
    """Detokenized translations of ``sentences`` (in input order); ``beam == 1`` is greedy.

    Sources are turned into tensors by the data layer's ``collate`` so they carry the
    exact special tokens the model was trained with.
    """
    from .data import collate

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = [tokenizer.encode(s) for s in sentences]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: List[str] = [""] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([(encoded[i], []) for i in idx], tokenizer.pad_id, tokenizer.bos_id,
                            tokenizer.eos_id).to(device)
            common = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                          max_len_a=max_len_a, max_len_b=max_len_b)
            if beam == 1:
                hyps = greedy_search(model, batch.src, batch.src_padding_mask, **common)
            else:
                hyps = beam_search(model, batch.src, batch.src_padding_mask, beam=beam,
                                   length_penalty=length_penalty, **common)
            for i, hyp in zip(idx, hyps):
                out[i] = tokenizer.decode(hyp)
    finally:
        model.train(was_training)
    return out
