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

:meth:`ProbeResult.load` reads a probe directory back.

A probe directory holds::

    probe.json           config, model, adapter, one row per prompt (base and tuned output)
    probe.md             the same as a Markdown table
    probe_scores.json    (score) per set and direction every figure, and every item
    probe_scores.md      (score) the table, how it was computed, the items whose hit changed
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import math
import os
import random
import string
import sys
import time
import unicodedata
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tli.errors import TLIError
from tli.pairs import add_pair_arguments

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
_TEXT_FIELDS = (*(f"template_{name}" for name in _PROBE_NEEDS), "score_header", "score_shot")
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
    src_lang: str = field(default="Swahili", metadata={"help": "name of the source language"})
    tgt_lang: str = field(default="English", metadata={"help": "name of the target language"})
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

    def __post_init__(self) -> None:
        for name, low in (
            ("n", 1),
            ("max_new_tokens", 1),
            ("score_n", 0),
            ("shots", 0),
            ("score_max_new_tokens", 1),
            ("batch_size", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TLIError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TLIError(f"seed must be an integer, got {self.seed!r}")
        templates = tuple(self.templates)
        object.__setattr__(self, "templates", templates)
        unknown = [t for t in templates if t not in TEMPLATES]
        if unknown or not templates or len(set(templates)) != len(templates):
            raise TLIError(
                f"templates must be distinct names among {', '.join(TEMPLATES)}, got "
                f"{','.join(templates) or 'none'}"
            )
        for lang in ("src_lang", "tgt_lang"):
            if not isinstance(getattr(self, lang), str) or not getattr(self, lang).strip():
                raise TLIError(f"{lang} must be a non-empty string")
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


def fewshot_parts(
    word: str, shots: Sequence[Any], direction: str, cfg: ProbeConfig
) -> tuple[str, str]:
    """The few-shot prompt asking ``word`` in ``direction``, as (shared prefix, question).

    The prefix is the header and the shots (each line ending in a line break); the question is
    :attr:`ProbeConfig.score_shot` cut before ``{answer}`` (trailing spaces dropped), so the
    answer would follow it.
    """
    in_lang, out_lang = (
        (cfg.src_lang, cfg.tgt_lang) if direction == "s2t" else (cfg.tgt_lang, cfg.src_lang)
    )
    langs = {"in_lang": in_lang, "out_lang": out_lang}
    lines = [cfg.score_header.format(**langs)] if cfg.score_header.strip() else []
    for shot in shots:
        w, a = (shot.source, shot.target) if direction == "s2t" else (shot.target, shot.source)
        lines.append(cfg.score_shot.format(**langs, word=w, answer=a))
    question = cfg.score_shot.format(**langs, word=word, answer="\x00").split("\x00")[0]
    return "".join(f"{line}\n" for line in lines), question.rstrip(" ")


def fewshot_prompt(word: str, shots: Sequence[Any], direction: str, cfg: ProbeConfig) -> str:
    """The few-shot prompt asking ``word`` in ``direction`` (:func:`fewshot_parts` joined)."""
    return "".join(fewshot_parts(word, shots, direction, cfg))


def probe_prompt(name: str, pair: Any, cfg: ProbeConfig) -> str:
    """Probe template ``name`` filled with one pair."""
    return getattr(cfg, f"template_{name}").format(
        source=pair.source, target=pair.target, src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang
    )


def sample(pairs: Sequence[Any], n: int, seed: int, salt: str = "") -> list[Any]:
    """``n`` pairs (all when ``n`` is 0 or at least their number), seeded, in input order."""
    if n <= 0 or n >= len(pairs):
        return list(pairs)
    rng = random.Random(f"{seed}\x1f{salt}")
    return [pairs[i] for i in sorted(rng.sample(range(len(pairs)), n))]


def probe_rows(sets: Mapping[str, Sequence[Any]], cfg: ProbeConfig) -> list[dict[str, Any]]:
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
                        "prompt": probe_prompt(template, pair, cfg),
                    }
                )
    return rows


def score_items(sets: Mapping[str, Sequence[Any]], cfg: ProbeConfig) -> list[dict[str, Any]]:
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
                prefix, question = fewshot_parts(word, shots, direction, cfg)
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


@contextmanager
def left_padding(tokenizer: Any) -> Iterator[Any]:
    """The tokenizer padding on the left (as generation needs) for the block; restored after."""
    before = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = before


def _first_line_done(text: str) -> bool:
    """Whether a continuation already holds its whole first non-blank line."""
    return "\n" in text.lstrip() or "\r" in text.lstrip()


def _first_line_criterion(tokenizer: Any, prompt_len: int) -> Any:
    """Stopping criterion: a row is done once its first non-blank line is complete.

    Only :func:`extract_answer`'s line is used, and greedy decoding of one row does not depend on
    when another row stops, so stopping early changes no answer; it only saves decoding steps.
    """
    from transformers import StoppingCriteria

    class FirstLine(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            done = [_first_line_done(t) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (B,)

    return FirstLine()


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int) -> Any:
    """Greedy decoding; sampling settings of the model's own config are neutralised."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )


def _forward_parameters(model: Any) -> Any:
    """The parameters of the forward method of ``model`` (of its base model, for peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def _cache_keyword(model: Any) -> str:
    """How forward() and generate() name the KV cache: ``cache`` or (older) ``past_key_values``."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _prefix_cache(model: Any, ids: list[int], device: Any) -> Any:
    """The KV cache of one token sequence (batch 1), computed without the LM head's full output."""
    extra = {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            use_cache=True,
            **extra,
        )
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _sliding_window(model: Any) -> int | None:
    """The model's sliding attention window (Gemma 2/3, Mistral), or None (full attention)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def _pad_between(
    prefix: list[int], rests: Sequence[list[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``(B, T)``: the prefix, left padding, then each rest."""
    n_pre, width = len(prefix), max(len(r) for r in rests)
    ids = torch.full((len(rests), n_pre + width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)  # (B, T)
    ids[:, :n_pre] = torch.tensor(prefix)
    mask[:, :n_pre] = 1
    for row, rest in enumerate(rests):
        ids[row, n_pre + width - len(rest) :] = torch.tensor(rest)
        mask[row, n_pre + width - len(rest) :] = 1
    return ids, mask


def _generate_batch(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    config: Any,
    first_line: bool,
    cache: Any = None,
) -> list[tuple[str, bool]]:
    """One ``model.generate`` call: per row the decoded continuation and whether it ended (EOS)."""
    from transformers import StoppingCriteriaList

    prompt_len = input_ids.shape[1]
    stop = (
        StoppingCriteriaList([_first_line_criterion(tokenizer, prompt_len)]) if first_line else None
    )
    extra = {_cache_keyword(model): cache} if cache is not None else {}
    with torch.inference_mode():
        seq = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=config,
            stopping_criteria=stop,
            **extra,
        )  # (B, T + new)
    new_ids = seq[:, prompt_len:]  # (B, new)
    eos = config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    eos_ids = torch.tensor(eos, dtype=new_ids.dtype, device=seq.device)
    ended = torch.isin(new_ids, eos_ids).any(dim=1).tolist()  # (B,)
    texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    return list(zip(texts, ended, strict=True))


def _generate_all(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    first_line: bool = False,
    prefix_chars: Sequence[int] | None = None,
) -> list[tuple[str, bool]]:
    """:func:`generate`, with per prompt whether generation ended with EOS."""
    if not prompts:
        return []
    if prefix_chars is not None and len(prefix_chars) != len(prompts):
        raise ValueError(f"{len(prefix_chars)} prefix lengths for {len(prompts)} prompts")
    device = next(model.parameters()).device
    config = _generation_config(model, tokenizer, max_new_tokens)
    out: list[tuple[str, bool]] = [("", False)] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    window = _sliding_window(model)
    with left_padding(tokenizer):
        full = tokenizer(list(prompts))["input_ids"]
        plain: list[int] = []
        groups: dict[str, list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            k = prefix_chars[i] if prefix_chars is not None else 0
            if k > 0:
                groups[prompt[:k]].append(i)
            else:
                plain.append(i)
        for prefix, members in groups.items():
            if len(members) < 2:
                plain += members
                continue
            p_ids = tokenizer(prefix)["input_ids"]
            n_pre = len(p_ids)
            shared = []
            for i in members:
                if len(full[i]) > n_pre and full[i][:n_pre] == p_ids:
                    shared.append(i)
                else:
                    plain.append(i)
            if not shared:
                continue
            cache = _prefix_cache(model, p_ids, device)
            shared.sort(key=lambda i: (-len(full[i]), i))
            for start in range(0, len(shared), batch_size):
                chunk = shared[start : start + batch_size]
                longest = len(full[chunk[0]])
                if window is None or longest + max_new_tokens <= window:
                    batches = [chunk]
                else:  # padding would take room in the sliding window: one length per batch
                    lengths: dict[int, list[int]] = defaultdict(list)
                    for i in chunk:
                        lengths[len(full[i])].append(i)
                    batches = list(lengths.values())
                for idx in batches:
                    ids, mask = _pad_between(p_ids, [full[i][n_pre:] for i in idx], pad)
                    rows_cache = copy.deepcopy(cache)
                    rows_cache.batch_repeat_interleave(len(idx))
                    results = _generate_batch(
                        model,
                        tokenizer,
                        ids.to(device),
                        mask.to(device),
                        config,
                        first_line,
                        rows_cache,
                    )
                    for i, result in zip(idx, results, strict=True):
                        out[i] = result
        plain.sort(key=lambda i: (-len(full[i]), i))
        for start in range(0, len(plain), batch_size):
            idx = plain[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            results = _generate_batch(
                model,
                tokenizer,
                enc["input_ids"].to(device),  # (B, T)
                enc["attention_mask"].to(device),  # (B, T)
                config,
                first_line,
            )
            for i, result in zip(idx, results, strict=True):
                out[i] = result
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    first_line: bool = False,
    prefix_chars: Sequence[int] | None = None,
) -> list[str]:
    """Greedy continuations of many prompts: batched, left-padded, with the KV cache.

    Prompts are grouped by token length (longest first) to waste little on padding; the
    results come back in input order. The tokenizer pads on the left during the call whatever
    its own setting (:func:`left_padding`), and adds its special tokens (BOS) as it does in
    training and evaluation.

    With ``prefix_chars``, prompts that start with the same text (a few-shot header and shots)
    share its KV cache: each distinct prefix is run once, its cache is copied into every batch
    of prompts that start with it, and only the rest of each prompt is run. In such a batch the
    rests are padded on their left, between the prefix and the rest, and the padding is masked
    (positions follow the attention mask, so every real token keeps its position); where that
    padding would take room in a sliding attention window (Gemma 2/3 prompts longer than the
    window), a batch holds prompts of one length instead and needs no padding. The tokens
    are those of the whole prompt, cut after the prefix's own tokens; a prompt whose tokens do
    not start with them (a token spanning the boundary) goes the plain way. The continuations
    are the plain way's up to floating-point rounding.

    Args:
        model: A causal LM (a peft model too).
        tokenizer: Its tokenizer; needs a pad token (:func:`tli.models.load_tokenizer` sets one).
        prompts: The prompts.
        max_new_tokens: Most tokens generated per prompt.
        batch_size: Prompts per ``generate`` call.
        first_line: Stop a row once its first non-blank line is complete (scoring).
        prefix_chars: Per prompt, the length in characters of its shared prefix (0: none).

    Returns:
        One decoded continuation per prompt (special tokens dropped).
    """
    results = _generate_all(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        first_line=first_line,
        prefix_chars=prefix_chars,
    )
    return [text for text, _ in results]


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    prefix_chars: Sequence[int] | None = None,
) -> list[tuple[str, bool]]:
    """Greedy answers: :func:`generate` stopping at the first line, and whether it is whole.

    Returns:
        Per prompt ``(continuation, complete)``: ``complete`` is False when the token limit
        cut the first non-blank line before it ended (no line break, no EOS). Such a line may
        be a prefix of a longer answer, so scoring counts it as a miss.
    """
    results = _generate_all(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        first_line=True,
        prefix_chars=prefix_chars,
    )
    return [(text, ended or _first_line_done(text)) for text, ended in results]


@contextmanager
def attached(loaded: Any, info: Any) -> Iterator[Any]:
    """The loaded model with the adapter attached (not merged) for the block; removed after.

    peft injects the LoRA layers into ``loaded.model`` in place; on exit ``unload()`` puts the
    original layers back, so ``loaded.model`` is exactly the base model again.

    Raises:
        TLIError: peft cannot load the adapter, or the adapter holds weights for modules its
            own config does not inject (it would be applied only in part).
    """
    from peft import PeftModel

    from tli.evaluate import ADAPTER_CONFIG

    try:
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 API that warns of its own deprecation.
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            peft_model = PeftModel.from_pretrained(loaded.model, str(info.dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TLIError(
            f"adapter {info.dir}: cannot be loaded onto {loaded.name!r}: {line}"
        ) from None
    try:
        injected = {
            name
            for name, module in peft_model.get_base_model().named_modules()
            if "default" in getattr(module, "lora_A", {})
        }
        unused = sorted(set(info.modules) - injected)
        if unused:
            raise TLIError(
                f"adapter {info.dir}: weights for {len(unused)} module(s) (e.g. {unused[0]}) are "
                f"not used by its {ADAPTER_CONFIG}; the adapter would be probed only in part"
            )
        peft_model.eval()
        yield peft_model
    finally:
        peft_model.unload()


def _identity_adapter(info: Any) -> bool:
    """Whether every LoRA B matrix of the adapter is zero (the adapter changes nothing)."""
    from safetensors import safe_open

    from tli.evaluate import ADAPTER_WEIGHTS

    with safe_open(str(info.dir / ADAPTER_WEIGHTS), "pt") as f:
        keys = [k for k in f.keys() if ".lora_B" in k]
        return bool(keys) and all(not bool(f.get_tensor(k).any()) for k in keys)


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
        warnings: Doubts raised on the way.
        timings: Seconds per step.
    """

    config: ProbeConfig
    model: dict[str, Any]
    adapter: dict[str, Any]
    rows: list[dict[str, Any]]
    items: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        """Whether the scored word translation ran."""
        return bool(self.items)

    def _head(self) -> dict[str, Any]:
        from tli.config import to_dict

        return {
            "config": to_dict(self.config),
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
                scores=[_nan_from_null(s) for s in scores.get("scores", [])],
                warnings=list(data.get("warnings", [])),
                timings={k: float(v) for k, v in data.get("timings", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise TLIError(
                f"{directory}: not a tli probe result ({type(err).__name__}: {err})"
            ) from None

    def direction_name(self, direction: str) -> str:
        """``Swahili -> English`` for ``s2t``, the reverse for ``t2s``."""
        a, b = self.config.src_lang, self.config.tgt_lang
        return f"{a} -> {b}" if direction == "s2t" else f"{b} -> {a}"

    def probe_markdown(self) -> str:
        """``probe.md``: one table row per prompt."""
        data = self.probe_json()
        lines = [
            f"# Probe: {self.model.get('name', '?')} with adapter `{self.adapter.get('dir', '?')}`",
            "",
            f"Greedy decoding, at most {self.config.max_new_tokens} new tokens; the same prompt "
            f"for both models. The tuned output differs from the base output in "
            f"{data['n_changed']} of {data['n_prompts']} prompts.",
            "",
            "| set | template | prompt | base output | tuned output |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            mark = "" if r["base"] != r["tuned"] else " (same)"
            lines.append(
                f"| {r['set']} | {r['template']} | {_cell(r['prompt'])} | {_cell(r['base'])} | "
                f"{_cell(r['tuned'])}{mark} |"
            )
        if self.warnings:
            lines += ["", "## Warnings", "", *[f"- {w}" for w in self.warnings]]
        return "\n".join(lines) + "\n"

    def score_table(self) -> str:
        """The scores as a Markdown table: one row per set and direction."""
        from tli.stats import format_p

        lines = [
            "| set | direction | n | exact base | exact tuned | change | lost | gained | "
            "McNemar p | chrF base | chrF tuned | chrF change |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in self.scores:
            lines.append(
                f"| {s['set']} | {self.direction_name(s['direction'])} | {s['n']} | "
                f"{_share(s['base'], s['n'])} | {_share(s['tuned'], s['n'])} | "
                f"{_signed(100 * s['acc_change'], '.1f')} pt | {s['lost']} | {s['gained']} | "
                f"{format_p(s['p'])} | {s['base_chrf']:.1f} | {s['tuned_chrf']:.1f} | "
                f"{_signed(s['chrf_change'], '.1f')} |"
            )
        return "\n".join(lines)

    def scores_markdown(self, max_examples: int = 30) -> str:
        """``probe_scores.md``: the table, how it was computed, the items whose hit changed."""
        cfg = self.config
        example = next((i["prompt"] for i in self.items), "")
        cut_base = sum(s["base_cut"] for s in self.scores)
        cut_tuned = sum(s["tuned_cut"] for s in self.scores)
        lines = [
            f"# Scored word translation: {self.model.get('name', '?')}, base vs. adapter "
            f"`{self.adapter.get('dir', '?')}`",
            "",
            self.score_table(),
            "",
            f"Few-shot prompts with {cfg.shots} shots drawn from the trained set only, never the "
            "item itself nor a pair sharing its source or a translation; the same prompt for "
            f"both models; greedy decoding, at most {cfg.score_max_new_tokens} new tokens. The "
            "answer is the first non-blank line of the output, NFC, lower-cased, with "
            "punctuation and quotes stripped from its ends. *Exact*: the answer equals the gold "
            "translation or a listed alternative (target -> source: any source listing that "
            "translation), normalised the same way. *lost* / *gained*: items right before and "
            "wrong after, and the reverse; McNemar's exact two-sided test on them. *chrF*: "
            "sacrebleu sentence chrF (char 6-grams, beta 2) of the normalised answer against "
            "the best gold string, averaged. An answer whose line the token limit cut (no line "
            "break, no end of text) counts as a miss"
            + (
                f" ({cut_base} base, {cut_tuned} tuned)."
                if cut_base or cut_tuned
                else " (there were none)."
            ),
            "",
            "Example prompt:",
            "",
            "```",
            example,
            "```",
        ]
        changed = [i for i in self.items if i["base_hit"] != i["tuned_hit"]]
        lines += ["", f"## Items whose hit changed ({len(changed)})", ""]
        if changed:
            lines += [
                "| set | direction | word | gold | base answer | tuned answer |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for i in changed[:max_examples]:
                lines.append(
                    f"| {i['set']} | {i['direction']} | {_cell(i['word'])} | "
                    f"{_cell('; '.join(i['gold']))} | {_cell(i['base_answer'])} | "
                    f"{_cell(i['tuned_answer'])} |"
                )
            if len(changed) > max_examples:
                lines += ["", f"... and {len(changed) - max_examples} more in {SCORES_JSON}."]
        else:
            lines.append("None.")
        if self.warnings:
            lines += ["", "## Warnings", "", *[f"- {w}" for w in self.warnings]]
        return "\n".join(lines) + "\n"

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
        if self.scored:
            return _scores_line(self.scores, self.config)
        data = self.probe_json()
        return (
            f"Probe: the tuned output differs from the base output in {data['n_changed']} of "
            f"{data['n_prompts']} prompts (no scored translation)."
        )


def _cell(text: str) -> str:
    """Text for one Markdown table cell: pipes escaped, line breaks as <br>, never empty."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "")
    text = text.replace("<", "&lt;").replace("\n", "<br>")
    return text if text.strip() else "(empty)"


def _share(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "n/a"


def _signed(value: float, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+{spec}}"


def _scores_line(scores: Sequence[Mapping[str, Any]], cfg: ProbeConfig) -> str:
    from tli.stats import format_p

    parts = []
    for name in dict.fromkeys(s["set"] for s in scores):
        cells = []
        for s in (s for s in scores if s["set"] == name):
            cells.append(
                f"{s['direction']} {_pct(s['base_acc'])} -> {_pct(s['tuned_acc'])} "
                f"(+{s['gained']}/-{s['lost']}, McNemar p = {format_p(s['p'])})"
            )
        parts.append(f"{name} " + ", ".join(cells))
    return (
        f"Word translation ({cfg.shots}-shot, exact match, base -> tuned; s2t = "
        f"{cfg.src_lang} -> {cfg.tgt_lang}): " + "; ".join(parts) + "."
    )


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _read_result(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TLIError(f"{path}: no such file (has the probe run?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TLIError(f"{path}: cannot read: {err}") from None
    if not isinstance(data, dict) or "config" not in data:
        raise TLIError(f"{path}: not a tli probe result")
    return data


def _nan_from_null(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in row.items()}


def probe_summary_line(probe_dir: str | os.PathLike[str]) -> str:
    """The one-line summary of a saved probe directory, for the ``tli run`` report.

    With ``probe_scores.json`` it gives per set and direction the base and tuned exact-match
    accuracy, items gained and lost and McNemar's p; otherwise how many probe outputs changed.

    Raises:
        TLIError: The directory holds no probe result, or a damaged one.
    """
    return ProbeResult.load(probe_dir).summary_line()


# --- the stage --------------------------------------------------------------------------------


def probe(
    loaded: Any,
    adapter_dir: str | os.PathLike[str],
    sets: Mapping[str, Sequence[Any]],
    cfg: ProbeConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    score: bool | None = None,
) -> ProbeResult:
    """Probe an adapter, and (``score``) score word translation, base vs. tuned.

    The adapter is checked first (:func:`tli.evaluate.read_adapter`,
    :func:`tli.evaluate.check_adapter`): a missing, corrupted or mismatched adapter is an error,
    never a silent probe of the base model. Every prompt is generated by the base model first;
    then the adapter is attached (:func:`attached`) and the same prompts are generated again;
    afterwards ``loaded.model`` is the base model again.

    Args:
        loaded: A full-depth :class:`tli.models.LoadedModel` without adapters.
        adapter_dir: A peft adapter directory (or a training directory with ``final/``).
        sets: Set name (``trained``, ``control``) -> its :class:`tli.pairs.Pair` list.
        cfg: Settings (defaults: :class:`ProbeConfig`).
        out_dir: If given, the result is saved there (:meth:`ProbeResult.save`).
        score: Run the scored translation; ``None``: ``cfg.score``.

    Returns:
        The :class:`ProbeResult`.

    Raises:
        TLIError: A bad adapter, a truncated model or one that already carries adapters, no
            pairs, or (scoring) no trained set.
    """
    from tli.evaluate import _model_facts, check_adapter, read_adapter

    cfg = cfg or ProbeConfig()
    score = cfg.score if score is None else score
    start = time.perf_counter()
    sets = {name: list(pairs) for name, pairs in sets.items() if pairs}
    if not sets:
        raise TLIError("nothing to probe: every set is empty")
    info = read_adapter(adapter_dir)
    if loaded.truncated:
        raise TLIError(
            f"the probe needs the full model; {loaded.name!r} was built with {loaded.depth} of "
            f"{loaded.num_layers} blocks (max_layer)"
        )
    if hasattr(loaded.model, "peft_config") or hasattr(loaded.model, "get_base_model"):
        raise TLIError(f"model {loaded.name!r} already carries adapters; load a fresh base model")
    check_adapter(info, loaded)
    if out_dir is not None:
        from tli.io import ensure_dir

        ensure_dir(out_dir)
    notes: list[str] = []
    if _identity_adapter(info):
        notes.append(
            f"adapter {info.dir}: every LoRA B matrix is zero, so the tuned model is the base model"
        )
    rows = probe_rows(sets, cfg)
    items = score_items(sets, cfg) if score else []
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
        model=_model_facts(loaded),
        adapter=info.summary(),
        rows=rows,
        items=items,
        scores=scores,
        warnings=notes,
        timings=timings,
    )
    timings["metrics_s"] = time.perf_counter() - clock
    timings["n_prompts"] = float(len(rows))
    timings["n_scored"] = float(len(items))
    result.timings["total_s"] = time.perf_counter() - start
    if out_dir is not None:
        result.save(out_dir)
    return result


# --- command line -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tli probe``."""
    from tli.config import add_dataclass_arguments
    from tli.evaluate import add_adapter_arguments

    p = sub.add_parser(
        "probe",
        help="generate from base and tuned model; --score: few-shot word translation + McNemar",
        description="Probe an adapter with prompt templates (translation both ways, a "
        "code-switched sentence, a contextual definition): greedy output of the base and the "
        "tuned model side by side (probe.md, probe.json). With --score, also few-shot word "
        "translation of the trained and control sets in both directions, exact match and chrF, "
        "base vs. tuned by McNemar's exact test (probe_scores.md, probe_scores.json). "
        "See docs/probe.md.",
    )
    add_adapter_arguments(p)
    add_pair_arguments(p)
    p.add_argument(
        "--out", type=Path, default=Path("probe"), help="output directory (default: probe)"
    )
    add_dataclass_arguments(p, ProbeConfig, skip=("enabled",))
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tli.config import build, overrides_from_args
    from tli.evaluate import adapter_and_model
    from tli.io import ensure_writable_dir
    from tli.models import load_model
    from tli.pairs import read_sets

    overrides = overrides_from_args(ProbeConfig, args)
    for key in _TEXT_FIELDS:  # a shell argument cannot hold a line break: accept "\n" for one
        if isinstance(overrides.get(key), str):
            overrides[key] = overrides[key].replace("\\n", "\n")
    cfg = build(ProbeConfig, overrides)
    ensure_writable_dir(args.out)
    info, model_cfg = adapter_and_model(args)
    sets = read_sets(
        args.pairs, args.control, src_key=args.src_key, tgt_key=args.tgt_key, stage="the probe"
    )
    start = time.perf_counter()
    loaded = load_model(model_cfg)
    load_s = time.perf_counter() - start
    result = probe(loaded, info.dir, sets, cfg, args.out)
    print(result.summary_line())
    if result.scored:
        print()
        print(result.score_table())
    files = [PROBE_MD, PROBE_JSON] + ([SCORES_MD, SCORES_JSON] if result.scored else [])
    print(
        f"wrote {', '.join(str(args.out / f) for f in files)} (probe "
        f"{result.timings['total_s']:.1f} s after a {load_s:.1f} s load)"
    )
    sys.stdout.flush()
    return 0


__all__ = [
    "DIRECTIONS",
    "PROBE_JSON",
    "PROBE_MD",
    "SCORES_JSON",
    "SCORES_MD",
    "TEMPLATES",
    "ProbeConfig",
    "ProbeResult",
    "attached",
    "choose_shots",
    "chrf",
    "compare_hits",
    "exact_match",
    "extract_answer",
    "fewshot_parts",
    "fewshot_prompt",
    "generate",
    "generate_answers",
    "left_padding",
    "normalize_answer",
    "probe",
    "probe_prompt",
    "probe_rows",
    "probe_summary_line",
    "question_and_gold",
    "related",
    "sample",
    "score_items",
    "shot_order",
    "summarize_scores",
]
