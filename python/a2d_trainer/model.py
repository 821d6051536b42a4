"""A post-norm Transformer encoder-decoder that can hand back its attention maps
(or, running fused attention, its queries and keys).

The architecture is fairseq's ``transformer`` baseline as the A2D release trains it:
post-norm residual blocks (``x = LayerNorm(x + Dropout(sublayer(x)))``), sinusoidal
positions, embeddings scaled by ``sqrt(d_model)``, and one shared vocabulary whose
embedding matrix is tied three ways (encoder input, decoder input, output projection).

Every attention layer computes its probabilities explicitly (``softmax(QK^T/sqrt(d) +
mask)``) so that, when asked, it can return them as the ``(B, H, T, K)`` maps that
``a2d_kernels`` distills. The same code path runs with and without ``need_attn``: the
maps a test inspects are the ones the model trains with.

Attention implementations (``attn_impl``, a runtime switch that changes no parameter):

* ``"maps"`` (default): the explicit softmax above; ``need_attn=True`` returns the maps.
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (fused on CUDA, no
  map in memory). It cannot return maps; ``need_qk=True`` returns what A2D's QK mode
  (``a2d_kernels.a2d_kl_qk``) takes instead. Same outputs as ``"maps"`` up to float
  rounding; with attention dropout > 0 the two draw different dropout masks.

``need_qk=True`` works under both implementations and returns, per layer, the query and
key ``(B, H, T, d)`` / ``(B, H, K, d)`` after projection and head split and *before* the
softmax scale ``1/sqrt(d)`` (the scale ``a2d_kl_qk`` applies by default): the very
tensors each layer feeds to its softmax.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

AttentionMaps = Dict[str, List[torch.Tensor]]
# Per kind, (per-layer queries, per-layer keys): what ``A2DDistiller.forward_qk`` takes.
AttentionQK = Dict[str, Tuple[List[torch.Tensor], List[torch.Tensor]]]

ATTN_IMPLS = ("maps", "sdpa")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a model. ``heads`` is the head count of every attention layer."""

    encoder_layers: int
    decoder_layers: int
    heads: int
    d_model: int
    ffn: int
    dropout: float = 0.3
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("encoder_layers", "decoder_layers", "heads", "d_model", "ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"ModelConfig.d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.d_model % 2:
            raise ValueError(f"ModelConfig.d_model must be even for sinusoidal positions, got {self.d_model}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**data)

    def architecture(self) -> dict:
        """The fields that decide parameter shapes (dropout does not)."""
        return {k: getattr(self, k) for k in ("encoder_layers", "decoder_layers", "heads", "d_model", "ffn")}

    def heads_per_kind(self) -> Dict[str, List[int]]:
        """Per attention kind, the head count of every layer (what ``A2DDistiller`` takes)."""
        return {"encoder": [self.heads] * self.encoder_layers,
                "decoder_self": [self.heads] * self.decoder_layers,
                "decoder_cross": [self.heads] * self.decoder_layers}


PRESETS: Dict[str, ModelConfig] = {
    # The A2D release (fairseq transformer_iwslt_de_en widths): teacher 6+6, student 3+3.
    "teacher": ModelConfig(encoder_layers=6, decoder_layers=6, heads=4, d_model=512, ffn=1024, dropout=0.3),
    "student": ModelConfig(encoder_layers=3, decoder_layers=3, heads=4, d_model=512, ffn=1024, dropout=0.3),
    # CPU-sized versions with the same 2:1 depth ratio, for the demo and the tests.
    "tiny-teacher": ModelConfig(encoder_layers=4, decoder_layers=4, heads=4, d_model=128, ffn=256, dropout=0.1),
    "tiny-student": ModelConfig(encoder_layers=2, decoder_layers=2, heads=4, d_model=128, ffn=256, dropout=0.1),
    # Smallest sensible shapes, for unit tests and smoke runs (seconds on a CPU).
    "micro-teacher": ModelConfig(encoder_layers=2, decoder_layers=2, heads=2, d_model=32, ffn=64, dropout=0.1),
    "micro-student": ModelConfig(encoder_layers=1, decoder_layers=1, heads=2, d_model=32, ffn=64, dropout=0.1),
}


def resolve_config(preset_or_config: Union[str, ModelConfig]) -> ModelConfig:
    if isinstance(preset_or_config, ModelConfig):
        return preset_or_config
    if preset_or_config not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset_or_config!r}")
    return PRESETS[preset_or_config]


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(length, dim)`` table: sin on the first half of the channels, cos on the second
    (fairseq's layout), wavelengths geometric from 2*pi to 10000*2*pi."""
    half = dim // 2
    step = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -step)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(dtype)


class Attention(nn.Module):
    """Multi-head attention, explicit (``impl="maps"``) or fused (``impl="sdpa"``).

    ``forward(query (B,T,D), key_value (B,K,D), key_padding_mask (B,K) True=pad,
    causal, need_probs, need_qk)`` returns ``(output (B,T,D), record)``: ``record`` is
    the probabilities ``(B,H,T,K)`` before attention dropout (what the release
    distills) when ``need_probs``, the pair ``(q (B,H,T,d), k (B,H,K,d))`` unscaled
    when ``need_qk``, else None.
    """

    def __init__(self, d_model: int, heads: int, dropout: float, impl: str = "maps") -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.scale = self.head_dim ** -0.5
        self.impl = _check_impl(impl)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))  # fairseq's init
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def queries_keys(self, query: torch.Tensor, key_value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q (B,H,T,d)``, ``k (B,H,K,d)``: projected and split, not yet scaled."""
        return self._split(self.q_proj(query)), self._split(self.k_proj(key_value))

    def _masked_scores(self, q, k, key_padding_mask, causal) -> torch.Tensor:
        scores = (q * self.scale) @ k.transpose(-1, -2)
        if causal:
            t, kk = scores.shape[-2:]
            future = torch.ones(t, kk, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return scores

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                need_probs: bool = False, need_qk: bool = False):
        if need_probs and need_qk:
            raise ValueError("Attention: ask for need_probs or need_qk, not both")
        if need_probs and self.impl != "maps":
            raise ValueError(f"Attention: need_probs needs impl='maps' (impl={self.impl!r} computes no "
                             "probabilities); use need_qk for the queries and keys")
        q, k = self.queries_keys(query, key_value)
        v = self._split(self.v_proj(key_value))
        probs = None
        if self.impl == "maps":
            scores = self._masked_scores(q, k, key_padding_mask, causal)
            # Low-precision scores (bf16 autocast) get an fp32 softmax; the maps keep the scores' dtype.
            acc = torch.float32 if scores.element_size() < 4 else scores.dtype
            probs = torch.softmax(scores, dim=-1, dtype=acc).to(scores.dtype)
            out = self.dropout(probs) @ v
        else:
            attn_mask, is_causal = _sdpa_mask(key_padding_mask, causal, q.shape[2], k.shape[2], q.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                dropout_p=self.dropout.p if self.training else 0.0)
        b, _, t, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        if need_probs:
            return out, probs
        return out, ((q, k) if need_qk else None)


def _check_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    return impl


def _sdpa_mask(key_padding_mask: Optional[torch.Tensor], causal: bool, t: int, k: int,
               device) -> Tuple[Optional[torch.Tensor], bool]:
    """``(attn_mask, is_causal)`` for SDPA: the same visibility as ``_masked_scores``.

    Without padding the mask stays implicit (``is_causal`` or nothing), which keeps
    SDPA's fastest kernels eligible; with padding it is a boolean ``(B, 1, T|1, K)``
    mask, True = attend (SDPA takes no ``is_causal`` together with a mask).
    """
    if key_padding_mask is None:
        return None, causal
    visible = ~key_padding_mask[:, None, None, :]
    if causal:
        visible = visible & torch.ones(t, k, dtype=torch.bool, device=device).tril()
    return visible, False


def _record_flags(need: Optional[str]) -> dict:
    """``need`` ("maps", "qk" or None) as :meth:`Attention.forward`'s keyword flags."""
    return {"need_probs": need == "maps", "need_qk": need == "qk"}


def _need(need_attn: bool, need_qk: bool) -> Optional[str]:
    if need_attn and need_qk:
        raise ValueError("ask for need_attn (maps) or need_qk (queries and keys), not both")
    return "maps" if need_attn else "qk" if need_qk else None


def _as_qk(records: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    return [q for q, _ in records], [k for _, k in records]


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn: int, activation_dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn)
        self.fc2 = nn.Linear(ffn, d_model)
        self.dropout = nn.Dropout(activation_dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """``forward`` returns ``(x, record)``: see :class:`Attention` for ``need``'s records."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn, cfg.activation_dropout)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask, need: Optional[str]):
        h, record = self.self_attn(x, x, padding_mask, **_record_flags(need))
        x = self.self_attn_norm(x + self.dropout(h))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x, record


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.cross_attn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn, cfg.activation_dropout)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, memory, tgt_padding_mask, src_padding_mask, need: Optional[str]):
        h, self_record = self.self_attn(x, x, tgt_padding_mask, causal=True, **_record_flags(need))
        x = self.self_attn_norm(x + self.dropout(h))
        h, cross_record = self.cross_attn(x, memory, src_padding_mask, **_record_flags(need))
        x = self.cross_attn_norm(x + self.dropout(h))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x, self_record, cross_record


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder over one shared vocabulary.

    ``forward(src (B,S), tgt_in (B,T), src_padding_mask, tgt_padding_mask, need_attn,
    need_qk)`` returns ``(logits (B,T,V), attn)``; ``attn`` is None unless asked:

    * ``need_attn`` (``attn_impl="maps"`` only): ``{"encoder": [...], "decoder_self":
      [...], "decoder_cross": [...]}`` with one ``(B, H, T, K)`` probability map per layer;
    * ``need_qk`` (either implementation): the same kinds, each a pair ``(queries,
      keys)`` of per-layer lists of unscaled ``(B, H, T, d)`` / ``(B, H, K, d)``
      tensors (softmax scale ``1/sqrt(d)``; decoder self-attention is causal).

    ``attn_impl`` ("maps" or "sdpa", see the module docstring) can be changed at any
    time; it is not part of the parameters or of a checkpoint.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, pad_id: Optional[int] = None,
                 attn_impl: str = "maps") -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size <= 1:
            raise ValueError(f"vocab_size must be an int > 1, got {vocab_size!r}")
        if pad_id is not None and not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be in [0, {vocab_size}), got {pad_id}")
        self.config = config
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, config.d_model, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, mean=0.0, std=config.d_model ** -0.5)
        if pad_id is not None:
            with torch.no_grad():
                self.embed.weight[pad_id].zero_()
        self.embed_scale = math.sqrt(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.attn_impl = attn_impl

    @property
    def attn_impl(self) -> str:
        """``"maps"`` or ``"sdpa"``: how every attention layer computes (see the module docstring)."""
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        self._attn_impl = _check_impl(impl)
        for module in self.modules():
            if isinstance(module, Attention):
                module.impl = impl

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.embed_scale
        positions = sinusoidal_positions(tokens.size(1), self.config.d_model, tokens.device, x.dtype)
        return self.dropout(x + positions)

    def _check_need(self, need_attn: bool, need_qk: bool) -> Optional[str]:
        need = _need(need_attn, need_qk)
        if need == "maps" and self.attn_impl != "maps":
            raise ValueError(f"need_attn needs attn_impl='maps' (attn_impl={self.attn_impl!r} computes no "
                             "attention maps); ask for need_qk instead")
        return need

    def encode(self, src: torch.Tensor, src_padding_mask: Optional[torch.Tensor] = None,
               need_attn: bool = False, need_qk: bool = False):
        """``(memory (B,S,D), records)``: records are per-layer maps (``need_attn``), a
        ``(queries, keys)`` pair of per-layer lists (``need_qk``), or None."""
        need = self._check_need(need_attn, need_qk)
        x = self._embed(src)
        records = []
        for layer in self.encoder_layers:
            x, record = layer(x, src_padding_mask, need)
            records.append(record)
        if need is None:
            return x, None
        return x, (records if need == "maps" else _as_qk(records))

    def decoder_states(self, tgt_in: torch.Tensor, memory: torch.Tensor,
                       src_padding_mask: Optional[torch.Tensor] = None,
                       tgt_padding_mask: Optional[torch.Tensor] = None,
                       need_attn: bool = False, need_qk: bool = False):
        """The decoder's last hidden states (B, T, D), before the output projection."""
        need = self._check_need(need_attn, need_qk)
        x = self._embed(tgt_in)
        self_records, cross_records = [], []
        for layer in self.decoder_layers:
            x, self_record, cross_record = layer(x, memory, tgt_padding_mask, src_padding_mask, need)
            self_records.append(self_record)
            cross_records.append(cross_record)
        if need is None:
            return x, None
        if need == "qk":
            self_records, cross_records = _as_qk(self_records), _as_qk(cross_records)
        return x, {"decoder_self": self_records, "decoder_cross": cross_records}

    def output_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of decoder states: the tied output projection."""
        return F.linear(states, self.embed.weight)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor,
               src_padding_mask: Optional[torch.Tensor] = None,
               tgt_padding_mask: Optional[torch.Tensor] = None,
               need_attn: bool = False, need_qk: bool = False):
        states, records = self.decoder_states(tgt_in, memory, src_padding_mask, tgt_padding_mask,
                                              need_attn, need_qk)
        return self.output_logits(states), records

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                src_padding_mask: Optional[torch.Tensor] = None,
                tgt_padding_mask: Optional[torch.Tensor] = None,
                need_attn: bool = False, need_qk: bool = False
                ) -> Tuple[torch.Tensor, Optional[Union[AttentionMaps, AttentionQK]]]:
        memory, enc = self.encode(src, src_padding_mask, need_attn, need_qk)
        logits, dec = self.decode(tgt_in, memory, src_padding_mask, tgt_padding_mask, need_attn, need_qk)
        if dec is None:
            return logits, None
        return logits, {"encoder": enc, **dec}


def build_model(preset_or_config: Union[str, ModelConfig], vocab_size: int,
                pad_id: Optional[int] = None, attn_impl: str = "maps") -> Seq2SeqTransformer:
    """A fresh model from a preset name (see ``PRESETS``) or a ``ModelConfig``."""
    return Seq2SeqTransformer(resolve_config(preset_or_config), vocab_size, pad_id=pad_id, attn_impl=attn_impl)
