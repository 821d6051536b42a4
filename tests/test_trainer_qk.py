"""QK mode in the trainer: attention layers on ``scaled_dot_product_attention`` and the
A2D term from queries and keys (``A2DDistiller.forward_qk``) give what the map path
gives on the same batch: logits, loss, and gradients into the model and the mixers.

CPU only; the Triton case runs under the interpreter on a very small model.
"""
import dataclasses
import json

import pytest
import torch

from a2d_kernels.distill import A2DDistiller
from a2d_trainer.model import PRESETS, ModelConfig, build_model
from a2d_trainer.objective import DistillationObjective
from test_trainer import make_toy_data, train_config

KINDS = ("encoder", "decoder_self", "decoder_cross")
VOCAB = 40


def _no_dropout(preset):
    """The preset without dropout: both paths then run the very same function."""
    return dataclasses.replace(PRESETS[preset], dropout=0.0)


def _batch(b=3, s=7, t=6, pad=True):
    """Right-padded like the data layer: every row keeps at least one token."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (b, s), generator=g)
    tgt = torch.randint(4, VOCAB, (b, t), generator=g)
    src_mask = torch.zeros(b, s, dtype=torch.bool)
    tgt_mask = torch.zeros(b, t, dtype=torch.bool)
    if pad:
        src_mask[1, 4:] = True
        src_mask[-1, 2:] = True
        tgt_mask[-1, 3:] = True
        tgt_mask[0, t - 1:] = True
    src[src_mask] = 0
    tgt[tgt_mask] = 0
    return src, tgt, src_mask, tgt_mask


def _pair(student="tiny-student", teacher="tiny-teacher", dtype=torch.float64):
    torch.manual_seed(0)
    s_cfg, t_cfg = _no_dropout(student), _no_dropout(teacher)
    return (build_model(s_cfg, VOCAB, pad_id=0).to(dtype), build_model(t_cfg, VOCAB, pad_id=0).to(dtype),
            s_cfg, t_cfg)


def _grads(*modules):
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if p.grad is not None}


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("preset", ["micro-teacher", "tiny-student"])
def test_sdpa_model_matches_the_maps_model(preset):
    """Same parameters, same logits and gradients; the q/k records are the tensors whose
    scaled, masked softmax is the maps path's maps."""
    torch.manual_seed(0)
    model = build_model(_no_dropout(preset), VOCAB, pad_id=0).double()
    src, tgt, src_mask, tgt_mask = _batch()
    w = torch.randn(*tgt.shape, VOCAB, dtype=torch.float64)

    logits_maps, maps = model(src, tgt, src_mask, tgt_mask, need_attn=True)
    (logits_maps * w).sum().backward()
    grads_maps = _grads(model)
    model.zero_grad()
    _, qk_maps = model(src, tgt, src_mask, tgt_mask, need_qk=True)

    model.attn_impl = "sdpa"
    assert all(a.impl == "sdpa" for l in model.encoder_layers for a in [l.self_attn])
    logits_sdpa, qk = model(src, tgt, src_mask, tgt_mask, need_qk=True)
    (logits_sdpa * w).sum().backward()
    grads_sdpa = _grads(model)

    torch.testing.assert_close(logits_sdpa, logits_maps, rtol=0, atol=1e-12)
    assert grads_sdpa.keys() == grads_maps.keys()
    for name in grads_maps:
        torch.testing.assert_close(grads_sdpa[name], grads_maps[name], rtol=0, atol=1e-11, msg=name)

    masks = {"encoder": src_mask, "decoder_self": tgt_mask, "decoder_cross": src_mask}
    d = model.config.d_model // model.config.heads
    for kind in KINDS:
        qs, ks = qk[kind]
        assert len(qs) == len(ks) == len(maps[kind])
        for i, (q, k) in enumerate(zip(qs, ks)):
            torch.testing.assert_close(q, qk_maps[kind][0][i], rtol=0, atol=1e-12)
            torch.testing.assert_close(k, qk_maps[kind][1][i], rtol=0, atol=1e-12)
            assert q.shape == (src.shape[0], model.config.heads, maps[kind][i].shape[2], d)
            scores = (q @ k.transpose(-1, -2)) * d ** -0.5  # the documented scale, applied by the loss
            hidden = masks[kind][:, None, None, :]
            if kind == "decoder_self":
                hidden = hidden | torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
            expected = scores.masked_fill(hidden, float("-inf")).softmax(-1)
            torch.testing.assert_close(maps[kind][i], expected, rtol=0, atol=1e-12)

    # Without padding SDPA runs on is_causal / no mask: still the same logits.
    logits_free, _ = model(src, tgt)
    model.attn_impl = "maps"
    torch.testing.assert_close(logits_free, model(src, tgt)[0], rtol=0, atol=1e-12)


def test_attention_impl_errors():
    model = build_model(_no_dropout("micro-student"), VOCAB, pad_id=0, attn_impl="sdpa")
    src, tgt, src_mask, tgt_mask = _batch()
    with pytest.raises(ValueError, match="need_attn needs attn_impl='maps'"):
        model(src, tgt, src_mask, tgt_mask, need_attn=True)
    with pytest.raises(ValueError, match="not both"):
        model(src, tgt, need_attn=True, need_qk=True)
    with pytest.raises(ValueError, match=r"attn_impl must be one of \('maps', 'sdpa'\), got 'flash'"):
        model.attn_impl = "flash"


# ----------------------------------------------------------------------------- objective


def _objective_pair(s_cfg, t_cfg, backend="reference", normalize="map", qk=False, seed=1):
    torch.manual_seed(seed)  # same mixer initialization for both paths
    distiller = A2DDistiller(s_cfg.heads_per_kind(), t_cfg.heads_per_kind(), kinds=KINDS, beta=1.0,
                             decay=0.9, normalize=normalize, backend=backend)
    return DistillationObjective("a2d", alpha=0.5, label_smoothing=0.1, distiller=distiller, a2d_mask=True,
                                 a2d_qk=qk)


def _step(student, teacher, objective, batch, dtype):
    """One training step's loss and gradients, the way ``train._StudentStep`` runs it."""
    src, tgt, src_mask, tgt_mask = batch
    objective.to(dtype)
    student.attn_impl = teacher.attn_impl = objective.attention_impl
    student.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_logits, t_attn = teacher(src, tgt, src_mask, tgt_mask, **objective.attention_request())
    s_logits, s_attn = student(src, tgt, src_mask, tgt_mask, **objective.attention_request())
    ntok = int((~tgt_mask).sum())
    out = objective(s_logits, tgt, tgt_mask, ntok, src_padding_mask=src_mask, student_attn=s_attn,
                    teacher_logits=t_logits, teacher_attn=t_attn, epoch=2)
    out.loss.backward()
    return out, _grads(student, objective)


@pytest.mark.parametrize("normalize", ["map", "row"])
def test_qk_objective_equals_the_masked_map_objective(normalize):
    """tiny presets, padded batch, fp64, reference backends: the whole criterion (CE +
    word-KD + the A2D term of all three kinds) and every gradient agree."""
    student, teacher, s_cfg, t_cfg = _pair()
    batch = _batch()
    ref, ref_grads = _step(student, teacher, _objective_pair(s_cfg, t_cfg, normalize=normalize), batch,
                           torch.float64)
    got, got_grads = _step(student, teacher, _objective_pair(s_cfg, t_cfg, normalize=normalize, qk=True), batch,
                           torch.float64)
    assert ref.parts["attn"] > 0
    for key in ("attn", "attn_encoder", "attn_decoder_self", "attn_decoder_cross", "ce", "kd"):
        torch.testing.assert_close(got.parts[key], ref.parts[key], rtol=1e-10, atol=1e-12, msg=key)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == ref_grads.keys()
    assert any(k.startswith("1.distiller.losses.decoder_self") for k in got_grads)  # the mixers train
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-8, atol=1e-10, msg=name)


def test_qk_objective_with_triton_matches_the_map_path():
    """backend='triton' (the interpreter on CPU), fp32, a very small model."""
    pytest.importorskip("triton")
    cfg_s = ModelConfig(encoder_layers=1, decoder_layers=1, heads=2, d_model=16, ffn=16, dropout=0.0)
    cfg_t = ModelConfig(encoder_layers=2, decoder_layers=2, heads=2, d_model=16, ffn=16, dropout=0.0)
    torch.manual_seed(0)
    student, teacher = build_model(cfg_s, VOCAB, pad_id=0), build_model(cfg_t, VOCAB, pad_id=0)
    batch = _batch(b=2, s=5, t=4)
    ref, ref_grads = _step(student, teacher, _objective_pair(cfg_s, cfg_t), batch, torch.float32)
    got, got_grads = _step(student, teacher, _objective_pair(cfg_s, cfg_t, backend="triton", qk=True), batch,
                           torch.float32)
    for key in ("attn_encoder", "attn_decoder_self", "attn_decoder_cross"):
        torch.testing.assert_close(got.parts[key], ref.parts[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padding_semantics_of_qk_mode():
    """QK mode's padding masks hide keys *and* drop them from the loss, so it equals the
    masked map loss only (above). The release's unmasked loss differs on a padded batch,
    which is why QK mode refuses to run without a2d_mask; without padding all agree."""
    student, teacher, s_cfg, t_cfg = _pair("micro-student", "micro-teacher")
    torch.manual_seed(1)
    distiller = A2DDistiller(s_cfg.heads_per_kind(), t_cfg.heads_per_kind(), backend="reference").double()

    def losses(batch, masked_maps):
        src, tgt, src_mask, tgt_mask = batch
        masks = dict(src_padding_mask=src_mask, tgt_padding_mask=tgt_mask)
        with torch.no_grad():
            student.attn_impl = teacher.attn_impl = "maps"
            _, s_maps = student(src, tgt, src_mask, tgt_mask, need_attn=True)
            _, t_maps = teacher(src, tgt, src_mask, tgt_mask, need_attn=True)
            student.attn_impl = teacher.attn_impl = "sdpa"
            _, s_qk = student(src, tgt, src_mask, tgt_mask, need_qk=True)
            _, t_qk = teacher(src, tgt, src_mask, tgt_mask, need_qk=True)
            by_maps = distiller(s_maps, t_maps, **(masks if masked_maps else {})).total
            return by_maps, distiller.forward_qk(s_qk, t_qk, **masks).total

    by_maps, by_qk = losses(_batch(pad=True), masked_maps=False)
    assert not torch.allclose(by_maps, by_qk, rtol=1e-6)
    by_maps, by_qk = losses(_batch(pad=False), masked_maps=False)
    torch.testing.assert_close(by_qk, by_maps, rtol=1e-10, atol=0)

    with pytest.raises(ValueError, match="needs a2d_mask=True"):
        DistillationObjective("a2d", distiller=distiller, a2d_qk=True)
    with pytest.raises(ValueError, match="needs kd='a2d'"):
        DistillationObjective("word", a2d_mask=True, a2d_qk=True)
    with pytest.raises(ValueError, match="backend 'cuda' has no QK mode"):
        A2DDistiller(s_cfg.heads_per_kind(), t_cfg.heads_per_kind(), backend="cuda").forward_qk(
            {k: ([], []) for k in KINDS}, {k: ([], []) for k in KINDS})
    with pytest.raises(ValueError, match=r"student_qk\['encoder'\] must be a pair"):
        distiller.forward_qk({k: [1, 2, 3] for k in KINDS}, {})


# ----------------------------------------------------------------------------- trainer and CLI


def test_cli_a2d_qk_trains_like_the_masked_map_path(tmp_path, capsys, monkeypatch):
    """``distill --a2d-qk --a2d-mask`` trains on SDPA and ``a2d_kl_qk``; its logged
    losses are the map path's (``--a2d-mask`` alone) on the same batches, to float32
    rounding."""
    import a2d_kernels.distill
    import torch.nn.functional as F
    from a2d_trainer.cli import main
    from a2d_trainer.train import train

    calls = {"sdpa": 0, "a2d_kl_qk": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted("sdpa", F.scaled_dot_product_attention))
    monkeypatch.setattr(a2d_kernels.distill, "a2d_kl_qk", counted("a2d_kl_qk", a2d_kernels.distill.a2d_kl_qk))

    data = make_toy_data(tmp_path / "data")
    teacher = train(train_config(data, tmp_path / "teacher", preset="micro-teacher", max_steps=2))["checkpoint"]
    common = ["distill", "--data", str(data), "--preset", "micro-student", "--teacher", teacher,
              "--kd", "a2d", "--max-steps", "2", "--max-tokens", "300", "--warmup-updates", "4", "--lr", "2e-3",
              "--log-every", "1", "--dropout", "0", "--seed", "3", "--no-progress", "--a2d-backend", "reference",
              "--a2d-mask"]
    assert main(common + ["--run-dir", str(tmp_path / "maps")]) == 0
    assert calls == {"sdpa": 0, "a2d_kl_qk": 0}
    assert main(common + ["--run-dir", str(tmp_path / "qk"), "--a2d-qk"]) == 0
    # 2 updates x (student 3 + teacher 6 attention layers) at least; 3 kinds per update.
    assert calls["sdpa"] >= 2 * 9 and calls["a2d_kl_qk"] == 2 * 3

    def train_records(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "train"]

    maps, qk = train_records("maps"), train_records("qk")
    assert len(maps) == len(qk) == 2
    assert qk[0]["attn"] > 0
    for a, b in zip(maps, qk):
        for key in ("loss", "attn", "ce", "kd"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key

    # QK mode needs the masked loss: a clear one-line error, nothing trained.
    capsys.readouterr()
    assert main(common[:-1] + ["--run-dir", str(tmp_path / "bad"), "--a2d-qk"]) == 2
    assert "a2d_qk (QK mode) computes the padding-masked A2D loss" in capsys.readouterr().err
