"""How much does the base LM itself know of a pair set's translations (docs/findings.md)?

For each pair, the LM reads a 3-shot prompt ending in the source word ("Swahili: X", newline,
"English:"), and every target of the set is scored by its mean token log-probability as the
continuation (the prompt runs once; its key/value cache serves every candidate).
P@1 is :func:`tli.metrics.retrieval` on these scores, with the same candidates and gold mask
(listed alternatives count) as the embedding P@1 of `tli evaluate`. ``calibrated`` subtracts
each candidate's score after a content-free source ("N/A"), which removes the pull of frequent
words (Zhao et al. 2021).

    python scripts/lm_ceiling.py --set control        # bundled lexicon, embedded gemma-3-270m
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tli import models, surgery
from tli.errors import TLIError
from tli.metrics import random_chance_p_at_1, retrieval
from tli.pairs import gold_mask, load_lexicon

SHOTS = (("mbwa", "dog"), ("nyumba", "house"), ("maji", "water"))  # all in the trained split


def candidate_scores(lm, prefix: str, cands: list[str]) -> torch.Tensor:
    """Mean log P(candidate tokens | prefix) for every candidate, shape (len(cands),)."""
    tok, model = lm.tokenizer, lm.model
    body = surgery.decoder(model)  # the transformer without its LM head
    pid = tok(prefix, return_tensors="pt").input_ids
    ids = [tok(" " + c, add_special_tokens=False).input_ids for c in cands]
    width = max(map(len, ids))
    cand = torch.zeros(len(cands), width, dtype=torch.long)
    mask = torch.zeros(len(cands), width)
    for j, c in enumerate(ids):
        cand[j, : len(c)] = torch.tensor(c)
        mask[j, : len(c)] = 1
    out = body(input_ids=pid, use_cache=True)  # the prompt once
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(cands))
    attn = torch.cat([torch.ones(len(cands), pid.shape[1]), mask], 1)
    hidden = body(
        input_ids=cand, attention_mask=attn, cache=cache, use_cache=True
    ).last_hidden_state  # (C, W): each candidate's tokens after the shared prompt
    # the state that predicts candidate token k is the one after token k-1 (or after the prompt)
    last = out.last_hidden_state[:, -1:].expand(len(cands), -1, -1)  # (C, 1, D)
    hidden = torch.cat([last, hidden[:, :-1]], 1)  # (C, W, D)
    logits = model.get_output_embeddings()(hidden)  # only where candidates are read
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = logits.log_softmax(-1).gather(2, cand[..., None])[..., 0]
    return (logp * mask).sum(1) / mask.sum(1)


def main() -> None:
    """Score the chosen set of the bundled lexicon and print one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--set", default="control", choices=("control", "trained"))
    ap.add_argument("--limit", type=int, default=None, help="first N pairs only")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        lm = models.load_model(models.ModelConfig(name=args.model))
    except TLIError as err:
        raise SystemExit(f"lm_ceiling: error: {err}") from None
    lm.model.eval()
    pairs = [p for p in load_lexicon() if p.split == args.set][: args.limit]
    cands = [p.target for p in pairs]
    shots = "".join(f"Swahili: {s}\nEnglish: {t}\n\n" for s, t in SHOTS)
    t0 = time.time()
    with torch.no_grad():
        prior = candidate_scores(lm, shots + "Swahili: N/A\nEnglish:", cands)
        raw = torch.stack(
            [candidate_scores(lm, shots + f"Swahili: {p.source}\nEnglish:", cands) for p in pairs]
        )
    gold = gold_mask(pairs)
    result = {
        "model": args.model,
        "set": args.set,
        "n": len(pairs),
        "p_at_1_raw": retrieval(raw, gold)["p_at_1"].item(),
        "p_at_1_calibrated": retrieval(raw - prior, gold)["p_at_1"].item(),
        "chance": random_chance_p_at_1(gold),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
