"""The embedded default corpus: English -> target-language sentence pairs mined from the gettext
message catalogs (``.mo`` files) that are already installed on the machine.

Every Linux image ships human translations of its programs' messages (coreutils, apt, glib, ...)
under ``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``, and some Python packages carry their own.
A ``.mo`` file maps an English msgid to its translated msgstr, so it is a small, real, parallel
corpus that needs no download. Most entries are not sentences (menu labels, format strings,
option tables), hence the filters below.

Filter rules, applied in this order to each (msgid, msgstr) entry; the first rule that fires
names the rejection in ``CorpusInfo.stats``:

1. ``plural`` / ``context`` / ``header`` / ``untranslated``: entries with plural forms (msgid
   contains NUL), a msgctxt (msgid contains the ``\\x04`` separator), the catalog header (empty
   msgid) and empty translations are skipped.
2. ``layout``: tabs, runs of 3+ spaces or lines starting with ``-`` mean column layout (option
   tables, ``--help`` text), not prose.
3. ``markup``: XML/HTML tags or character entities.
4. Accelerator marks are removed on both sides: ``&File`` and ``(_F)`` always (``AT&T`` and
   shell ``&&`` are no marks). An underscore is a GTK mark only when it is the message's sole
   underscore (one mnemonic per label; ``_POSIX2_LOCALEDEF`` is no label): at a word start
   (``_File``) it is removed; inside a word (``Sa_ve``) only when the other side also has
   exactly one underscore (a translated label keeps its mnemonic), it does not sit between two
   capitals (``IP_ADDR``) and the identifier around it does not occur verbatim in the other
   side (translators copy identifiers such as ``open_sync``; mnemonics move to another letter).
5. Whitespace is normalised: every run of (Unicode) whitespace, line breaks included, becomes
   one space; leading and trailing whitespace is removed.
6. ``not_sentence``: the message must start with a letter or digit (optionally after an opening
   quote or bracket), and at least 60% of its non-space characters must be letters, so paths,
   code and symbol soup are dropped.
7. ``format_only`` / ``short`` / ``long``: printf (``%s``, ``%1$d``, ``%(name)s``) and brace
   (``{0}``, ``{name}``) placeholders are allowed, but the source needs at least 3 words made of
   letters outside them (``short`` when it has < 3 words in total, ``format_only`` otherwise),
   and at most 60 words / 400 characters (``long``: licence blocks, help pages).
8. ``identical`` (target equals source, i.e. untranslated) and ``length_ratio`` (character
   lengths differ by more than 3x: a misaligned or truncated translation).

Then pairs are de-duplicated by source: when catalogs disagree, the most frequent translation
wins, ties broken by the smallest string, so the result does not depend on the order in which
catalogs were found. The split is decided by a SHA-256 of the source (never Python's salted
``hash``), so it is identical on every machine and run.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import hashlib
import json
import os
import re
import site
import struct
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

from .atomic import write_text

__all__ = [
    "SPLITS",
    "CatalogError",
    "CorpusError",
    "CorpusInfo",
    "build_corpus",
    "clean_message",
    "clean_pair",
    "default_search_paths",
    "extract_pairs",
    "find_catalogs",
    "load_corpus_info",
    "read_mo",
    "read_lines",
    "read_parallel",
    "split_of",
    "strip_accelerators",
]

SPLITS = ("train", "valid", "test")
MANIFEST = "corpus.json"
# Present while build_corpus replaces a folder's files: a build cut short leaves it, and
# read_parallel refuses such a folder (its splits may come from two different builds).
BUILDING = ".corpus-building"

MIN_WORDS = 3
MAX_WORDS = 60
MAX_CHARS = 400
MIN_LETTER_FRACTION = 0.6
MAX_LENGTH_RATIO = 3.0


class CorpusError(ValueError):
    """Bad corpus input or too little data; the message names the file/line or the search."""


class CatalogError(CorpusError):
    """A ``.mo`` file that cannot be parsed or decoded."""


# --------------------------------------------------------------------------------------------
# .mo parsing


_MO_MAGIC = 0x950412DE


def read_mo(path: str | os.PathLike) -> tuple[list[tuple[str, str]], collections.Counter]:
    """Parse a GNU ``.mo`` catalog into its singular, context-free (msgid, msgstr) entries.

    Returns the decoded entries (header, plural and context entries removed) and a Counter of
    what was skipped. Raises CatalogError naming the file when it is truncated, not a ``.mo``
    file, or not decodable with the charset its header declares.

    Written against the format description in the GNU gettext manual rather than through
    ``gettext.GNUTranslations``: that class decodes eagerly with one charset, merges plural
    forms into the same dict and gives no way to see which entries carried a context.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 20:
        raise CatalogError(f"{path}: not a .mo catalog ({len(data)} bytes, the header alone is 20)")
    for order in ("<", ">"):
        if struct.unpack(order + "I", data[:4])[0] == _MO_MAGIC:
            break
    else:
        raise CatalogError(f"{path}: not a .mo catalog (bad magic number {data[:4].hex()})")
    revision, count, ids_at, strs_at = struct.unpack(order + "4I", data[4:20])
    if revision >> 16 not in (0, 1):
        raise CatalogError(f"{path}: unsupported .mo major revision {revision >> 16}")

    def string(table: int, index: int) -> bytes:
        entry = table + 8 * index
        if entry + 8 > len(data):
            raise CatalogError(f"{path}: truncated string table (entry {index} of {count})")
        length, offset = struct.unpack(order + "2I", data[entry:entry + 8])
        if offset + length > len(data):
            raise CatalogError(f"{path}: truncated string data (entry {index} of {count})")
        return data[offset:offset + length]

    skipped: collections.Counter = collections.Counter()
    raw: list[tuple[bytes, bytes]] = []
    charset = "utf-8"
    for i in range(count):
        msgid, msgstr = string(ids_at, i), string(strs_at, i)
        if not msgid:
            skipped["header"] += 1
            charset = _header_charset(msgstr, path)
        elif b"\x00" in msgid:
            skipped["plural"] += 1
        elif b"\x04" in msgid:
            skipped["context"] += 1
        elif not msgstr:
            skipped["untranslated"] += 1
        else:
            raw.append((msgid, msgstr))

    entries = []
    for msgid, msgstr in raw:
        # msgids are ASCII/UTF-8 English by convention; msgstrs use the header's charset.
        entries.append((_decode(msgid, "utf-8", "msgid", msgid, path),
                        _decode(msgstr, charset, "translation of", msgid, path)))
    return entries, skipped


def _decode(text: bytes, charset: str, what: str, msgid: bytes, path: Path) -> str:
    try:
        return text.decode(charset)
    except UnicodeDecodeError as err:
        raise CatalogError(f"{path}: {what} {msgid[:40]!r} is not valid {charset}: {err.reason}") from None


def _header_charset(header: bytes, path: Path) -> str:
    match = re.search(rb"charset=([A-Za-z0-9_.:-]+)", header)
    if match is None or match.group(1).upper() == b"CHARSET":  # unfilled PO template
        return "utf-8"
    name = match.group(1).decode("ascii")
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise CatalogError(f"{path}: header declares unknown charset {name!r}") from None


# --------------------------------------------------------------------------------------------
# filters


_LAYOUT = re.compile(r"\t| {3,}|(?:^|\n)\s*-")
_MARKUP = re.compile(r"<[A-Za-z/!][^>]*>|&(?:[A-Za-z]+|#[0-9]+|#x[0-9A-Fa-f]+);")
_PAREN_ACCEL = re.compile(r"\s*\([_&][^\W_]\)")  # "ファイル(_F)": the mark shown in parentheses
_WORD_START_ACCEL = re.compile(r"(?<![^\W_])_(?=[^\W_])")  # GTK: "_File", "Save _As"
_QT_ACCEL = re.compile(r"(?<![^\W_]|&)&(?=[^\W_])")  # Qt: "&File", not "AT&T" or "&&"
_MID_WORD_UNDERSCORE = re.compile(r"(?<=[^\W\d_])_(?=[^\W\d_])")  # "Sa_ve"
_PLACEHOLDER = re.compile(
    r"%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGaAcspnm%]"
    r"|%\([^)\s]+\)[-+ #0]*\d*(?:\.\d+)?[a-zA-Z]"
    r"|\{[A-Za-z0-9_.]*\}")
_OPENERS = "\"'“„‘‚«»‹›(["


def strip_accelerators(text: str, counterpart: str = "") -> str:
    """Remove keyboard accelerator marks (rule 4 in the module docstring). ``counterpart`` is
    the other side of the pair, used to tell mid-word mnemonics from identifiers."""
    text = _PAREN_ACCEL.sub("", text)
    if text.count("_") == 1:
        match = _MID_WORD_UNDERSCORE.search(text)
        if match is None:
            text = _WORD_START_ACCEL.sub("", text, count=1)
        elif counterpart.count("_") == 1 and not (
                text[match.start() - 1].isupper() and text[match.end()].isupper()):  # IP_ADDR
            start, end = match.start(), match.end()
            while start > 0 and text[start - 1].isalnum():
                start -= 1
            while end < len(text) and text[end].isalnum():
                end += 1
            if text[start:end] not in counterpart:  # identifiers are copied, mnemonics move
                text = text[:match.start()] + text[match.end():]
    return _QT_ACCEL.sub("", text)


def clean_message(text: str, counterpart: str = "") -> tuple[str | None, str]:
    """Apply rules 2-6 to one side of an entry: (cleaned text, "") or (None, rejection rule)."""
    if _LAYOUT.search(text.strip()):
        return None, "layout"
    if _MARKUP.search(text):
        return None, "markup"
    text = " ".join(strip_accelerators(text, counterpart).split())
    if not text:
        return None, "short"
    first = text.lstrip(_OPENERS)[:1]
    compact = text.replace(" ", "")
    letters = sum(ch.isalpha() for ch in compact)
    if not first.isalnum() or letters < MIN_LETTER_FRACTION * len(compact):
        return None, "not_sentence"
    return text, ""


def _letter_words(text: str) -> int:
    return sum(any(ch.isalpha() for ch in w) for w in _PLACEHOLDER.sub(" ", text).split())


def clean_pair(source: str, target: str) -> tuple[tuple[str, str] | None, str]:
    """Apply rules 2-8 to an entry: ((source, target), "") or (None, rejection rule)."""
    src, why = clean_message(source, target)
    if src is None:
        return None, why
    tgt, why = clean_message(target, source)
    if tgt is None:
        return None, why
    words = len(src.split())
    if words < MIN_WORDS:
        return None, "short"
    if _letter_words(src) < MIN_WORDS:
        return None, "format_only"
    if words > MAX_WORDS or len(src) > MAX_CHARS:
        return None, "long"
    if tgt == src:
        return None, "identical"
    ratio = len(tgt) / len(src)
    if not 1 / MAX_LENGTH_RATIO <= ratio <= MAX_LENGTH_RATIO:
        return None, "length_ratio"
    return (src, tgt), ""


# --------------------------------------------------------------------------------------------
# catalog discovery


def default_search_paths() -> list[Path]:
    """System locale folders and this interpreter's site-packages, those that exist."""
    candidates = [
        Path("/usr/share/locale"),
        Path("/usr/share/locale-langpack"),
        Path("/usr/local/share/locale"),
        Path(sys.prefix) / "share" / "locale",
        Path(sys.base_prefix) / "share" / "locale",
    ]
    for getter in (site.getsitepackages, lambda: [site.getusersitepackages()]):
        try:
            candidates.extend(Path(p) for p in getter())
        except AttributeError:  # some virtualenv flavours lack these
            pass
    for key in ("purelib", "platlib"):
        candidates.append(Path(sysconfig.get_paths()[key]))
    seen, paths = set(), []
    for path in candidates:
        real = os.path.realpath(path)
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            paths.append(path)
    return paths


def _normalise_lang(lang: str) -> str:
    return lang.lower().replace("-", "_")


def _locale_dir_matches(dirname: str, target_lang: str) -> bool:
    """``de`` matches de, de_DE, de_CH.UTF-8, de@euro; ``de_CH`` only matches de_CH*."""
    base = _normalise_lang(dirname.split(".")[0].split("@")[0])
    return base == target_lang or ("_" not in target_lang and base.startswith(target_lang + "_"))


def find_catalogs(target_lang: str, search_paths: Iterable[str | os.PathLike]) -> list[Path]:
    """All ``<lang>/LC_MESSAGES/*.mo`` files below the search paths, sorted, symlinks resolved
    and de-duplicated. A search path may also be a single ``.mo`` file, taken as is."""
    target = _normalise_lang(target_lang)
    found: dict[str, Path] = {}
    for root in search_paths:
        root = Path(root)
        if root.is_file() and root.suffix == ".mo":
            found.setdefault(os.path.realpath(root), root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            here = Path(dirpath)
            if here.name != "LC_MESSAGES":
                continue
            dirnames[:] = []
            if _locale_dir_matches(here.parent.name, target):
                for name in sorted(filenames):
                    if name.endswith(".mo"):
                        found.setdefault(os.path.realpath(here / name), here / name)
    return sorted(found.values())


# --------------------------------------------------------------------------------------------
# extraction, split, writing


def extract_pairs(catalogs: Sequence[Path]) -> tuple[list[tuple[str, str]], dict, list]:
    """Filtered, de-duplicated (source, target) pairs from the catalogs.

    Returns (pairs sorted by source, stats Counter as a dict, [(catalog, reason)] for catalogs
    that could not be read). Unreadable catalogs are skipped, not fatal: one mis-declared system
    file must not make the whole corpus unbuildable.
    """
    stats: collections.Counter = collections.Counter()
    skipped_catalogs = []
    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in catalogs:
        try:
            entries, skipped = read_mo(path)
        except (CatalogError, OSError) as err:
            skipped_catalogs.append((str(path), str(err)))
            continue
        stats["catalogs"] += 1
        stats.update(skipped)
        stats["entries"] += len(entries) + sum(skipped.values())
        for msgid, msgstr in entries:
            pair, why = clean_pair(msgid, msgstr)
            if pair is None:
                stats[why] += 1
            else:
                stats["kept"] += 1
                votes[pair[0]][pair[1]] += 1
    pairs = []
    for source in sorted(votes):
        # Most frequent translation; ties go to the smallest string (order-independent).
        target = min(votes[source].items(), key=lambda item: (-item[1], item[0]))[0]
        pairs.append((source, target))
    stats["duplicates"] = stats["kept"] - len(pairs)
    stats["pairs"] = len(pairs)
    return pairs, dict(stats), skipped_catalogs


def _hash_key(source: str) -> int:
    return int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "big")


def split_of(pairs: Sequence[tuple[str, str]], valid_fraction: float = 0.05,
             test_fraction: float = 0.05) -> dict[str, list[tuple[str, str]]]:
    """Deterministic train/valid/test split by a SHA-256 of the source.

    Pairs are ordered by hash; the first ``round(test_fraction * n)`` (at least 1) go to test,
    the next ``round(valid_fraction * n)`` (at least 1) to valid, the rest to train. With many
    pairs this is the usual "hash below a threshold" split (a sentence keeps its split when the
    corpus grows), and it still gives non-empty eval splits on tiny corpora. Every split is in
    hash order, i.e. shuffled independently of which catalog a pair came from.
    """
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 0.5:
            raise ValueError(f"{name} must be in [0, 0.5), got {value!r}")
    n = len(pairs)
    n_test = max(1, round(test_fraction * n))
    n_valid = max(1, round(valid_fraction * n))
    if n - n_test - n_valid < 1:
        raise CorpusError(f"{n} pairs cannot fill train, valid and test splits (need at least 3)")
    ordered = sorted(pairs, key=lambda p: (_hash_key(p[0]), p[0]))
    return {
        "test": ordered[:n_test],
        "valid": ordered[n_test:n_test + n_valid],
        "train": ordered[n_test + n_valid:],
    }


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """What ``build_corpus`` wrote. ``files[split] = (source_path, target_path)``."""

    out_dir: Path
    source_lang: str
    target_lang: str
    counts: dict[str, int]
    files: dict[str, tuple[Path, Path]]
    catalogs: tuple[str, ...] = ()
    search_paths: tuple[str, ...] = ()
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_catalogs: tuple[tuple[str, str], ...] = ()

    def paths(self, split: str) -> tuple[Path, Path]:
        if split not in self.files:
            raise KeyError(f"split must be one of {SPLITS}, got {split!r}")
        return self.files[split]

    def to_json(self) -> dict:
        return {
            "source_lang": self.source_lang,
            "target_lang": self.target_lang,
            "counts": self.counts,
            "files": {s: [p.name for p in paths] for s, paths in self.files.items()},
            "catalogs": list(self.catalogs),
            "search_paths": list(self.search_paths),
            "stats": self.stats,
            "skipped_catalogs": [list(x) for x in self.skipped_catalogs],
        }


def _split_files(out_dir: Path) -> dict[str, tuple[Path, Path]]:
    return {s: (out_dir / f"{s}.src", out_dir / f"{s}.tgt") for s in SPLITS}


def build_corpus(out_dir: str | os.PathLike, target_lang: str = "de", source_lang: str = "en",
                 search_paths: Iterable[str | os.PathLike] | None = None, *,
                 min_pairs: int = 1000, valid_fraction: float = 0.05,
                 test_fraction: float = 0.05) -> CorpusInfo:
    """Extract en->``target_lang`` pairs from installed ``.mo`` catalogs and write
    ``out_dir/{train,valid,test}.{src,tgt}`` plus a ``corpus.json`` manifest.

    The manifest is removed first and written last, each file is replaced atomically, so a
    folder with a manifest always holds a complete corpus (``load_corpus_info`` checks it);
    a ``.corpus-building`` marker stands while the files are replaced, so a build cut short
    is refused by ``read_parallel`` rather than read as a mix of two builds.
    Raises CorpusError, saying how many pairs were found and where it looked, when fewer than
    ``min_pairs`` remain after filtering.
    """
    if source_lang != "en":
        raise ValueError(f"source_lang must be 'en' (gettext msgids are English), got {source_lang!r}")
    if not isinstance(target_lang, str) or not re.fullmatch(r"[A-Za-z]{2,3}(?:[_-][A-Za-z0-9]+)?", target_lang):
        raise ValueError(f"target_lang must be a locale name like 'de' or 'de_DE', got {target_lang!r}")
    if min_pairs < 3:
        raise ValueError(f"min_pairs must be >= 3 (one pair per split), got {min_pairs!r}")
    roots = default_search_paths() if search_paths is None else [Path(p) for p in search_paths]
    catalogs = find_catalogs(target_lang, roots)
    pairs, stats, skipped_catalogs = extract_pairs(catalogs)
    where = ", ".join(str(r) for r in roots) or "(no search paths)"
    if len(pairs) < min_pairs:
        raise CorpusError(
            f"found {len(pairs)} usable en->{target_lang} sentence pairs in {stats.get('catalogs', 0)} "
            f"'{target_lang}' .mo catalogs ({len(skipped_catalogs)} unreadable), need at least "
            f"{min_pairs}; searched: {where}. Install translated packages/language packs or pass "
            f"other search_paths.")
    splits = split_of(pairs, valid_fraction, test_fraction)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST
    marker = out_dir / BUILDING
    marker.touch()
    manifest.unlink(missing_ok=True)
    files = _split_files(out_dir)
    for split, (src_path, tgt_path) in files.items():
        write_text(src_path, "".join(s + "\n" for s, _ in splits[split]))
        write_text(tgt_path, "".join(t + "\n" for _, t in splits[split]))
    info = CorpusInfo(
        out_dir=out_dir, source_lang=source_lang, target_lang=target_lang,
        counts={s: len(splits[s]) for s in SPLITS}, files=files,
        catalogs=tuple(str(c) for c in catalogs), search_paths=tuple(str(r) for r in roots),
        stats=stats, skipped_catalogs=tuple(skipped_catalogs))
    write_text(manifest, json.dumps(info.to_json(), indent=1, ensure_ascii=False) + "\n")
    marker.unlink()
    return info


def load_corpus_info(out_dir: str | os.PathLike) -> CorpusInfo:
    """The CorpusInfo of a folder ``build_corpus`` completed; CorpusError if it never finished."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise CorpusError(f"{out_dir}: no complete corpus here ({MANIFEST} missing); run build_corpus")
    meta = json.loads(manifest.read_text(encoding="utf-8"))
    files = {s: (out_dir / a, out_dir / b) for s, (a, b) in meta["files"].items()}
    return CorpusInfo(
        out_dir=out_dir, source_lang=meta["source_lang"], target_lang=meta["target_lang"],
        counts=meta["counts"], files=files, catalogs=tuple(meta["catalogs"]),
        search_paths=tuple(meta["search_paths"]), stats=meta["stats"],
        skipped_catalogs=tuple(tuple(x) for x in meta["skipped_catalogs"]))


# --------------------------------------------------------------------------------------------
# reading parallel text


def read_lines(path: str | os.PathLike, what: str, allow_empty: bool = False) -> list[str]:
    """The lines of a UTF-8 text file (a leading BOM and CR line ends tolerated).

    ``what`` names the file in errors ("source", "input"). Raises FileNotFoundError for a
    missing file and CorpusError naming ``file:line`` for undecodable bytes, or for an
    empty line unless ``allow_empty``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path}: no such file")
    data = path.read_bytes()
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()  # the final newline terminates the last line, it does not start a new one
    lines = []
    for number, line in enumerate(raw, start=1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")  # tolerate a BOM
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"{path}:{number}: invalid UTF-8 ({err.reason} at byte {err.start} of the line)") from None
        text = text.rstrip("\r")
        if not allow_empty and not text.strip():
            raise CorpusError(f"{path}:{number}: empty line (every line must hold a sentence)")
        lines.append(text)
    return lines


def read_parallel(src_path: str | os.PathLike, tgt_path: str | os.PathLike) -> list[tuple[str, str]]:
    """Line-aligned (source, target) pairs from two UTF-8 files, one sentence per line.

    Raises FileNotFoundError for a missing file and CorpusError naming ``file:line`` for
    undecodable bytes or an empty line, or naming both files and their line counts when the
    counts differ.
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    for folder in {src_path.parent, tgt_path.parent}:
        if (folder / BUILDING).exists():
            raise CorpusError(f"{folder}: a corpus build into this folder did not finish ({BUILDING} is "
                              f"there; its splits may come from two builds); build the corpus again")
    src = read_lines(src_path, "source")
    tgt = read_lines(tgt_path, "target")
    if len(src) != len(tgt):
        shorter, line = (src_path, len(src) + 1) if len(src) < len(tgt) else (tgt_path, len(tgt) + 1)
        raise CorpusError(
            f"unequal line counts: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}; "
            f"{shorter} ends before line {line}")
    return list(zip(src, tgt))
