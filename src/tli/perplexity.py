"""Do-no-harm check: language-modelling perplexity of a model on short everyday texts.

tli bundles short everyday sentences written for the project, one per line, in
``tli/data/texts_sw.txt`` (Swahili) and ``tli/data/texts_en.txt`` (English). The check scores
each sentence under the base and the adapted model and reports the relative change of per-token
perplexity with a paired bootstrap CI over sentences (docs/perplexity.md):

* :func:`load_texts` reads the bundled sentences;
* :func:`sentence_nll` gives each sentence's summed negative log-likelihood and token count;
* :func:`perplexity` pools them into one per-token perplexity;
* :func:`perplexity_change` compares two models on the same sentences, with its interval;
* :func:`format_change` writes the one-line summary ("Swahili perplexity +3.1% [+2.2, +4.0]");
* :func:`text_sets` gathers the bundled texts and a user's files (:func:`read_text_file`), and
  :func:`summary_line` writes the do-no-harm line of ``tli evaluate``'s verdict.

Everything after :func:`sentence_nll` is pure numpy on per-sentence arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tli.errors import TLIError

#: Language code -> name of the bundled text sets (files ``tli/data/texts_<code>.txt``).
LANGUAGES: dict[str, str] = {"sw": "Swahili", "en": "English"}


def read_sentences(file: Any, where: str) -> list[str]:
    """The lines of a UTF-8 text file of sentences, one per line, none blank.

    Args:
        file: A path or an ``importlib.resources`` file (anything with ``read_bytes``).
        where: How messages name the file, e.g. ``bundled texts tli/data/texts_sw.txt``.

    Raises:
        TLIError: the file cannot be read, is not UTF-8, or has a blank line.
    """
    from tli.errors import first_line

    try:
        lines = file.read_bytes().decode("utf-8").splitlines()
    except OSError as err:
        raise TLIError(f"{where}: cannot read: {first_line(err)}") from None
    except UnicodeDecodeError as err:
        raise TLIError(f"{where}: not UTF-8: {err}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise TLIError(f"{where}: line {i} is blank")
    return lines


def load_texts() -> dict[str, list[str]]:
    """The bundled everyday sentences, by language code (:data:`LANGUAGES`), in file order.

    Each file holds one sentence per line, UTF-8, with no header and no blank line.

    Raises:
        TLIError: a file is missing, not UTF-8, or holds a blank line.
    """
    from importlib import resources

    texts: dict[str, list[str]] = {}
    for code in LANGUAGES:
        name = f"tli/data/texts_{code}.txt"
        texts[code] = read_sentences(
            resources.files("tli").joinpath(f"data/texts_{code}.txt"), f"bundled texts {name}"
        )
    return texts


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to ``(B, T)`` ids and attention mask, on the tokenizer's side."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def _batch_nll(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64) and scored-token count per row of one padded batch ``(B, T)``."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): padding never shifts positions
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).logits  # (B, T, V), the model's dtype: the only full-vocabulary tensor of the batch
    # Position t predicts token t + 1; score it only when both are real tokens. The first
    # token of a sentence (BOS where the tokenizer adds one) is context, never a target.
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()  # (B, T-1)
    targets = ids[:, 1:]  # (B, T-1)
    sums = torch.zeros(ids.shape[0], dtype=torch.float64)
    for i in range(ids.shape[0]):
        keep = scored[i]  # (T-1,)
        row = logits[i, :-1][keep].float()  # (n_i, V): one sentence at a time bounds memory
        gold = row.gather(-1, targets[i][keep][:, None]).squeeze(-1)  # (n_i,)
        sums[i] = (torch.logsumexp(row, dim=-1) - gold).double().sum().cpu()
    return sums, scored.sum(-1).cpu()


def sentence_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each sentence under a causal LM, summed over its tokens.

    Each text is tokenised alone with the tokenizer's special tokens, as the model expects them
    (e.g. Gemma's and Llama's BOS). Token ``t + 1`` is scored from the logits at position ``t``;
    the first token is never a target, and padding is never context or target. Texts are sorted
    by length into batches of ``batch_size`` to limit padding, padded on the tokenizer's
    ``padding_side`` with the attention mask and position ids that skip the padding, and the
    results come back in input order. Works on a plain ``transformers`` model and on a peft
    model wrapping one. Runs under ``torch.inference_mode()`` with every module in eval mode
    (their modes are restored afterwards), so the result is deterministic on a given machine.

    Args:
        model: A causal LM (or a peft model around one) whose output has ``.logits`` ``(B, T, V)``.
        tokenizer: Its tokenizer; ``tokenizer(texts)["input_ids"]`` must give one list per text.
        texts: Non-empty strings, N of them.
        batch_size: Sentences per forward pass; bounds the logits at ``batch_size * T * V``.

    Returns:
        ``(nll_sum, counts)``: float64 ``(N,)`` summed NLL in nats and int64 ``(N,)`` number of
        scored tokens of each text.

    Raises:
        TLIError: no texts, an empty text, ``batch_size < 1``, or a text with fewer than two
            tokens (nothing to score).
    """
    if not texts:
        raise TLIError("no texts to score")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise TLIError(f"text {i + 1} is empty or whitespace-only")
    if batch_size < 1:
        raise TLIError(f"batch size must be >= 1, got {batch_size}")
    rows = [list(r) for r in tokenizer(list(texts))["input_ids"]]
    for i, row in enumerate(rows):
        if len(row) < 2:
            raise TLIError(f"text {i + 1} has {len(row)} token(s); perplexity needs at least 2")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    side = getattr(tokenizer, "padding_side", "right")
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    nll = np.zeros(len(rows), dtype=np.float64)
    counts = np.zeros(len(rows), dtype=np.int64)
    device = next(model.parameters()).device
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask = _pad([rows[i] for i in idx], pad_id, side)
                sums, n = _batch_nll(model, ids.to(device), mask.to(device))
                nll[idx] = sums.numpy()
                counts[idx] = n.numpy()
    finally:
        for module, training in modes:
            module.training = training
    return nll, counts


def _check(nll_sum: Any, counts: Any, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    nll = np.asarray(nll_sum, dtype=np.float64)
    n = np.asarray(counts)
    label = f"{what}: " if what else ""
    if nll.ndim != 1 or nll.shape != n.shape or nll.size == 0:
        raise TLIError(
            f"{label}need two non-empty 1-D arrays of one length, got {nll.shape}, {n.shape}"
        )
    if not np.isfinite(nll).all():
        raise TLIError(f"{label}NLL contains NaN or infinity")
    if (n < 1).any() or not np.array_equal(n, np.round(n)):
        raise TLIError(f"{label}token counts must be whole numbers >= 1")
    return nll, n.astype(np.int64)


def perplexity(nll_sum: Any, counts: Any) -> float:
    """Per-token perplexity of a set of sentences: ``exp(total NLL / total tokens)``.

    Args:
        nll_sum: Summed NLL (nats) per sentence, shape (N,).
        counts: Scored tokens per sentence, shape (N,).
    """
    nll, n = _check(nll_sum, counts)
    return math.exp(nll.sum() / n.sum())


def perplexity_change(
    base: tuple[Any, Any],
    tuned: tuple[Any, Any],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | int]:
    """Relative change of per-token perplexity, ``tuned / base - 1``, with a paired bootstrap CI.

    Both models scored the same N sentences with the same tokenizer, so the token counts agree
    and ``tuned / base = exp((NLL_tuned - NLL_base) / tokens)``. Each of ``n_boot`` resamples
    draws N sentence indices with replacement (``numpy.random.default_rng(seed)``) and
    recomputes both perplexities on that same resample; the interval is the percentile interval
    of the resampled changes. Identical inputs give exactly ``change = lo = hi = 0``.

    Args:
        base: ``(nll_sum, counts)`` of the base model, (N,) each (see :func:`sentence_nll`).
        tuned: ``(nll_sum, counts)`` of the adapted model on the same sentences.
        n_boot: Number of resamples.
        seed: Seed of the resamples; same seed, same interval.
        level: Coverage of the interval, in (0, 1).

    Returns:
        ``base`` and ``tuned`` (per-token perplexities), ``change`` (``tuned / base - 1``),
        ``lo`` / ``hi`` (its CI), ``level``, ``n_sentences`` and ``n_tokens``.

    Raises:
        TLIError: bad shapes or values, or token counts that differ between the two.
    """
    nll0, n0 = _check(*base, "base")
    nll1, n1 = _check(*tuned, "tuned")
    if n0.size != n1.size:
        raise TLIError(f"base has {n0.size} sentence(s) and tuned {n1.size}: they must be the same")
    if not np.array_equal(n0, n1):
        raise TLIError(
            "base and tuned token counts differ: they must score the same sentences with the "
            "same tokenizer"
        )
    if n_boot < 1 or not 0 < level < 1:
        raise TLIError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    diff = nll1 - nll0  # (N,) paired per-sentence change of summed NLL
    size = diff.size
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // size)  # bound memory: ~16 MB of indices at a time
    boot = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, size, size=(min(chunk, n_boot - start), size))  # (b, N)
        boot.append(np.expm1(diff[idx].sum(axis=1) / n0[idx].sum(axis=1)))  # (b,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(np.concatenate(boot), [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return {
        "base": perplexity(nll0, n0),
        "tuned": perplexity(nll1, n1),
        "change": float(np.expm1(diff.sum() / n0.sum())),
        "lo": float(lo),
        "hi": float(hi),
        "level": float(level),
        "n_sentences": int(size),
        "n_tokens": int(n0.sum()),
    }


def _points(x: float) -> str:
    """A fraction as signed percentage points with one decimal; never "-0.0"."""
    value = round(100.0 * x, 1)
    return f"{value + 0.0:+.1f}"  # + 0.0 turns -0.0 into 0.0


def format_change(language: str, result: dict[str, Any]) -> str:
    """One line such as ``Swahili perplexity +3.1% [+2.2, +4.0]``.

    A rise of tenfold or more reads as a ratio, ``English perplexity x4.5e+04 [x3.0e+04,
    x7.1e+04]``: seven-digit percentages are hard to read and hide that the model is broken.

    Args:
        language: The language's name, as the reader should see it.
        result: A dict from :func:`perplexity_change`.
    """
    if min(result["change"], result["lo"]) >= 9.0:  # perplexity x10 or more
        change, lo, hi = (f"x{1.0 + result[k]:.1e}" for k in ("change", "lo", "hi"))
        return f"{language} perplexity {change} [{lo}, {hi}]"
    change, lo, hi = (_points(result[k]) for k in ("change", "lo", "hi"))
    return f"{language} perplexity {change}% [{lo}, {hi}]"


def read_text_file(spec: str) -> tuple[str, str, list[str]]:
    """A user's text file for the do-no-harm check: ``NAME=PATH`` or ``PATH``.

    The file holds one sentence per line, UTF-8; blank lines are skipped.

    Args:
        spec: ``NAME=PATH`` (NAME is how the reports name the texts) or a path (named by its
            file stem).

    Returns:
        ``(name, path, sentences)``.

    Raises:
        TLIError: an empty name, a missing or unreadable file, or one without a sentence.
    """
    from tli.io import expand_user, read_text

    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    name, path = name.strip(), path.strip()
    if not path:
        raise TLIError(f"perplexity text {spec!r}: expected NAME=PATH or PATH")
    name = name or expand_user(path).stem
    if not name:
        raise TLIError(f"perplexity text {spec!r}: the texts need a name (NAME=PATH)")
    lines = [line.strip() for line in read_text(expand_user(path)).splitlines()]
    sentences = [line for line in lines if line]
    if not sentences:
        raise TLIError(f"{path}: no sentence (one sentence per line, UTF-8)")
    return name, path, sentences


#: The language names of a pair whose languages are not named (tli.pairs' neutral defaults).
UNNAMED = ("source", "target")


def bundled_codes(languages: Sequence[str] = UNNAMED) -> list[str]:
    """The bundled text sets of a run's languages: those whose name or code is one of them.

    Both sets when the languages are unnamed (``source``, ``target``), since tli cannot tell.
    """
    if tuple(languages) == UNNAMED:
        return list(LANGUAGES)
    wanted = {str(name).casefold() for name in languages}
    return [c for c, name in LANGUAGES.items() if c in wanted or name.casefold() in wanted]


def text_sets(
    files: Sequence[str] = (), *, bundled: bool = True, languages: Sequence[str] = UNNAMED
) -> dict[str, dict[str, Any]]:
    """The texts of the do-no-harm check: the bundled ones, then the user's files.

    Args:
        files: ``NAME=PATH`` or ``PATH`` specs (:func:`read_text_file`).
        bundled: Include the bundled sentences of the run's languages (:func:`load_texts`,
            :func:`bundled_codes`): a German-English run measures the English ones only.
        languages: The run's (source, target) language names.

    Returns:
        Key -> ``{"name", "source", "texts"}``: key ``sw`` / ``en`` for the bundled sets (named by
        :data:`LANGUAGES`), the user's name for a file.

    Raises:
        TLIError: a bad file, or two sets with one name.
    """
    out: dict[str, dict[str, Any]] = {}
    if bundled:
        codes = bundled_codes(languages)
        for code, texts in load_texts().items():
            if code not in codes:
                continue
            # named as the run names the language (its pair config), e.g. "en" or "English"
            own = [n for n in languages if str(n).casefold() in (code, LANGUAGES[code].casefold())]
            out[code] = {
                "name": own[0] if own else LANGUAGES[code],
                "source": f"tli/data/texts_{code}.txt (bundled)",
                "texts": texts,
            }
    names = {v["name"].casefold() for v in out.values()} | {k.casefold() for k in out}
    for spec in files:
        name, path, texts = read_text_file(spec)
        if name.casefold() in names:
            raise TLIError(
                f"perplexity text {spec!r}: the name {name!r} is taken; give another (NAME=PATH)"
            )
        names.add(name.casefold())
        out[name] = {"name": name, "source": str(path), "texts": texts}
    return out


def summary_line(results: dict[str, Any]) -> str:
    """The do-no-harm line of a verdict, e.g. ``do no harm: Swahili perplexity +3.1% [...]; ...``.

    Args:
        results: What ``tli evaluate`` saves under ``perplexity``: ``enabled``, ``reason`` (when
            off) and ``sets`` (key -> :func:`perplexity_change` plus ``name``).
    """
    if not results or not results.get("enabled"):
        why = (results or {}).get("reason") or "not measured by this evaluation"
        return f"do no harm: perplexity not measured ({why})"
    parts = [
        f"{format_change(r['name'], r)} (base {r['base']:.1f} -> {r['tuned']:.1f}, "
        f"{r['n_sentences']} sentences)"
        for r in results["sets"].values()
    ]
    pct = int(round(100 * next(iter(results["sets"].values()))["level"])) if parts else 95
    return f"do no harm ({pct}% paired bootstrap CI): " + "; ".join(parts)
