"""Tests of tli.pairs: readers, validation, repairs, the leakage-free split, the lexicon."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import tempfile
import types
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tli.cli import main
from tli.errors import TLIError
from tli.pairs import (
    FORMATS,
    MAX_CONTROL_GROUP,
    Pair,
    _components,
    check_leakage,
    gloss_keys,
    gold_keys,
    group_pairs,
    is_calendar,
    is_loanword,
    language_code,
    language_name,
    leakage_keys,
    load_lexicon,
    load_sets,
    read_pairs,
    split_pairs,
    split_sets,
    write_pairs,
)

from conftest import SRC, assert_one_line_error

LEXICON = SRC / "tli" / "data" / "lexicon.tsv"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------
# Formats

EXPECTED = [
    Pair("bahari", "sea", ("ocean",)),
    Pair("kitabu", "book"),
    Pair("bei gani", "how much"),
    Pair("-zuri", "good", is_stem=True),
]

PAPER_JSON = """[
  {"swahili": "bahari", "english": "sea"},
  {"swahili": "bahari", "english": "ocean"},
  {"swahili": "kitabu", "english": "book"},
  {"swahili": "bei gani", "english": "how much"},
  {"swahili": "-zuri", "english": "good"}
]"""

FIXTURES = {
    "paper.json": (PAPER_JSON, {}),
    "custom.json": (
        json.dumps(
            [
                {"sw": "bahari", "en": "sea", "alternatives": ["ocean"]},
                {"sw": "kitabu", "en": "book"},
                {"sw": "bei gani", "en": "how much"},
                {"sw": "-zuri", "en": "good", "is_stem": True},
            ]
        ),
        {"src_key": "sw", "tgt_key": "en"},
    ),
    "pairs.jsonl": (
        '{"swahili": "bahari", "english": "sea"}\n'
        '{"swahili": "bahari", "english": "ocean"}\n'
        "\n"
        '{"swahili": "kitabu", "english": "book"}\n'
        '{"swahili": "bei gani", "english": "how much"}\n'
        '{"swahili": "-zuri", "english": "good"}\n',
        {},
    ),
    "pairs.csv": (
        "source,target,alternatives\r\n"
        "bahari,sea,ocean\r\n"
        "kitabu,book,\r\n"
        '"bei gani","how much",\r\n'
        "-zuri,good,\r\n",
        {},
    ),
    "pairs.tsv": (
        "swahili\tenglish\talternatives\tis_stem\n"
        "bahari\tsea\tocean\t0\n"
        "kitabu\tbook\t\t0\n"
        "bei gani\thow much\t\t\n"
        "-zuri\tgood\t\t1\n",
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_format_reads_to_the_same_pairs(tmp_path, name):
    text, keys = FIXTURES[name]
    assert read_pairs(write(tmp_path / name, text), **keys) == EXPECTED


def test_explicit_format_overrides_the_extension(tmp_path):
    path = write(tmp_path / "pairs.dat", FIXTURES["pairs.tsv"][0])
    assert read_pairs(path, fmt="tsv") == EXPECTED
    with pytest.raises(TLIError, match=r"pairs\.dat: cannot tell the format"):
        read_pairs(path)
    # .txt is a MUSE dictionary: a TSV with four columns is not one
    txt = write(tmp_path / "pairs.txt", FIXTURES["pairs.tsv"][0])
    assert read_pairs(txt, fmt="tsv") == EXPECTED
    with pytest.raises(TLIError, match=r"pairs\.txt: line 1: expected 2 whitespace-separated"):
        read_pairs(txt)


# --- MUSE / vecmap dictionaries and conversion ------------------------------------------------


def test_muse_dictionary_reads_repeated_sources_as_alternatives(tmp_path):
    path = write(tmp_path / "sw-en.txt", "bahari sea\nbahari\tocean\n\nkitabu  book\n-zuri good\n")
    pairs = read_pairs(path)
    assert pairs == [Pair("bahari", "sea", ("ocean",)), Pair("kitabu", "book"),
                     Pair("-zuri", "good", is_stem=True)]  # fmt: skip
    assert read_pairs(write(tmp_path / "dict", "a b\n"), fmt="muse") == [Pair("a", "b")]


@pytest.mark.parametrize(
    "line, found", [("bei gani how much", 4), ("maji", 1), ("a b c", 3)]
)
def test_a_muse_line_of_other_than_two_fields_is_one_line_naming_it(tmp_path, run_cli, line,
                                                                    found):
    path = write(tmp_path / "de-en.txt", f"Hund dog\nKatze cat\n{line}\nBaum tree\n")
    code, _, err = run_cli("pairs", "check", path)
    assert_one_line_error(code, err, "de-en.txt: line 3: expected 2 whitespace-separated "
                                     f"fields (source target), found {found}")  # fmt: skip


def _round_trip_pairs() -> list[Pair]:
    lexicon = load_lexicon()
    # every kind of metadata, alternatives, stems and both splits, but one word per entry
    picked = [p for p in lexicon if " " not in p.source and all(" " not in t for t in p.targets)]
    return picked[:40] + [p for p in picked if p.alternatives][:5] + [
        p for p in picked if p.split == "control"][:5]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_through_write_and_read(tmp_path, fmt, caplog):
    pairs = list(dict.fromkeys(_round_trip_pairs()))
    ext = {"muse": "txt"}.get(fmt, fmt)
    path = tmp_path / f"out.{ext}"
    with caplog.at_level(logging.WARNING, logger="tli"):
        write_pairs(pairs, path, src_key="sw", tgt_key="en")
    back = read_pairs(path, src_key="sw", tgt_key="en")
    if fmt == "muse":  # source and target only; the warning names what was dropped
        keep = [Pair(p.source, p.target, p.alternatives, is_stem=p.is_stem) for p in pairs]
        assert back == keep
        assert "dropped the column(s) pos, category, root, split" in caplog.text
    else:
        assert back == pairs and caplog.records == []


def test_a_multi_word_entry_cannot_go_to_a_muse_file(tmp_path):
    with pytest.raises(TLIError, match=r"cannot write 'bei gani' .* to a MUSE file"):
        write_pairs([Pair("bei gani", "how much")], tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_cli_convert_goes_between_every_pair_of_formats(tmp_path, run_cli):
    pairs = [Pair("Hund", "dog", ("hound",)), Pair("Katze", "cat"), Pair("Baum", "tree")]
    files = {"json": "a.json", "jsonl": "a.jsonl", "csv": "a.csv", "tsv": "a.tsv", "muse": "a.txt"}
    write_pairs(pairs, tmp_path / "start.tsv", src_key="de", tgt_key="en")
    for src_fmt, src_name in files.items():
        source = tmp_path / f"from-{src_fmt}" / src_name
        source.parent.mkdir()
        code, out, err = run_cli("pairs", "convert", tmp_path / "start.tsv", source,
                                 "--src-key", "de", "--tgt-key", "en")  # fmt: skip
        assert code == 0, err
        for dst_fmt, dst_name in files.items():
            target = source.parent / f"to-{dst_name}"
            code, out, err = run_cli("pairs", "convert", source, target, "--src-key", "de",
                                     "--tgt-key", "en")  # fmt: skip
            assert code == 0, err
            assert f"({dst_fmt}): 3 source entries, 4 translations" in out
            assert read_pairs(target, src_key="de", tgt_key="en") == pairs, (src_fmt, dst_fmt)
    code, _, err = run_cli("pairs", "convert", tmp_path / "start.tsv", tmp_path / "x.dat",
                           "--src-key", "de", "--tgt-key", "en")  # fmt: skip
    assert_one_line_error(code, err, "x.dat: cannot tell the format")
    code, _, err = run_cli("pairs", "convert", tmp_path / "start.tsv", tmp_path / "x.dat",
                           "--src-key", "de", "--tgt-key", "en", "--to", "json")  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "x.dat").read_text())[0]["de"] == "Hund"


def test_languages_come_from_the_names_the_keys_or_a_muse_file_name(tmp_path):
    tsv = write(tmp_path / "p.tsv", "de\ten\nHund\tdog\nKatze\tcat\n")
    assert load_sets(tsv, src_key="de", tgt_key="en").languages == ("de", "en")
    assert load_sets(tsv, src_key="de", tgt_key="en", src_lang="German").languages == (
        "German", "en")
    paper = write(tmp_path / "p.json", '[{"swahili": "maji", "english": "water"}]')
    assert load_sets(paper).languages == ("Swahili", "English")
    plain = write(tmp_path / "q.tsv", "source\ttarget\nHund\tdog\n")
    assert load_sets(plain).languages == ("source", "target")  # the file names no language
    muse = write(tmp_path / "de-en.0-5000.txt", "Hund dog\n")
    assert load_sets(muse).languages == ("de", "en")
    assert load_sets(write(tmp_path / "dict.txt", "Hund dog\n")).languages == ("source", "target")
    assert load_sets().languages == ("Swahili", "English")  # the bundled lexicon
    sets = load_sets(muse)
    assert sets.sha256["de-en.0-5000.txt"] == hashlib.sha256(b"Hund dog\n").hexdigest()
    assert sets.summary()["src_lang"] == "de"


def test_language_names_and_codes():
    assert [language_name(k) for k in ("swahili", "de", "source", "zh-Hans")] == [
        "Swahili", "de", "source", "zh-Hans"]
    assert [language_code(n) for n in ("Swahili", "English", "de", "sw", "German")] == [
        "sw", "en", "de", "sw", "de"]
    assert language_code("source") is None and language_code("Qwxzyland") is None


def test_paper_layout_is_read_unchanged(tmp_path, caplog):
    records = [
        {"swahili": "Kamba", "english": "Rope"},
        {"swahili": "Februari", "english": "February"},
        {"swahili": "asante sana", "english": "thank you very much"},
        {"swahili": "bahari", "english": "sea"},
        {"swahili": "dada", "english": "sister"},
        {"swahili": "bahari", "english": "ocean"},
    ]
    path = write(tmp_path / "paper.json", json.dumps(records, ensure_ascii=False))
    with caplog.at_level(logging.WARNING, logger="tli"):
        pairs = read_pairs(path)
    assert caplog.records == []
    assert [(p.source, p.targets) for p in pairs] == [
        ("Kamba", ("Rope",)),
        ("Februari", ("February",)),
        ("asante sana", ("thank you very much",)),
        ("bahari", ("sea", "ocean")),
        ("dada", ("sister",)),
    ]
    assert all(p.split is None and p.category is None for p in pairs)


def test_tsv_metadata_columns_are_honoured(tmp_path):
    path = write(
        tmp_path / "lex.tsv",
        "swahili\tenglish\talternatives\tpos\tcategory\troot\tis_stem\tsplit\n"
        "kitabu\tbook\t\tnoun\tschool_work\ttabu\t0\ttrained\n"
        "-zuri\tgood\tnice; fine\tadj\tadjectives\tzuri\t1\tcontrol\n",
    )
    assert read_pairs(path) == [
        Pair("kitabu", "book", (), "noun", "school_work", "trained", "tabu", False),
        Pair("-zuri", "good", ("nice", "fine"), "adj", "adjectives", "control", "zuri", True),
    ]


def test_group_pairs_merges_sources_and_keeps_first_metadata():
    pairs = [
        Pair("bahari", "sea", pos="noun"),
        Pair("ziwa", "lake"),
        Pair("bahari", "ocean", ("sea",), category="nature"),
    ]
    assert group_pairs(pairs) == [
        Pair("bahari", "sea", ("ocean",), pos="noun", category="nature"),
        Pair("ziwa", "lake"),
    ]


# ---------------------------------------------------------------------------------------------
# Errors

BAD_INPUTS = [
    (
        "bytes.json",
        b'[{"swahili": "maji", "english": "water"},\n {"swahili": "\xff"}]',
        "line 2: not UTF-8",
    ),
    ("syntax.json", '[{"swahili": "maji",\n  "english": }]', "bad JSON at line 2, column 14"),
    ("object.json", '{"swahili": "maji", "english": "water"}', "expected a JSON list of objects"),
    (
        "numbers.json",
        '[{"swahili": "maji", "english": "water"}, 3]',
        "record 2: expected a JSON object",
    ),
    (
        "missing.json",
        '[{"swahili": "maji", "english": "water"}, {"swahili": "moto"}]',
        'record 2: missing field "english"',
    ),
    (
        "blank.json",
        '[{"swahili": "maji", "english": "   "}]',
        'record 1: field "english" is empty or whitespace-only',
    ),
    ("empty.json", '[{"swahili": "", "english": "water"}]', 'record 1: field "swahili" is empty'),
    (
        "type.json",
        '[{"swahili": 7, "english": "seven"}]',
        'record 1: field "swahili" must be a string, not int',
    ),
    ("none.json", "[]", "no pairs"),
    (
        "control.json",
        '[{"swahili": "ma\\u0000ji", "english": "water"}]',
        'record 1: field "swahili" contains a control or invalid character U+0000',
    ),
    (
        "split.json",
        '[{"swahili": "maji", "english": "water", "split": "test"}]',
        'record 1: field "split" must be',
    ),
    (
        "bad.jsonl",
        '{"swahili": "maji", "english": "water"}\n{"swahili": "moto",\n',
        "line 2: bad JSON at column",
    ),
    (
        "missing.jsonl",
        '{"swahili": "maji", "english": "water"}\n\n{"english": "fire"}\n',
        'line 3: missing field "swahili"',
    ),
    ("columns.tsv", "swahili\tenglish\nmaji\twater\nmoto\n", "line 3: expected 2 columns, found 1"),
    ("extra.tsv", "swahili\tenglish\nmaji\twater\tfire\n", "line 2: expected 2 columns, found 3"),
    ("header.csv", "swahili,translation\nmaji,water\n", 'line 1: missing column "english"'),
    ("blank.csv", "source,target\nmaji,water\nmoto,  \n", 'line 3: field "target" is empty'),
    ("columns.csv", "source,target\nmaji,water,fire\n", "line 2: expected 2 columns, found 3"),
    ("quote.csv", 'source,target\nmaji,"wa"ter\n', "line 2: bad CSV"),
    ("header.tsv", "swahili\tenglish\n", "no pairs"),
    (
        "stem.tsv",
        "swahili\tenglish\tis_stem\n-zuri\tgood\tmaybe\n",
        'line 2: field "is_stem" must be',
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_tlierror_naming_file_and_place(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(TLIError) as info:
        read_pairs(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "content", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_via_cli_exits_2_with_one_line(tmp_path, run_cli, name, content, message):
    path = write(tmp_path / name, content)
    code, _, err = run_cli("pairs", "check", str(path))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tli: error: ")
    assert message in err and "Traceback" not in err


def test_missing_file(tmp_path, run_cli):
    path = tmp_path / "nowhere.json"
    with pytest.raises(TLIError, match=r"nowhere\.json: cannot read"):
        read_pairs(path)
    code, _, err = run_cli("pairs", "check", str(path))
    assert code == 2 and err.startswith("tli: error: ") and err.count("\n") == 1


def test_unreadable_file(tmp_path):
    with pytest.raises(TLIError, match="cannot read"):
        read_pairs(tmp_path, fmt="json")  # a directory


# ---------------------------------------------------------------------------------------------
# Repairs


def test_repairs_warn_once_per_kind_and_repair(tmp_path, caplog):
    decomposed = "cafe\u0301"  # "café" in NFD
    records = [
        {"swahili": " maji", "english": "water "},
        {"swahili": "moto", "english": "fire"},
        {"swahili": "moto", "english": "fire"},
        {"swahili": "kahawa", "english": decomposed},
        {"swahili": "moto", "english": "fire"},
        {"swahili": "hewa\t", "english": "air"},
    ]
    path = write(tmp_path / "messy.json", json.dumps(records))
    with caplog.at_level(logging.WARNING, logger="tli"):
        pairs = read_pairs(path)
    assert pairs == [
        Pair("maji", "water"),
        Pair("moto", "fire"),
        Pair("kahawa", "café"),
        Pair("hewa", "air"),
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    whitespace, duplicate, nfc = (
        next(m for m in messages if word in m) for word in ("whitespace", "duplicate", "NFC")
    )
    assert "3 field(s)" in whitespace and "record 1" in whitespace
    assert "2 exact duplicate" in duplicate and "record 3" in duplicate
    assert "1 field(s)" in nfc and "record 4" in nfc
    assert all(m.startswith(f"{path}: ") for m in messages)


def test_conflicting_metadata_warns(tmp_path, caplog):
    path = write(
        tmp_path / "c.tsv",
        "swahili\tenglish\tpos\nbahari\tsea\tnoun\nbahari\tocean\tverb\n",
    )
    with caplog.at_level(logging.WARNING, logger="tli"):
        assert read_pairs(path) == [Pair("bahari", "sea", ("ocean",), pos="noun")]
    assert "different pos" in caplog.text and 'source "bahari"' in caplog.text


def test_repairs_via_cli_warn_and_exit_0(tmp_path, run_cli):
    path = write(tmp_path / "p.jsonl", '{"swahili": "maji ", "english": "water"}\n')
    code, out, err = run_cli("pairs", "check", str(path))
    assert code == 0
    assert err.startswith("tli: warning: ") and "whitespace" in err
    assert "pairs: 1 (trained 1, control 0)" in out


# ---------------------------------------------------------------------------------------------
# Leakage keys and the split


def test_gloss_keys_reduce_plurals_and_noise():
    same = [
        ("house", "houses"),
        ("glass", "glasses"),
        ("bus", "buses"),
        ("city", "cities"),
        ("box", "boxes"),
        ("dish", "dishes"),
        ("church", "churches"),
        ("eat", "to eat"),
        ("How much?", "how much"),
        ("red apple", "red apples"),
        ("you", "you (plural)"),
    ]
    for a, b in same:
        assert gloss_keys(a) & gloss_keys(b), (a, b)
    for a, b in [("bus", "bu"), ("glass", "glas"), ("apple", "apples pie"), ("eat", "heat")]:
        assert not gloss_keys(a) & gloss_keys(b), (a, b)


def test_leakage_keys():
    assert leakage_keys(Pair("-kubwa", "big")) == {"sw:kubwa", "en:big"}
    keys = leakage_keys(Pair("habari za asubuhi", "good morning", root="habari"))
    assert {"sw:habari", "sw:asubuhi", "sw:habari za asubuhi", "en:good morning"} <= keys
    assert "sw:za" not in keys


#: Deliberately related groups: each must land on one side of every split.
RELATED = [
    [Pair("mti", "tree", category="nature"), Pair("miti", "trees", category="nature")],
    [
        Pair("kitabu", "book", category="school", root="tabu"),
        Pair("vitabu", "books", category="school", root="tabu"),
        Pair("kitabu cha hadithi", "storybook", category="school"),
    ],
    [Pair("bei", "price", category="market"), Pair("bei gani", "how much", category="market")],
    [
        Pair("-zuri", "good", is_stem=True, category="adj"),
        Pair("nzuri", "fine", ("good",), category="adj"),
    ],
    [Pair("basi", "bus", category="travel"), Pair("mabasi", "buses", category="travel")],
    [Pair("jiji", "city", category="travel"), Pair("majiji", "cities", category="travel")],
    [
        Pair("-kubwa", "big", is_stem=True, category="adj"),
        Pair("kubwa", "large", category="nature"),
    ],
    [Pair("sanduku", "box", category="house"), Pair("masanduku", "boxes", category="house")],
    [
        Pair("kula", "to eat", category="verbs"),
        Pair("chakula", "food", ("eat",), category="market"),
    ],
]
CATEGORIES = ["nature", "school", "market", "adj", "travel", "house", "verbs"]
FILLER = [
    Pair(f"neno{chr(97 + i % 26)}{i}", f"gloss{i}", category=CATEGORIES[i % len(CATEGORIES)])
    for i in range(203)
]
SYNTHETIC = [p for group in RELATED for p in group] + FILLER
#: Expected control size: 10% of each category, rounded.
N_CONTROL = sum(round(n * 0.1 + 1e-9) for n in Counter(p.category for p in SYNTHETIC).values())


def _splits(pairs):
    return {p.source: p.split for p in pairs}


def test_split_is_stratified_and_leak_free():
    sizes = Counter(p.category for p in SYNTHETIC)
    for seed in range(8):
        split = split_pairs(SYNTHETIC, seed=seed)
        sets = split_sets(split)
        assert check_leakage(sets["trained"], sets["control"]) == []
        per_cat = Counter(p.category for p in sets["control"])
        for cat, n in sizes.items():
            assert per_cat[cat] == round(n * 0.1 + 1e-9), (seed, cat)
        by_source = _splits(split)
        for group in RELATED:
            assert len({by_source[p.source] for p in group}) == 1


def test_split_is_deterministic_and_order_free():
    base = _splits(split_pairs(SYNTHETIC, seed=3))
    assert _splits(split_pairs(SYNTHETIC, seed=3)) == base
    shuffled = SYNTHETIC[:]
    random.Random(1).shuffle(shuffled)
    out = split_pairs(shuffled, seed=3)
    assert [p.source for p in out] == [p.source for p in shuffled]  # input order kept
    assert _splits(out) == base
    assert _splits(split_pairs(SYNTHETIC, seed=4)) != base
    assert sum(s == "control" for s in base.values()) == N_CONTROL


def test_split_replaces_an_existing_split_and_checks_fraction():
    marked = [replace(p, split="control") for p in SYNTHETIC]
    assert _splits(split_pairs(marked)) == _splits(split_pairs(SYNTHETIC))
    assert all(p.split == "trained" for p in split_pairs(SYNTHETIC, control_fraction=0))
    with pytest.raises(ValueError, match="control_fraction"):
        split_pairs(SYNTHETIC, control_fraction=1.0)


def test_check_leakage_names_each_overlap():
    trained = [Pair("miti", "trees"), Pair("vitabu", "books", root="tabu"), Pair("bei", "price")]
    control = [
        Pair("mti", "tree"),
        Pair("kitabu", "volume", root="tabu"),
        Pair("bei gani", "how much"),
        Pair("maji", "water"),
    ]
    leaks = check_leakage(trained, control, ("Swahili", "English"))
    assert len(leaks) == 3
    assert 'English gloss "tree"' in leaks[0] and 'trained "miti"' in leaks[0]
    assert 'target gloss "tree"' in check_leakage(trained, control)[0]  # no languages named
    assert '"tabu"' in leaks[1] and '"bei"' in leaks[2]


def test_split_sets_and_gold_keys():
    pairs = [
        Pair("bahari", "sea", ("ocean",), split="trained"),
        Pair("ziwa", "lake", split="control"),
        Pair("Kitabu", "Book"),
        Pair("bahari kuu", "ocean", split="control"),
    ]
    sets = split_sets(pairs)
    assert [p.source for p in sets["trained"]] == ["bahari", "Kitabu"]
    assert [p.source for p in sets["control"]] == ["ziwa", "bahari kuu"]
    fwd = gold_keys(pairs)
    assert fwd.queries == ["bahari", "ziwa", "Kitabu", "bahari kuu"]
    assert fwd.candidates == ["sea", "lake", "Book", "ocean"]
    assert fwd.accept[0] == {"sea", "ocean"} and fwd.accept[2] == {"book"}
    assert fwd.correct == [{0, 3}, {1}, {2}, {3}]
    rev = gold_keys(pairs, reverse=True)
    assert rev.queries == ["sea", "lake", "Book", "ocean"]
    assert rev.accept[3] == {"bahari", "bahari kuu"}
    assert rev.correct == [{0}, {1}, {2}, {0, 3}]
    metrics = pytest.importorskip("tli.metrics")
    for gold in (fwd, rev):
        mask = metrics.gold_mask_from_keys(gold.accept, gold.candidates)
        assert [set(row.nonzero().flatten().tolist()) for row in mask] == gold.correct


# ---------------------------------------------------------------------------------------------
# CLI: split and check


def _tsv(pairs) -> str:
    rows = ["swahili\tenglish\tcategory\troot\tsplit"]
    rows += [f"{p.source}\t{p.target}\t{p.category or ''}\t{p.root or ''}\t" for p in pairs]
    return "\n".join(rows) + "\n"


def test_cli_split_writes_the_split_in_place(tmp_path, run_cli):
    path = write(tmp_path / "lex.tsv", _tsv(SYNTHETIC))
    path.chmod(0o644)
    # The split of what the CLI reads: _tsv leaves out alternatives, which relate pairs.
    expected = split_pairs(read_pairs(path), seed=2)
    code, out, _ = run_cli("pairs", "split", str(path), "--seed", "2", "--out", str(path))
    assert code == 0 and f"{N_CONTROL} control" in out
    first = path.read_bytes()
    assert (
        first.splitlines()[0]
        == b"swahili\tenglish\talternatives\tpos\tcategory\troot\tis_stem\tsplit"
    )
    assert path.stat().st_mode & 0o777 == 0o644
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    stored = read_pairs(path)
    assert _splits(stored) == _splits(expected)
    assert run_cli("pairs", "split", str(path), "--seed", "2", "--out", str(path))[0] == 0
    assert path.read_bytes() == first
    code, out, _ = run_cli("pairs", "check", str(path))
    assert code == 0 and "leakage between trained and control: none" in out


def test_cli_split_rejects_bad_options(tmp_path, run_cli):
    path = write(tmp_path / "lex.tsv", _tsv(SYNTHETIC))
    with pytest.raises(SystemExit) as info:  # argparse rejects the value itself
        main(["pairs", "split", str(path), "--control-fraction", "1.5", "--out", str(path)])
    assert info.value.code == 2
    code, _, err = run_cli("pairs", "split", str(path), "--out", str(tmp_path / "out.json"))
    assert code == 2 and "give a .tsv file name" in err


LEAKY = "swahili\tenglish\tsplit\nmiti\ttrees\ttrained\nmaji\twater\ttrained\nmti\ttree\tcontrol\n"


def test_cli_check_reports_leakage_within_a_file(tmp_path, run_cli):
    path = write(tmp_path / "leaky.tsv", LEAKY)
    code, out, err = run_cli("pairs", "check", str(path))
    assert code == 2
    assert 'control "mti" (tree) shares the English gloss "tree" with trained "miti"' in out
    assert err.count("\n") == 1 and "1 overlapping item" in err and "--allow-overlap" in err
    code, out, err = run_cli("pairs", "check", str(path), "--allow-overlap")
    assert code == 0 and err.startswith("tli: warning: ")


def test_cli_check_against_a_trained_file(tmp_path, run_cli):
    trained = write(
        tmp_path / "trained.json", '[{"sw": "miti", "en": "trees"}, {"sw": "maji", "en": "water"}]'
    )
    clean = write(tmp_path / "clean.json", '[{"sw": "moto", "en": "fire"}]')
    leaky = write(tmp_path / "leaky.json", '[{"sw": "Maji", "en": "liquid"}]')
    keys = ("--src-key", "sw", "--tgt-key", "en")
    code, out, _ = run_cli("pairs", "check", str(clean), "--against", str(trained), *keys)
    assert code == 0 and f"leakage with {trained}: none" in out
    code, out, err = run_cli("pairs", "check", str(leaky), "--against", str(trained), *keys)
    assert code == 2 and 'sw headword/root/word "maji"' in out  # the file's key names it


def test_cli_check_summary_and_token_counts(tmp_path, run_cli, monkeypatch):
    path = write(
        tmp_path / "lex.tsv",
        "swahili\tenglish\talternatives\tpos\tcategory\tsplit\n"
        "bahari\tsea\tocean\tnoun\tnature\ttrained\n"
        "bei gani\thow much\t\tphrase\tmarket\ttrained\n"
        "moto\tfire\t\tnoun\tnature\tcontrol\n",
    )
    loaded = []

    def load_tokenizer(name):
        loaded.append(name)
        return lambda text, add_special_tokens: {"input_ids": list(text.replace(" ", ""))}

    monkeypatch.setitem(
        sys.modules, "tli.models", types.SimpleNamespace(load_tokenizer=load_tokenizer)
    )
    # Only `tli pairs` is registered: the other commands' modules need the real tli.models.
    monkeypatch.setattr("tli.cli.COMMANDS", ("tli.cli.pairs",))
    code, out, err = run_cli("pairs", "check", str(path), "--model", "fake-model")
    assert code == 0 and err == "" and loaded == ["fake-model"]
    assert "pairs: 3 (trained 2, control 1)" in out
    assert "multi-word expressions: 1" in out and "entries with alternatives: 1" in out
    assert any(line.split() == ["nature", "1", "1", "2"] for line in out.splitlines())
    assert any(line.split() == ["phrase", "1", "0", "1"] for line in out.splitlines())
    # bahari 6, beigani 7, moto 4 characters; sea 3, howmuch 7, fire 4
    assert "tokens per swahili entry (fake-model): mean 5.67, max 7" in out
    assert "tokens per english entry (fake-model): mean 4.67, max 7" in out


# ---------------------------------------------------------------------------------------------
# Robustness: arbitrary input gives pairs or TLIError, nothing else

_JSONISH = st.text(alphabet='[]{}":,\\ \t\n\r01;-aeghilnorstuwx', max_size=120)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["swahili", "english", "alternatives", "split", "pos", "is_stem", "x"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)
_INPUTS = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    _JSONISH.map(str.encode),
    _JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.lists(st.lists(st.text(max_size=8), max_size=4), max_size=5).map(
        lambda rows: "\n".join("\t".join(r) for r in [["swahili", "english"], *rows]).encode()
    ),
)


@settings(max_examples=60, deadline=None)
@given(data=_INPUTS)
def test_readers_never_raise_anything_but_tlierror(data):
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            path = Path(tmp) / f"input.{fmt}"
            path.write_bytes(data)
            try:
                pairs = read_pairs(path)
            except TLIError as err:
                assert str(err) and "\n" not in str(err)
            else:
                assert pairs and all(isinstance(p, Pair) and p.source and p.target for p in pairs)


# ---------------------------------------------------------------------------------------------
# Loanwords, calendar names and group sizes in the split


def test_is_loanword_hand_cases():
    for source, target in [
        ("benki", "bank"),
        ("tiketi", "ticket"),
        ("februari", "february"),
        ("hospitali", "hospital"),
        ("shati", "shirt"),  # without its final vowel
        ("kiswahili", "swahili"),  # contains the gloss
    ]:
        assert is_loanword(Pair(source, target)), source
    assert is_loanword(Pair("-benki", "money", ("bank",)))  # an alternative, hyphen dropped
    for source, target in [
        ("mbwa", "dog"),
        ("jua", "sun"),
        ("na", "and"),
        ("au", "or"),
        ("kitabu", "book"),
    ]:
        assert not is_loanword(Pair(source, target)), source


def test_is_calendar():
    assert is_calendar(Pair("jumatatu", "monday"))
    assert is_calendar(Pair("mei", "May"))
    assert is_calendar(Pair("x", "y", ("december",)))
    assert not is_calendar(Pair("wiki", "week"))
    assert not is_calendar(Pair("mwezi", "moon", ("month",)))


def _share(items, test) -> float:
    return sum(map(test, items)) / len(items)


def test_split_keeps_loanwords_out_of_control_beyond_their_share():
    loans = [Pair(f"benki{i}", f"bank{i}", category="market") for i in range(40)]
    pairs = SYNTHETIC + loans
    for seed in range(6):
        sets = split_sets(split_pairs(pairs, seed=seed))
        assert _share(sets["control"], is_loanword) <= _share(sets["trained"], is_loanword)
        assert check_leakage(sets["trained"], sets["control"]) == []


def test_split_draws_control_from_groups_of_every_size():
    lengths = (2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 7, 12)
    groups = [
        [Pair(f"a{j}x{k}", f"g{j}x{k}", category=CATEGORIES[k % 7], root=f"r{j}") for k in range(n)]
        for j, n in enumerate(lengths)
    ]
    pairs = [p for group in groups for p in group] + FILLER
    assert sorted(map(len, _components(pairs))) == [1] * len(FILLER) + sorted(lengths)
    sizes = {p.source: len(group) for group in groups for p in group}
    for seed in range(6):
        split = split_pairs(pairs, control_fraction=0.2, seed=seed)
        by_source = _splits(split)
        assert all(len({by_source[p.source] for p in group}) == 1 for group in groups)
        control = [p for p in split if p.split == "control"]
        assert not any(sizes.get(p.source, 1) > MAX_CONTROL_GROUP for p in control)
        multi = [p for p in control if p.source in sizes]
        assert multi and {sizes[p.source] for p in multi} != {2}, seed


# ---------------------------------------------------------------------------------------------
# The bundled lexicon


def test_bundled_lexicon_is_clean_and_big_enough(caplog):
    with caplog.at_level(logging.WARNING, logger="tli"):
        pairs = load_lexicon()
    assert caplog.records == [], caplog.text  # no repairs needed
    header = LEXICON.read_text(encoding="utf-8").split("\n", 1)[0]
    assert header == "swahili\tenglish\talternatives\tpos\tcategory\troot\tis_stem\tsplit"
    sets = split_sets(pairs)
    assert len(pairs) >= 1500
    assert sum(p.is_multiword for p in pairs) >= 60
    assert len(sets["control"]) >= 250
    assert all(p.split in ("trained", "control") for p in pairs)
    assert all(p.pos and p.category for p in pairs)
    assert all(p.is_stem == p.source.startswith("-") for p in pairs)
    assert all(p.source == p.source.lower() for p in pairs)
    assert check_leakage(sets["trained"], sets["control"]) == []


#: The command that wrote the stored split (docs/lexicon.md):
#: tli pairs split src/tli/data/lexicon.tsv --seed 0 --control-fraction 0.17 --out ...
LEXICON_FRACTION, LEXICON_SEED = 0.17, 0


def test_bundled_lexicon_split_is_reproduced():
    pairs = load_lexicon()
    split = split_pairs(pairs, control_fraction=LEXICON_FRACTION, seed=LEXICON_SEED)
    assert [p.split for p in split] == [p.split for p in pairs]
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    split = split_pairs(shuffled, control_fraction=LEXICON_FRACTION, seed=LEXICON_SEED)
    assert _splits(split) == _splits(pairs)  # whatever the row order


def test_bundled_lexicon_control_is_not_richer_in_loanwords_or_calendar_names():
    sets = split_sets(load_lexicon())
    for test in (is_loanword, is_calendar):
        assert _share(sets["control"], test) <= _share(sets["trained"], test), test.__name__


def test_bundled_lexicon_control_draws_on_related_word_groups():
    pairs = load_lexicon()
    size = {pairs[i].source: len(comp) for comp in _components(pairs) for i in comp}
    sets = split_sets(pairs)

    def in_group(p):
        return size[p.source] > 1

    trained, control = (_share(sets[s], in_group) for s in ("trained", "control"))
    assert abs(control - trained) <= 0.05, (control, trained)
    assert {size[p.source] for p in sets["control"]} >= {1, 2, 3, 4, 5}


def test_cli_check_on_bundled_lexicon(run_cli):
    code, out, err = run_cli("pairs", "check", str(LEXICON))
    assert code == 0, err
    assert err == ""
    assert "leakage between trained and control: none" in out


# ---------------------------------------------------------------------------------------------
# One loader for every command


class _Reached(Exception):
    """Raised by the spy loader: the command got as far as reading its pair sets."""


@pytest.mark.parametrize("command", ["run", "scan", "train", "evaluate", "probe", "sweep"])
def test_every_command_reads_its_pair_sets_through_load_sets(
    command, monkeypatch, tmp_path, tiny_model_dir
):
    """`tli.pairs.load_sets` is the one rule for --pairs, --control and a split column."""
    import tli.pairs
    from tli.cli import main

    calls = []

    def spy(file=None, control=None, **kwargs):
        calls.append((file, control, kwargs))
        raise _Reached

    pairs = write(tmp_path / "pairs.tsv", "swahili\tenglish\nmaji\twater\nmoto\tfire\n")
    adapter = tmp_path / "adapter"
    if command in ("evaluate", "probe"):  # a real (random) peft adapter: read before the pairs
        from peft import LoraConfig, get_peft_model

        from conftest import tiny_model

        model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(adapter)
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'[sweep]\nmodel = "{tiny_model_dir}"\npairs = "{pairs}"\n'
        '[train]\nlayer = 1\n[grid]\nseed = [0]\n'
    )
    argv = {
        "run": ["run", "--model", tiny_model_dir, "--pairs", pairs, "--out", tmp_path / "r"],
        "scan": ["scan", "--model", tiny_model_dir, "--pairs", pairs, "--out", tmp_path / "s"],
        "train": ["train", "--model", tiny_model_dir, "--pairs", pairs, "--layer", "1",
                  "--out", tmp_path / "t"],
        "evaluate": ["evaluate", "--adapter", adapter, "--model", tiny_model_dir,
                     "--pairs", pairs, "--out", tmp_path / "e"],
        "probe": ["probe", "--adapter", adapter, "--model", tiny_model_dir,
                  "--pairs", pairs, "--out", tmp_path / "p"],
        "sweep": ["sweep", "--grid", grid, "--out", tmp_path / "w"],
    }[command]  # fmt: skip
    monkeypatch.setattr(tli.pairs, "load_sets", spy)
    with pytest.raises(_Reached):
        main([str(a) for a in argv])
    assert len(calls) == 1
    assert Path(calls[0][0]).resolve() == pairs.resolve()


def test_one_leakage_rule_for_every_command(run_cli, inputs, tiny_model_dir, tmp_path):
    """Related control pairs are an error in every command that reads pair sets (as in
    `tli pairs check`), reported once; `--allow-overlap` (`pairs.allow_overlap` in a run)
    turns the error into a single warning."""
    from tli.pairs import load_sets

    from conftest import assert_user_error

    sets = load_sets(inputs / "leaky.tsv")
    assert len(sets.leaks) == 1
    with pytest.raises(TLIError, match=r"leaky.tsv: 1 control item\(s\) overlap .*--allow-o"):
        sets.check_leakage()
    code, _, err = run_cli("pairs", "check", inputs / "leaky.tsv")
    assert_user_error(code, err, "1 overlapping item(s)")
    argv = ["scan", "--model", tiny_model_dir, "--pairs", inputs / "leaky.tsv", "--n-boot", "20",
            "--out", tmp_path / "scan"]  # fmt: skip
    code, _, err = run_cli(*argv)
    assert_user_error(code, err, "leaky.tsv: 1 control item(s) overlap the trained set")
    code, _, err = run_cli(*argv, "--allow-overlap")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "overlap the trained set" in line]
    assert len(warned) == 1 and warned[0].startswith("tli: warning: ")
    assert "allowed by --allow-overlap" in warned[0]
