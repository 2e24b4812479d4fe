import json

from click.testing import CliRunner

from slmsearch.hwmodel import load_platform
from slmsearch.hwmodel.validate import (FITS, FIT_ROWS, LOCAL_KEYS, ROWS, _value, fit, format_validation_table,
                                        held_out_error_pct, leave_one_out, predict, validation_table)


def test_validation_table_has_every_row_with_its_role():
    table = validation_table(loo={"decode_1core": 16.0})
    assert [r["name"] for r in table] == [r.name for r in ROWS]
    assert {r["name"] for r in table if r["role"] == "fit"} == set(FIT_ROWS)
    assert sum(r["role"] == "held_out" for r in table) >= 6
    for r in table:
        assert r["model"] > 0 and abs(r["error"] - (r["model"] / r["measured"] - 1)) < 1e-12
        assert r["source"].startswith("B") and r["regime"] in ("tiled", "untiled")
        if r["roofline"] is not None:  # a bare roofline is off by far more than the model
            assert abs(r["roofline_error"]) > 0.9 > abs(r["error"]) - 0.5
    assert table[0]["loo_model"] == 16.0
    text = format_validation_table(table)
    assert "held-out rows" in text and f"{held_out_error_pct(table):.1f}%" in text


def test_fitted_values_in_the_platform_file_are_what_the_fit_finds():
    fitted = fit(iters=60)
    base = load_platform("siracusa")
    assert set(fitted) == {k for g in FITS for k in g.keys} and set(LOCAL_KEYS) <= set(fitted)
    for k, v in fitted.items():
        assert abs(v / _value(base, k) - 1) < 0.05, k
    assert set(FIT_ROWS) < {r.name for r in ROWS}


def test_fit_groups_use_disjoint_rows_and_tiled_and_untiled_fixed_costs_differ():
    rows = [r for g in FITS for r in g.rows]
    assert len(rows) == len(set(rows))
    base = load_platform("siracusa")
    # the untiled flow's fixed cost per kernel is its own value: moving it leaves tiled rows alone
    tiled = next(r for r in ROWS if r.name == "decode64_npu")
    untiled = next(r for r in ROWS if r.name == "decode_8core")
    k = "cluster.untiled_kernel_overhead_cycles"
    bumped = {k: 2 * _value(base, k)}
    assert predict(tiled, bumped) == predict(tiled)
    assert predict(untiled, bumped) > predict(untiled)


def test_kernel_rows_price_one_eltwise_operator():
    simd = next(r for r in ROWS if r.name == "leaky_tiled_simd")
    scalar = next(r for r in ROWS if r.name == "leaky_tiled_scalar")
    assert predict(scalar) > predict(simd) > 0


def test_leave_one_out_refits_only_groups_with_another_row():
    loo = leave_one_out(iters=5)
    assert set(loo) == set(FIT_ROWS)
    for g in FITS:
        for name in g.rows:
            assert (loo[name] is None) == (len(g.rows) == 1)


def test_hw_validate_json_lists_rows(monkeypatch):
    from slmsearch import cli
    from slmsearch.hwmodel import validate

    monkeypatch.setattr(validate, "leave_one_out", lambda *a, **k: {})
    out = CliRunner().invoke(cli.main, ["hw-validate", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert {"name", "role", "measured", "model", "error", "source"} <= set(rows[0])
    assert {r["role"] for r in rows} == {"fit", "held_out"}
