"""Word pairs: read and validate pair files, group glosses, split without leakage.

One `Pair` type feeds every stage. Readers accept the paper's JSON (a list of
``{"swahili": ..., "english": ...}``), JSON with other keys, JSONL, CSV/TSV with a header, and
MUSE/vecmap bilingual dictionaries (``.txt``: one ``source target`` pair per line, separated by
whitespace; a repeated source lists an alternative translation). `write_pairs` writes every one
of these formats. Bad input raises `TLIError` naming the file and the line (TSV, CSV, JSONL,
MUSE) or record (JSON, numbered from 1). Harmless problems are repaired with one summary warning
per kind.

The languages of a pair list (its labels in every table, figure and report) come from the pair
config (``--src-lang`` / ``--tgt-lang``), else from the file's keys (`language_name`), else from
a MUSE file's name (``de-en.txt``); the bundled lexicon is Swahili-English.

The split puts whole groups of related items on one side, so that no control item shares a
Swahili headword, root or stem, or an English gloss (after lower-casing and reducing plurals),
with any trained item.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tli.errors import TLIError
from tli.io import atomic_open

log = logging.getLogger("tli")

#: File formats the readers and writers know, by name; the extension picks one by default.
FORMATS = ("json", "jsonl", "csv", "tsv", "muse")
#: File extension -> format, where the two differ (MUSE and vecmap dictionaries are ``.txt``).
EXTENSIONS = {"txt": "muse"}
#: Values of the ``split`` column.
SPLITS = ("trained", "control")
#: Default field (or column) names of the source word and its translation in pair files.
SRC_KEY, TGT_KEY = "swahili", "english"
#: Columns of the bundled lexicon and of files written by `write_pairs`, after the two keys.
EXTRA_COLUMNS = ("alternatives", "pos", "category", "root", "is_stem", "split")
#: Separator of several glosses in one ``alternatives`` (or ``root``) cell.
ALT_SEP = ";"

_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}


@dataclass(frozen=True)
class Pair:
    """One source entry and its translations.

    Attributes:
        source: The source-language entry (a Swahili headword, stem such as "-zuri", or phrase).
        target: Its main translation.
        alternatives: Further correct translations (later stages mask them as negatives).
        pos: Part of speech (noun, verb, adj, phrase, ...), if known.
        category: Semantic category slug (body, food_drink, ...), if known.
        split: "trained" or "control", or None before a split.
        root: Lexical root(s) shared by morphologically related entries, ``;``-separated.
        is_stem: True for bound stems written with a leading hyphen ("-zuri").
    """

    source: str
    target: str
    alternatives: tuple[str, ...] = ()
    pos: str | None = None
    category: str | None = None
    split: str | None = None
    root: str | None = None
    is_stem: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "alternatives", tuple(self.alternatives))

    @property
    def targets(self) -> tuple[str, ...]:
        """All correct translations: the main target, then the alternatives."""
        return (self.target, *self.alternatives)

    @property
    def is_multiword(self) -> bool:
        """True when the source is a multi-word expression."""
        return len(self.source.split()) > 1


# --------------------------------------------------------------------------------------------
# Reading


class _Repairs:
    """Counts repairs of one kind each and reports one warning per kind."""

    _TEXT = {
        "whitespace": "stripped leading/trailing whitespace from {n} field(s)",
        "nfc": "normalised {n} field(s) to Unicode NFC",
        "duplicate": "dropped {n} exact duplicate record(s)",
        "conflict": "{n} source(s) listed more than once with different pos/category/split/"
        "root/is_stem; kept the first value",
    }

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: dict[str, list[Any]] = {}
        self.keys: dict[str, str] = {}  # "source"/"target" -> the field the file used


    def note(self, kind: str, where: str) -> None:
        entry = self.seen.setdefault(kind, [0, where])
        entry[0] += 1

    def report(self) -> None:
        for kind, (n, where) in self.seen.items():
            log.warning("%s: %s (first at %s)", self.name, self._TEXT[kind].format(n=n), where)


def _bad(name: str, where: str | None, problem: str) -> TLIError:
    return TLIError(f"{name}: {where}: {problem}" if where else f"{name}: {problem}")


def _clean(value: str, fld: str, name: str, where: str, repairs: _Repairs) -> str:
    """Strip and NFC-normalise one string, rejecting characters no word contains."""
    stripped = value.strip()
    if stripped != value:
        repairs.note("whitespace", where)
    for ch in stripped:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            raise _bad(
                name,
                where,
                f'field "{fld}" contains a control or invalid character U+{ord(ch):04X}',
            )
    normal = unicodedata.normalize("NFC", stripped)
    if normal != stripped:
        repairs.note("nfc", where)
    return normal


def _required(rec: dict, keys: Sequence[str], name: str, where: str, repairs: _Repairs) -> str:
    key = next((k for k in keys if k in rec), None)
    if key is None:
        raise _bad(name, where, f'missing field "{keys[0]}"')
    repairs.keys.setdefault(keys[-1], key)
    value = rec[key]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise _bad(name, where, f'field "{key}" must be a string, not {kind}')
    text = _clean(value, key, name, where, repairs)
    if not text:
        raise _bad(name, where, f'field "{key}" is empty or whitespace-only')
    return text


def _optional(rec: dict, key: str, name: str, where: str, repairs: _Repairs) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(name, where, f'field "{key}" must be a string, not {type(value).__name__}')
    return _clean(value, key, name, where, repairs) or None


def _alternatives(rec: dict, name: str, where: str, repairs: _Repairs) -> tuple[str, ...]:
    value = rec.get("alternatives")
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(ALT_SEP)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [piece for v in value for piece in v.split(ALT_SEP)]
    else:
        raise _bad(name, where, 'field "alternatives" must be a string or a list of strings')
    out: list[str] = []
    for item in items:
        # Spaces around ";" are part of the separator convention, not a repair.
        text = _clean(item.strip(), "alternatives", name, where, repairs)
        if text and text not in out:
            out.append(text)
    return tuple(out)


def _to_pair(
    rec: dict, src_key: str, tgt_key: str, name: str, where: str, repairs: _Repairs
) -> Pair:
    """Build one Pair from a record (a dict of raw field values)."""
    source = _required(rec, (src_key, "source"), name, where, repairs)
    target = _required(rec, (tgt_key, "target"), name, where, repairs)
    alternatives = tuple(a for a in _alternatives(rec, name, where, repairs) if a != target)
    split = _optional(rec, "split", name, where, repairs)
    if split is not None:
        split = split.lower()
        if split not in SPLITS:
            raise _bad(
                name, where, f'field "split" must be "trained", "control" or empty: {split!r}'
            )
    stem = rec.get("is_stem")
    if isinstance(stem, str) and not stem.strip():
        stem = None
    if stem is None:
        is_stem = source.startswith("-")
    elif isinstance(stem, bool):
        is_stem = stem
    elif isinstance(stem, int) and stem in (0, 1):
        is_stem = bool(stem)
    elif isinstance(stem, str) and stem.strip().lower() in _TRUE | _FALSE:
        is_stem = stem.strip().lower() in _TRUE
    else:
        raise _bad(name, where, f'field "is_stem" must be 1, 0 or empty: {stem!r}')
    return Pair(
        source=source,
        target=target,
        alternatives=alternatives,
        pos=_optional(rec, "pos", name, where, repairs),
        category=_optional(rec, "category", name, where, repairs),
        split=split,
        root=_optional(rec, "root", name, where, repairs),
        is_stem=is_stem,
    )


class _Record(dict):
    """A JSON object as read, with the first key it repeats (None when it repeats none)."""

    repeated: str | None = None


def _record(items: list[tuple[str, Any]]) -> _Record:
    """``object_pairs_hook``: Python's json would keep the last of two equal keys silently."""
    rec = _Record()
    for key, value in items:
        if key in rec and rec.repeated is None:
            rec.repeated = key
        rec[key] = value
    return rec


def _no_repeats(rec: Any, name: str, where: str) -> None:
    if isinstance(rec, _Record) and rec.repeated is not None:
        raise _bad(name, where, f'field "{rec.repeated}" appears twice; keep one of them')


def _json_records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(text, object_pairs_hook=_record)
    except json.JSONDecodeError as err:
        raise _bad(
            name, None, f"bad JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except (ValueError, RecursionError) as err:
        raise _bad(name, None, f"bad JSON: {err}") from None
    if not isinstance(data, list):
        kind = "an object" if isinstance(data, dict) else type(data).__name__
        raise _bad(name, None, f"expected a JSON list of objects, found {kind}")
    for i, rec in enumerate(data, start=1):
        _no_repeats(rec, name, f"record {i}")
        yield f"record {i}", rec


def _jsonl_records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line, object_pairs_hook=_record)
        except json.JSONDecodeError as err:
            raise _bad(name, f"line {i}", f"bad JSON at column {err.colno}: {err.msg}") from None
        except (ValueError, RecursionError) as err:
            raise _bad(name, f"line {i}", f"bad JSON: {err}") from None
        _no_repeats(rec, name, f"line {i}")
        yield f"line {i}", rec


def _muse_records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """MUSE/vecmap lines: ``source target``, whitespace-separated; blank lines skipped."""
    for i, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise _bad(
                name,
                f"line {i}",
                f"expected 2 whitespace-separated fields (source target), found {len(fields)}",
            )
        yield f"line {i}", {"source": fields[0], "target": fields[1]}


def _tsv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    for i, line in enumerate(text.split("\n"), start=1):
        yield i, line.removesuffix("\r").split("\t")


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise _bad(name, f"line {reader.line_num}", f"bad CSV: {err}") from None
        yield reader.line_num, row


def _table_records(
    rows: Iterable[tuple[int, list[str]]], name: str, src_key: str, tgt_key: str
) -> Iterator[tuple[str, Any]]:
    header: list[str] | None = None
    for line_no, row in rows:
        if all(not cell.strip() for cell in row):
            continue
        where = f"line {line_no}"
        if header is None:
            header = [cell.strip().lower() for cell in row]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise _bad(name, where, f"duplicate column {dupes[0]!r} in the header")
            for keys in ((src_key, "source"), (tgt_key, "target")):
                if not any(k.lower() in header for k in keys):
                    shown = ascii(", ".join(header))
                    shown = shown if len(shown) <= 80 else shown[:77] + "..."
                    raise _bad(name, where, f'missing column "{keys[0]}" in the header {shown}')
            continue
        if len(row) != len(header):
            raise _bad(name, where, f"expected {len(header)} columns, found {len(row)}")
        yield where, dict(zip(header, row, strict=True))


def _keys_lower(rec: dict, src_key: str, tgt_key: str) -> dict:
    """Let a table's lower-cased header match keys given in any case."""
    for key in (src_key, tgt_key):
        if key.lower() in rec and key not in rec:
            rec[key] = rec.pop(key.lower())
    return rec


def detect_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """``fmt`` if given (checked), else the format of the file's extension (`EXTENSIONS`)."""
    path = Path(path)
    if fmt is not None:
        if fmt not in FORMATS:
            raise TLIError(f"{path}: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    suffix = EXTENSIONS.get(suffix, suffix)
    if suffix not in FORMATS:
        known = [f for f in FORMATS if f not in EXTENSIONS.values()] + list(EXTENSIONS)
        raise TLIError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"use one of .{', .'.join(known)} or give the format"
        )
    return suffix


def parse_pairs(
    data: bytes,
    name: str,
    fmt: str,
    *,
    src_key: str = SRC_KEY,
    tgt_key: str = TGT_KEY,
    keys: dict[str, str] | None = None,
) -> list[Pair]:
    """Parse the bytes of a pair file; see `read_pairs`. ``name`` is used in messages.

    ``keys``, if given, receives the fields the file used for ``"source"`` and ``"target"``
    (``src_key`` or the fallback ``source``; nothing for a MUSE file, which has no fields).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise _bad(name, f"line {line}", f"not UTF-8 (byte 0x{data[err.start]:02x})") from None
    text = text.removeprefix("\ufeff")
    if fmt == "json":
        records = _json_records(text, name)
    elif fmt == "muse":
        records = _muse_records(text, name)
    elif fmt == "jsonl":
        records = _jsonl_records(text, name)
    else:
        rows = _tsv_rows(text) if fmt == "tsv" else _csv_rows(text, name)
        records = _table_records(rows, name, src_key, tgt_key)
    repairs = _Repairs(name)
    pairs: list[Pair] = []
    seen: set[Pair] = set()
    for where, rec in records:
        if not isinstance(rec, dict):
            raise _bad(name, where, f"expected a JSON object, found {type(rec).__name__}")
        pair = _to_pair(_keys_lower(rec, src_key, tgt_key), src_key, tgt_key, name, where, repairs)
        if pair in seen:
            repairs.note("duplicate", where)
            continue
        seen.add(pair)
        pairs.append(pair)
    if not pairs:
        raise _bad(name, None, "no pairs")
    grouped = group_pairs(pairs, _repairs=repairs)
    repairs.report()
    if keys is not None and fmt != "muse":
        keys.update(repairs.keys)
    return grouped


def read_pairs(
    path: str | os.PathLike[str],
    *,
    src_key: str = SRC_KEY,
    tgt_key: str = TGT_KEY,
    fmt: str | None = None,
    keys: dict[str, str] | None = None,
) -> list[Pair]:
    """Read, validate and group a pair file.

    Args:
        path: A ``.json``, ``.jsonl``, ``.csv``, ``.tsv`` or (MUSE) ``.txt`` file.
        src_key: Field (or column) of the source word; ``source`` is accepted too.
        tgt_key: Field (or column) of the translation; ``target`` is accepted too.
        fmt: One of `FORMATS`; by default taken from the extension.
        keys: If given, receives the fields the file used (see `parse_pairs`).

    Returns:
        One Pair per distinct source, in order of first appearance; further translations of a
        source become its alternatives.

    Raises:
        TLIError: The file is missing, unreadable, not UTF-8, bad JSON or CSV, lacks a field,
            has an empty field, a row with the wrong number of columns (a MUSE line of other
            than two fields), or no pairs.
    """
    from tli.io import read_bytes

    path = Path(path)
    fmt = detect_format(path, fmt)
    data = read_bytes(path)
    return parse_pairs(data, str(path), fmt, src_key=src_key, tgt_key=tgt_key, keys=keys)


def load_lexicon() -> list[Pair]:
    """The bundled Swahili-English lexicon (``tli/data/lexicon.tsv``), with its split."""
    from importlib import resources

    res = resources.files("tli").joinpath("data/lexicon.tsv")
    try:
        data = res.read_bytes()
    except OSError as err:
        raise TLIError(f"bundled lexicon tli/data/lexicon.tsv: cannot read: {err}") from None
    return parse_pairs(data, "tli/data/lexicon.tsv", "tsv")


def group_pairs(pairs: Iterable[Pair], *, _repairs: _Repairs | None = None) -> list[Pair]:
    """Merge pairs that share a source: later targets become alternatives of the first.

    Metadata (pos, category, split, root, is_stem) comes from the first record; a later record
    that disagrees is counted in a warning when reading a file.
    """
    merged: dict[str, Pair] = {}
    for pair in pairs:
        first = merged.get(pair.source)
        if first is None:
            merged[pair.source] = pair
            continue
        extra = [t for t in pair.targets if t not in first.targets]
        meta = ("pos", "category", "split", "root", "is_stem")
        fill = {k: getattr(pair, k) for k in meta[:4] if getattr(first, k) is None}
        clash = any(
            getattr(first, k) is not None
            and getattr(pair, k) is not None
            and getattr(first, k) != getattr(pair, k)
            for k in meta
        )
        if clash and _repairs is not None:
            _repairs.note("conflict", f'source "{pair.source}"')
        merged[pair.source] = replace(first, alternatives=(*first.alternatives, *extra), **fill)
    return list(merged.values())


def _cells(p: Pair) -> tuple[str, ...]:
    """One pair in the lexicon's column order (`EXTRA_COLUMNS` after source and target)."""
    return (
        p.source,
        p.target,
        ALT_SEP.join(p.alternatives),
        p.pos or "",
        p.category or "",
        p.root or "",
        "1" if p.is_stem else "0",
        p.split or "",
    )


def _json_record(p: Pair, src_key: str, tgt_key: str) -> dict[str, Any]:
    """One pair as a JSON object: the two keys, then the metadata it has."""
    rec: dict[str, Any] = {src_key: p.source, tgt_key: p.target}
    if p.alternatives:
        rec["alternatives"] = list(p.alternatives)
    for key in ("pos", "category", "root", "split"):
        if getattr(p, key) is not None:
            rec[key] = getattr(p, key)
    rec["is_stem"] = p.is_stem
    return rec


def _muse_lines(pairs: Sequence[Pair], path: Path) -> list[str]:
    """``source target`` per translation; metadata that MUSE cannot hold is named in a warning."""
    lines = []
    for p in pairs:
        for target in p.targets:
            for text in (p.source, target):
                if len(text.split()) != 1 or text != text.strip():
                    raise TLIError(
                        f"{path}: cannot write {text!r} (source {p.source!r}) to a MUSE file: "
                        "its fields are separated by whitespace, so an entry must be one word"
                    )
            lines.append(f"{p.source} {target}")
    lost = [k for k in ("pos", "category", "root", "split") if any(getattr(p, k) for p in pairs)]
    if lost:
        log.warning(
            "%s: a MUSE file holds source and target only; dropped the column(s) %s",
            path,
            ", ".join(lost),
        )
    return lines


def write_pairs(
    pairs: Iterable[Pair],
    path: str | os.PathLike[str],
    *,
    src_key: str = SRC_KEY,
    tgt_key: str = TGT_KEY,
    fmt: str | None = None,
) -> None:
    """Write pairs atomically (temp file, then rename) in any of `FORMATS`.

    The format is ``fmt``, else the file's extension. TSV and CSV use the lexicon's layout
    (``src_key``, ``tgt_key``, then `EXTRA_COLUMNS`); JSON is a list of objects and JSONL one
    object per line, each with the two keys and the metadata the pair has; a MUSE file gets one
    ``source target`` line per translation (alternatives repeat the source) and no metadata.
    `read_pairs` reads each back to the same pairs (MUSE: without the metadata).

    Raises:
        TLIError: The format is unknown, or a MUSE entry holds whitespace.
    """
    path = Path(path)
    fmt = detect_format(path, fmt)
    pairs = list(pairs)
    if fmt in ("tsv", "csv"):
        buf = io.StringIO()
        if fmt == "csv":
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow((src_key, tgt_key, *EXTRA_COLUMNS))
            writer.writerows(_cells(p) for p in pairs)
            text = buf.getvalue()
        else:
            rows = [(src_key, tgt_key, *EXTRA_COLUMNS), *(_cells(p) for p in pairs)]
            text = "".join("\t".join(row) + "\n" for row in rows)
    elif fmt == "json":
        records = [_json_record(p, src_key, tgt_key) for p in pairs]
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    elif fmt == "jsonl":
        text = "".join(
            json.dumps(_json_record(p, src_key, tgt_key), ensure_ascii=False) + "\n" for p in pairs
        )
    else:
        text = "".join(line + "\n" for line in _muse_lines(pairs, path))
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


# --------------------------------------------------------------------------------------------
# Leakage keys and the split

#: Swahili grammatical particles that do not link multi-word expressions to each other.
_SW_PARTICLES = frozenset("a wa ya la cha vya za kwa pa mwa na ni si".split())
_EN_DROP_PREFIX = re.compile(r"^(?:to|a|an|the)\s+")
_WORD = re.compile(r"[\w']+")


def _sw_norm(word: str) -> str:
    return word.lower().strip("'").lstrip("-")


def _en_variants(word: str) -> set[str]:
    """The word and its possible singulars, by a few English plural rules."""
    out = {word}
    if len(word) > 3 and word.endswith("ies"):
        out |= {word[:-3] + "y", word[:-1]}
    if word.endswith(("ses", "xes", "zes", "ches", "shes")):
        out.add(word[:-2])
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 2:
        out.add(word[:-1])
    return out


def gloss_keys(gloss: str) -> set[str]:
    """Comparison keys of an English gloss.

    The gloss is lower-cased; parentheses, punctuation and a leading "to" or article are
    dropped; the last word is replaced by each of its possible singulars.
    """
    text = re.sub(r"\([^)]*\)", " ", gloss.lower())
    text = " ".join(re.sub(r"[^\w\s'-]", " ", text).split())
    text = _EN_DROP_PREFIX.sub("", text) or text
    if not text:
        return {gloss.lower()}
    *head, last = text.split(" ")
    prefix = " ".join(head) + " " if head else ""
    return {prefix + v for v in _en_variants(last)}


def leakage_keys(pair: Pair) -> set[str]:
    """Keys that make two pairs related: ``sw:`` Swahili forms, ``en:`` English glosses.

    Swahili: the headword (lower-case, leading hyphen dropped), each root in the ``root``
    column, and each content word of a multi-word expression (grammatical particles such as
    "na", "ya", "za" excepted). English: `gloss_keys` of every translation.
    """
    keys = {"sw:" + _sw_norm(pair.source)}
    words = re.split(r"[;,\s]+", pair.root or "")
    if pair.is_multiword:
        words += [w for w in _WORD.findall(pair.source) if _sw_norm(w) not in _SW_PARTICLES]
    keys.update("sw:" + _sw_norm(w) for w in words if _sw_norm(w))
    keys.update("en:" + key for gloss in pair.targets for key in gloss_keys(gloss))
    return keys


def _components(pairs: Sequence[Pair]) -> list[list[int]]:
    """Connected components of pairs linked by any shared leakage key (union-find)."""
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        for key in leakage_keys(pair):
            j = owner.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(pairs)):
        groups[find(i)].append(i)
    return list(groups.values())


#: Month and weekday names: a pair glossed by one of them is a calendar name (`is_calendar`).
CALENDAR_NAMES = frozenset(
    "january february march april may june july august september october november december "
    "monday tuesday wednesday thursday friday saturday sunday".split()
)
#: Groups of related pairs larger than this always stay trained (see `split_pairs`).
MAX_CONTROL_GROUP = 8
#: Size classes of groups for the split, as (fewest, most) members; the first is singletons.
_SIZE_CLASSES = ((1, 1), (2, 2), (3, 4), (5, MAX_CONTROL_GROUP))
_VOWELS = frozenset("aeiou")


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions, each costing 1."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def is_loanword(pair: Pair) -> bool:
    """True when the Swahili source is spelled like one of its English translations.

    The source is lower-cased with hyphens dropped. It, and its form without a final vowel when
    it has five or more letters (Swahili adds a vowel to borrowed words: ``shati`` -> ``shat``),
    is compared with each translation (lower-cased) of three or more letters. A translation
    matches when a form contains it or is within Levenshtein distance 2 of it; distance 1 when
    either string has three letters or fewer, where two edits leave little in common
    (``jua``/``sun``, ``na``/``and``). So ``benki``/bank, ``tiketi``/ticket,
    ``februari``/february and ``shati``/shirt are loanwords, ``mbwa``/dog is not. The test is
    deliberately broad: a few native words that happen to look like their gloss count too
    (``sawa``/same).
    """
    source = pair.source.lower().replace("-", "")
    forms = {source}
    if len(source) >= 5 and source[-1] in _VOWELS:
        forms.add(source[:-1])
    for target in pair.targets:
        target = target.strip().lower()
        if len(target) < 3:
            continue
        for form in forms:
            limit = 2 if min(len(form), len(target)) >= 4 else 1
            if target in form or _edit_distance(form, target) <= limit:
                return True
    return False


def is_calendar(pair: Pair) -> bool:
    """True when a translation of the pair is a month or weekday name (`CALENDAR_NAMES`)."""
    return any(t.strip().lower() in CALENDAR_NAMES for t in pair.targets)


def _size_class(size: int) -> int:
    """Index in `_SIZE_CLASSES` of a group of ``size`` pairs (at most `MAX_CONTROL_GROUP`)."""
    return next(k for k, (lo, hi) in enumerate(_SIZE_CLASSES) if lo <= size <= hi)


def split_pairs(
    pairs: Sequence[Pair], *, control_fraction: float = 0.1, seed: int = 0
) -> list[Pair]:
    """Assign each pair to "trained" or "control", deterministically and without leakage.

    Related pairs (sharing any `leakage_keys`) form groups (`_components`) that go to one side
    whole. The control set is drawn to look like the whole list:

    - **categories**: at most ``round(control_fraction * size)`` pairs of each category (its
      quota); the quotas add up to the control size aimed at, ``Q``;
    - **group sizes**: about the list's share of pairs that belong to multi-member groups, i.e.
      ``M = round(Q * pairs in multi-member groups / all pairs)`` pairs, split over the size
      classes 2, 3-4 and 5-`MAX_CONTROL_GROUP` in proportion to the pairs each class holds (the
      singletons' budget is ``Q - M``). Groups larger than `MAX_CONTROL_GROUP` always stay
      trained (one would be a large, internally related block of the control set), so their
      share of ``M`` falls on the smaller multi-member groups;
    - **loanwords and calendar names** (`is_loanword`, `is_calendar`): at most
      ``floor(Q * count / all pairs)`` of each, so that their control share is no higher than
      their trained share.

    Groups are visited in an order fixed by ``seed`` and each group's own pairs (a hash of
    the seed and their sorted sources and targets), never by input order, so the same pairs
    and seed give the same split in any row order. First pass: size classes from the largest
    down, each group taken while its class budget, every category quota it touches and the
    loanword and calendar limits allow. Second pass: the remaining groups smallest first, taken
    while the quotas and limits allow, to fill what the budgets left over.

    Args:
        pairs: The pairs; any existing split is replaced.
        control_fraction: Share of each category to hold out, in [0, 1).
        seed: Seed of the visiting order.

    Returns:
        The pairs in input order with ``split`` filled.
    """
    if not 0 <= control_fraction < 1:
        raise ValueError(f"control_fraction must be in [0, 1), got {control_fraction}")
    total = max(len(pairs), 1)
    sizes = Counter(p.category or "" for p in pairs)
    quota = {c: int(n * control_fraction + 0.5) for c, n in sizes.items()}
    target = sum(quota.values())
    flags = {
        "loanword": [is_loanword(p) for p in pairs],
        "calendar": [is_calendar(p) for p in pairs],
    }
    limit = {name: target * sum(marks) // total for name, marks in flags.items()}

    def order(comp: list[int]) -> tuple[str, tuple[str, ...]]:
        names = tuple(sorted(f"{pairs[i].source}\t{pairs[i].target}" for i in comp))
        text = f"{seed}\n" + "\n".join(names)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return digest, names

    comps = _components(pairs)
    groups = sorted((c for c in comps if len(c) <= MAX_CONTROL_GROUP), key=order)
    multi = int(target * sum(len(c) for c in comps if len(c) > 1) / total + 0.5)
    held = Counter(_size_class(len(c)) for c in groups for _ in c)
    held_multi = sum(n for k, n in held.items() if k > 0)
    budget = {0: target - multi}
    for k in range(1, len(_SIZE_CLASSES)):
        budget[k] = int(multi * held[k] / held_multi + 0.5) if held_multi else 0

    taken: Counter[str] = Counter()  # control pairs per category
    marked: Counter[str] = Counter()  # control loanwords and calendar names
    control: set[int] = set()

    def fits(comp: list[int]) -> bool:
        need = Counter(pairs[i].category or "" for i in comp)
        if any(taken[c] + k > quota[c] for c, k in need.items()):
            return False
        return all(
            marked[name] + sum(marks[i] for i in comp) <= limit[name]
            for name, marks in flags.items()
        )

    def take(comp: list[int]) -> None:
        taken.update(pairs[i].category or "" for i in comp)
        for name, marks in flags.items():
            marked[name] += sum(marks[i] for i in comp)
        control.update(comp)

    for k in reversed(range(len(_SIZE_CLASSES))):
        used = 0
        for comp in groups:
            if _size_class(len(comp)) == k and used + len(comp) <= budget[k] and fits(comp):
                take(comp)
                used += len(comp)
    for comp in sorted(groups, key=len):
        if comp[0] not in control and fits(comp):
            take(comp)
    return [replace(p, split="control" if i in control else "trained") for i, p in enumerate(pairs)]


def split_sets(pairs: Iterable[Pair]) -> dict[str, list[Pair]]:
    """Pairs by set: ``{"trained": [...], "control": [...]}``; no split counts as trained."""
    sets: dict[str, list[Pair]] = {"trained": [], "control": []}
    for p in pairs:
        sets["control" if p.split == "control" else "trained"].append(p)
    return sets


def check_leakage(
    trained: Iterable[Pair],
    control: Iterable[Pair],
    languages: tuple[str, str] = ("source", "target"),
) -> list[str]:
    """One line per control pair that shares a headword, root, stem or gloss with a trained pair.

    ``languages`` names the two sides in the lines (e.g. ``("Swahili", "English")``).
    """
    owners: dict[str, list[Pair]] = defaultdict(list)
    for p in trained:
        for key in leakage_keys(p):
            owners[key].append(p)
    found: list[str] = []
    for c in control:
        for key in sorted(leakage_keys(c)):
            what = f"{languages[0]} headword/root/word" if key.startswith("sw:") else (
                f"{languages[1]} gloss"
            )
            for t in owners.get(key, ()):
                found.append(
                    f'control "{c.source}" ({c.target}) shares the {what} "{key[3:]}" '
                    f'with trained "{t.source}" ({t.target})'
                )
    return found


# --------------------------------------------------------------------------------------------
# Gold answers for retrieval


@dataclass(frozen=True)
class Gold:
    """Queries, candidates and correct answers for retrieval over a list of pairs.

    ``candidates[i]`` belongs to ``queries[i]`` (one per pair), so index i is always correct;
    ``correct[i]`` adds every other candidate that is also a listed translation.

    Attributes:
        queries: One query string per pair.
        candidates: One candidate string per pair, aligned with the queries.
        accept: Per query, every acceptable answer, case-folded.
        correct: Per query, the indices of candidates that are acceptable answers.
    """

    queries: list[str]
    candidates: list[str]
    accept: list[frozenset[str]] = field(repr=False)
    correct: list[frozenset[int]] = field(repr=False)


def _fold(text: str) -> str:
    """Lookup form of a string: case-folded, whitespace collapsed (as in `tli.metrics`)."""
    return " ".join(text.casefold().split())


def gold_keys(pairs: Sequence[Pair], *, reverse: bool = False) -> Gold:
    """Retrieval keys: source -> target (default) or, with ``reverse``, target -> source.

    Forward, a query's acceptable answers are its target and alternatives. Reverse, a target's
    acceptable answers are all sources that list it among their translations. Strings are
    compared case-folded with whitespace collapsed, so
    ``tli.metrics.gold_mask_from_keys(gold.accept, gold.candidates)`` gives the same answers as
    ``gold.correct`` as a ``(B, C)`` mask.
    """
    if not reverse:
        queries = [p.source for p in pairs]
        candidates = [p.target for p in pairs]
        accept = [frozenset(_fold(t) for t in p.targets) for p in pairs]
    else:
        sources_of: dict[str, set[str]] = defaultdict(set)
        for p in pairs:
            for t in p.targets:
                sources_of[_fold(t)].add(_fold(p.source))
        queries = [p.target for p in pairs]
        candidates = [p.source for p in pairs]
        accept = [frozenset(sources_of[_fold(p.target)]) for p in pairs]
    where: dict[str, list[int]] = defaultdict(list)
    for j, cand in enumerate(candidates):
        where[_fold(cand)].append(j)
    correct = [frozenset(j for a in acc for j in where.get(a, ())) for acc in accept]
    return Gold(queries, candidates, accept, correct)


def gold_mask(pairs: Sequence[Pair]) -> Any:
    """Source -> target gold mask ``(B, B)``: the diagonal plus every listed translation."""
    from tli.metrics import gold_mask_from_keys

    gold = gold_keys(pairs)
    return gold_mask_from_keys(gold.accept, gold.candidates)


def check_sets(sets: Mapping[str, Sequence[Pair]], stage: str = "the scan") -> dict[str, list]:
    """The non-empty sets, each holding at least 2 pairs (a baseline needs mismatched pairs).

    Raises:
        TLIError: If a set holds a single pair, or every set is empty.
    """
    out = {name: list(items) for name, items in sets.items() if items}
    for name, items in out.items():
        if len(items) < 2:
            raise TLIError(
                f"set {name!r} has {len(items)} pair; {stage} needs at least 2 per set "
                "(the baseline is made of mismatched pairs)"
            )
    if not out:
        raise TLIError(f"nothing for {stage}: every set is empty")
    return out


# --------------------------------------------------------------------------------------------
# Languages

#: The languages of the bundled lexicon.
LEXICON_LANGUAGES = ("Swahili", "English")
#: A MUSE dictionary's file name that names its languages, e.g. ``de-en.txt``, ``sw-en.0-5000.txt``.
_MUSE_NAME = re.compile(r"^([A-Za-z]{2,3})-([A-Za-z]{2,3})(?:[._-]|$)")


def language_name(key: str) -> str:
    """The label of a language given as a file key or a name: ``swahili`` -> ``Swahili``.

    A key that looks like a word (more than 3 letters) is capitalised; codes such as ``de`` or
    ``sw`` and the neutral ``source`` / ``target`` stay as they are.
    """
    key = key.strip()
    if key in ("source", "target") or not key.isalpha() or len(key) <= 3:
        return key
    return key[0].upper() + key[1:]


def file_languages(
    path: str | os.PathLike[str], fmt: str, keys: Mapping[str, str]
) -> tuple[str, str]:
    """The languages a pair file names: its keys, or a MUSE file's ``xx-yy`` name."""
    if fmt == "muse":
        found = _MUSE_NAME.match(Path(path).name)
        return (found.group(1), found.group(2)) if found else ("source", "target")
    return language_name(keys.get("source", "source")), language_name(keys.get("target", "target"))


def language_code(name: str) -> str | None:
    """The IETF/ISO 639 code of a language name or code (``Swahili`` -> ``sw``), else None."""
    import langcodes

    text = name.strip()
    try:
        if langcodes.tag_is_valid(text) and text.lower() not in ("source", "target"):
            return langcodes.standardize_tag(text)
        return str(langcodes.find(text).language)
    except (LookupError, ValueError):
        return None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hex), to record which data a run used."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise TLIError(f"{path}: cannot read: {err.strerror or err}") from None


@dataclass
class PairSets:
    """The trained and control sets a command works on, and where they came from.

    Attributes:
        trained: The trained set.
        control: The control set (may be empty).
        leaks: One line per control pair related to a trained pair (:func:`check_leakage`).
        source: The pair file, or "the bundled lexicon".
        control_source: The control file, if one was given.
        how: How the sets were formed, in words (for summaries).
        languages: The source and target language, as labels (:func:`language_name`).
        sha256: File name -> SHA-256 of its bytes (the bundled lexicon's too).
    """

    trained: list[Pair]
    control: list[Pair]
    leaks: list[str]
    source: str
    control_source: str | None = None
    how: str = ""
    languages: tuple[str, str] = ("source", "target")
    sha256: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a run records about its data: files, digests, counts, languages, the split."""
        return {
            "source": self.source,
            "control_source": self.control_source,
            "sha256": dict(self.sha256),
            "trained": len(self.trained),
            "control": len(self.control),
            "how": self.how,
            "src_lang": self.languages[0],
            "tgt_lang": self.languages[1],
        }

    @property
    def where(self) -> str:
        """The file(s) the sets came from, for messages."""
        return self.source + (f" and {self.control_source}" if self.control_source else "")

    def as_dict(self) -> dict[str, list[Pair]]:
        """``{"trained": [...], "control": [...]}``."""
        return {"trained": list(self.trained), "control": list(self.control)}

    def check_leakage(self, allow: bool = False, how: str = "--allow-overlap") -> None:
        """The one leakage rule of every command: related control pairs are an error.

        A control item that shares a headword, root, stem or gloss with a trained item
        (:func:`check_leakage`) is not unseen, so a control figure would overstate
        generalisation. With ``allow`` the overlap is accepted with one warning instead.

        Args:
            allow: Accept the overlap (``--allow-overlap``; ``pairs.allow_overlap`` in a run).
            how: The option that allows it, named in the error.

        Raises:
            TLIError: Naming the file(s), the count and the first overlap, unless ``allow``.
        """
        if not self.leaks:
            return
        found = f"{len(self.leaks)} control item(s) overlap the trained set, e.g. {self.leaks[0]}"
        if not allow:
            raise TLIError(f"{self.where}: {found} (`tli pairs check` lists them; {how} accepts)")
        log.warning("%s: %s (allowed by %s)", self.where, found, how)


def load_sets(
    file: str | os.PathLike[str] | None = None,
    control: str | os.PathLike[str] | None = None,
    *,
    src_key: str = SRC_KEY,
    tgt_key: str = TGT_KEY,
    split_unsplit: bool = False,
    resplit: bool = False,
    control_fraction: float = 0.1,
    split_seed: int = 0,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
) -> PairSets:
    """The trained and control sets of ``--pairs`` / ``--control``: the one rule of every command.

    1. The pairs come from ``file``, or the bundled lexicon (with its stored split).
    2. With ``control``, the control set is every pair of that file and the trained set every
       pair of ``file``; a ``file`` whose own split column marks control rows conflicts with it
       (an error: use one or the other).
    3. Otherwise, with ``resplit`` (or ``split_unsplit`` and a file without a split column),
       tli's seeded leakage-free split (:func:`split_pairs`) forms the sets.
    4. Otherwise the file's split column forms them; rows without a split are trained.

    The leakage check (:func:`check_leakage`) runs on every path; its lines are returned, not
    logged (:meth:`PairSets.warn_leakage` logs one summary).

    The languages are ``src_lang`` / ``tgt_lang`` where given, else those of the bundled
    lexicon (Swahili, English), else the file's (:func:`file_languages`).

    Raises:
        TLIError: A file cannot be read or parsed, or ``control`` conflicts with the file's split.
    """
    keys: dict[str, str] = {}
    digests: dict[str, str] = {}
    if file is None:
        found, name = load_lexicon(), "the bundled lexicon"
        langs = LEXICON_LANGUAGES
        from importlib import resources

        data = resources.files("tli").joinpath("data/lexicon.tsv").read_bytes()
        digests["tli/data/lexicon.tsv"] = hashlib.sha256(data).hexdigest()
    else:
        found = read_pairs(file, src_key=src_key, tgt_key=tgt_key, keys=keys)
        name = str(file)
        langs = file_languages(file, detect_format(file), keys)
        digests[Path(file).name] = file_sha256(file)
    languages = (src_lang or langs[0], tgt_lang or langs[1])
    has_split = any(p.split for p in found)
    if control is not None:
        sets = split_sets(found)
        if sets["control"] and not resplit:
            raise TLIError(
                f"{name} has its own control split and --control ({control}) was given: use one "
                "or the other"
            )
        trained = [replace(p, split="trained") for p in found]
        held = [
            replace(p, split="control")
            for p in read_pairs(control, src_key=src_key, tgt_key=tgt_key)
        ]
        digests[Path(control).name] = file_sha256(control)
        how = f"trained: every pair of {name}; control: every pair of {control}"
    else:
        if resplit or (split_unsplit and not has_split):
            found = split_pairs(found, control_fraction=control_fraction, seed=split_seed)
            how = (
                f"tli's leakage-free split of {name} (control fraction {control_fraction}, "
                f"seed {split_seed})"
            )
        else:
            how = f"the split column of {name}" if has_split else f"every pair of {name} (trained)"
        sets = split_sets(found)
        trained, held = sets["trained"], sets["control"]
    return PairSets(
        trained=trained,
        control=held,
        leaks=check_leakage(trained, held, languages),
        source=name,
        control_source=None if control is None else str(control),
        how=how,
        languages=languages,
        sha256=digests,
    )


# --------------------------------------------------------------------------------------------
# Summary and CLI


def summarize(pairs: Sequence[Pair]) -> str:
    """A plain-text summary: counts per set, category and part of speech."""
    sets = split_sets(pairs)
    lines = [
        f"pairs: {len(pairs)} (trained {len(sets['trained'])}, control {len(sets['control'])})",
        f"multi-word expressions: {sum(p.is_multiword for p in pairs)}",
        f"entries with alternatives: {sum(bool(p.alternatives) for p in pairs)}",
        f"stems: {sum(p.is_stem for p in pairs)}",
    ]
    for title, attr in (("category", "category"), ("part of speech", "pos")):
        counts = {s: Counter(getattr(p, attr) or "-" for p in sets[s]) for s in sets}
        names = sorted(counts["trained"].keys() | counts["control"].keys())
        width = max(len(title), *(len(n) for n in names))
        lines.append("")
        lines.append(f"{title:<{width}}  trained  control  total")
        for n in names:
            tr, co = counts["trained"][n], counts["control"][n]
            lines.append(f"{n:<{width}}  {tr:>7}  {co:>7}  {tr + co:>5}")
    return "\n".join(lines)


def token_counts(pairs: Sequence[Pair], tokenizer: Any) -> dict[str, tuple[float, int]]:
    """Mean and max number of tokens (no special tokens) per source and per main target."""
    out = {}
    for side in ("source", "target"):
        counts = [
            len(tokenizer(getattr(p, side), add_special_tokens=False)["input_ids"]) for p in pairs
        ]
        out[side] = (sum(counts) / len(counts), max(counts))
    return out


