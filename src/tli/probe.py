"""Probing and scored word translation: does the adapter change what the model *says*?

The evaluation (:mod:`tli.evaluate`) measures vectors; this stage measures text. Both parts
generate greedily (no sampling), batched with left padding and the KV cache, first from the
base model and then from the same model with the LoRA adapter attached; the prompts, the
shots and the decoding are identical on both sides, so every difference is the adapter's.

**Probe** (always): ``n`` pairs sampled from each set go through prompt templates kept in
:class:`ProbeConfig`: direct translation source -> target (``s2t``) and target -> source
(``t2s``), a code-switched sentence (``code_switch``) and a contextual definition (``define``).
Written to ``probe.md`` (prompt, base output, tuned output) and ``probe.json``.

**Scored word translation** (``score``): every item of the trained and control sets (up to
``score_n`` per set, sampled with the seed) is asked in both directions with a few-shot prompt.
The shots come from the trained set only and never include the item itself or any pair that
shares its source or one of its translations (after :func:`normalize_answer`); they are the
first unrelated pairs of one seeded order (:func:`choose_shots`), so most prompts share their
shots and :func:`generate` runs that shared prefix once. The answer is the first non-blank line
of the output (:func:`extract_answer`); it is a hit when it equals the gold translation or any
listed alternative after normalisation (:func:`exact_match`) and the token limit did not cut
it; it also gets a sentence-level chrF (:func:`chrf`, sacrebleu). Base and tuned hits are
compared per set and direction with McNemar's exact test (:func:`compare_hits`). Written to
``probe_scores.md`` and ``probe_scores.json``; :func:`probe_summary_line` turns the latter into
one line for the ``tli run`` report.

**LM ranking** (``rank``, a yardstick of the base model): for each item of the ranked sets the
base model reads the scored translation's few-shot prompt once, and every translation of the set
is scored by its mean token log-probability as the continuation
(:func:`tli.generate.continuation_scores`); P@1 raw and calibrated against a content-free word
(:func:`lm_rank`). Written to ``probe_rank.json`` and ``probe_rank.md``.

:meth:`ProbeResult.load` reads a probe directory back.

A probe directory holds::

    probe.json           config, model, adapter, one row per prompt (base and tuned output)
    probe.md             the same as a Markdown table
    probe_scores.json    (score) per set and direction every figure, and every item
    probe_scores.md      (score) the table, how it was computed, the items whose hit changed
    probe_rank.json      (rank) the LM ranking per set and direction, and every item
    probe_rank.md        (rank) the same as tables
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import string
import time
import unicodedata
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tli.adapters import (
    attached,
    check_adapter,
    check_base,
    is_identity,
    model_facts,
    quantization_note,
    read_adapter,
)
from tli.config import MAX_BATCH, check_int, check_seed
from tli.errors import TLIError
from tli.generate import generate, generate_answers
from tli.io import ensure_dir, nan_from_null

log = logging.getLogger("tli")

#: The probe templates, by name: ``template_<name>`` in :class:`ProbeConfig` holds each.
TEMPLATES: tuple[str, ...] = ("s2t", "t2s", "code_switch", "define")
#: Directions of the scored word translation: source -> target and target -> source.
DIRECTIONS: tuple[str, ...] = ("s2t", "t2s")
#: File names inside a probe directory.
PROBE_JSON, PROBE_MD, SCORES_JSON, SCORES_MD = (
    "probe.json",
    "probe.md",
    "probe_scores.json",
    "probe_scores.md",
)
#: The LM-ranking yardstick's files (:func:`lm_rank`).
RANK_JSON, RANK_MD = "probe_rank.json", "probe_rank.md"

#: Placeholders a probe template may use, and per template the one it must use and the one it
#: must not (a translation prompt that contains its own answer measures nothing).
_PROBE_FIELDS = frozenset({"source", "target", "src_lang", "tgt_lang"})
_PROBE_NEEDS = {
    "s2t": ("source", "target"),
    "t2s": ("target", "source"),
    "code_switch": ("source", "target"),
    "define": ("source", "target"),
}
_HEADER_FIELDS = frozenset({"in_lang", "out_lang"})
#: The template fields; on the command line a literal backslash-n in them is a line break.
TEXT_FIELDS = (*(f"template_{name}" for name in _PROBE_NEEDS), "score_header", "score_shot")
_SHOT_FIELDS = frozenset({"in_lang", "out_lang", "word", "answer"})


@dataclass(frozen=True)
class ProbeConfig:
    """What to probe and score, and how to generate. Not in the paper (its sec. 7 asks for it)."""

    enabled: bool = field(
        default=False,
        metadata={
            "help": "tli run only: after the evaluation, probe the adapter and score word "
            "translation (probe/ in the run directory, one line in the report)"
        },
    )
    n: int = field(
        default=10, metadata={"help": "probe: pairs sampled from each set (trained, control)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the samples and of the shots"})
    templates: tuple[str, ...] = field(
        default=TEMPLATES,
        metadata={"help": f"probe templates to run, comma-separated: {', '.join(TEMPLATES)}"},
    )
    template_s2t: str = field(
        default="Translate the {src_lang} word into {tgt_lang}.\n{src_lang}: {source}\n{tgt_lang}:",
        metadata={"help": "probe template: direct translation, source -> target"},
    )
    template_t2s: str = field(
        default="Translate the {tgt_lang} word into {src_lang}.\n{tgt_lang}: {target}\n{src_lang}:",
        metadata={"help": "probe template: direct translation, target -> source"},
    )
    template_code_switch: str = field(
        default="Rewrite this mixed {src_lang}-{tgt_lang} sentence in plain {tgt_lang}.\n"
        "Sentence: Yesterday my friend and I talked about {source} for a long time.\n"
        "{tgt_lang}:",
        metadata={"help": "probe template: a code-switched sentence (source word in a target one)"},
    )
    template_define: str = field(
        default='Mwalimu aliandika neno "{source}" ubaoni.\n'
        'Question: What does the {src_lang} word "{source}" mean in {tgt_lang}?\nAnswer:',
        metadata={"help": "probe template: a contextual definition"},
    )
    max_new_tokens: int = field(
        default=32, metadata={"help": "probe: most tokens generated per prompt (greedy)"}
    )
    score: bool = field(
        default=False,
        metadata={"help": "also run the scored few-shot word translation, both directions"},
    )
    score_n: int = field(
        default=100,
        metadata={"help": "score: items per set, sampled with the seed (0: every item)"},
    )
    shots: int = field(
        default=4,
        metadata={
            "help": "score: examples per prompt, from the trained set only, never the item "
            "itself nor a pair sharing its source or a translation"
        },
    )
    score_header: str = field(
        default="Translate each {in_lang} word into {out_lang}.",
        metadata={"help": "score: first line of every few-shot prompt ({in_lang}, {out_lang})"},
    )
    score_shot: str = field(
        default="{in_lang}: {word}\n{out_lang}: {answer}",
        metadata={
            "help": "score: one shot; the question is the same text cut before {answer}, which "
            "must come last"
        },
    )
    score_max_new_tokens: int = field(
        default=10,
        metadata={"help": "score: most tokens generated per answer (stops at the first line)"},
    )
    batch_size: int = field(
        default=64,
        metadata={"help": "prompts per generate() call (larger batches share each weight read)"},
    )
    rank: bool = field(
        default=False,
        metadata={
            "help": "also the LM-ranking yardstick: the base model ranks every candidate "
            "translation of a set by its log-probability after a few-shot prompt (P@1 raw and "
            "calibrated; probe_rank.json, probe_rank.md). Slow: one prompt and C candidates "
            "per item (docs/probe.md); in tli run it runs with or without enabled"
        },
    )
    rank_sets: tuple[str, ...] = field(
        default=("control",),
        metadata={
            "help": "rank: the sets to rank, comma-separated (every pair's translation "
            "is a candidate: the embedding P@1's candidates)"
        },
    )
    rank_n: int = field(
        default=0,
        metadata={
            "help": "rank: items per set, sampled with the seed (0: every item); the "
            "candidates are always the whole set"
        },
    )
    rank_directions: tuple[str, ...] = field(
        default=("s2t",),
        metadata={"help": "rank: directions, comma-separated: s2t, t2s"},
    )

    def __post_init__(self) -> None:
        for name, low, high in (
            ("n", 1, MAX_BATCH),
            ("max_new_tokens", 1, 4096),
            ("score_n", 0, MAX_BATCH),
            ("shots", 0, 256),
            ("score_max_new_tokens", 1, 4096),
            ("batch_size", 1, MAX_BATCH),
            ("rank_n", 0, MAX_BATCH),
        ):
            check_int(name, getattr(self, name), low, high)
        check_seed("seed", self.seed)
        templates = tuple(self.templates)
        object.__setattr__(self, "templates", templates)
        for name in ("rank_sets", "rank_directions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.rank_sets or any(not isinstance(x, str) or not x for x in self.rank_sets):
            raise TLIError(f"rank_sets must name sets, got {','.join(map(str, self.rank_sets))}")
        bad = [d for d in self.rank_directions if d not in DIRECTIONS]
        if (
            bad
            or not self.rank_directions
            or len(set(self.rank_directions)) != len(self.rank_directions)
        ):
            raise TLIError(
                f"rank_directions must be distinct names among {', '.join(DIRECTIONS)}, got "
                f"{','.join(map(str, self.rank_directions)) or 'none'}"
            )
        for name in ("rank",):
            if not isinstance(getattr(self, name), bool):
                raise TLIError(f"{name} must be true or false, got {getattr(self, name)!r}")
        unknown = [t for t in templates if t not in TEMPLATES]
        if unknown or not templates or len(set(templates)) != len(templates):
            raise TLIError(
                f"templates must be distinct names among {', '.join(TEMPLATES)}, got "
                f"{','.join(templates) or 'none'}"
            )
        for name, (needed, banned) in _PROBE_NEEDS.items():
            found = _placeholders(f"template_{name}", getattr(self, f"template_{name}"))
            _check_fields(f"template_{name}", found, _PROBE_FIELDS)
            if needed not in found:
                raise TLIError(f"template_{name} must contain {{{needed}}}")
            if banned in found:
                raise TLIError(
                    f"template_{name} must not contain {{{banned}}}: the prompt would hold its "
                    "own answer"
                )
        _check_fields(
            "score_header", _placeholders("score_header", self.score_header), _HEADER_FIELDS
        )
        shot = _placeholders("score_shot", self.score_shot)
        _check_fields("score_shot", shot, _SHOT_FIELDS)
        if shot.count("word") != 1 or shot.count("answer") != 1:
            raise TLIError("score_shot must contain {word} and {answer} once each")
        if not self.score_shot.rstrip().endswith("{answer}"):
            raise TLIError("score_shot must end with {answer} (the question is the text before it)")


def _placeholders(name: str, template: str) -> list[str]:
    """The field names of a ``str.format`` template, in order (TLIError if malformed)."""
    if not isinstance(template, str):
        raise TLIError(f"{name} must be a string, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise TLIError(f"{name}: bad template ({err})") from None
    out = []
    for _, fname, spec, conv in parsed:
        if fname is None:
            continue
        if not fname or spec or conv:
            raise TLIError(f"{name}: placeholders must be plain names like {{source}}")
        out.append(fname)
    return out


def _check_fields(name: str, found: Sequence[str], allowed: set[str] | frozenset[str]) -> None:
    bad = sorted(set(found) - set(allowed))
    if bad:
        raise TLIError(
            f"{name}: unknown placeholder {{{bad[0]}}}; known: "
            + ", ".join(f"{{{a}}}" for a in sorted(allowed))
        )


# --- answers and scores (pure) ----------------------------------------------------------------

_STRIP_CATEGORIES = ("P", "Sk", "Z", "Cc", "Cf")


def _strippable(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith(_STRIP_CATEGORIES)


def normalize_answer(text: str) -> str:
    """The comparison form of an answer or a gold gloss.

    NFC, lower-cased (``str.casefold``), whitespace collapsed, and punctuation, quotes and
    similar marks (Unicode categories P*, Sk, Z*, Cc, Cf) stripped from both ends; inner
    punctuation stays ("ice-cream", "don't"). A leading hyphen of a stem ("-zuri") goes too.
    """
    text = " ".join(unicodedata.normalize("NFC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _strippable(text[start]):
        start += 1
    while end > start and _strippable(text[end - 1]):
        end -= 1
    return text[start:end]


def extract_answer(generated: str) -> str:
    """The answer in a generated continuation: its first non-blank line, normalised.

    Leading whitespace (the space after "English:", blank lines) is skipped, the text is cut at
    the first line break, and the line goes through :func:`normalize_answer`.
    """
    text = unicodedata.normalize("NFC", generated).lstrip()
    lines = text.splitlines()
    return normalize_answer(lines[0] if lines else "")


def exact_match(answer: str, gold: Sequence[str]) -> bool:
    """Whether ``answer`` equals any gold string after :func:`normalize_answer` (never if empty)."""
    answer = normalize_answer(answer)
    return bool(answer) and answer in {normalize_answer(g) for g in gold}


_CHRF: Any = None


def chrf(answer: str, gold: Sequence[str]) -> float:
    """Sentence chrF (sacrebleu's ``CHRF()``: char 6-grams, beta 2) of the normalised answer.

    With several gold strings sacrebleu keeps the best-scoring one. An empty answer scores 0.

    Returns:
        A score in [0, 100].
    """
    global _CHRF
    if _CHRF is None:
        from sacrebleu.metrics import CHRF

        _CHRF = CHRF()
    refs = [normalize_answer(g) for g in gold]
    answer = normalize_answer(answer)
    if not answer or not refs:
        return 0.0
    return float(_CHRF.sentence_score(answer, refs).score)


def compare_hits(base_hits: Sequence[bool], tuned_hits: Sequence[bool]) -> dict[str, Any]:
    """Paired comparison of base and tuned exact-match hits: McNemar's exact test.

    Args:
        base_hits: One bool per item, base model.
        tuned_hits: One bool per item, same items, tuned model.

    Returns:
        ``n``, ``base`` and ``tuned`` (hits), ``base_acc`` and ``tuned_acc`` (shares; NaN for
        no items), ``lost`` (hit before, miss after), ``gained`` (the reverse) and ``p``
        (:func:`tli.stats.mcnemar_exact`, two-sided).
    """
    from tli.stats import discordant_counts, mcnemar_exact

    base = np.asarray(base_hits, dtype=bool)
    tuned = np.asarray(tuned_hits, dtype=bool)
    lost, gained = discordant_counts(base, tuned)
    n = int(base.size)
    return {
        "n": n,
        "base": int(base.sum()),
        "tuned": int(tuned.sum()),
        "base_acc": float(base.mean()) if n else math.nan,
        "tuned_acc": float(tuned.mean()) if n else math.nan,
        "lost": lost,
        "gained": gained,
        "p": mcnemar_exact(lost, gained),
    }


def summarize_scores(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (set, direction) of scored items: exact match, McNemar, chrF.

    Args:
        items: Dicts with ``set``, ``direction``, ``base_hit``, ``tuned_hit``, ``base_chrf``
            and ``tuned_chrf`` (as :func:`probe` writes them).

    Returns:
        Rows in order of first appearance: ``set``, ``direction``, the keys of
        :func:`compare_hits`, ``acc_change`` (tuned - base share), ``base_chrf``,
        ``tuned_chrf`` (means), ``chrf_change``, and ``base_cut`` / ``tuned_cut``: answers
        the token limit cut (``<who>_complete`` False; they count as misses).
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for item in items:
        groups[(item["set"], item["direction"])].append(item)
    rows = []
    for (name, direction), group in groups.items():
        row: dict[str, Any] = {"set": name, "direction": direction}
        row.update(compare_hits([i["base_hit"] for i in group], [i["tuned_hit"] for i in group]))
        row["acc_change"] = row["tuned_acc"] - row["base_acc"]
        row["base_chrf"] = float(np.mean([i["base_chrf"] for i in group]))
        row["tuned_chrf"] = float(np.mean([i["tuned_chrf"] for i in group]))
        row["chrf_change"] = row["tuned_chrf"] - row["base_chrf"]
        for who in ("base", "tuned"):
            row[f"{who}_cut"] = sum(not i.get(f"{who}_complete", True) for i in group)
        rows.append(row)
    return rows


# --- prompts and shots (pure) -----------------------------------------------------------------


def related(a: Any, b: Any) -> bool:
    """Whether two pairs share a source or any translation (after :func:`normalize_answer`)."""
    if normalize_answer(a.source) == normalize_answer(b.source):
        return True
    return bool({normalize_answer(t) for t in a.targets} & {normalize_answer(t) for t in b.targets})


def shot_order(pool: Sequence[Any], seed: int, direction: str = "s2t") -> list[Any]:
    """The pool's distinct pairs in a seeded order (one order per seed and direction).

    The order depends on the pairs, the seed and the direction only, not on the pool's order.
    """
    unique = sorted(dict.fromkeys(pool), key=lambda p: (p.source, p.target, p.alternatives))
    random.Random(f"{seed}\x1f{direction}").shuffle(unique)
    return unique


def choose_shots(
    item: Any,
    pool: Sequence[Any],
    k: int,
    seed: int,
    direction: str = "s2t",
    *,
    order: Sequence[Any] | None = None,
) -> list[Any]:
    """The shots of one few-shot prompt: the first ``k`` unrelated pairs of :func:`shot_order`.

    A pair is never a shot for itself, nor for a pair it is :func:`related` to (same source or a
    shared translation). Most items therefore get the same ``k`` shots, and so the same prompt
    prefix, which :func:`generate` runs once and shares; an item related to one of them gets the
    next unrelated pairs instead. The same item gets the same shots in the base and the tuned
    run, whatever the order of the items or of the pool.

    Args:
        item: The :class:`tli.pairs.Pair` being asked.
        pool: The pairs shots come from (the trained set).
        k: Number of shots; fewer when fewer unrelated pairs exist.
        seed: Seed of the order.
        direction: ``s2t`` or ``t2s`` (each has its own order).
        order: ``shot_order(pool, seed, direction)``, if already computed.

    Returns:
        Up to ``k`` distinct pairs of ``pool``, in prompt order.
    """
    out: list[Any] = []
    for pair in order if order is not None else shot_order(pool, seed, direction):
        if len(out) == k:
            break
        if not related(pair, item):
            out.append(pair)
    return out


def question_and_gold(
    item: Any, direction: str, all_pairs: Sequence[Any]
) -> tuple[str, tuple[str, ...]]:
    """The word asked and every acceptable answer for one item and direction.

    ``s2t``: the source; its gold is its target and alternatives. ``t2s``: the main target;
    its gold is every source (among ``all_pairs``, i.e. both sets) that lists it as a
    translation, so a target with two Swahili words accepts either.
    """
    if direction == "s2t":
        return item.source, tuple(item.targets)
    if direction != "t2s":
        raise ValueError(f"direction must be s2t or t2s, got {direction!r}")
    key = normalize_answer(item.target)
    gold = [p.source for p in all_pairs if key in {normalize_answer(t) for t in p.targets}]
    return item.target, tuple(dict.fromkeys([item.source, *gold]))


#: The languages a probe names when the caller gives none (the pair config gives them in
#: ``tli probe`` and ``tli run``: :func:`tli.pairs.load_sets`).
NO_LANGUAGES = ("source", "target")


def fewshot_parts(
    word: str,
    shots: Sequence[Any],
    direction: str,
    cfg: ProbeConfig,
    languages: tuple[str, str] = NO_LANGUAGES,
) -> tuple[str, str]:
    """The few-shot prompt asking ``word`` in ``direction``, as (shared prefix, question).

    The prefix is the header and the shots (each line ending in a line break); the question is
    :attr:`ProbeConfig.score_shot` cut before ``{answer}`` (trailing spaces dropped), so the
    answer would follow it. ``languages`` are the source and target language names.
    """
    src_lang, tgt_lang = languages
    in_lang, out_lang = (src_lang, tgt_lang) if direction == "s2t" else (tgt_lang, src_lang)
    langs = {"in_lang": in_lang, "out_lang": out_lang}
    lines = [cfg.score_header.format(**langs)] if cfg.score_header.strip() else []
    for shot in shots:
        w, a = (shot.source, shot.target) if direction == "s2t" else (shot.target, shot.source)
        lines.append(cfg.score_shot.format(**langs, word=w, answer=a))
    question = cfg.score_shot.format(**langs, word=word, answer="\x00").split("\x00")[0]
    return "".join(f"{line}\n" for line in lines), question.rstrip(" ")


def fewshot_prompt(
    word: str,
    shots: Sequence[Any],
    direction: str,
    cfg: ProbeConfig,
    languages: tuple[str, str] = NO_LANGUAGES,
) -> str:
    """The few-shot prompt asking ``word`` in ``direction`` (:func:`fewshot_parts` joined)."""
    return "".join(fewshot_parts(word, shots, direction, cfg, languages))


def probe_prompt(
    name: str, pair: Any, cfg: ProbeConfig, languages: tuple[str, str] = NO_LANGUAGES
) -> str:
    """Probe template ``name`` filled with one pair and the two language names."""
    return getattr(cfg, f"template_{name}").format(
        source=pair.source, target=pair.target, src_lang=languages[0], tgt_lang=languages[1]
    )


def sample(pairs: Sequence[Any], n: int, seed: int, salt: str = "") -> list[Any]:
    """``n`` pairs (all when ``n`` is 0 or at least their number), seeded, in input order."""
    if n <= 0 or n >= len(pairs):
        return list(pairs)
    rng = random.Random(f"{seed}\x1f{salt}")
    return [pairs[i] for i in sorted(rng.sample(range(len(pairs)), n))]


def probe_rows(
    sets: Mapping[str, Sequence[Any]],
    cfg: ProbeConfig,
    languages: tuple[str, str] = NO_LANGUAGES,
) -> list[dict[str, Any]]:
    """The probe's prompts: ``n`` sampled pairs per set, each through every template."""
    rows = []
    for name, pairs in sets.items():
        for pair in sample(pairs, cfg.n, cfg.seed, f"probe:{name}"):
            for template in cfg.templates:
                rows.append(
                    {
                        "set": name,
                        "source": pair.source,
                        "target": pair.target,
                        "template": template,
                        "prompt": probe_prompt(template, pair, cfg, languages),
                    }
                )
    return rows


def score_items(
    sets: Mapping[str, Sequence[Any]],
    cfg: ProbeConfig,
    languages: tuple[str, str] = NO_LANGUAGES,
) -> list[dict[str, Any]]:
    """The scored items: up to ``score_n`` per set, both directions, with prompt and gold.

    Raises:
        TLIError: There is no trained set to draw shots from (and ``shots`` > 0).
    """
    pool = list(sets.get("trained", ()))
    if cfg.shots > 0 and not pool:
        raise TLIError(
            "the scored translation draws its shots from the trained set, which is empty"
        )
    everything = [p for pairs in sets.values() for p in pairs]
    orders = {d: shot_order(pool, cfg.seed, d) for d in DIRECTIONS}
    items = []
    for name, pairs in sets.items():
        for pair in sample(pairs, cfg.score_n, cfg.seed, f"score:{name}"):
            for direction in DIRECTIONS:
                word, gold = question_and_gold(pair, direction, everything)
                shots = choose_shots(
                    pair, pool, cfg.shots, cfg.seed, direction, order=orders[direction]
                )
                prefix, question = fewshot_parts(word, shots, direction, cfg, languages)
                items.append(
                    {
                        "set": name,
                        "direction": direction,
                        "source": pair.source,
                        "target": pair.target,
                        "word": word,
                        "gold": list(gold),
                        "shots": [[s.source, s.target] for s in shots],
                        "prompt": prefix + question,
                        "prefix_chars": len(prefix),
                    }
                )
    return items


# --- generation -------------------------------------------------------------------------------


# --- the result -------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Everything a probe found, and how to write it and read it back.

    Attributes:
        config: The settings.
        model: Facts about the base model (name, path, type, depth).
        adapter: What the adapter records (:meth:`tli.evaluate.AdapterInfo.summary`).
        rows: One dict per probe prompt: set, source, target, template, prompt, base, tuned.
        items: One dict per scored item (empty without ``score``): set, direction, source,
            target, word, gold, shots, prompt, prefix_chars (length of the shared part of the
            prompt), and per model (``base_``/``tuned_``) the raw output, the answer, whether
            its line is complete, the hit and the chrF.
        scores: :func:`summarize_scores` of the items.
        rank: The LM-ranking yardstick (:func:`lm_rank`); empty when it did not run.
        warnings: Doubts raised on the way.
        timings: Seconds per step.
        languages: The source and target language names (the pair config's).
    """

    config: ProbeConfig
    model: dict[str, Any]
    adapter: dict[str, Any]
    rows: list[dict[str, Any]]
    items: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rank: dict[str, Any] = field(default_factory=dict)
    languages: tuple[str, str] = NO_LANGUAGES

    @property
    def scored(self) -> bool:
        """Whether the scored word translation ran."""
        return bool(self.items)

    def _head(self) -> dict[str, Any]:
        from tli.config import to_dict

        return {
            "config": to_dict(self.config),
            "languages": list(self.languages),
            "model": self.model,
            "adapter": self.adapter,
            "warnings": self.warnings,
            "timings": self.timings,
        }

    def probe_json(self) -> dict[str, Any]:
        """The content of ``probe.json``."""
        changed = sum(r["base"] != r["tuned"] for r in self.rows)
        return {
            **self._head(),
            "n_prompts": len(self.rows),
            "n_changed": changed,
            "rows": self.rows,
        }

    def scores_json(self) -> dict[str, Any]:
        """The content of ``probe_scores.json``."""
        return {**self._head(), "scores": self.scores, "items": self.items}

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ProbeResult:
        """Read a probe directory written by :meth:`save` (scores too, when there are any).

        Raises:
            TLIError: ``probe.json`` is missing or is not a probe result.
        """
        from tli.config import build

        directory = Path(directory)
        data = _read_result(directory / PROBE_JSON)
        scores_path = directory / SCORES_JSON
        scores = _read_result(scores_path) if scores_path.is_file() else {}
        try:
            return cls(
                config=build(ProbeConfig, data["config"]),
                model=dict(data["model"]),
                adapter=dict(data["adapter"]),
                rows=list(data["rows"]),
                items=list(scores.get("items", [])),
                scores=[nan_from_null(s) for s in scores.get("scores", [])],
                warnings=list(data.get("warnings", [])),
                timings={k: float(v) for k, v in data.get("timings", {}).items()},
                rank=load_rank(directory) or {},
                languages=tuple(data.get("languages", NO_LANGUAGES)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise TLIError(
                f"{directory}: not a tli probe result ({type(err).__name__}: {err})"
            ) from None

    def direction_name(self, direction: str) -> str:
        """``Swahili -> English`` for ``s2t``, the reverse for ``t2s`` (the run's languages)."""
        a, b = self.languages
        return f"{a} -> {b}" if direction == "s2t" else f"{b} -> {a}"

    def probe_markdown(self) -> str:
        """``probe.md``: one table row per prompt."""
        from tli.tables import probe_markdown

        return probe_markdown(self)

    def score_table(self) -> str:
        """The scores as a Markdown table: one row per set and direction."""
        from tli.tables import score_table

        return score_table(self)

    def scores_markdown(self, max_examples: int = 30) -> str:
        """``probe_scores.md``: the table, how it was computed, the items whose hit changed."""
        from tli.tables import scores_markdown

        return scores_markdown(self, max_examples)

    def save(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write ``probe.md``, ``probe.json`` and, when scored, the two score files.

        ``probe.json`` is written last, so its presence marks a finished probe directory. A
        stale ``probe_scores.*`` from an earlier scored probe in the same directory is removed
        when this result holds no scores.
        """
        from tli.io import atomic_write_json, atomic_write_text, ensure_dir

        out = ensure_dir(out_dir)
        (out / PROBE_JSON).unlink(missing_ok=True)
        written = []
        if self.scored:
            atomic_write_text(out / SCORES_MD, self.scores_markdown())
            atomic_write_json(out / SCORES_JSON, self.scores_json())
            written += [out / SCORES_MD, out / SCORES_JSON]
        else:
            for name in (SCORES_MD, SCORES_JSON):
                (out / name).unlink(missing_ok=True)
        atomic_write_text(out / PROBE_MD, self.probe_markdown())
        atomic_write_json(out / PROBE_JSON, self.probe_json())
        return [*written, out / PROBE_MD, out / PROBE_JSON]

    def summary_line(self) -> str:
        """One line for a report: the scores when scored, else how many outputs changed."""
        from tli.tables import probe_summary

        return probe_summary(self)


def _read_result(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TLIError(f"{path}: no such file (has the probe run?)")
    from tli.io import read_text

    try:
        data = json.loads(read_text(path))  # a regular file only: a FIFO would block
    except (ValueError, RecursionError) as err:
        raise TLIError(f"{path}: cannot read: {err}") from None
    if not isinstance(data, dict) or "config" not in data:
        raise TLIError(f"{path}: not a tli probe result")
    return data


def probe_summary_line(probe_dir: str | os.PathLike[str]) -> str:
    """The one-line summary of a saved probe directory, for the ``tli run`` report.

    With ``probe_scores.json`` it gives per set and direction the base and tuned exact-match
    accuracy, items gained and lost and McNemar's p; otherwise how many probe outputs changed.

    Raises:
        TLIError: The directory holds no probe result, or a damaged one.
    """
    return ProbeResult.load(probe_dir).summary_line()


# --- the LM-ranking yardstick ----------------------------------------------------------------


#: The content-free word of the calibration prompt (Zhao et al. 2021, "Calibrate before use").
CONTENT_FREE = "N/A"


def rank_items(
    sets: Mapping[str, Sequence[Any]],
    cfg: ProbeConfig,
    languages: tuple[str, str] = NO_LANGUAGES,
) -> list[dict[str, Any]]:
    """The items of the LM-ranking yardstick: per ranked set and direction, prompt and gold.

    Every item of a set (or ``rank_n`` sampled with the seed) is asked with the few-shot prompt
    of the scored translation (:func:`fewshot_parts`: shots from the trained set only, never the
    item nor a related pair); its candidates are the translations of *every* pair of the set in
    that direction (the targets for ``s2t``, the sources for ``t2s``), as in the embedding P@1,
    and its gold row is :func:`tli.pairs.gold_mask`'s (listed alternatives count).

    Raises:
        TLIError: No ranked set is among ``sets``, or there is no trained set for the shots.
    """
    from tli.pairs import gold_mask

    pool = list(sets.get("trained", ()))
    if cfg.shots > 0 and not pool:
        raise TLIError("the LM ranking draws its shots from the trained set, which is empty")
    wanted = [name for name in cfg.rank_sets if sets.get(name)]
    if not wanted:
        raise TLIError(
            f"nothing to rank: no set among rank_sets ({', '.join(cfg.rank_sets)}) has pairs"
        )
    orders = {d: shot_order(pool, cfg.seed, d) for d in DIRECTIONS}
    items = []
    for name in wanted:
        pairs = list(sets[name])
        gold = gold_mask(pairs)  # (B, B): source i -> target j
        chosen = sample(list(range(len(pairs))), cfg.rank_n, cfg.seed, f"rank:{name}")
        for direction in cfg.rank_directions:
            g = gold if direction == "s2t" else gold.T
            for i in chosen:
                pair = pairs[i]
                word = pair.source if direction == "s2t" else pair.target
                shots = choose_shots(
                    pair, pool, cfg.shots, cfg.seed, direction, order=orders[direction]
                )
                prefix, question = fewshot_parts(word, shots, direction, cfg, languages)
                items.append(
                    {
                        "set": name,
                        "direction": direction,
                        "index": i,
                        "word": word,
                        "shots": [[s.source, s.target] for s in shots],
                        "prefix": prefix,
                        "prompt": prefix + question,
                        "gold": g[i].nonzero().flatten().tolist(),
                    }
                )
    return items


def _separator(cfg: ProbeConfig, direction: str, languages: tuple[str, str]) -> str:
    """The spaces between the question and the answer in :attr:`ProbeConfig.score_shot`."""
    src_lang, tgt_lang = languages
    in_lang, out_lang = (src_lang, tgt_lang) if direction == "s2t" else (tgt_lang, src_lang)
    raw = cfg.score_shot.format(in_lang=in_lang, out_lang=out_lang, word="w", answer="\x00")
    raw = raw.split("\x00")[0]
    return raw[len(raw.rstrip(" ")) :]


def lm_rank(
    loaded: Any,
    sets: Mapping[str, Sequence[Any]],
    cfg: ProbeConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    languages: tuple[str, str] = NO_LANGUAGES,
) -> dict[str, Any]:
    """The LM-ranking yardstick: how often the base LM itself ranks the right translation first.

    For each item (:func:`rank_items`) the model reads the few-shot prompt once and every
    candidate of the set is scored by its mean token log-probability as the continuation
    (:func:`tli.generate.continuation_scores`). ``raw`` ranks by that score; ``calibrated``
    subtracts each candidate's score after the same shots and the content-free word
    :data:`CONTENT_FREE`, which removes the pull of frequent words (Zhao et al. 2021). P@1 and
    MRR are :func:`tli.metrics.retrieval` (ties count against the item), with Wilson intervals.
    The model is used as given (``tli probe`` passes the base model, before any adapter).

    Args:
        loaded: A full-depth :class:`tli.models.LoadedModel`.
        sets: Set name -> its pairs; the trained set gives the shots.
        cfg: Settings (``rank_sets``, ``rank_n``, ``rank_directions``, ``shots``, the templates).
        out_dir: If given, ``probe_rank.json`` and ``probe_rank.md`` are written there.
        languages: The source and target language names, for the prompts.

    Returns:
        The content of ``probe_rank.json``: ``config``, ``model``, ``scores`` (one row per set
        and direction), ``items`` and ``timings``.
    """
    import torch

    from tli.adapters import model_facts
    from tli.config import to_dict
    from tli.generate import continuation_scores
    from tli.metrics import random_chance_p_at_1, retrieval
    from tli.stats import wilson_interval

    cfg = cfg or ProbeConfig()
    start = time.perf_counter()
    sets = {name: list(pairs) for name, pairs in sets.items() if pairs}
    languages = (str(languages[0]), str(languages[1]))
    items = rank_items(sets, cfg, languages)
    model, tok = loaded.model, loaded.tokenizer
    priors: dict[tuple[str, str, str], torch.Tensor] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[(item["set"], item["direction"])].append(item)
    scores, rows = [], []
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for (name, direction), members in groups.items():
            pairs = sets[name]
            sep = _separator(cfg, direction, languages)
            cands = [(p.target if direction == "s2t" else p.source) for p in pairs]
            texts = [sep + c for c in cands]
            raw, calibrated = [], []
            for item in members:
                key = (name, direction, item["prefix"])
                if key not in priors:
                    _, empty = fewshot_parts(CONTENT_FREE, [], direction, cfg, languages)
                    priors[key] = continuation_scores(
                        model, tok, item["prefix"] + empty, texts, batch_size=cfg.batch_size
                    )
                got = continuation_scores(
                    model, tok, item["prompt"], texts, batch_size=cfg.batch_size
                )
                raw.append(got)
                calibrated.append(got - priors[key])
            gold = torch.zeros(len(members), len(cands), dtype=torch.bool)  # (I, C)
            for r, item in enumerate(members):
                gold[r, item["gold"]] = True
            row = {
                "set": name,
                "direction": direction,
                "n": len(members),
                "n_candidates": len(cands),
                "chance": random_chance_p_at_1(gold),
            }
            for kind, matrix in (
                ("raw", torch.stack(raw)),
                ("calibrated", torch.stack(calibrated)),
            ):
                result = retrieval(matrix, gold)
                hits = int((result["rank"] == 1).sum())
                lo, hi = wilson_interval(hits, len(members), 0.95)
                row |= {
                    f"p_at_1_{kind}": hits / len(members),
                    f"p_at_1_{kind}_lo": lo,
                    f"p_at_1_{kind}_hi": hi,
                    f"hits_{kind}": hits,
                    f"mrr_{kind}": float(result["mrr"]),
                }
                top = matrix.argmax(dim=1).tolist()
                for r, item in enumerate(members):
                    item[f"rank_{kind}"] = int(result["rank"][r])
                    item[f"top_{kind}"] = cands[top[r]]
            scores.append(row)
            rows += members
    finally:
        for module, training in modes:
            module.training = training
    out = {
        "stage": "probe_rank",
        "config": to_dict(cfg),
        "model": model_facts(loaded),
        "languages": list(languages),
        "level": 0.95,
        "scores": scores,
        "items": [{k: v for k, v in item.items() if k not in ("prefix",)} for item in rows],
        "timings": {"total_s": time.perf_counter() - start, "n_items": float(len(rows))},
    }
    if out_dir is not None:
        from tli.io import atomic_write_json, atomic_write_text
        from tli.tables import rank_markdown

        directory = ensure_dir(out_dir)
        atomic_write_text(directory / RANK_MD, rank_markdown(out))
        atomic_write_json(directory / RANK_JSON, out)
    return out


def load_rank(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved LM ranking of a probe directory, or None when it holds none.

    Raises:
        TLIError: ``probe_rank.json`` exists but is not a tli LM ranking.
    """
    path = Path(directory) / RANK_JSON
    if not path.is_file():
        return None
    data = _read_result(path)
    if data.get("stage") != "probe_rank" or not isinstance(data.get("scores"), list):
        raise TLIError(f"{path}: not a tli LM ranking")
    return data


# --- the stage --------------------------------------------------------------------------------


def probe(
    loaded: Any,
    adapter_dir: str | os.PathLike[str],
    sets: Mapping[str, Sequence[Any]],
    cfg: ProbeConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    score: bool | None = None,
    rank: bool | None = None,
    languages: tuple[str, str] = NO_LANGUAGES,
) -> ProbeResult:
    """Probe an adapter, and (``score``) score word translation, base vs. tuned.

    The adapter is checked first (:func:`tli.adapters.read_adapter`,
    :func:`tli.adapters.check_adapter`): a missing, corrupted or mismatched adapter is an error,
    never a silent probe of the base model. Every prompt is generated by the base model first;
    then the adapter is attached (:func:`tli.adapters.attached`) and the same prompts are
    generated again;
    afterwards ``loaded.model`` is the base model again.

    Args:
        loaded: A full-depth :class:`tli.models.LoadedModel` without adapters.
        adapter_dir: A peft adapter directory (or a training directory with ``final/``).
        sets: Set name (``trained``, ``control``) -> its :class:`tli.pairs.Pair` list.
        cfg: Settings (defaults: :class:`ProbeConfig`).
        out_dir: If given, the result is saved there (:meth:`ProbeResult.save`).
        score: Run the scored translation; ``None``: ``cfg.score``.
        rank: Run the LM-ranking yardstick (:func:`lm_rank`, base model only, written to
            ``probe_rank.json``); ``None``: ``cfg.rank``.
        languages: The source and target language names, for prompts and labels.

    Returns:
        The :class:`ProbeResult`.

    Raises:
        TLIError: A bad adapter, a truncated model or one that already carries adapters, no
            pairs, or (scoring) no trained set.
    """
    cfg = cfg or ProbeConfig()
    score = cfg.score if score is None else score
    rank = cfg.rank if rank is None else rank
    start = time.perf_counter()
    sets = {name: list(pairs) for name, pairs in sets.items() if pairs}
    if not sets:
        raise TLIError("nothing to probe: every set is empty")
    info = read_adapter(adapter_dir)
    check_base(loaded, "the probe")
    check_adapter(info, loaded)
    if out_dir is not None:
        ensure_dir(out_dir)
    notes: list[str] = []
    mismatch = quantization_note(info, loaded)
    if mismatch:
        notes.append(mismatch)
    if is_identity(info):
        notes.append(
            f"adapter {info.dir}: every LoRA B matrix is zero, so the tuned model is the base model"
        )
    languages = (str(languages[0]), str(languages[1]))
    rows = probe_rows(sets, cfg, languages)
    items = score_items(sets, cfg, languages) if score else []
    if score:
        tok = loaded.tokenizer
        long = [
            i["word"]
            for i in items
            if min(len(tok(f" {g}", add_special_tokens=False)["input_ids"]) for g in i["gold"])
            >= cfg.score_max_new_tokens
        ]
        if long:
            notes.append(
                f"{len(long)} scored item(s) (e.g. {long[0]!r}) have no gold answer shorter than "
                f"score_max_new_tokens = {cfg.score_max_new_tokens} tokens: they cannot be hit; "
                "raise score_max_new_tokens"
            )
        short = sorted({len(i["shots"]) for i in items if len(i["shots"]) < cfg.shots})
        if short:
            notes.append(
                f"some prompts have only {short[0]} of {cfg.shots} shots: the trained set has too "
                "few pairs unrelated to the item"
            )
    timings: dict[str, float] = {"prepare_s": time.perf_counter() - start}

    def run(model: Any, who: str) -> tuple[list[str], list[tuple[str, bool]]]:
        clock = time.perf_counter()
        probe_out = generate(
            model,
            loaded.tokenizer,
            [r["prompt"] for r in rows],
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
        )
        timings[f"probe_{who}_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        score_out = generate_answers(
            model,
            loaded.tokenizer,
            [i["prompt"] for i in items],
            max_new_tokens=cfg.score_max_new_tokens,
            batch_size=cfg.batch_size,
            prefix_chars=[i["prefix_chars"] for i in items],
        )
        timings[f"score_{who}_s"] = time.perf_counter() - clock
        return probe_out, score_out

    ranking: dict[str, Any] = {}
    if rank:
        clock = time.perf_counter()
        ranking = lm_rank(loaded, sets, cfg, out_dir, languages=languages)
        timings["rank_base_s"] = time.perf_counter() - clock
    elif out_dir is not None:
        (Path(out_dir) / RANK_JSON).unlink(missing_ok=True)  # not this probe's: stale
        (Path(out_dir) / RANK_MD).unlink(missing_ok=True)
    base_probe, base_score = run(loaded.model, "base")
    clock = time.perf_counter()
    with attached(loaded, info) as tuned:
        timings["attach_s"] = time.perf_counter() - clock
        tuned_probe, tuned_score = run(tuned, "tuned")
    clock = time.perf_counter()

    for row, b, t in zip(rows, base_probe, tuned_probe, strict=True):
        row["base"], row["tuned"] = b, t
    for item, b, t in zip(items, base_score, tuned_score, strict=True):
        for who, (raw, complete) in (("base", b), ("tuned", t)):
            answer = extract_answer(raw)
            item[f"{who}_output"] = raw
            item[f"{who}_answer"] = answer
            item[f"{who}_complete"] = complete
            item[f"{who}_hit"] = complete and exact_match(answer, item["gold"])
            item[f"{who}_chrf"] = chrf(answer, item["gold"])
    scores = summarize_scores(items)
    if rows and all(r["base"] == r["tuned"] for r in rows) and not notes:
        notes.append("the tuned model generated exactly the base model's output for every prompt")
    for note in notes:
        log.warning("%s", note)
    result = ProbeResult(
        config=cfg,
        model=model_facts(loaded),
        adapter=info.summary(),
        rows=rows,
        items=items,
        scores=scores,
        warnings=notes,
        timings=timings,
        rank=ranking,
        languages=languages,
    )
    timings["metrics_s"] = time.perf_counter() - clock
    timings["n_prompts"] = float(len(rows))
    timings["n_scored"] = float(len(items))
    result.timings["total_s"] = time.perf_counter() - start
    if out_dir is not None:
        result.save(out_dir)
    return result


# --- command line -----------------------------------------------------------------------------


__all__ = [
    "DIRECTIONS",
    "PROBE_JSON",
    "PROBE_MD",
    "RANK_JSON",
    "RANK_MD",
    "SCORES_JSON",
    "SCORES_MD",
    "TEMPLATES",
    "ProbeConfig",
    "ProbeResult",
    "choose_shots",
    "chrf",
    "compare_hits",
    "exact_match",
    "extract_answer",
    "fewshot_parts",
    "fewshot_prompt",
    "lm_rank",
    "load_rank",
    "normalize_answer",
    "probe",
    "probe_prompt",
    "probe_rows",
    "probe_summary_line",
    "question_and_gold",
    "rank_items",
    "related",
    "sample",
    "score_items",
    "shot_order",
    "summarize_scores",
]
