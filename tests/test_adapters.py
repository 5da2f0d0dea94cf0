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
