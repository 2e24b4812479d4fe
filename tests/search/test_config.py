import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.search.config import STUDIES_DIR, load_study_config, with_overrides


def test_default_and_thesis_study_files_load():
    default = load_study_config(None)
    assert default.budget_mb == 64 and default.sampler == "nsga2"
    assert [o.metric for o in default.objectives] == ["wikitext_word_ppl", "triviaqa_exact_match", "decode_latency_s"]
    thesis = load_study_config(STUDIES_DIR / "llama-3.2-1b-siracusa.yaml")
    assert thesis.model == "meta-llama/Llama-3.2-1B"


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
