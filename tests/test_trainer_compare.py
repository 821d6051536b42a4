"""``a2d-train compare``: waves, equal update counts per seed, parallel processes, the
seed summary. Tiny corpus and micro presets, so a run takes seconds."""
import dataclasses
import json
import math

import pytest

from a2d_trainer import cli
from a2d_trainer.compare import PLANS, results_table, run_comparison, seed_summary

from test_trainer import build_toy_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return build_toy_corpus(root / "data", root)


MICRO = dataclasses.replace(
    PLANS["demo"], teacher_preset="micro-teacher", student_preset="micro-student", teacher_updates=4,
    student_updates=3,
    training=dict(PLANS["demo"].training, vocab_size=40, max_tokens=200, warmup_updates=2))


def test_two_seeds_in_parallel_processes(corpus, tmp_path, capsys):
    results = run_comparison(MICRO, tmp_path / "run", minutes=5.0, seeds=[4, 7], parallel=2, data_dir=corpus,
                             beam=1, eval_sentences=4, progress=False)
    assert list(results) == ["teacher", "student_none_seed4", "student_word_seed4", "student_a2d_seed4",
                             "student_none_seed7", "student_word_seed7", "student_a2d_seed7"]
    for seed in (4, 7):
        a2d = results[f"student_a2d_seed{seed}"]
        assert a2d["seed"] == seed and a2d["updates"] == MICRO.student_updates
        for kd in ("none", "word"):  # update for update with that seed's A2D student
            assert results[f"student_{kd}_seed{seed}"]["updates"] == a2d["updates"]
    assert all(r["sentences"] == 4 and math.isfinite(r["bleu"]) for r in results.values())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["seeds"] == [4, 7] and list(saved["results"]) == list(results)
    gap = saved["summary"]["a2d_minus_word_bleu"]
    assert gap["seeds"] == 2 and len(gap["per_seed"]) == 2
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| student, word-KD + A2D (scaled schedule) | 7 |" in table and "Over 2 seeds" in table
    assert "A2D minus word-KD BLEU" in capsys.readouterr().out


def test_seed_summary_statistics():
    def run(kd, seed, bleu):
        return f"student_{kd}_seed{seed}", {"label": kd, "seed": seed, "updates": 5, "train_seconds": 1.0,
                                            "valid_nll": 4.0 + bleu / 100, "bleu": bleu, "chrf": 2 * bleu}
    results = dict([run("word", 1, 10.0), run("a2d", 1, 11.0), run("word", 2, 12.0), run("a2d", 2, 11.5),
                    run("word", 3, 8.0), run("a2d", 3, 9.5), run("none", 1, 7.0)])
    summary = seed_summary(results, [1, 2, 3])
    assert summary["word"]["bleu"]["mean"] == pytest.approx(10.0)
    assert summary["word"]["bleu"]["std"] == pytest.approx(2.0)  # sample std of 10, 12, 8
    assert "none" not in summary  # seeds 2 and 3 missing: not summarized
    gap = summary["a2d_minus_word_bleu"]
    assert gap["per_seed"] == pytest.approx([1.0, -0.5, 1.5])
    assert gap["mean"] == pytest.approx(2.0 / 3)
    assert gap["stderr"] == pytest.approx(gap["std"] / math.sqrt(3))
    assert gap["a2d_ahead"] == 2
    assert "+0.67 ±" in results_table(results, [1, 2, 3])
    assert seed_summary(results, [1]) == {}


def test_compare_rejects_bad_arguments(corpus, tmp_path, capsys):
    with pytest.raises(ValueError, match="parallel must be >= 1, got 0"):
        run_comparison(MICRO, tmp_path, minutes=1, parallel=0, data_dir=corpus)
    with pytest.raises(ValueError, match="no complete corpus"):
        run_comparison(MICRO, tmp_path, minutes=1, data_dir=tmp_path / "nowhere")
    assert cli.main(["compare", "--minutes", "1", "--seeds", "1,x", "--data", str(corpus)]) == 2
    assert "--seeds takes comma-separated integers" in capsys.readouterr().err


def test_a_failed_run_keeps_the_finished_ones(corpus, tmp_path, monkeypatch, capsys):
    from a2d_trainer import compare

    real = compare.train_and_score

    def flaky(cfg, score):
        if cfg.kd == "a2d" and cfg.seed == 7:
            raise ValueError("boom")
        return real(cfg, score)

    monkeypatch.setattr(compare, "train_and_score", flaky)
    with pytest.raises(ValueError, match="boom"):
        run_comparison(MICRO, tmp_path / "run", minutes=5.0, seeds=[4, 7], data_dir=corpus, beam=1,
                       eval_sentences=2, progress=False)
    out = capsys.readouterr().out
    assert "student_a2d_seed7: FAILED: ValueError: boom" in out and "1 run(s) failed" in out
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    # The other seed's runs and seed 7's baselines (at the planned count) still ran.
    assert list(saved["results"]) == ["teacher", "student_none_seed4", "student_word_seed4", "student_a2d_seed4",
                                      "student_none_seed7", "student_word_seed7"]
    assert saved["results"]["student_word_seed7"]["target_updates"] == MICRO.student_updates


def test_updates_short_of_the_target_are_marked():
    row = {"label": "student, word-KD", "seed": 1, "updates": 300, "target_updates": 360, "train_seconds": 9.0,
           "valid_nll": 4.2, "bleu": 9.0, "chrf": 17.0}
    assert "| student, word-KD | 300 of 360 | 9 |" in results_table({"student_word": row}, [1])
    assert "| student, word-KD | 360 | 9 |" in results_table({"student_word": {**row, "updates": 360}}, [1])


def test_a2d_update_target_from_the_teachers_rate():
    from a2d_trainer.compare import a2d_updates

    release = PLANS["release"]
    budget = 600.0  # teacher cap 240 s, A2D cap 150 s
    teacher = {"updates": 2400, "train_seconds": 275.0}  # 10 updates/s in its 240 s loop
    assert a2d_updates(release, teacher, budget, workers=1, rounds=1) == 1500
    assert a2d_updates(release, teacher, budget, workers=3, rounds=1) == 500  # three share the device
    assert a2d_updates(release, teacher, budget, workers=1, rounds=2) == 750  # two runs one after the other
    assert a2d_updates(release, {"updates": 10 ** 6, "train_seconds": 240.0}, budget, 1, 1) == release.student_updates
    assert a2d_updates(PLANS["demo"], teacher, budget, 3, 1) == 360  # a fixed plan


def test_a_rerun_never_shows_the_previous_table(corpus, tmp_path, monkeypatch):
    from a2d_trainer import compare

    def failing(cfg, score):
        raise ValueError("teacher failed")

    run = tmp_path / "run"
    run.mkdir()
    for name in ("results.json", "results.md"):
        (run / name).write_text("a previous comparison's table")
    monkeypatch.setattr(compare, "train_and_score", failing)
    with pytest.raises(ValueError, match="teacher failed"):
        run_comparison(MICRO, run, minutes=1.0, seeds=[1], data_dir=corpus, progress=False)
    for name in ("results.json", "results.md"):
        assert "previous" not in ((run / name).read_text() if (run / name).exists() else "")
