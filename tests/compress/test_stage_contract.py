"""The contract every stage type keeps, checked for each on the tiny random LLaMA.

(a) a setting that does nothing keeps the logits; (b) the hardware model reads from the compressed
checkpoint the shape ``Plan.shape`` predicted, and the plan survives the folder's ``plan.json``;
(c) settings survive ``to_dict``/``from_dict`` and JSON; (d) an unknown setting is rejected by
name. A new stage type fails ``test_every_stage_type_is_covered`` until it is added here.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import DATA_DIR, TINY_CALIB, finished_copy
from slmsearch import checkpoint
from slmsearch.compress.calib import CalibSettings
from slmsearch.compress.depth import DepthPrune
from slmsearch.compress.embedding import EmbeddingQuant
from slmsearch.compress.gptq import Eora, Gptq
from slmsearch.compress.kvcache import KvCacheQuant
from slmsearch.compress.lora import LoraRecovery
from slmsearch.compress.minmax import MinMaxQuant
from slmsearch.compress.pipeline import run
from slmsearch.compress.plan import STAGE_TYPES, Plan
from slmsearch.compress.stage import Stage
from slmsearch.compress.wanda import Wanda
from slmsearch.errors import SlmsearchError

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 7, 128, 64]])

# A setting of each stage type that does nothing. GPTQ and minmax have none: every setting quantizes.
NOOP: dict[str, Stage] = {
    "depth": DepthPrune(drop=0),
    "wanda": Wanda(pattern="structured"),
    "lora": LoraRecovery(rank=0),
    "embedding": EmbeddingQuant(bits=16),
    "eora": Eora(rank=0),
    "kv_cache": KvCacheQuant(bits=16),
}
WITHOUT_NOOP = {"gptq", "minmax"}

# Typical settings, each alone in a plan on the tiny model (EoRA after its GPTQ stage). The GPTQ
# plans come from the session's ``quantized`` fixture (tests/compress/conftest.py).
TYPICAL: dict[str, tuple[Stage, ...]] = {
    "depth": (DepthPrune(drop=1),),
    "wanda unstructured": (Wanda(sparsity=0.5),),
    "wanda 2:4": (Wanda(pattern="2:4"),),
    "wanda structured": (Wanda(pattern="structured", mlp_fraction=0.5, kv_groups=1, multiple=32),),
    "lora merged": (LoraRecovery(rank=4, steps=2, seqlen=32, heldout=0),),
    "lora kept": (LoraRecovery(rank=4, steps=2, seqlen=32, heldout=0, merge=False),),
    "embedding": (EmbeddingQuant(bits=4, group_size=32),),
    "embedding wide rows": (EmbeddingQuant(bits=4, group_size=32, grid="minmax", wide_rows=64),),
    "embedding scale codes": (EmbeddingQuant(bits=4, group_size=32, wide_rows=64, scale_bits=8),),
    "gptq": (Gptq(bits=4, group_size=32),),
    "scales8": (Gptq(bits=3, group_size=32, scale_bits=8),),
    "minmax": (MinMaxQuant(bits=4, group_size=32),),
    "eora": (Gptq(bits=4, group_size=32), Eora(rank=16)),
    "kv_cache": (KvCacheQuant(bits=4, group_size=16),),
}


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


def test_every_stage_type_is_covered():
    assert set(NOOP) | WITHOUT_NOOP == set(STAGE_TYPES)
    assert {plan[-1].kind for plan in TYPICAL.values()} == set(STAGE_TYPES)
    assert all(not STAGE_TYPES[kind]().is_noop() for kind in WITHOUT_NOOP)


# (a) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(NOOP))
def test_a_noop_setting_keeps_the_logits(kind, model, calib, tiny_base, tmp_path):
    stage = NOOP[kind]
    assert stage.is_noop()
    if stage.works_on_dirs:
        stage.apply_dir(tiny_base, tmp_path / "out", calib, tiny_base)
        before, after = checkpoint.load(tiny_base)[0], checkpoint.load(tmp_path / "out")[0]
        assert torch.equal(logits(after), logits(before))
    else:
        before = logits(model)
        stage.apply(model, calib)
        assert torch.equal(logits(model), before)


# (b) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_checkpoint_shape_equals_plan_shape(name, tiny_base, tmp_path, request):
    from slmsearch.hwmodel import ModelShape

    plan = Plan(TYPICAL[name])
    if name in ("gptq", "eora", "scales8"):
        result = request.getfixturevalue("quantized")[name]
        assert result.plan == plan
        # gptqmodel loads the (fp32) tiny base in bf16 and stores what it does not quantize so:
        # its input is the base as deployed, every weight 16-bit (how the search prices a plan)
        base = ModelShape.from_hf_config(json.loads((tiny_base / checkpoint.CONFIG_FILE).read_text()))
    else:
        result = run(plan, str(tiny_base), DATA_DIR, CalibSettings(**TINY_CALIB), out=tmp_path / "out")
        base = ModelShape.from_checkpoint(tiny_base)  # in-memory stages keep the stored dtype
    folder = result.checkpoint_dir
    if name in ("gptq", "eora", "scales8"):  # a cache entry: the deployment stores the finished folder
        folder = finished_copy(folder, tmp_path / "finished")
    measured = ModelShape.from_checkpoint(folder)
    predicted = plan.shape(base)
    assert dataclasses.replace(measured, name="") == dataclasses.replace(predicted, name="")
    assert predicted != base or name == "lora merged"  # the stage changed something the shape shows
    assert Plan.from_json((folder / checkpoint.PLAN_FILE).read_text()) == plan


# (c) and (d) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_settings_survive_dict_and_json(name):
    stage = TYPICAL[name][-1]
    data = stage.to_dict()
    assert data["stage"] == stage.kind
    assert type(stage).from_dict(data) == stage
    assert type(stage).from_dict(json.loads(json.dumps(data))) == stage
    assert Plan.from_json(Plan(TYPICAL[name]).to_json()) == Plan(TYPICAL[name])


@pytest.mark.parametrize("kind", sorted(STAGE_TYPES))
def test_an_unknown_setting_is_rejected_by_name(kind):
    with pytest.raises(SlmsearchError, match=f"stage '{kind}' has no setting.*'sparsty_typo'"):
        STAGE_TYPES[kind].from_dict({"stage": kind, "sparsty_typo": 1})
    with pytest.raises(SlmsearchError, match="'sparsty_typo'"):
        Plan.from_dict([{"stage": kind, "sparsty_typo": 1}])


# what a stage tells the rest of slmsearch ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_label_and_columns(name):
    stage = TYPICAL[name][-1]
    assert stage.label() and " " not in stage.label()
    assert set(stage.columns()) == set(type(stage).column_defaults)
    plan = Plan(TYPICAL[name])
    assert plan.label() == " ".join(s.label() for s in plan.stages)
    assert set(plan.columns()) == {k for cls in STAGE_TYPES.values() for k in cls.column_defaults}
