from slmsearch.hwmodel import load_platform
from slmsearch.hwmodel.validate import (FIT_ROWS, ROWS, _get, fit, format_validation_table, held_out_error_pct,
                                        validation_table)


def test_validation_table_has_every_row_and_reports_held_out_error():
    table = validation_table()
    assert [r["row"] for r in table] == [r.name for r in ROWS]
    assert any(r["used_for_fit"] for r in table) and any(not r["used_for_fit"] for r in table)
    for r in table:
        assert r["predicted"] > 0
    # a bare roofline is off by far more than the model on every cycle row
    for r in table:
        if r["roofline"] is not None:
            assert abs(r["roofline_error_pct"]) > 90
            assert abs(r["error_pct"]) < 50
    text = format_validation_table(table)
    assert "held-out" in text and f"{held_out_error_pct(table):.1f}%" in text


def test_fitted_values_in_the_platform_file_are_what_the_fit_finds():
    fitted = fit(iters=60)
    base = load_platform("siracusa")
    for k, v in fitted.items():
        assert abs(v / _get(base, k) - 1) < 0.05, k
    assert set(FIT_ROWS) < {r.name for r in ROWS}

