"""Batched greedy generation: left padding, the KV cache, and a shared-prefix cache.

The engine behind ``tli probe`` and the LM-ranking yardstick, independent of probing: many
prompts are generated greedily in batches grouped by token length (left-padded, positions from
the attention mask), and prompts that share a prefix (a few-shot header and its shots) run that
prefix once and copy its KV cache into each batch. :func:`generate` returns the continuations;
:func:`generate_answers` stops each row at the end of its first non-blank line and says whether
the token limit cut it. :func:`continuation_scores` ranks given continuations of one prompt by
their mean token log-probability (the LM-ranking yardstick of ``tli probe --rank``).
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from tli import surgery


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


def _prefix_kv_cache(model: Any, ids: list[int], device: Any) -> Any:
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
    window = surgery.sliding_window(model)
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
            cache = _prefix_kv_cache(model, p_ids, device)
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


def continuation_scores(
    model: Any,
    tokenizer: Any,
    prompt: str,
    continuations: Sequence[str],
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean token log-probability of each continuation after one prompt.

    The prompt (with the tokenizer's special tokens) runs once through the decoder without its
    LM head; its KV cache is copied into each batch of continuations, which are tokenised
    without special tokens, right-padded and masked. The LM head (and Gemma's final logit
    soft-capping) runs only at the positions that predict a continuation token, so
    ``score[j] = mean_k log P(c_jk | prompt, c_j<k)``: the same as scoring each full
    sequence on its own, up to floating-point rounding (tested).

    Args:
        model: A causal LM (not peft-wrapped).
        tokenizer: Its tokenizer.
        prompt: The shared prompt; the continuations follow it directly (put any separating
            space at the start of each continuation).
        continuations: C non-empty strings.
        batch_size: Continuations per forward pass.

    Returns:
        Float32 ``(C,)`` mean log-probabilities.
    """
    if not continuations:
        return torch.zeros(0)
    body = surgery.decoder(model)  # the transformer without its LM head
    head = surgery.lm_head(model)
    cap = surgery.logit_softcap(model)
    device = next(model.parameters()).device
    pid = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # (1, T)
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    for c, row in zip(continuations, ids, strict=True):
        if not row:
            raise ValueError(f"continuation {c!r} has no tokens")
    keyword = _cache_keyword(model)
    out = torch.zeros(len(ids))
    with torch.inference_mode():
        first = body(input_ids=pid, use_cache=True)  # the prompt once
        cache = getattr(first, "cache", None) or first.past_key_values
        last = first.last_hidden_state[:, -1:]  # (1, 1, D): predicts each first token
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            width = max(map(len, chunk))
            cand = torch.zeros(len(chunk), width, dtype=torch.long, device=device)  # (B, W)
            mask = torch.zeros(len(chunk), width, device=device)  # (B, W)
            for j, row in enumerate(chunk):
                cand[j, : len(row)] = torch.tensor(row)
                mask[j, : len(row)] = 1
            rows_cache = copy.deepcopy(cache)
            rows_cache.batch_repeat_interleave(len(chunk))
            attn = torch.cat([torch.ones(len(chunk), pid.shape[1], device=device), mask], 1)
            hidden = body(
                input_ids=cand, attention_mask=attn, use_cache=True, **{keyword: rows_cache}
            ).last_hidden_state  # (B, W, D): each candidate's tokens after the prompt
            # the state that predicts token k is the one after token k-1 (or after the prompt)
            hidden = torch.cat([last.expand(len(chunk), -1, -1), hidden[:, :-1]], 1)  # (B, W, D)
            logits = head(hidden).float()  # (B, W, V): only where candidates are read
            if cap:
                logits = torch.tanh(logits / cap) * cap
            logp = logits.log_softmax(-1).gather(2, cand[..., None])[..., 0]  # (B, W)
            out[start : start + len(chunk)] = ((logp * mask).sum(1) / mask.sum(1)).cpu()
    return out
