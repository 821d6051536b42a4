"""Trainer data layer: .mo extraction and filters, deterministic split, atomic corpus writing,
parallel-file validation, the shared sentencepiece tokenizer and token-budget batching."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import torch
from a2d_trainer import corpus as corpus_mod
from a2d_trainer.corpus import (
    CatalogError,
    CorpusError,
    build_corpus,
    extract_pairs,
    find_catalogs,
    load_corpus_info,
    read_mo,
    read_parallel,
    split_of,
)
from a2d_trainer.data import BOS_ID, EOS_ID, PAD_ID, Tokenizer, batches_by_tokens, collate, encode_pairs

# ---------------------------------------------------------------------------------------------
# a tiny .mo writer (GNU gettext binary format: header, two (length, offset) tables, strings)


def write_mo(path: Path, entries, charset: str = "UTF-8", big_endian: bool = False,
             header: bool = True) -> Path:
    """``entries``: (msgid, msgstr) str pairs; plural msgids/msgstrs hold "\\0", contexts "\\x04"."""
    items = [(k.encode("utf-8"), v.encode(charset)) for k, v in entries]
    if header:
        items.append((b"", f"Content-Type: text/plain; charset={charset}\n".encode("ascii")))
    items.sort()  # GNU tools sort by msgid; the reader must not depend on it, but stay realistic
    order = ">" if big_endian else "<"
    n = len(items)
    ids_at, strs_at = 28, 28 + 8 * n
    data_at = strs_at + 8 * n
    blob, ids_table, strs_table = b"", b"", b""
    for which in (0, 1):
        for item in items:
            table_entry = struct.pack(order + "2I", len(item[which]), data_at + len(blob))
            blob += item[which] + b"\0"
            if which == 0:
                ids_table += table_entry
            else:
                strs_table += table_entry
    head = struct.pack(order + "7I", 0x950412DE, 0, n, ids_at, strs_at, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + ids_table + strs_table + blob)
    return path


GOOD = [
    ("Cannot open the configuration file.", "Die Konfigurationsdatei kann nicht geöffnet werden."),
    ("_Open the selected file", "Die ausgewählte Datei _öffnen"),                  # GTK mnemonic
    ("Sa_ve the current document", "Aktuelles Dokument _speichern"),               # mid-word mark
    ("&Print all open documents", "Alle offenen Dokumente &drucken"),              # Qt mark
    ("could not set SO_LINGER on socket", "SO_LINGER konnte nicht gesetzt werden"),  # identifier
    ("Run make && make install afterwards", "Danach make && make install ausführen"),
    ("This line\n  continues on the next.\n", "Diese Zeile\ngeht  weiter.\n"),  # whitespace only
    ("Cannot read file %s: %s", "Datei %s kann nicht gelesen werden: %s"),          # placeholders ok
]
EXPECTED_GOOD = [
    ("Cannot open the configuration file.", "Die Konfigurationsdatei kann nicht geöffnet werden."),
    ("Open the selected file", "Die ausgewählte Datei öffnen"),
    ("Save the current document", "Aktuelles Dokument speichern"),
    ("Print all open documents", "Alle offenen Dokumente drucken"),
    ("could not set SO_LINGER on socket", "SO_LINGER konnte nicht gesetzt werden"),
    ("Run make && make install afterwards", "Danach make && make install ausführen"),
    ("This line continues on the next.", "Diese Zeile geht weiter."),
    ("Cannot read file %s: %s", "Datei %s kann nicht gelesen werden: %s"),
]
REJECTED = [  # (msgid, msgstr, the rule that must fire)
    ("one file removed\0%d files removed", "eine Datei entfernt\0%d Dateien entfernt", "plural"),
    ("menu\x04Open the recent file list", "Zuletzt geöffnete Dateien anzeigen", "context"),
    ("Remove this entry now", "", "untranslated"),
    ("Open", "Öffnen", "short"),
    ("Open file", "Datei öffnen", "short"),
    ("%s: %s: %s", "%s: %s: %s", "not_sentence"),
    ("/usr/lib/x86_64-linux-gnu/libfoo.so", "/usr/lib/x86_64-linux-gnu/libfoo.so", "not_sentence"),
    ("Open %s %s", "Öffne %s %s", "format_only"),
    ("<b>Bold text is not a sentence</b>", "<b>Fetter Text ist kein Satz</b>", "markup"),
    ("Copy &amp; paste the whole text", "Den ganzen Text kopieren &amp; einfügen", "markup"),
    ("  -v, --verbose     explain what is being done", "  -v, --verbose     erklären, was passiert", "layout"),
    ("Usage:\tprogram does things", "Aufruf:\tProgramm tut Dinge", "layout"),
    ("Saint George Basseterre parish", "Saint George Basseterre parish", "identical"),
    ("Please report this bug",
     ("Bitte melden Sie diesen Fehler auf Englisch an die Adresse, die in der Dokumentation "
      "steht, mit allen Details"), "length_ratio"),
    (" ".join(["word"] * 61), " ".join(["Wort"] * 61), "long"),
]


def catalog_tree(root: Path) -> Path:
    """A fake system locale folder and a fake site-packages with German catalogs."""
    write_mo(root / "share/locale/de/LC_MESSAGES/app.mo", GOOD + [(m, t) for m, t, _ in REJECTED])
    # duplicates across catalogs: "Delete ..." has 2 votes for one translation, 1 for another
    dup_a = ("Delete the selected files", "Ausgewählte Dateien löschen")
    dup_b = ("Delete the selected files", "Die ausgewählten Dateien entfernen")
    tie_a = ("Show hidden files as well", "Versteckte Dateien auch zeigen")
    tie_b = ("Show hidden files as well", "Auch versteckte Dateien anzeigen")
    write_mo(root / "share/locale/de_DE/LC_MESSAGES/other.mo", [dup_b, tie_a], charset="ISO-8859-1",
             big_endian=True)
    write_mo(root / "site-packages/pkg/locale/de_CH.UTF-8/LC_MESSAGES/pkg.mo", [dup_a, tie_b])
    write_mo(root / "site-packages/pkg2/locale/de/LC_MESSAGES/pkg2.mo", [dup_a])
    # must be ignored: another language, another category, a language that merely starts with "d"
    write_mo(root / "share/locale/fr/LC_MESSAGES/app.mo", [("Open the selected file", "Ouvrir le fichier")])
    write_mo(root / "share/locale/de/LC_TIME/app.mo", [("Open the selected file", "Zeit")])
    write_mo(root / "share/locale/dsb/LC_MESSAGES/app.mo", [("Open the selected file", "Sorbisch")])
    return root


EXPECTED_DUPS = [
    ("Delete the selected files", "Ausgewählte Dateien löschen"),   # majority: 2 votes against 1
    ("Show hidden files as well", "Auch versteckte Dateien anzeigen"),  # 1-1 tie: smallest string
]


# ---------------------------------------------------------------------------------------------
# .mo reading and filtering


def test_read_mo_skips_header_plural_context_untranslated(tmp_path):
    entries = [("Hello there world", "Hallo Welt da"), ("file\0files", "Datei\0Dateien"),
               ("ctx\x04Open it now", "Jetzt öffnen"), ("Nothing here yet", "")]
    for big_endian in (False, True):
        path = write_mo(tmp_path / f"x{big_endian}.mo", entries, big_endian=big_endian)
        got, skipped = read_mo(path)
        assert got == [("Hello there world", "Hallo Welt da")]
        assert skipped == {"header": 1, "plural": 1, "context": 1, "untranslated": 1}


def test_read_mo_decodes_declared_charset(tmp_path):
    path = write_mo(tmp_path / "latin.mo", [("Cannot remove file", "Kann Datei nicht löschen")],
                    charset="ISO-8859-1")
    assert path.read_bytes().count("ö".encode("latin-1")) == 1
    assert read_mo(path)[0] == [("Cannot remove file", "Kann Datei nicht löschen")]


def test_read_mo_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(CatalogError, match=r"bad\.mo: not a \.mo catalog \(bad magic"):
        read_mo(bad)
    short = tmp_path / "short.mo"
    short.write_bytes(b"\xde\x12\x04\x95")
    with pytest.raises(CatalogError, match=r"short\.mo: not a \.mo catalog \(4 bytes"):
        read_mo(short)
    good = write_mo(tmp_path / "cut.mo", [("Cannot remove file", "Kann Datei nicht löschen")])
    truncated = tmp_path / "truncated.mo"
    truncated.write_bytes(good.read_bytes()[:-12])
    with pytest.raises(CatalogError, match=r"truncated\.mo: truncated string data"):
        read_mo(truncated)
    lying = tmp_path / "lying.mo"  # header says UTF-8, bytes are Latin-1
    write_mo(lying, [("Cannot remove file", "Kann Datei nicht löschen")], charset="ISO-8859-1")
    lying.write_bytes(lying.read_bytes().replace(b"ISO-8859-1", b"UTF-8\n\n\n\n\n"))
    with pytest.raises(CatalogError, match=r"lying\.mo: translation of b'Cannot remove file' is not valid utf-8"):
        read_mo(lying)


def test_extract_pairs_filters_and_deduplicates_exactly(tmp_path):
    root = catalog_tree(tmp_path)
    catalogs = find_catalogs("de", [root])
    pairs, stats, skipped = extract_pairs(catalogs)
    assert skipped == []
    assert pairs == sorted(EXPECTED_GOOD + EXPECTED_DUPS)
    expected_rejections = {}
    for _, _, rule in REJECTED:
        expected_rejections[rule] = expected_rejections.get(rule, 0) + 1
    for rule, count in expected_rejections.items():
        assert stats[rule] == count, rule
    assert stats["catalogs"] == 4 and stats["header"] == 4
    assert stats["kept"] == len(GOOD) + 5 and stats["duplicates"] == 3  # 5 dup entries, 2 sources
    assert stats["pairs"] == len(pairs)


def test_find_catalogs_matches_language_directories(tmp_path):
    root = catalog_tree(tmp_path)
    names = [p.relative_to(root).as_posix() for p in find_catalogs("de", [root])]
    assert names == sorted([
        "share/locale/de/LC_MESSAGES/app.mo", "share/locale/de_DE/LC_MESSAGES/other.mo",
        "site-packages/pkg/locale/de_CH.UTF-8/LC_MESSAGES/pkg.mo",
        "site-packages/pkg2/locale/de/LC_MESSAGES/pkg2.mo"])
    only_ch = find_catalogs("de_CH", [root])
    assert [p.name for p in only_ch] == ["pkg.mo"]
    assert [p.name for p in find_catalogs("fr", [root])] == ["app.mo"]
    # a .mo file given directly is taken as is; the same file twice is read once
    direct = root / "share/locale/fr/LC_MESSAGES/app.mo"
    assert find_catalogs("de", [direct, direct]) == [direct]


def test_unreadable_catalog_is_reported_not_fatal(tmp_path):
    root = catalog_tree(tmp_path)
    broken = root / "share/locale/de/LC_MESSAGES/broken.mo"
    broken.write_bytes(b"garbage, not a catalog")
    pairs, _, skipped = extract_pairs(find_catalogs("de", [root]))
    assert pairs == sorted(EXPECTED_GOOD + EXPECTED_DUPS)
    assert len(skipped) == 1 and skipped[0][0] == str(broken) and "bad magic" in skipped[0][1]


# ---------------------------------------------------------------------------------------------
# split and build_corpus


def synthetic_pairs(n: int):
    return [(f"source sentence number {i}", f"Quellsatz Nummer {i}") for i in range(n)]


def test_split_is_a_deterministic_order_independent_partition():
    pairs = synthetic_pairs(2000)
    split = split_of(pairs)
    assert {k: len(v) for k, v in split.items()} == {"train": 1800, "valid": 100, "test": 100}
    assert sorted(split["train"] + split["valid"] + split["test"]) == sorted(pairs)
    shuffled = pairs[:]
    random.Random(3).shuffle(shuffled)
    assert split_of(shuffled) == split
    # by hash, not by position: test is not simply a contiguous slice of the input
    test_ids = sorted(int(s.split()[-1]) for s, _ in split["test"])
    assert test_ids[-1] - test_ids[0] > 1000
    # tiny corpora still get non-empty eval splits
    tiny = split_of(synthetic_pairs(5))
    assert [len(tiny[k]) for k in ("train", "valid", "test")] == [3, 1, 1]
    with pytest.raises(CorpusError, match="2 pairs cannot fill"):
        split_of(synthetic_pairs(2))
    with pytest.raises(ValueError, match="valid_fraction must be in"):
        split_of(pairs, valid_fraction=0.7)


def test_build_corpus_writes_complete_reproducible_splits(tmp_path):
    root = catalog_tree(tmp_path / "catalogs")
    infos = [build_corpus(tmp_path / f"out{i}", "de", search_paths=[root], min_pairs=5) for i in (0, 1)]
    info = infos[0]
    assert sum(info.counts.values()) == len(EXPECTED_GOOD) + len(EXPECTED_DUPS)
    assert all(info.counts[s] >= 1 for s in ("train", "valid", "test"))
    written = []
    for split in ("train", "valid", "test"):
        src, tgt = info.paths(split)
        pairs = read_parallel(src, tgt)
        assert len(pairs) == info.counts[split]
        written += pairs
        for path in (src, tgt):  # same inputs -> byte-identical files
            assert path.read_bytes() == (tmp_path / "out1" / path.name).read_bytes()
    assert sorted(written) == sorted(EXPECTED_GOOD + EXPECTED_DUPS)
    loaded = load_corpus_info(tmp_path / "out0")
    assert loaded.counts == info.counts and loaded.files == info.files
    assert loaded.stats == info.stats and loaded.catalogs == info.catalogs
    assert not list((tmp_path / "out0").glob(".*tmp"))


def test_interrupted_build_leaves_no_complete_looking_corpus(tmp_path, monkeypatch):
    root = catalog_tree(tmp_path / "catalogs")
    out = tmp_path / "out"
    build_corpus(out, search_paths=[root], min_pairs=5)
    real_write, calls = corpus_mod.write_text, []

    def failing_write(path, text):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(path, text)

    monkeypatch.setattr(corpus_mod, "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build_corpus(out, search_paths=[root], min_pairs=5)
    with pytest.raises(CorpusError, match="no complete corpus here"):
        load_corpus_info(out)
    assert not list(out.glob(".*tmp"))
    # train/valid now come from two builds: the split files are refused as well
    with pytest.raises(CorpusError, match="corpus build into this folder did not finish"):
        read_parallel(out / "valid.src", out / "valid.tgt")
    monkeypatch.undo()
    build_corpus(out, search_paths=[root], min_pairs=5)  # a finished build clears the mark
    assert read_parallel(out / "valid.src", out / "valid.tgt")


def test_too_few_pairs_says_how_many_and_where(tmp_path):
    root = catalog_tree(tmp_path / "catalogs")
    with pytest.raises(CorpusError) as err:
        build_corpus(tmp_path / "out", "de", search_paths=[root, tmp_path / "nowhere"], min_pairs=1000)
    message = str(err.value)
    assert f"found {len(EXPECTED_GOOD) + len(EXPECTED_DUPS)} usable en->de" in message
    assert "in 4 'de' .mo catalogs" in message and "need at least 1000" in message
    assert str(root) in message and "nowhere" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(CorpusError, match=r"found 0 usable en->pt_BR .* in 0 'pt_BR'"):
        build_corpus(tmp_path / "out", "pt_BR", search_paths=[root], min_pairs=5)


def test_build_corpus_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"source_lang must be 'en'.*got 'fr'"):
        build_corpus(tmp_path, source_lang="fr", search_paths=[])
    with pytest.raises(ValueError, match=r"target_lang must be a locale name.*got '../de'"):
        build_corpus(tmp_path, target_lang="../de", search_paths=[])
    with pytest.raises(ValueError, match=r"min_pairs must be >= 3 \(one pair per split\), got 1"):
        build_corpus(tmp_path, search_paths=[], min_pairs=1)


@pytest.mark.skipif(not Path("/usr/share/locale/de/LC_MESSAGES").is_dir(),
                    reason="no German gettext catalogs installed")
def test_default_search_finds_the_system_catalogs(tmp_path):
    info = build_corpus(tmp_path / "corpus", "de")
    assert sum(info.counts.values()) >= 1000
    assert any(c.startswith("/usr/share/locale/de") for c in info.catalogs)
    src, tgt = info.paths("test")
    assert len(read_parallel(src, tgt)) == info.counts["test"]


# ---------------------------------------------------------------------------------------------
# read_parallel


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_read_parallel_reads_aligned_lines(tmp_path):
    src = write_bytes(tmp_path / "a.src", "\ufeffHello world\r\nSecond line\n".encode())  # BOM, CRLF
    tgt = write_bytes(tmp_path / "a.tgt", b"Hallo Welt\nZweite Zeile")  # no final newline
    assert read_parallel(src, tgt) == [("Hello world", "Hallo Welt"), ("Second line", "Zweite Zeile")]


def test_read_parallel_errors_name_file_and_line(tmp_path):
    good = write_bytes(tmp_path / "good.tgt", b"one\ntwo\nthree\n")
    with pytest.raises(FileNotFoundError, match=r"source file .*missing\.src: no such file"):
        read_parallel(tmp_path / "missing.src", good)
    short = write_bytes(tmp_path / "short.src", b"one\ntwo\n")
    with pytest.raises(CorpusError, match=r"short\.src has 2 lines, .*good\.tgt has 3; .*short\.src ends before line 3"):
        read_parallel(short, good)
    empty = write_bytes(tmp_path / "empty.src", b"one\n  \nthree\n")
    with pytest.raises(CorpusError, match=r"empty\.src:2: empty line"):
        read_parallel(empty, good)
    bad = write_bytes(tmp_path / "bad.tgt", "one\ntwo\nthr\xe9e\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"bad\.tgt:3: invalid UTF-8 \(invalid continuation byte at byte 3"):
        read_parallel(write_bytes(tmp_path / "ok.src", b"a\nb\nc\n"), bad)



def test_translation_input_keeps_empty_lines_and_drops_the_bom(tmp_path):
    from a2d_trainer.translate import read_sentences

    path = write_bytes(tmp_path / "in.txt", "\ufeffHello\r\n\nBye\n".encode())
    assert read_sentences(path) == ["Hello", "", "Bye"]
    with pytest.raises(CorpusError, match=r"bad\.txt:2: invalid UTF-8"):
        read_sentences(write_bytes(tmp_path / "bad.txt", b"ok\n\xff\n"))

# ---------------------------------------------------------------------------------------------
# tokenizer


TOKENIZER_TEXTS = [f"{w} {x} number {i}" for i, (w, x) in enumerate(
    (w, x) for w in ("cannot open", "kann nicht öffnen", "the file", "die Datei", "Überprüfung")
    for x in ("quickly", "schnell", "later", "später", "now", "jetzt", "again", "erneut"))]


def test_tokenizer_round_trip_specials_and_determinism(tmp_path):
    tok = Tokenizer.train(TOKENIZER_TEXTS, tmp_path / "a", vocab_size=120)
    again = Tokenizer.train(iter(TOKENIZER_TEXTS), tmp_path / "b", vocab_size=120)
    assert tok.model_path == tmp_path / "a.model"
    assert tok.model_path.read_bytes() == again.model_path.read_bytes()
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, 1, BOS_ID, EOS_ID)
    assert 8 < tok.vocab_size <= 120
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        assert ids and all(i > EOS_ID for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([BOS_ID] + ids + [EOS_ID, PAD_ID, PAD_ID]) == text
    loaded = Tokenizer.load(tok.model_path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TOKENIZER_TEXTS[7]) == tok.encode(TOKENIZER_TEXTS[7])
    assert not list(tmp_path.glob(".*tmp"))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer model .*nope\.model: no such file"):
        Tokenizer.load(tmp_path / "nope.model")
    junk = write_bytes(tmp_path / "junk.model", b"not a model")
    with pytest.raises(ValueError, match=r"junk\.model: not a sentencepiece model"):
        Tokenizer.load(junk)
    with pytest.raises(ValueError, match=r"texts must be non-empty strings, got text 1 = ''"):
        Tokenizer.train(["fine", ""], tmp_path / "t", vocab_size=50)
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 8, got 2"):
        Tokenizer.train(["fine"], tmp_path / "t", vocab_size=2)


# ---------------------------------------------------------------------------------------------
# collate, encode_pairs, batches_by_tokens


def test_collate_layout_and_masks():
    batch = collate([([5, 6, 7], [8]), ([9], [10, 11, 12, 13])], pad_id=0, bos_id=2, eos_id=3)
    assert batch.src.tolist() == [[5, 6, 7, 3], [9, 3, 0, 0]]
    assert batch.tgt_in.tolist() == [[2, 8, 0, 0, 0], [2, 10, 11, 12, 13]]
    assert batch.tgt_out.tolist() == [[8, 3, 0, 0, 0], [10, 11, 12, 13, 3]]
    assert batch.src_padding_mask.tolist() == [[False] * 4, [False, False, True, True]]
    assert batch.tgt_padding_mask.tolist() == [[False, False, True, True, True], [False] * 5]
    assert batch.ntokens == 2 + 5 and batch.nsentences == 2
    assert batch.src.dtype == torch.long and batch.src_padding_mask.dtype == torch.bool
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out) and moved.ntokens == batch.ntokens
    empty_target = collate([([5], [])])
    assert empty_target.tgt_in.tolist() == [[BOS_ID]] and empty_target.tgt_out.tolist() == [[EOS_ID]]
    with pytest.raises(ValueError, match="items must hold at least one"):
        collate([])


class CharTokenizer:
    """One id per character: enough to test encode_pairs without sentencepiece."""

    def encode(self, text):
        return [4 + ord(c) % 50 for c in text]


def test_encode_pairs_truncates_to_max_len():
    pairs = [("abcdefghij", "xyz"), ("ab", "klmnopqrstuvw")]
    encoded = encode_pairs(pairs, CharTokenizer(), max_len=6)
    assert encoded[0] == (CharTokenizer().encode("abcde"), CharTokenizer().encode("xyz"))
    assert encoded[1] == (CharTokenizer().encode("ab"), CharTokenizer().encode("klmno"))
    batch = collate(encoded)
    assert batch.src.shape[1] <= 6 and batch.tgt_in.shape[1] <= 6
    with pytest.raises(ValueError, match="max_len must be an int >= 2.*got 1"):
        encode_pairs(pairs, CharTokenizer(), max_len=1)


def random_encoded(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(4, 100) for _ in range(rng.randrange(0, 30))],
             [rng.randrange(4, 100) for _ in range(rng.randrange(0, 30))]) for _ in range(n)]


def unpad(batch):
    """The (x, y) pairs a batch holds, recovered through its masks."""
    items = []
    for i in range(batch.nsentences):
        src = batch.src[i][~batch.src_padding_mask[i]].tolist()
        tgt = batch.tgt_out[i][~batch.tgt_padding_mask[i]].tolist()
        tgt_in = batch.tgt_in[i][~batch.tgt_padding_mask[i]].tolist()
        assert src[-1] == EOS_ID and tgt[-1] == EOS_ID and tgt_in[0] == BOS_ID
        assert tgt_in[1:] == tgt[:-1]
        assert (batch.src[i][batch.src_padding_mask[i]] == PAD_ID).all()
        assert (batch.tgt_in[i][batch.tgt_padding_mask[i]] == PAD_ID).all()
        items.append((src[:-1], tgt[:-1]))
    return items


def test_batches_respect_budget_and_cover_every_pair_once():
    encoded = random_encoded(500)
    batches = batches_by_tokens(encoded, max_tokens=200, shuffle=True, seed=1, epoch=1)
    seen = []
    for batch in batches:
        width = max(batch.src.shape[1], batch.tgt_in.shape[1])
        assert batch.nsentences * width <= 200
        items = unpad(batch)
        assert batch.ntokens == sum(len(y) + 1 for _, y in items)
        # masks are exactly "beyond each row's length", and every row reaches the padded width
        assert not batch.src_padding_mask[:, 0].any() and not batch.tgt_padding_mask[:, 0].any()
        assert (~batch.src_padding_mask).sum(1).max() == batch.src.shape[1]
        seen += items
    assert sorted(map(repr, seen)) == sorted(map(repr, encoded))
    # length bucketing keeps padding low: well under the worst case of random batching
    real = sum(len(x) + 1 + len(y) + 1 for x, y in encoded)
    padded = sum(b.src.numel() + b.tgt_in.numel() for b in batches)
    assert real / padded > 0.75


def test_batches_are_deterministic_per_seed_and_epoch():
    encoded = random_encoded(300)

    def signature(batches):
        return [b.src.tolist() + b.tgt_in.tolist() for b in batches]

    shuffled = batches_by_tokens(encoded, 150, True, seed=7, epoch=2)
    widths = [max(b.src.shape[1], b.tgt_in.shape[1]) for b in shuffled]
    assert widths != sorted(widths)  # the batch order is shuffled, not only ties within a length
    first = signature(shuffled)
    assert first == signature(batches_by_tokens(encoded, 150, True, seed=7, epoch=2))
    assert first != signature(batches_by_tokens(encoded, 150, True, seed=7, epoch=3))
    assert first != signature(batches_by_tokens(encoded, 150, True, seed=8, epoch=2))
    ordered = batches_by_tokens(encoded, 150, shuffle=False, seed=0, epoch=1)
    widths = [max(b.src.shape[1], b.tgt_in.shape[1]) for b in ordered]
    assert widths == sorted(widths)  # unshuffled: ascending length (validation / translation)
    assert signature(ordered) == signature(batches_by_tokens(encoded, 150, False, seed=5, epoch=9))


@pytest.mark.parametrize("world_size", [2, 3])
def test_batches_shard_across_ranks(world_size):
    encoded = random_encoded(400, seed=1)
    global_batches = batches_by_tokens(encoded, 120, True, seed=3, epoch=4)
    usable = len(global_batches) // world_size * world_size
    shards = [batches_by_tokens(encoded, 120, True, seed=3, epoch=4, rank=r, world_size=world_size)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == usable // world_size
    for step in range(len(shards[0])):
        for r in range(world_size):
            expected = global_batches[step * world_size + r]
            assert torch.equal(shards[r][step].src, expected.src)
            assert torch.equal(shards[r][step].tgt_out, expected.tgt_out)


def test_unequal_shards_deal_every_batch_for_evaluation():
    encoded = random_encoded(200, seed=2)
    global_batches = batches_by_tokens(encoded, 100, False, seed=0, epoch=1)
    world_size = next(w for w in (3, 4, 5, 7) if len(global_batches) % w)  # equal shards would drop
    shards = [batches_by_tokens(encoded, 100, False, seed=0, epoch=1, rank=r, world_size=world_size,
                                equal_shards=False) for r in range(world_size)]
    assert sum(map(len, shards)) == len(global_batches)
    seen = [item for shard in shards for batch in shard for item in unpad(batch)]
    assert sorted(map(repr, seen)) == sorted(map(repr, encoded))
    single = batches_by_tokens(encoded[:1], 100, False, 0, 1, rank=1, world_size=2, equal_shards=False)
    assert single == []


def test_batches_argument_errors():
    encoded = random_encoded(20)
    longest = max(max(len(x), len(y)) + 1 for x, y in encoded)
    with pytest.raises(ValueError, match=rf"max_tokens={longest - 1} is smaller than pair \d+, which spans {longest}"):
        batches_by_tokens(encoded, longest - 1, True, 0, 1)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\), got 2"):
        batches_by_tokens(encoded, 100, True, 0, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"world_size must be a positive int, got 0"):
        batches_by_tokens(encoded, 100, True, 0, 1, world_size=0)
    with pytest.raises(ValueError, match=r"max_tokens must be a positive int, got 0"):
        batches_by_tokens(encoded, 0, True, 0, 1)
    with pytest.raises(ValueError, match=r"1 batches cannot be shared by world_size=2"):
        batches_by_tokens(encoded, 10_000, True, 0, 1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="encoded must hold at least one pair"):
        batches_by_tokens([], 100, True, 0, 1)
