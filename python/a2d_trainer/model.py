"""A post-norm Transformer encoder-decoder that can hand back its attention maps.

The architecture is fairseq's ``transformer`` baseline as the A2D release trains it:
post-norm residual blocks (``x = LayerNorm(x + Dropout(sublayer(x)))``), sinusoidal
positions, embeddings scaled by ``sqrt(d_model)``, and one shared vocabulary whose
embedding matrix is tied three ways (encoder input, decoder input, output projection).

Every attention layer computes its probabilities explicitly (``softmax(QK^T/sqrt(d) +
mask)``) so that, when asked, it can return them as the ``(B, H, T, K)`` maps that
``a2d_kernels`` distills. The same code path runs with and without ``need_attn``: the
maps a test inspects are the ones the model trains with.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

AttentionMaps = Dict[str, List[torch.Tensor]]


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
    """Multi-head attention with explicit probabilities.

    ``forward(query (B,T,D), key_value (B,K,D), key_padding_mask (B,K) True=pad,
    causal)`` returns ``(output (B,T,D), probs (B,H,T,K) or None)``; the probabilities
    are those before attention dropout (what the release distills).
    """

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.scale = self.head_dim ** -0.5
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

    def scores(self, query: torch.Tensor, key_value: torch.Tensor,
               key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """Masked logits ``QK^T * scale`` of shape (B, H, T, K); masked entries are -inf."""
        q = self._split(self.q_proj(query)) * self.scale
        k = self._split(self.k_proj(key_value))
        scores = q @ k.transpose(-1, -2)
        if causal:
            t, kk = scores.shape[-2:]
            future = torch.ones(t, kk, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return scores

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                need_probs: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        scores = self.scores(query, key_value, key_padding_mask, causal)
        # Low-precision scores (bf16 autocast) get an fp32 softmax; the maps keep the scores' dtype.
        acc = torch.float32 if scores.element_size() < 4 else scores.dtype
        probs = torch.softmax(scores, dim=-1, dtype=acc).to(scores.dtype)
        v = self._split(self.v_proj(key_value))
        out = self.dropout(probs) @ v
        b, _, t, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return out, (probs if need_probs else None)


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
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn, cfg.activation_dropout)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask, need_attn):
        h, probs = self.self_attn(x, x, padding_mask, need_probs=need_attn)
        x = self.self_attn_norm(x + self.dropout(h))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x, probs


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

    def forward(self, x, memory, tgt_padding_mask, src_padding_mask, need_attn):
        h, self_probs = self.self_attn(x, x, tgt_padding_mask, causal=True, need_probs=need_attn)
        x = self.self_attn_norm(x + self.dropout(h))
        h, cross_probs = self.cross_attn(x, memory, src_padding_mask, need_probs=need_attn)
        x = self.cross_attn_norm(x + self.dropout(h))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x, self_probs, cross_probs


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder over one shared vocabulary.

    ``forward(src (B,S), tgt_in (B,T), src_padding_mask, tgt_padding_mask, need_attn)``
    returns ``(logits (B,T,V), attn)``; ``attn`` is None unless ``need_attn``, then
    ``{"encoder": [...], "decoder_self": [...], "decoder_cross": [...]}`` with one
    ``(B, H, T, K)`` probability map per layer.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, pad_id: Optional[int] = None) -> None:
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

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.embed_scale
        positions = sinusoidal_positions(tokens.size(1), self.config.d_model, tokens.device, x.dtype)
        return self.dropout(x + positions)

    def encode(self, src: torch.Tensor, src_padding_mask: Optional[torch.Tensor] = None,
               need_attn: bool = False) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
        x = self._embed(src)
        maps = []
        for layer in self.encoder_layers:
            x, probs = layer(x, src_padding_mask, need_attn)
            maps.append(probs)
        return x, (maps if need_attn else None)

    def decoder_states(self, tgt_in: torch.Tensor, memory: torch.Tensor,
                       src_padding_mask: Optional[torch.Tensor] = None,
                       tgt_padding_mask: Optional[torch.Tensor] = None,
                       need_attn: bool = False) -> Tuple[torch.Tensor, Optional[AttentionMaps]]:
        """The decoder's last hidden states (B, T, D), before the output projection."""
        x = self._embed(tgt_in)
        self_maps, cross_maps = [], []
        for layer in self.decoder_layers:
            x, self_probs, cross_probs = layer(x, memory, tgt_padding_mask, src_padding_mask, need_attn)
            self_maps.append(self_probs)
            cross_maps.append(cross_probs)
        maps = {"decoder_self": self_maps, "decoder_cross": cross_maps} if need_attn else None
        return x, maps

    def output_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of decoder states: the tied output projection."""
        return F.linear(states, self.embed.weight)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor,
               src_padding_mask: Optional[torch.Tensor] = None,
               tgt_padding_mask: Optional[torch.Tensor] = None,
               need_attn: bool = False) -> Tuple[torch.Tensor, Optional[AttentionMaps]]:
        states, maps = self.decoder_states(tgt_in, memory, src_padding_mask, tgt_padding_mask, need_attn)
        return self.output_logits(states), maps

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                src_padding_mask: Optional[torch.Tensor] = None,
                tgt_padding_mask: Optional[torch.Tensor] = None,
                need_attn: bool = False) -> Tuple[torch.Tensor, Optional[AttentionMaps]]:
        memory, enc_maps = self.encode(src, src_padding_mask, need_attn)
        logits, dec_maps = self.decode(tgt_in, memory, src_padding_mask, tgt_padding_mask, need_attn)
        if not need_attn:
            return logits, None
        return logits, {"encoder": enc_maps, **dec_maps}


def build_model(preset_or_config: Union[str, ModelConfig], vocab_size: int,
                pad_id: Optional[int] = None) -> Seq2SeqTransformer:
    """A fresh model from a preset name (see ``PRESETS``) or a ``ModelConfig``."""
    return Seq2SeqTransformer(resolve_config(preset_or_config), vocab_size, pad_id=pad_id)
