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
        ("calibration: {n_samples: 0}\n", "calibration needs n_samples >= 1"),
        ("calibration: [16, 256]\n", "study section 'calibration' must be a mapping"),
        ("evaluation: {metrics: [bleu]}\n", "unknown metric 'bleu'"),
        ("evaluation: {metrics: [wikitext_token_ppl]}\n", "add wikitext_word_ppl, triviaqa_exact_match or leave metrics out"),
        ("objectives: [{metric: accuracy, direction: maximize}]\n", "'accuracy'"),
        ("sampler: cmaes\n", "'cmaes'"),
        ("space: {lora_heldout: -1}\n", "space.lora_heldout must be 0 (no report) to 4096 windows, got -1"),
        # types: one line naming the key, the value and what is allowed (no TypeError from a comparison)
        ("space: {lora_steps: ten}\n", "space.lora_steps must be an integer, got 'ten'"),
        ("space: {drop_layers: [0, x]}\n", "space.drop_layers must be a [low, high] pair of integers, got [0, 'x']"),
        ("space: {drop_layers: [0, 1, 2]}\n", "space.drop_layers must be a [low, high] pair of integers, got [0, 1, 2]"),
        ("space: {structured_fraction: [0, .nan]}\n", "space.structured_fraction must be a [low, high] pair of numbers"),
        ("space: {act_order: [0]}\n", "space.act_order must be a list of true/false values, got [0]"),
        ("calibration: {n_samples: x}\n", "calibration.n_samples must be an integer, got 'x'"),
        ("pruning: {first_windows: '2'}\n", "pruning.first_windows must be an integer, got '2' (text, not a number: drop the quotes)"),
        ("pruning: {max_ppl_ratio: .inf}\n", "pruning.max_ppl_ratio must be a finite number, got inf"),
        ("evaluation: {token_windows: four}\n", "evaluation.token_windows must be an integer or null, got 'four'"),
        ("evaluation: {word_pages: 0}\n", "word_pages must be >= 1, or null for all, got 0"),
        ("population_size: 0\n", "population_size must be an integer >= 2 (NSGA-II's generation size), got 0"),
        ("trials: eight\n", "trials must be an integer, got 'eight'"),
        ("trials: 2.5\n", "trials must be an integer, got 2.5"),
        ("trials: true\n", "trials must be an integer, got True"),
        ("budget_mb: .nan\n", "budget_mb must be a finite number, got nan"),
        ("budget_mb: 1e3\n", "budget_mb must be a finite number, got '1e3' (YAML reads 1e3 as text"),
        ("timeout_s: -1\n", "timeout_s (--timeout) must be a positive number of seconds, or null for none, got -1.0"),
        ("seed: -1\n", "seed (--seed) must be an integer in 0..4294967295, got -1"),
        ("platform_overrides: {memory.l3.size_bytes: big}\n", "platform_overrides.memory.l3.size_bytes must be a finite number, got 'big'"),
        ("objectives: [{metric: wikitext_word_ppl, direction: 1}]\n", "objectives.direction must be a string, got 1"),
        ("objectives: []\n", "objectives must be a non-empty list"),
        ("space: 3\n", "study section 'space' must be a mapping of keys, got 3"),
        ("model: 3\n", "model must be a string or null, got 3"),
        ("space: {kv_cache_key_group: 24}\n", "space.kv_cache_key_group: unsupported value 24; supported: 8, 16, 32, 64, 128 (or 0"),
        ("space: {kv_cache_rotate: 1}\n", "space.kv_cache_rotate must be true or false, got 1"),
        ("space: {embedding_gptq: yes please}\n", "space.embedding_gptq must be true or false, got 'yes please'"),
        ("screening: {neighbour_share: 2}\n", "screening.neighbour_share must be between 0 and 1, got 2.0; 0.5 proposes"),
        ("screening: {neighbour_share: x}\n", "screening.neighbour_share must be a finite number, got 'x'"),
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
    with pytest.raises(SlmsearchError, match="budget_mb must be a finite number, got nan"):
        with_overrides(config, budget_mb=float("nan"))
    with pytest.raises(SlmsearchError, match=r"timeout_s \(--timeout\) must be a positive number"):
        with_overrides(config, timeout_s=-1.0)


def test_a_loaded_config_has_the_declared_types():
    """Integers written where a float is declared become floats; lists become tuples."""
    config = load_study_config(None)
    assert isinstance(config.budget_mb, float) and isinstance(config.space.drop_layers, tuple)
    assert with_overrides(config, budget_mb=64).budget_mb == 64.0


def test_calibration_and_evaluation_are_typed_settings():
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.evals.settings import EvalSettings
    from slmsearch.search.config import StudyConfig

    default = load_study_config(None)
    assert default.calibration == CalibSettings(n_samples=16, seqlen=256, seed=0)
    assert isinstance(default.evaluation, EvalSettings) and default.evaluation.token_windows == 4
    # metrics: token ppl (it drives pruning), then the objectives' quality metrics, once each
    assert default.evaluation.metrics == ("wikitext_token_ppl", "wikitext_word_ppl", "triviaqa_exact_match")
    assert StudyConfig().calibration == default.calibration and StudyConfig().evaluation.metrics == default.evaluation.metrics
    assert with_overrides(default, trials=3).evaluation == default.evaluation
    assert with_overrides(default, trials=3).calibration == default.calibration


def test_a_settings_section_starts_from_the_settings_defaults(tmp_path):
    from slmsearch.compress.calib import CalibSettings

    metrics = "[wikitext_word_ppl, triviaqa_exact_match, triviaqa_answer_logprob]"
    config = load_study_config(_write(tmp_path, f"calibration: {{seqlen: 128}}\nevaluation: {{metrics: {metrics}}}\n"))
    assert config.calibration == CalibSettings(seqlen=128)
    assert config.evaluation.metrics == ("wikitext_word_ppl", "triviaqa_exact_match", "triviaqa_answer_logprob")  # as written
    assert config.evaluation.token_windows == 8  # EvalSettings' default


def test_sizes_are_decimal_gb_in_the_study_and_the_cache():
    from slmsearch.compress.cache import DEFAULT_MAX_BYTES
    from slmsearch.search.config import StudyConfig

    assert StudyConfig(cache_gb=1.5).cache_bytes == 1_500_000_000
    assert StudyConfig().cache_bytes == DEFAULT_MAX_BYTES == 20 * 10**9
