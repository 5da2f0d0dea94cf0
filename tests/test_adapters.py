"""Adapters (``tli.adapters``): reading an adapter directory and checking it against the loaded
model; every failure is one ``tli: error:`` line (shown through ``tli evaluate``)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tli.adapters import read_adapter
from tli.errors import TLIError
from tli.models import ModelConfig, load_model
from tli.train import TrainConfig, train

from conftest import (
    EVAL_TRAINED,
    EVAL_TRAINING,
    assert_one_line_error,
    eval_set_args,
    tiny_model,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def gemma_adapter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma")
    tiny_model("gemma3_text", layers=4).save_pretrained(path / "model")
    tiny_tokenizer("left").save_pretrained(path / "model")
    loaded = load_model(ModelConfig(str(path / "model")), max_layer=1)
    cfg = TrainConfig(layer=1, **EVAL_TRAINING)
    train(loaded, EVAL_TRAINED[:4], cfg, path / "run", progress=False)
    return path / "run" / "final"


def _copy(adapter_dir, tmp_path, name="adapter"):
    path = tmp_path / name
    shutil.copytree(adapter_dir, path)
    return path


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_cli_missing_adapter(run_cli, tiny_model_dir, tmp_path):
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli(
        "evaluate", "--model", tiny_model_dir, "--adapter", tmp_path / "nope", *sets,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert_one_line_error(code, err, "nope", "no such directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_cli_adapter_without_its_files(run_cli, adapter_dir, tiny_model_dir, tmp_path, missing):
    path = _copy(adapter_dir, tmp_path)
    (path / missing).unlink()
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli(
        "evaluate", "--model", tiny_model_dir, "--adapter", path, *sets,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert_one_line_error(code, err, missing, "is missing")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_cli_corrupted_weights(run_cli, adapter_dir, tiny_model_dir, tmp_path, damage):
    path = _copy(adapter_dir, tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 9 if damage == "garbage" else data[: len(data) // 2])
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli(
        "evaluate", "--model", tiny_model_dir, "--adapter", path, *sets,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert_one_line_error(code, err, "adapter_model.safetensors is corrupted")


def test_cli_adapter_of_another_model(run_cli, gemma_adapter_dir, tiny_model_dir, tmp_path):
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli(
        "evaluate", "--model", tiny_model_dir, "--adapter", gemma_adapter_dir, *sets,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert_one_line_error(code, err, "was trained on model", str(tiny_model_dir), "tiny-gemma")


def test_cli_adapter_of_another_architecture(run_cli, gemma_adapter_dir, tiny_model_dir, tmp_path):
    # Names made to agree: the recorded architecture still tells them apart.
    path = _copy(gemma_adapter_dir, tmp_path)
    _edit_json(path / "adapter_config.json", base_model_name_or_path=str(tiny_model_dir))
    _edit_json(path / "tli_adapter.json", model=str(tiny_model_dir))
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli("evaluate", "--adapter", path, *sets, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "model_type 'gemma3_text'", "'llama'")


def test_cli_adapter_of_another_depth(run_cli, adapter_dir, tiny_model_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    _edit_json(path / "tli_adapter.json", num_layers=30)
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli("evaluate", "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "num_layers 30", "has num_layers 4")


def test_cli_adapter_with_wrong_shapes(run_cli, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    key = next(k for k in weights if "q_proj.lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0], 48)
    save_file(weights, path / "adapter_model.safetensors")
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli("evaluate", "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "q_proj.lora_A.weight has shape [16, 48]", "takes 32 inputs")


def test_cli_adapter_with_a_module_the_model_lacks(run_cli, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    weights = {k.replace("layers.1.", "layers.7."): v for k, v in weights.items()}
    save_file(weights, path / "adapter_model.safetensors")
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli("evaluate", "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "model.layers.7.self_attn", "does not have")


def test_cli_adapter_weights_its_config_does_not_use(run_cli, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    _edit_json(path / "adapter_config.json", target_modules=["q_proj"])
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli("evaluate", "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "v_proj", "evaluated only in part")


def test_cli_nan_weights(run_cli, adapter_dir, tmp_path):
    path = _copy(adapter_dir, tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    key = next(iter(weights))
    weights[key][0, 0] = math.nan
    save_file(weights, path / "adapter_model.safetensors")
    sets = eval_set_args(tmp_path)
    code, _, err = run_cli("evaluate", "--adapter", path, *sets, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "NaN or infinity")


def test_read_adapter_accepts_only_directories(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TLIError, match="is not a directory"):
        read_adapter(tmp_path / "file")


def test_evaluation_json_does_not_depend_on_hash_order(adapter):
    """peft writes target_modules (a set) in hash order, which changes from process to process."""
    from tli.adapters import read_adapter

    info = read_adapter(adapter)
    for order in (["q_proj", "v_proj"], ["v_proj", "q_proj"]):
        info.config["target_modules"] = order
        assert info.summary()["peft"]["target_modules"] == ["q_proj", "v_proj"]


# --- an adapter loads completely or not at all, wherever it is attached ----------------------


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_model(ModelConfig(str(tiny_model_dir)))


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("name", ["renamed", "no-lora-b", "one-layer-missing", "rank-mismatch"])
def test_an_incomplete_adapter_is_never_attached(base, damaged, name):
    """The paper's bug: peft only warns ("Found missing adapter keys") and the base model, or
    part of the adapter, is evaluated. Every place tli attaches an adapter (merged for the
    evaluation, attached for the probe and the sweep) refuses it, naming the first tensor,
    and leaves the base model as it was."""
    from tli.adapters import Merged, attached, read_adapter
    from tli.evaluate import evaluate

    from conftest import EVAL_CONTROL

    info = read_adapter(damaged / name)
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    needle = "has shape" if name == "rank-mismatch" else "is missing"
    with pytest.raises(TLIError, match=f"tensor base_model.*{needle}.*evaluated only in part"):
        Merged(base, info)
    with pytest.raises(TLIError, match=f"tensor base_model.*{needle}.*probed only in part"):
        with attached(base, info):
            pass
    with pytest.raises(TLIError, match=needle):
        evaluate(base, damaged / name, {"trained": EVAL_TRAINED, "control": EVAL_CONTROL})
    assert _lora_layers(base.model) == []
    after = base.model.state_dict()
    assert weights.keys() == after.keys()
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_an_incomplete_adapter_is_refused_before_the_model_is_loaded(
    run_cli, monkeypatch, damaged, inputs, tmp_path
):
    """The adapter's own files and the model's config (meta device) are enough to see it."""
    import tli.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr(tli.models, "load_model", never)
    for command in ("evaluate", "probe"):
        code, _, err = run_cli(command, "--adapter", damaged / "one-layer-missing", "--pairs",
                               inputs / "split.tsv", "--out", tmp_path / command)  # fmt: skip
        assert_one_line_error(code, err, "layers.1.self_attn.q_proj.lora_A.weight is missing")
    assert list(tmp_path.iterdir()) == []


def test_a_complete_adapter_checks_clean(adapter, tiny_model_dir):
    from tli.adapters import check_adapter, check_tensors
    from tli.models import meta_model

    info = read_adapter(adapter)
    check_adapter(info, meta_model(ModelConfig(str(tiny_model_dir))))
    check_tensors(info, meta_model(ModelConfig(str(tiny_model_dir))))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING' is not supported"),
        ({"peft_type": None}, "peft_type None is not supported"),
        ({"r": 0}, "r must be a positive integer (the LoRA rank), got 0"),
        ({"r": "16"}, "r must be a positive integer"),
        ({"lora_alpha": None}, "lora_alpha must be a number, got None"),
        ({"target_modules": []}, "target_modules must be a module name or a list of them"),
    ],
)
def test_adapter_config_fields_are_checked_with_a_clear_message(adapter, tmp_path, change,
                                                                 needle):  # fmt: skip
    path = _copy(adapter, tmp_path)
    _edit_json(path / "adapter_config.json", **change)
    with pytest.raises(TLIError) as err:
        read_adapter(path)
    assert needle in str(err.value) and "adapter_config.json" in str(err.value)


def test_save_adapter_writes_ordinary_file_modes(adapter_dir):
    from tli.io import current_umask

    mask = current_umask()
    for path in [adapter_dir, *adapter_dir.iterdir()]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == want, (path.name, oct(path.stat().st_mode))
