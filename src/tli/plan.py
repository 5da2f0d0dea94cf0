"""Plans: what each stage will build and the memory its weights need, before anything loads.

``tli run --plan`` (and ``--plan`` of ``scan``, ``train`` and ``evaluate``) reads the model's config
alone (:func:`tli.models.config_only`), builds each stage's load on the meta device
(:func:`tli.memory.footprint`) and prints, per stage, the parts it builds, their parameter counts
and the memory of their weights in the chosen dtype or 4-bit, compared with the memory free on
the device (:func:`tli.memory.render_plan`).
"""

from __future__ import annotations

from typing import Any

from tli import memory, surgery
from tli.models import ModelConfig, config_only

#: The layer the paper's scan chose (sec. 3.2), shown when a run's layer comes from its scan.
PAPER_LAYER = 2


def model_stage(
    label: str,
    mcfg: ModelConfig,
    config: Any,
    *,
    max_layer: int | None = None,
    lm_head: bool | None = None,
    note: str = "",
) -> memory.Stage:
    """The load a stage makes (as :func:`tli.models.load_model` with the same arguments)."""
    fp = memory.footprint(
        config, mcfg.dtype, load_in_4bit=mcfg.load_in_4bit, double_quant=mcfg.double_quant,
        max_layer=max_layer, lm_head=lm_head, name=mcfg.name,
    )  # fmt: skip
    return memory.Stage(label, fp, note)


def train_stage(mcfg: ModelConfig, config: Any, tcfg: Any, note: str = "") -> memory.Stage:
    """The training load of ``tcfg`` (depth from :func:`tli.train.plan`) with its LoRA size."""
    from tli.train import plan as train_plan

    n = surgery.num_layers(config)
    the_plan = train_plan(tcfg, n)
    stage = model_stage(f"train (layer {the_plan.deepest})", mcfg, config,
                        max_layer=the_plan.load_depth, lm_head=False, note=note)  # fmt: skip
    modules = tuple(tcfg.target_modules)
    if modules == ("q_proj", "v_proj"):
        modules = surgery.lora_target_modules(config)  # GPT-2 fuses them in c_attn
    lora = memory.lora_parameters(config, the_plan.adapt, tcfg.lora_r, modules)
    return memory.Stage(stage.label, stage.footprint, note, lora)


def run_stages(cfg: Any) -> list[memory.Stage]:
    """The stages of ``tli run`` for a run config: scan, train, evaluate and probe."""
    import dataclasses

    mcfg = cfg.model
    config = config_only(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
    n = surgery.num_layers(config)
    stages = [model_stage("scan", mcfg, config, note="evaluate and probe reuse this model")]
    train = cfg.train
    needs_target = train.loss_layers is None or "target" in train.loss_layers
    if train.layer is None and needs_target:
        for layer, why in ((min(PAPER_LAYER, n), "the paper's scan chose 2"), (n, "the deepest")):
            tcfg = dataclasses.replace(train, layer=layer)
            stages.append(train_stage(mcfg, config, tcfg, f"layer from the scan; {why}"))
    else:
        stages.append(train_stage(mcfg, config, train))
    stages.append(memory.Stage("evaluate, probe", None, "the scan's model (loaded once)"))
    return stages


def print_plan(stages: list[memory.Stage], device: str) -> int:
    """Print the plan; exit code 0, or a TLIError when a stage's weights cannot fit."""
    from tli.errors import TLIError

    text, problem = memory.render_plan(stages, device)
    print(text, flush=True)
    if problem:
        raise TLIError(problem)
    return 0
