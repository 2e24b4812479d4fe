import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.search.config import STUDIES_DIR, load_study_config, with_overrides


def test_default_and_thesis_study_files_load():
    default = load_study_config(None)
    assert default.budget_mb == 64 and default.sampler == "nsga2"
    assert [o.metric for o in default.objectives] == ["wikitext_word_ppl", "triviaqa_exact_match", "decode_latency_s"]
    thesis = load_study_config(STUDIES_DIR / "llama-3.2-1b-siracusa.yaml")
    assert thesis.model == "meta-llama/Llama-3.2-1B"
    assert (default.space.lora_heldout, thesis.space.lora_heldout) == (0, 8)


def test_the_space_passes_lora_heldout_to_the_lora_stage():
    from slmsearch.search.config import SpaceConfig
    from slmsearch.search.space import plan_from_params

    dims = {"hidden": 576, "attn_out": 576, "intermediate": 1536}
    params = {"drop_layers": 2, "wanda_pattern": "none", "lora_rank": 8, "lora_steps": 3, "embedding_bits": 16, "gptq_bits": 16}
    for heldout in (0, 8):
        plan = plan_from_params(params, SpaceConfig(lora_heldout=heldout), dims, 30).to_dict()
        lora = [stage for stage in plan["stages"] if stage["stage"] == "lora"]
        assert len(lora) == 1 and lora[0]["heldout"] == heldout and lora[0]["steps"] == 3


def _write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("budget_mb: 64\nbudgett: 3\n", "'budgett'"),
        ("space: {drop_layerz: [0, 2]}\n", "'drop_layerz'"),
        ("space: {drop_layers: [5, 2]}\n", "low <= high must hold, but got low=5, high=2"),
        ("space: {gptq_bits: [5]}\n", "unsupported value 5"),
        ("budget_mb: 0\n", "positive number of MB"),
        ("budget_mb: -3\n", "positive number of MB"),
        ("evaluation: {windowz: 3}\n", "'windowz'"),
        ("calibration: {samples: 3}\n", "'samples'"),
        ("objectives: [{metric: accuracy, direction: maximize}]\n", "'accuracy'"),
        ("sampler: cmaes\n", "'cmaes'"),
        ("space: {lora_heldout: -1}\n", "space.lora_heldout must be 0 (no report) to 4096 windows, got -1"),
    ],
)
def test_bad_study_files_name_the_value(tmp_path, text, needle):
    with pytest.raises(SlmsearchError) as err:
        load_study_config(_write(tmp_path, text))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_flags_override_the_file():
    config = with_overrides(load_study_config(None), budget_mb=32.0, trials=3, sampler="tpe", model=None)
    assert (config.budget_mb, config.trials, config.sampler) == (32.0, 3, "tpe")
    with pytest.raises(SlmsearchError, match="positive"):
        with_overrides(config, budget_mb=-1.0)
