"""Adapters (``tli.adapters``): reading an adapter directory and checking it against the loaded
model."""


def test_evaluation_json_does_not_depend_on_hash_order(adapter):
    """peft writes target_modules (a set) in hash order, which changes from process to process."""
    from tli.adapters import read_adapter

    info = read_adapter(adapter)
    for order in (["q_proj", "v_proj"], ["v_proj", "q_proj"]):
        info.config["target_modules"] = order
        assert info.summary()["peft"]["target_modules"] == ["q_proj", "v_proj"]
