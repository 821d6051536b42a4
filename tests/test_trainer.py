"""The distillation trainer: model maps, the release's criterion, decoding, training
(exact resume, errors, atomic outputs) and a tiny end-to-end run from a ``.mo`` catalog.

Everything runs on the CPU with tiny models and a handful of updates.
"""
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from a2d_kernels.distill import A2DDistiller
from a2d_trainer.model import PRESETS, ModelConfig, build_model
from a2d_trainer.objective import DistillationObjective, label_smoothed_nll_sum, word_kd_sum

SMALL = ModelConfig(encoder_layers=2, decoder_layers=2, heads=2, d_model=16, ffn=32, dropout=0.0)

# ----------------------------------------------------------------------------- a toy corpus

EN = "the a cat dog house tree red blue big small runs sees eats old new green".split()
DE = "der ein Katze Hund Haus Baum rot blau gross klein rennt sieht isst alt neu gruen".split()


def toy_pairs(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(EN) for _ in range(rng.randint(3, 7))]
        out.append((" ".join(words), " ".join(DE[EN.index(w)] for w in words)))
    return out


def write_split(folder: Path, split: str, pairs):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.src").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (folder / f"{split}.tgt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


def make_toy_data(folder: Path) -> Path:
    for split, n, seed in (("train", 160, 0), ("valid", 16, 1), ("test", 12, 2)):
        write_split(folder, split, toy_pairs(n, seed))
    return folder


def train_config(data, run, **kw):
    from a2d_trainer.train import TrainConfig

    base = dict(data_dir=str(data), run_dir=str(run), preset="micro-teacher", vocab_size=48, max_tokens=300,
                warmup_updates=4, lr=2e-3, log_every=1, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy corpus and a teacher trained on it for a few updates."""
    from a2d_trainer.train import train

    root = tmp_path_factory.mktemp("toy")
    data = make_toy_data(root / "data")
    summary = train(train_config(data, root / "teacher", preset="micro-teacher", max_steps=4))
    return {"root": root, "data": data, "teacher": Path(summary["checkpoint"])}


# ----------------------------------------------------------------------------- model


def _padded_batch(vocab=30, b=3, s=6, t=5):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, vocab, (b, s), generator=g)
    tgt = torch.randint(4, vocab, (b, t), generator=g)
    src_mask = torch.zeros(b, s, dtype=torch.bool)
    tgt_mask = torch.zeros(b, t, dtype=torch.bool)
    src_mask[1, 4:] = True
    tgt_mask[2, 3:] = True
    src[src_mask] = 0
    tgt[tgt_mask] = 0
    return src, tgt, src_mask, tgt_mask


def test_attention_maps_equal_softmax_of_the_layers_own_projections():
    torch.manual_seed(0)
    model = build_model(SMALL, 30, pad_id=0).double().eval()
    src, tgt, src_mask, tgt_mask = _padded_batch()
    inputs = {}

    def grab(name):
        def hook(module, args):
            inputs[name] = (args[0], args[1])
        return hook

    handles = []
    for i, layer in enumerate(model.encoder_layers):
        handles.append(layer.self_attn.register_forward_pre_hook(grab(("encoder", i))))
    for i, layer in enumerate(model.decoder_layers):
        handles.append(layer.self_attn.register_forward_pre_hook(grab(("decoder_self", i))))
        handles.append(layer.cross_attn.register_forward_pre_hook(grab(("decoder_cross", i))))
    _, attn = model(src, tgt, src_mask, tgt_mask, need_attn=True)
    for h in handles:
        h.remove()

    modules = {"encoder": [l.self_attn for l in model.encoder_layers],
               "decoder_self": [l.self_attn for l in model.decoder_layers],
               "decoder_cross": [l.cross_attn for l in model.decoder_layers]}
    key_masks = {"encoder": src_mask, "decoder_self": tgt_mask, "decoder_cross": src_mask}
    for kind, layers in modules.items():
        assert len(attn[kind]) == len(layers)
        for i, mod in enumerate(layers):
            query, kv = inputs[(kind, i)]
            b, t, d = query.shape
            h = SMALL.heads
            q = (query @ mod.q_proj.weight.T + mod.q_proj.bias).view(b, t, h, -1).transpose(1, 2)
            k = (kv @ mod.k_proj.weight.T + mod.k_proj.bias).view(b, kv.shape[1], h, -1).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
            scores = scores.masked_fill(key_masks[kind][:, None, None, :], float("-inf"))
            if kind == "decoder_self":
                scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            expected = torch.softmax(scores, dim=-1)
            got = attn[kind][i]
            assert got.shape == (b, h, t, kv.shape[1])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
            assert torch.all(got.masked_select(key_masks[kind][:, None, None, :]) == 0)
        if kind == "decoder_self":  # causal: nothing above the diagonal
            assert torch.all(attn[kind][0].triu(1) == 0)


def test_need_attn_keeps_logits_and_output_projection_is_tied():
    torch.manual_seed(0)
    model = build_model(SMALL, 30, pad_id=0).eval()
    src, tgt, src_mask, tgt_mask = _padded_batch()
    logits, none = model(src, tgt, src_mask, tgt_mask)
    logits2, maps = model(src, tgt, src_mask, tgt_mask, need_attn=True)
    assert none is None and set(maps) == {"encoder", "decoder_self", "decoder_cross"}
    assert torch.equal(logits, logits2)
    # one embedding matrix: encoder input, decoder input and output projection
    embeddings = [n for n, p in model.named_parameters() if p.dim() == 2 and p.shape[0] == 30]
    assert embeddings == ["embed.weight"]
    with torch.no_grad():
        model.embed.weight[7] += 1.0
    changed, _ = model(src, tgt, src_mask, tgt_mask)
    assert not torch.equal(changed[..., 7], logits[..., 7])
    assert torch.all(build_model(SMALL, 30, pad_id=0).embed.weight[0] == 0)  # pad row starts at zero


def test_presets_and_config_errors():
    assert PRESETS["teacher"].architecture() == dict(encoder_layers=6, decoder_layers=6, heads=4, d_model=512,
                                                     ffn=1024)
    assert PRESETS["student"].architecture() == dict(encoder_layers=3, decoder_layers=3, heads=4, d_model=512,
                                                     ffn=1024)
    assert {"tiny-teacher", "tiny-student", "micro-teacher", "micro-student"} <= set(PRESETS)
    assert PRESETS["student"].heads_per_kind()["decoder_cross"] == [4, 4, 4]
    with pytest.raises(ValueError, match="preset must be one of"):
        build_model("huge", 10)
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by heads \(4\)"):
        ModelConfig(1, 1, 4, 10, 8)
    with pytest.raises(ValueError, match="vocab_size must be an int > 1"):
        build_model("micro-student", 1)


# ----------------------------------------------------------------------------- objective


def test_label_smoothed_ce_is_soft_target_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9, dtype=torch.float64)
    target = torch.randint(0, 9, (2, 4))
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    eps = 0.1
    soft = torch.full((2, 4, 9), eps / 8, dtype=torch.float64)
    soft.scatter_(-1, target[..., None], 1 - eps)
    expected = F.cross_entropy(logits[valid], soft[valid], reduction="sum")
    loss, nll = label_smoothed_nll_sum(logits, target, valid, eps)
    torch.testing.assert_close(loss.double(), expected)
    torch.testing.assert_close(nll.double(), F.cross_entropy(logits[valid], target[valid], reduction="sum"))


def test_word_kd_is_kl_with_soft_ce_gradient():
    torch.manual_seed(0)
    student = torch.randn(3, 5, 7, requires_grad=True)
    teacher = torch.randn(3, 5, 7)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, 3:] = False
    kd = word_kd_sum(student, teacher, valid)
    p = teacher.softmax(-1)[valid]
    expected = (p * (p.log() - student.log_softmax(-1)[valid])).sum()
    torch.testing.assert_close(kd, expected)
    assert float(word_kd_sum(teacher, teacher, valid)) == pytest.approx(0.0, abs=1e-5)
    (grad,) = torch.autograd.grad(kd, student)
    soft_ce = -(p * student.log_softmax(-1)[valid]).sum()
    (grad_ce,) = torch.autograd.grad(soft_ce, student)
    torch.testing.assert_close(grad, grad_ce)


@pytest.mark.parametrize("kinds", [("encoder", "decoder_self", "decoder_cross"), ("encoder",)])
def test_objective_combines_ce_word_kd_and_a2d_as_released(kinds):
    torch.manual_seed(0)
    s_cfg, t_cfg = SMALL, ModelConfig(3, 3, 2, 16, 32, dropout=0.0)
    student, teacher = build_model(s_cfg, 30, pad_id=0), build_model(t_cfg, 30, pad_id=0)
    src, tgt, src_mask, tgt_mask = _padded_batch()
    s_logits, s_attn = student(src, tgt, src_mask, tgt_mask, need_attn=True)
    with torch.no_grad():
        t_logits, t_attn = teacher(src, tgt, src_mask, tgt_mask, need_attn=True)
    distiller = A2DDistiller(s_cfg.heads_per_kind(), t_cfg.heads_per_kind(), kinds=kinds, backend="reference")
    obj = DistillationObjective("a2d", alpha=0.5, label_smoothing=0.1, distiller=distiller)
    ntok = int((~tgt_mask).sum())
    out = obj(s_logits, tgt, tgt_mask, ntok, src_padding_mask=src_mask, student_attn=s_attn,
              teacher_logits=t_logits, teacher_attn=t_attn, epoch=3)
    valid = ~tgt_mask
    ce, _ = label_smoothed_nll_sum(s_logits, tgt, valid, 0.1)
    kd = word_kd_sum(s_logits, t_logits, valid)
    parts = {k: distiller.losses[k](s_attn[k], t_attn[k]) for k in kinds}
    dec = [parts[k] for k in ("decoder_self", "decoder_cross") if k in parts]
    attn = 0.9 ** 2 * (parts["encoder"] + (sum(dec) / len(dec) if dec else 0.0))
    expected = 0.5 * ce / ntok + 0.5 * kd / ntok + attn
    torch.testing.assert_close(out.loss, expected)
    assert set(out.parts) >= {"ce", "kd", "attn"} | {f"attn_{k}" for k in kinds}
    # validation (epoch None): no attention term
    val = obj(s_logits, tgt, tgt_mask, ntok, teacher_logits=t_logits, epoch=None)
    torch.testing.assert_close(val.loss, 0.5 * ce / ntok + 0.5 * kd / ntok)
    # the mixers get gradients (they are trained with the student)
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.parameters())


def test_objective_modes_and_masks():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    target = torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[False, False, True], [False, False, False]])
    none = DistillationObjective("none")
    ce, _ = label_smoothed_nll_sum(logits, target, ~mask, 0.1)
    torch.testing.assert_close(none(logits, target, mask, 5).loss, ce / 5)
    with pytest.raises(ValueError, match="kd must be one of"):
        DistillationObjective("attention")
    with pytest.raises(ValueError, match="needs distiller"):
        DistillationObjective("a2d")
    with pytest.raises(ValueError, match="needs teacher_logits"):
        DistillationObjective("word")(logits, target, mask, 5)
    # --a2d-mask passes the padding masks through to the distiller
    calls = {}

    class Spy(torch.nn.Module):
        def forward(self, s, t, epoch, **masks):
            calls.update(masks)
            from a2d_kernels.distill import A2DOutput
            return A2DOutput(total=torch.zeros(()), parts={})

    obj = DistillationObjective("word", distiller=None)
    obj.kd, obj.distiller, obj.a2d_mask = "a2d", Spy(), True
    src_mask = torch.zeros(2, 4, dtype=torch.bool)
    obj(logits, target, mask, 5, src_padding_mask=src_mask, student_attn={}, teacher_logits=logits,
        teacher_attn={}, epoch=1)
    assert calls["tgt_padding_mask"] is mask and calls["src_padding_mask"] is src_mask


# ----------------------------------------------------------------------------- decoding


def test_beam_one_is_greedy_and_beam_finds_a_better_or_equal_score():
    from a2d_trainer.translate import beam_search, greedy_search

    torch.manual_seed(1)
    model = build_model(SMALL, 12, pad_id=0).eval()
    src, _, src_mask, _ = _padded_batch(vocab=12, b=4, s=6)
    kw = dict(bos_id=2, eos_id=3, pad_id=0, max_len_a=1.0, max_len_b=3)
    greedy = greedy_search(model, src, src_mask, **kw)
    assert beam_search(model, src, src_mask, beam=1, **kw) == greedy
    beam = beam_search(model, src, src_mask, beam=4, length_penalty=0.0, **kw)

    def logprob(i, hyp):  # sum log p(hyp + EOS | src)
        tokens = torch.tensor([[2] + hyp])
        logits, _ = model(src[i:i + 1], tokens, src_mask[i:i + 1])
        lp = logits.log_softmax(-1)[0]
        return float(sum(lp[j, t] for j, t in enumerate(hyp + [3])))

    limits = (~src_mask).sum(1).tolist()
    for i in range(4):
        assert len(beam[i]) < limits[i] + 3 + 1
        assert 0 not in beam[i] and 2 not in beam[i] and 3 not in beam[i]
        if len(greedy[i]) + 1 < limits[i] + 3:  # greedy stopped by itself: beam must do as well or better
            assert logprob(i, beam[i]) >= logprob(i, greedy[i]) - 1e-5


# ----------------------------------------------------------------------------- training


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _log(path, kind):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["kind"] == kind]


def _curve(path):
    """The train records without their timings (which differ between any two runs)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _log(path, "train")]


def test_resume_continues_exactly(toy, tmp_path):
    """4 updates straight == 2 updates, stop, resume, 2 more (an A2D student with
    dropout: exercises RNG, optimizer, schedule, mixers and the data position), and the
    log holds the same train records: the stop falls between two log points
    (log_every=3), so the updates since the last record travel in the checkpoint."""
    from a2d_trainer.train import train

    kw = dict(preset="micro-student", kd="a2d", teacher=str(toy["teacher"]), a2d_backend="reference", log_every=3)
    train(train_config(toy["data"], tmp_path / "straight", max_steps=4, **kw))
    train(train_config(toy["data"], tmp_path / "split", max_steps=2, **kw))
    first = _params(tmp_path / "split" / "checkpoint_last.pt")
    assert first["step"] == 2 and first["batch_index"] > 0  # stopped mid-epoch
    assert [(r["step"], r.get("partial")) for r in _log(tmp_path / "split" / "log.jsonl", "train")] == [(2, True)]
    # As if killed after logging update 3 but before checkpointing it (the last line
    # torn): the resumed run redoes update 3, and its log must not hold it twice.
    with open(tmp_path / "split" / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "loss": -1.0}) + '\n{"kind": "tr')
    train(train_config(toy["data"], tmp_path / "split", max_steps=4, resume=True, **kw))
    a = _params(tmp_path / "straight" / "checkpoint_last.pt")
    b = _params(tmp_path / "split" / "checkpoint_last.pt")
    assert a["step"] == b["step"] == 4 and (a["epoch"], a["batch_index"]) == (b["epoch"], b["batch_index"])
    for name in ("model", "objective"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs after resume"
    straight = _curve(tmp_path / "straight" / "log.jsonl")
    assert [(r["step"], r.get("partial")) for r in straight] == [(3, None), (4, True)]
    assert straight == _curve(tmp_path / "split" / "log.jsonl")
    assert (tmp_path / "split" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"

    # Resuming a finished run with the same limit does nothing: no extra update, no save,
    # the log untouched (its final partial record included).
    files = ("checkpoint_last.pt", "log.jsonl")
    before = [(tmp_path / "split" / f).read_bytes() for f in files]
    summary = train(train_config(toy["data"], tmp_path / "split", max_steps=4, resume=True, **kw))
    assert summary["steps"] == 4 and summary["stop_reason"] == "max_steps"
    assert [(tmp_path / "split" / f).read_bytes() for f in files] == before


def test_resume_refuses_changed_settings(toy, tmp_path):
    """A resume must continue the same run: a setting that shapes the trajectory (data
    order, updates, objective) differing from the checkpoint's is a clear error naming
    it; limits may change."""
    from a2d_trainer.train import train

    kw = dict(preset="micro-student", kd="a2d", teacher=str(toy["teacher"]), a2d_backend="reference")
    run = tmp_path / "run"
    train(train_config(toy["data"], run, max_steps=1, **kw))
    with pytest.raises(ValueError, match=r"started with max_tokens=300, alpha=0\.5, this call sets "
                                         r"max_tokens=200, alpha=0\.9"):
        train(train_config(toy["data"], run, max_steps=2, resume=True, **dict(kw, max_tokens=200, alpha=0.9)))
    with pytest.raises(ValueError, match="started with decoder_self=True, this call sets decoder_self=False"):
        train(train_config(toy["data"], run, max_steps=2, resume=True, decoder_self=False, **kw))
    assert train(train_config(toy["data"], run, max_steps=2, resume=True, **kw))["steps"] == 2


def test_validation_records_name_the_epoch_they_close(toy, tmp_path):
    from a2d_trainer.train import train

    run = tmp_path / "run"
    train(train_config(toy["data"], run, preset="micro-student", max_epochs=2))
    train_records, valid = _log(run / "log.jsonl", "train"), _log(run / "log.jsonl", "valid")
    assert [r["epoch"] for r in valid] == [1, 2]
    last_of_epoch = {r["epoch"]: r["step"] for r in train_records}
    assert [r["step"] for r in valid] == [last_of_epoch[1], last_of_epoch[2]]


def test_a_batch_budget_error_names_the_line_and_leaves_no_run(toy, tmp_path):
    from a2d_trainer.train import train

    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train\.src:1: the pair spans \d+ positions, more than max_tokens=5"):
        train(train_config(toy["data"], run, max_tokens=5, max_steps=1))
    assert not run.exists()


def test_a2d_decay_clock_per_updates(toy, tmp_path):
    """--a2d-decay-every N: the attention weight is beta * decay**floor(step / N) per
    update (logged as a2d_weight), and the weighted term the loss adds is that weight
    times the unweighted parts (encoder + half of each decoder kind). Default: per epoch."""
    from a2d_trainer.train import decay_epoch, train

    assert [decay_epoch(3, s, 0) for s in (0, 7)] == [3, 3]  # per epoch (release)
    assert [decay_epoch(1, s, 2.5) for s in (0, 2, 3, 5, 7)] == [1, 1, 2, 3, 3]
    kw = dict(preset="micro-student", kd="a2d", teacher=str(toy["teacher"]), a2d_backend="reference",
              beta=0.8, decay=0.5, a2d_decay_every=2)
    train(train_config(toy["data"], tmp_path / "clock", max_steps=5, **kw))
    logs = [json.loads(line) for line in (tmp_path / "clock" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for r in steps:
        weight = 0.8 * 0.5 ** ((r["step"] - 1) // 2)
        assert r["a2d_weight"] == pytest.approx(weight)
        unweighted = r["attn_encoder"] + 0.5 * (r["attn_decoder_self"] + r["attn_decoder_cross"])
        assert r["attn"] == pytest.approx(weight * unweighted, rel=1e-5)
    with pytest.raises(ValueError, match="a2d_decay_every must be >= 0"):
        train_config(toy["data"], tmp_path / "bad", max_steps=1, **dict(kw, a2d_decay_every=-1)).validate()
    with pytest.raises(ValueError, match="a2d_decay_every .* needs kd='a2d'"):
        train_config(toy["data"], tmp_path / "bad", max_steps=1, kd="word", teacher=str(toy["teacher"]),
                     a2d_decay_every=3).validate()


def test_teacher_that_does_not_match_the_preset_is_a_clear_error(toy, tmp_path):
    from a2d_trainer.train import train

    run = tmp_path / "student"
    with pytest.raises(ValueError, match=r"does not match preset 'teacher': it has encoder_layers=2 \(preset has 6\)"):
        train(train_config(toy["data"], run, preset="micro-student", kd="word", teacher=str(toy["teacher"]),
                           teacher_preset="teacher", max_steps=1))
    assert not run.exists()  # nothing written
    with pytest.raises(ValueError, match="not an a2d-train checkpoint"):
        bogus = tmp_path / "bogus.pt"
        torch.save({"weights": 1}, bogus)
        train(train_config(toy["data"], run, kd="word", teacher=str(bogus), max_steps=1))
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        train(train_config(toy["data"], run, kd="word", teacher=str(tmp_path / "missing.pt"), max_steps=1))
    assert not run.exists()


def test_a_student_must_use_the_teachers_tokenizer(toy, tmp_path):
    import shutil

    from a2d_trainer.data import Tokenizer
    from a2d_trainer.train import train

    other = Tokenizer.train([f"word{i} other{i % 7} text" for i in range(200)], tmp_path / "other", 48)
    run = tmp_path / "student"
    with pytest.raises(ValueError, match="is not the teacher's .*needs the teacher's tokenizer"):
        train(train_config(toy["data"], run, preset="micro-student", kd="word", teacher=str(toy["teacher"]),
                           tokenizer=str(other.model_path), max_steps=1))
    assert not run.exists()
    same = shutil.copy(toy["teacher"].parent / "spm.model", tmp_path / "copy.model")  # the same pieces: fine
    assert train(train_config(toy["data"], run, preset="micro-student", kd="word", teacher=str(toy["teacher"]),
                              tokenizer=str(same), max_steps=1))["steps"] == 1


def test_a_fresh_run_refuses_to_overwrite_an_existing_one(toy):
    from a2d_trainer.train import train

    before = toy["teacher"].read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        train(train_config(toy["data"], toy["teacher"].parent, max_steps=1))
    assert toy["teacher"].read_bytes() == before


def test_bad_data_is_reported_before_any_output(tmp_path):
    from a2d_trainer.cli import main

    data = tmp_path / "data"
    write_split(data, "train", toy_pairs(10, 0))
    write_split(data, "valid", toy_pairs(3, 1))
    (data / "train.tgt").write_text("eins\nzwei\n", encoding="utf-8")
    run = tmp_path / "run"
    args = ["train-teacher", "--data", str(data), "--run-dir", str(run), "--preset", "micro-teacher",
            "--max-steps", "1", "--no-progress"]
    assert main(args) == 2
    assert not run.exists()
    with pytest.raises(ValueError, match="unequal line counts"):
        from a2d_trainer.train import train
        train(train_config(data, run, max_steps=1))
    with pytest.raises(ValueError, match="stopping condition"):
        train_config(data, run).validate()


def test_translate_and_evaluate_write_complete_files_only(toy, tmp_path, capsys):
    from a2d_trainer.cli import main

    src = tmp_path / "in.txt"
    src.write_text("the red cat\na big dog runs\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert main(["translate", "--checkpoint", str(toy["teacher"]), "--input", str(src), "--output", str(out),
                 "--beam", "2"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    missing = tmp_path / "never.txt"
    assert main(["translate", "--checkpoint", str(toy["teacher"]), "--input", str(tmp_path / "nope.txt"),
                 "--output", str(missing)]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert not missing.exists() and not list(tmp_path.glob(".never.txt*"))
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(bad), "--data", str(toy["data"])]) == 2
    assert not list(tmp_path.glob("broken*.json"))


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_from_a_generated_mo_catalog(tmp_path):
    """Corpus from a .mo catalog -> teacher -> A2D student -> BLEU/chrF, through the CLI."""
    from test_trainer_data import write_mo

    from a2d_trainer.cli import main
    from a2d_trainer.corpus import build_corpus

    entries = [(f"Cannot open the {en} file now", f"Kann die {de} Datei jetzt nicht öffnen")
               for en, de in zip(EN, DE)]
    entries += [(f"The {a} {b} was removed", f"Der {c} {d} wurde entfernt")
                for a, c in zip(EN, DE) for b, d in zip(EN[:6], DE[:6])]
    root = tmp_path / "share" / "locale" / "de" / "LC_MESSAGES"
    write_mo(root / "toy.mo", entries)
    info = build_corpus(tmp_path / "data", target_lang="de", search_paths=[tmp_path / "share"], min_pairs=20)
    assert sum(info.counts.values()) == len(entries)
    data = str(tmp_path / "data")
    common = ["--data", data, "--max-steps", "3", "--max-tokens", "400", "--vocab-size", "60", "--no-progress",
              "--warmup-updates", "2"]
    assert main(["train-teacher", "--run-dir", str(tmp_path / "teacher"), "--preset", "micro-teacher", *common]) == 0
    teacher = str(tmp_path / "teacher" / "checkpoint_best.pt")
    assert main(["distill", "--run-dir", str(tmp_path / "a2d"), "--teacher", teacher, "--teacher-preset",
                 "micro-teacher", "--preset", "micro-student", "--kd", "a2d", "--no-decoder-self", *common]) == 0
    log = [json.loads(line) for line in (tmp_path / "a2d" / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in log if r["kind"] == "train"]
    assert train_records and all("attn_encoder" in r and "attn_decoder_cross" in r for r in train_records)
    assert not any("attn_decoder_self" in r for r in train_records)
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "a2d" / "checkpoint_best.pt"), "--data", data,
                 "--beam", "2", "--output", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert result["sentences"] == info.counts["test"]
    assert 0.0 <= result["bleu"] <= 100.0 and 0.0 <= result["chrf"] <= 100.0
    assert result["kd"] == "a2d" and result["step"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_a2d_distillation_and_decoding(toy, tmp_path):
    """On a GPU: bf16 autocast, the fused A2D backend picked by "auto", beam search."""
    from a2d_trainer.evaluate import evaluate_checkpoint
    from a2d_trainer.train import train

    summary = train(train_config(toy["data"], tmp_path / "gpu", preset="micro-student", kd="a2d",
                                 teacher=str(toy["teacher"]), device="cuda", amp="auto", max_steps=3))
    assert summary["steps"] == 3 and math.isfinite(summary["best_valid_nll"])
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert "cuda" in ckpt["rng"][0]
    scores = evaluate_checkpoint(summary["checkpoint"], toy["data"], beam=2, device="cuda", limit=5)
    assert scores["sentences"] == 5


def build_toy_corpus(out_dir: Path, scratch: Path) -> Path:
    """A complete corpus folder at ``out_dir``, built by ``build_corpus`` from a generated
    gettext catalog under ``scratch`` (so nothing scans the machine's catalogs)."""
    from test_trainer_data import write_mo

    from a2d_trainer.corpus import build_corpus

    entries = [(f"The {a} {b} was removed", f"Der {c} {d} wurde entfernt")
               for a, c in zip(EN, DE) for b, d in zip(EN[:5], DE[:5])]
    write_mo(scratch / "share" / "locale" / "de" / "LC_MESSAGES" / "toy.mo", entries)
    return build_corpus(out_dir, search_paths=[scratch / "share"], min_pairs=20).out_dir


def test_demo_pipeline_runs_on_a_prebuilt_corpus(tmp_path, capsys):
    """The demo's plumbing (stages, equal update counts, table, outputs) in seconds; the
    corpus folder is prebuilt so the demo reuses it instead of scanning the machine."""
    from a2d_trainer.demo import run_demo

    build_toy_corpus(tmp_path / "run" / "data", tmp_path)
    results = run_demo(tmp_path / "run", minutes=0.03, beam=1, eval_sentences=3, progress=False)
    assert list(results) == ["teacher", "student_none", "student_word", "student_a2d"]
    assert results["student_none"]["updates"] <= results["student_a2d"]["updates"]
    out = capsys.readouterr().out
    assert "reusing" in out and "| student, word-KD + A2D (scaled schedule) |" in out
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["results"]["teacher"]["sentences"] == 3
    assert (tmp_path / "run" / "student_a2d" / "test_hypotheses.txt").is_file()
