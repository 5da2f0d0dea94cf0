"""Shared test helpers: tiny random models and tokenizers built in memory (no network, no GPU),
the shared input files, pairs and adapters, and the helpers that run ``tli`` and check its errors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tli.pairs import Pair

#: The repository and its sources (subprocesses import tli from SRC: see `python_env`).
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

#: The first bytes of every PNG file.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

#: Swahili-English pairs for tiny training runs (tests of train, sweep, evaluate and probe).
WORDS = [
    ("mtoto", "child"),
    ("kitabu", "book"),
    ("maji", "water"),
    ("nyumba", "house"),
    ("mbwa", "dog"),
    ("paka", "cat"),
    ("chakula", "food"),
    ("mti", "tree"),
    ("jua", "sun"),
    ("mwezi", "moon"),
    ("bahari", "sea"),
    ("mkate", "bread"),
]

#: The trained and control sets of the evaluation and adapter tests: 8 of WORDS and "bahari"
#: with an alternative gloss; 4 control pairs.
EVAL_TRAINED = [Pair(s, t) for s, t in WORDS[:7] + WORDS[-1:]] + [
    Pair("bahari", "sea", alternatives=("ocean",))
]
EVAL_CONTROL = [
    Pair("jua", "sun"),
    Pair("mwezi", "moon"),
    Pair("mti", "tree"),
    Pair("moto", "fire"),
]
#: One quick epoch of training: the adapters of the evaluation and adapter tests.
EVAL_TRAINING = dict(epochs=1, batch_size=4, warmup_steps=1, lr=5e-3, save_every=0)

#: The sets of the probe and generation tests: 10 trained pairs (one with an alternative gloss)
#: and 2 control pairs.
PROBE_SETS = {
    "trained": [Pair(s, t) for s, t in WORDS[:8]]
    + [Pair("bahari", "sea", alternatives=("ocean",)), Pair("mkate", "bread")],
    "control": [Pair(s, t, split="control") for s, t in WORDS[8:10]],
}

#: Examples per fuzz test; raise it to search longer: TLI_FUZZ_EXAMPLES=5000 pytest -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("TLI_FUZZ_EXAMPLES", "200"))

#: model_type -> config kwargs for a tiny random model of that architecture.
TINY = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": None},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16},
    "gpt2": {},
}


def tiny_tokenizer(padding_side: str = "left", add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (any text encodes) with pad/bos/eos and optional BOS."""
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_map):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    fast.padding_side = padding_side
    return fast


def tiny_config(model_type: str = "llama", layers: int = 4, **overrides):
    kwargs = dict(TINY[model_type])
    if model_type == "gpt2":
        kwargs.update(n_embd=32, n_layer=layers, n_head=4, n_positions=64, vocab_size=300)
    else:
        kwargs.update(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", layers: int = 4, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers, **overrides))
    return model.eval()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's cache, except the embedded-model tests (own fixture)."""
    monkeypatch.setenv("TLI_CACHE", str(tmp_path_factory.getbasetemp() / "tli-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


#: The "tli" logger as the session found it: handlers, level, propagation.
_TLI_LOGGER = logging.getLogger("tli")
_TLI_LOGGER_STATE = (tuple(_TLI_LOGGER.handlers), _TLI_LOGGER.level, _TLI_LOGGER.propagate)


@pytest.fixture(autouse=True)
def _restore_tli_logger():
    """cli.main() points the "tli" logger at the current stderr; undo that after each test.

    The saved state is the session's first: a module- or session-scoped fixture may call
    cli.main() before a test starts, and its handler must not outlive that test.
    """
    yield
    handlers, level, propagate = _TLI_LOGGER_STATE
    _TLI_LOGGER.handlers[:], _TLI_LOGGER.level, _TLI_LOGGER.propagate = (
        list(handlers),
        level,
        propagate,
    )


# --- running tli and checking its errors ----------------------------------------------------


def python_env() -> dict[str, str]:
    """The environment of a ``tli`` subprocess: this checkout's sources first."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.fixture
def run_cli(capsys):
    """``run(*argv)`` runs ``tli ARGV`` in-process and returns (exit code, stdout, stderr).

    Arguments may be paths or numbers; argparse's own errors (SystemExit) become the code.
    """
    from tli.cli import main

    def run(*argv) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse-level errors exit from the parser
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_one_line_error(code, err, *needles):
    """Exit 2; stderr is exactly one ``tli: error:`` line naming every needle; no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.startswith("tli: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def assert_user_error(code, err, *needles):
    """Exit 2; stderr holds exactly one ``tli: error:`` line, last, naming ``needles``.

    Other stderr lines may only be tli's own log lines (``tli: info:``/``tli: warning:``):
    no traceback, no progress bar, no stray warning.
    """
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("tli: error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    assert all(line.startswith("tli: ") for line in lines), err
    for needle in needles:
        assert needle in errors[0], errors[0]


def gold_of(b, alternatives=()):
    """A b x b gold mask: the diagonal and each (i, j) of ``alternatives``."""
    gold = torch.eye(b, dtype=torch.bool)
    for i, j in alternatives:
        gold[i, j] = True
    return gold


def eval_pair_files(tmp_path: Path) -> tuple[Path, Path]:
    """EVAL_TRAINED and EVAL_CONTROL written to trained.tsv and control.tsv in ``tmp_path``."""
    from tli.pairs import write_pairs

    write_pairs(EVAL_TRAINED, tmp_path / "trained.tsv")
    write_pairs(EVAL_CONTROL, tmp_path / "control.tsv")
    return tmp_path / "trained.tsv", tmp_path / "control.tsv"


def eval_set_args(tmp_path: Path) -> list:
    """``--pairs`` and ``--control`` options for the files of `eval_pair_files`."""
    trained, control = eval_pair_files(tmp_path)
    return ["--pairs", trained, "--control", control]


# --- shared inputs, models and adapters (built once per session) --------------------------------

BAD_TOML = "[train\nepochs = 3\n"
UNKNOWN_KEY_TOML = "[train]\nnope = 1\n"
UNKNOWN_SECTION_TOML = "[extra]\nx = 1\n"
WRONG_TYPE_TOML = '[train]\nepochs = "three"\n'


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """One folder of good and bad input files, shared by the error tests."""
    from tli.pairs import load_lexicon, split_pairs, write_pairs

    d = tmp_path_factory.mktemp("inputs")
    lexicon = [dataclasses.replace(p, split=None) for p in load_lexicon()[:60]]
    write_pairs(lexicon, d / "pairs.tsv")
    write_pairs(split_pairs(lexicon, control_fraction=0.2, seed=0), d / "split.tsv")
    write_pairs(lexicon[:1], d / "one.tsv")
    files = {
        "empty.json": "[]",
        "bad.json": '[{"swahili": "maji", "english": "water"},\n',
        "bad.csv": 'swahili,english\n"maji,water\n',
        "nofield.json": '[{"swahili": "maji"}]',
        "nocolumn.tsv": "swahili\tpos\nmaji\tnoun\n",
        "afile": "x\n",
        "words.txt": "maji\nmoto\n",
        "de-en.txt": "Hund dog\nbei gani how much\nKatze cat\n",
        "blank_line.txt": "maji\n\nmoto\n",
        "empty.txt": "",
        "bad.toml": BAD_TOML,
        "unknown_key.toml": UNKNOWN_KEY_TOML,
        "unknown_section.toml": UNKNOWN_SECTION_TOML,
        "wrong_type.toml": WRONG_TYPE_TOML,
        "unknown_preset.toml": 'preset = "nope"\n',
        "bad_pooling.toml": 'pooling = "max"\n',
        "ok.toml": "[train]\nepochs = 1\n",
        "obj.json": '{"swahili": "maji", "english": "water"}',
        "dup.json": '[{"swahili": "maji", "english": "water", "english": "wet"}]',
        "dup.jsonl": '{"swahili": "maji", "english": "water"}\n'
        '{"swahili": "moto", "english": "fire", "swahili": "joto"}\n',
        # every trained target the same: training has no negatives
        "same.tsv": "swahili\tenglish\tsplit\n"
        + "".join(f"neno{i}\tword\ttrained\n" for i in range(6))
        + "".join(f"kitu{i}\tthing{i}\tcontrol\n" for i in range(3)),
        # control pairs that share an English gloss with trained ones
        "leaky.tsv": "swahili\tenglish\tsplit\nmaji\twater\ttrained\nmoto\tfire\ttrained\n"
        "jua\tsun\ttrained\nmvua\train\ttrained\nmaji-maji\twater\tcontrol\n"
        "ndimu\tlemon\tcontrol\nchai\ttea\tcontrol\n",
    }
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "latin1.tsv").write_bytes("swahili\tenglish\nmaji\tw\xe4ter\n".encode("latin-1"))
    (d / "latin1.toml").write_bytes("[train]\n# \xe4\n".encode("latin-1"))
    (d / "dir.tsv").mkdir()  # a directory where a file is expected: unreadable
    (d / "dir.toml").mkdir()
    (d / "adir").mkdir()
    (d / "notrun").mkdir()
    (d / "notrun" / "notes.txt").write_text("someone's files\n")
    (d / "notrun.tsv").write_text("x")
    return d


@pytest.fixture(scope="session")
def special(tmp_path_factory):
    """Files that are not regular files, or too large to read: a FIFO, /dev/zero, a 65 MiB file."""
    d = tmp_path_factory.mktemp("special")
    os.mkfifo(d / "fifo.tsv")
    os.symlink("/dev/zero", d / "zero.tsv")
    with open(d / "huge.tsv", "wb") as handle:  # sparse: no disk used
        handle.truncate(65 * 2**20)
    os.mkfifo(d / "fifo.toml")
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=4).save_pretrained(path)
    tiny_tokenizer("left").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """A different tiny Llama (2 blocks, other seed): not the base of `adapter`."""
    path = tmp_path_factory.mktemp("other-llama")
    tiny_model("llama", layers=2, seed=1).save_pretrained(path)
    tiny_tokenizer("left").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama whose positions reach far enough for few-shot prompts of bytes."""
    path = tmp_path_factory.mktemp("probe-llama")
    tiny_model("llama", layers=4, max_position_embeddings=512).save_pretrained(path)
    tiny_tokenizer("left").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapter(tiny_model_dir, inputs, tmp_path_factory):
    """A real adapter of the tiny model, from `tli train` (one epoch, a few steps)."""
    from tli.cli import main

    out = tmp_path_factory.mktemp("train") / "t"
    argv = ["train", "--model", tiny_model_dir, "--pairs", inputs / "pairs.tsv", "--layer", "2",
            "--epochs", "1", "--batch-size", "8", "--warmup-steps", "0", "--out", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return out / "final"


@pytest.fixture(scope="session")
def corrupt_adapter(adapter, tmp_path_factory):
    """The adapter with its weights file cut short."""
    path = tmp_path_factory.mktemp("corrupt") / "final"
    shutil.copytree(adapter, path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return path


def damage_adapter(source: Path, target: Path, *, weights=None, config=None) -> Path:
    """A copy of the adapter ``source`` at ``target``, its tensors or config edited.

    ``weights`` maps the tensors (name -> tensor) to the ones to save; ``config`` updates
    ``adapter_config.json``.
    """
    import json

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if weights is not None:
        path = target / "adapter_model.safetensors"
        save_file(weights(load_file(path)), path)
    if config is not None:
        path = target / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return target


#: Damaged adapters: name -> what is wrong (see `damaged`).
DAMAGE = {
    "renamed": dict(weights=lambda w: {k.replace("lora_", "lorax_"): v for k, v in w.items()}),
    "no-lora-b": dict(weights=lambda w: {k: v for k, v in w.items() if "lora_B" not in k}),
    "one-layer-missing": dict(weights=lambda w: {k: v for k, v in w.items()
                                                 if ".layers.1." not in k}),  # fmt: skip
    "rank-mismatch": dict(config={"r": 8}),
    "bad-peft-type": dict(config={"peft_type": "NOPE"}),
    "integer-weights": dict(weights=lambda w: {k: v.to(torch.int64) for k, v in w.items()}),
}


@pytest.fixture(scope="session")
def damaged(adapter, tmp_path_factory):
    """The `adapter` fixture damaged in each way of DAMAGE, one folder per name."""
    root = tmp_path_factory.mktemp("damaged")
    for name, how in DAMAGE.items():
        damage_adapter(adapter, root / name, **how)
    return root


@pytest.fixture(scope="session")
def results(tiny_model_dir, inputs, adapter, tmp_path_factory):
    """A run-like results folder (config.toml, scan/, eval/) for `tli plot`, without figures."""
    from tli.cli import main
    from tli.pipeline.config import resolve_config, to_toml

    root = tmp_path_factory.mktemp("results") / "run"
    root.mkdir()
    (root / "config.toml").write_text(to_toml(resolve_config({"figures": {"tsne_pairs": 4}})))
    split = inputs / "split.tsv"
    common = ["--model", tiny_model_dir, "--pairs", split, "--n-boot", "20"]
    assert main([str(a) for a in ["scan", *common, "--out", root / "scan"]]) == 0
    argv = ["evaluate", "--adapter", adapter, *common, "--out", root / "eval"]
    assert main([str(a) for a in argv]) == 0
    return root


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter of the tiny Llama at layer 2, trained one epoch on EVAL_TRAINED."""
    from tli.models import ModelConfig, load_model
    from tli.train import TrainConfig, train

    loaded = load_model(ModelConfig(str(tiny_model_dir)), max_layer=2)
    out = tmp_path_factory.mktemp("train")
    train(loaded, EVAL_TRAINED, TrainConfig(layer=2, **EVAL_TRAINING), out / "run", progress=False)
    return out / "run" / "final"
