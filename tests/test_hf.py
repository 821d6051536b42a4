"""A2DDistiller on real Hugging Face Marian models (random init from configs, nothing downloaded).

Skipped when ``transformers`` (the ``hf`` extra) is not installed.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from a2d_kernels import a2d_kl  # noqa: E402
from a2d_kernels.distill import A2DDistiller  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_marian_distill.py"
PAD, EOS, VOCAB = 0, 1, 40


def _marian(layers, heads, d_model=16):
    config = transformers.MarianConfig(
        vocab_size=VOCAB, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, max_position_embeddings=32,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, dropout=0.0,
        attn_implementation="eager",
    )
    return transformers.MarianMTModel(config)


def _batch():
    """Two sentences of different lengths on both sides, so both masks pad something."""
    input_ids = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD]])
    labels = torch.tensor([[11, 12, 13, EOS], [14, EOS, -100, -100]])
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(),
            "labels": labels, "decoder_attention_mask": (labels != -100).long()}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return _marian(layers=2, heads=4).eval(), _marian(layers=1, heads=2).train()


def test_head_counts_come_from_the_configs(models):
    teacher, student = models
    distiller = A2DDistiller.from_hf_configs(student.config, teacher.config)
    for kind, loss in distiller.losses.items():
        assert (loss.student_channels, loss.teacher_channels) == (1 * 2, 2 * 4), kind


@pytest.mark.parametrize("normalize", ["map", "row"])
def test_forward_hf_combines_masked_per_kind_losses(models, normalize):
    teacher, student = models
    batch = _batch()
    with torch.no_grad():
        t_out = teacher(**batch, output_attentions=True)
    s_out = student(**batch, output_attentions=True)
    distiller = A2DDistiller.from_hf_configs(student.config, teacher.config, beta=0.5, decay=0.9,
                                             normalize=normalize, reduction="mean", backend="reference")
    out = distiller.forward_hf(s_out, t_out, epoch=3, attention_mask=batch["attention_mask"],
                               decoder_attention_mask=batch["decoder_attention_mask"])

    src_pad = batch["attention_mask"] == 0
    tgt_pad = batch["decoder_attention_mask"] == 0
    # kind: (student maps, teacher maps, key padding, query padding)
    cases = {
        "encoder": (s_out.encoder_attentions, t_out.encoder_attentions, src_pad, src_pad),
        "decoder_self": (s_out.decoder_attentions, t_out.decoder_attentions, tgt_pad, tgt_pad),
        "decoder_cross": (s_out.cross_attentions, t_out.cross_attentions, src_pad, tgt_pad),
    }
    expected = {}
    for kind, (s_maps, t_maps, key_pad, query_pad) in cases.items():
        loss = distiller.losses[kind]
        expected[kind] = a2d_kl(s_maps, t_maps, loss.weight, loss.bias, normalize=normalize, reduction="mean",
                                key_padding_mask=key_pad, query_mask=query_pad, backend="reference")
        torch.testing.assert_close(out.parts[kind], expected[kind], rtol=1e-6, atol=0)
    weight = 0.5 * 0.9 ** 2
    total = weight * (expected["encoder"] + (expected["decoder_self"] + expected["decoder_cross"]) / 2)
    torch.testing.assert_close(out.total, total, rtol=1e-6, atol=0)
    assert out.total.item() > 0

    # The padding masks must matter: without them the loss differs.
    unmasked = distiller.forward_hf(s_out, t_out, epoch=3)
    assert not torch.allclose(unmasked.total, out.total)

    # Gradients reach the student's attention and the alignment module, never the teacher.
    out.total.backward()
    q_proj = student.model.encoder.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0
    for loss in distiller.losses.values():
        assert loss.weight.grad is not None and torch.isfinite(loss.weight.grad).all()
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


def test_forward_hf_compiles_without_graph_breaks(models):
    """Hugging Face outputs go straight into a fullgraph-compiled forward_hf."""
    teacher, student = models
    batch = _batch()
    distiller = A2DDistiller.from_hf_configs(student.config, teacher.config, backend="reference")
    with torch.no_grad():
        t_out = teacher(**batch, output_attentions=True)
        s_out = student(**batch, output_attentions=True)
    masks = dict(attention_mask=batch["attention_mask"], decoder_attention_mask=batch["decoder_attention_mask"])
    torch._dynamo.reset()
    # aot_eager: Dynamo and AOTAutograd trace as with Inductor, without its slow CPU codegen.
    compiled = torch.compile(distiller.forward_hf, fullgraph=True, backend="aot_eager")
    got = compiled(s_out, t_out, epoch=2, **masks)
    want = distiller.forward_hf(s_out, t_out, epoch=2, **masks)
    torch.testing.assert_close(got.total, want.total, rtol=1e-6, atol=0)
    for kind in want.parts:
        torch.testing.assert_close(got.parts[kind], want.parts[kind], rtol=1e-6, atol=0)


def test_forward_hf_without_attention_maps_says_how_to_get_them(models):
    teacher, student = models
    batch = _batch()
    distiller = A2DDistiller.from_hf_configs(student.config, teacher.config)
    with torch.no_grad():
        t_out = teacher(**batch, output_attentions=True)
        s_out = student(**batch)  # output_attentions not requested: no maps
    with pytest.raises(ValueError, match="output_attentions=True.*eager"):
        distiller.forward_hf(s_out, t_out)
    with pytest.raises(TypeError, match="ModelOutput"):
        distiller.forward_hf(s_out.to_tuple(), t_out)


def test_example_script_runs_two_steps():
    spec = importlib.util.spec_from_file_location("hf_marian_distill", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(["--steps", "2", "--batch-size", "4", "--max-len", "6", "--device", "cpu"])
    assert [r["step"] for r in history] == [1, 2]
    for record in history:
        for key in ("loss", "ce", "word_kd", "a2d", "a2d_encoder", "a2d_decoder_self", "a2d_decoder_cross"):
            assert math.isfinite(record[key]), (key, record)
        assert record["a2d"] > 0
