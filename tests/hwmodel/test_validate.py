import json

from click.testing import CliRunner

from slmsearch.hwmodel import load_platform
from slmsearch.hwmodel.validate import FIT_ROWS, ROWS, _get, fit, format_validation_table, held_out_error_pct, validation_table


def test_validation_table_has_every_row_with_its_role():
    table = validation_table(loo={"decode_1core": 16.0})
    assert [r["name"] for r in table] == [r.name for r in ROWS]
    assert {r["name"] for r in table if r["role"] == "fit"} == set(FIT_ROWS)
    assert sum(r["role"] == "held_out" for r in table) >= 6
    for r in table:
        assert r["model"] > 0 and abs(r["error"] - (r["model"] / r["measured"] - 1)) < 1e-12
        assert r["source"].startswith("B")
        if r["roofline"] is not None:  # a bare roofline is off by far more than the model
            assert abs(r["roofline_error"]) > 0.9 > abs(r["error"]) - 0.5
    assert table[0]["loo_model"] == 16.0
    text = format_validation_table(table)
    assert "held-out rows" in text and f"{held_out_error_pct(table):.1f}%" in text


def test_fitted_values_in_the_platform_file_are_what_the_fit_finds():
    fitted = fit(iters=60)
    base = load_platform("siracusa")
    for k, v in fitted.items():
        assert abs(v / _get(base, k) - 1) < 0.05, k
    assert set(FIT_ROWS) < {r.name for r in ROWS}


def test_hw_validate_json_lists_rows(monkeypatch):
    from slmsearch import cli
    from slmsearch.hwmodel import validate

    monkeypatch.setattr(validate, "leave_one_out", lambda *a, **k: {})
    out = CliRunner().invoke(cli.main, ["hw-validate", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert {"name", "role", "measured", "model", "error", "source"} <= set(rows[0])
    assert {r["role"] for r in rows} == {"fit", "held_out"}
