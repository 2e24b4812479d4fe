import json

from click.testing import CliRunner

from slmsearch.hwmodel import load_platform
from slmsearch.hwmodel.estimate import estimate
from slmsearch.hwmodel.latency import integer_graph
from slmsearch.hwmodel.shape import microllama, smollm2_135m
from slmsearch.hwmodel.validate import (FITS, FIT_ROWS, ROWS, SCALAR, _get, fit, format_validation_table,
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
    assert set(fitted) == {k for g in FITS for k in g.keys} and SCALAR in fitted
    for k, v in fitted.items():
        assert abs(v / _get(base, k) - 1) < 0.05, k
    assert set(FIT_ROWS) < {r.name for r in ROWS}


def test_fit_groups_use_disjoint_rows_and_tiled_and_untiled_fixed_costs_differ():
    rows = [r for g in FITS for r in g.rows]
    assert len(rows) == len(set(rows))
    base = load_platform("siracusa")
    # the untiled flow's fixed cost per kernel is its own value: moving it leaves tiled rows alone
    tiled = next(r for r in ROWS if r.name == "decode64_npu")
    untiled = next(r for r in ROWS if r.name == "decode_8core")
    k = "cluster.untiled_kernel_overhead_cycles"
    bumped = {k: 2 * _get(base, k)}
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


def test_scalar_kernel_rows_and_the_integer_graph_share_one_cost_per_element():
    """The scalar LeakyReLU rows are priced at the platform's cost of Deeploy's scalar int8
    element-wise kernels, the same value that prices the integer graph's requant/transpose/concat."""
    scalar = next(r for r in ROWS if r.name == "leaky_tiled_scalar")
    model = next(r for r in ROWS if r.name == "decode64_cluster")
    base = load_platform("siracusa")
    bumped = {SCALAR: 2 * _get(base, SCALAR)}
    assert predict(scalar, bumped) > predict(scalar)
    assert predict(model, bumped) > predict(model)


def test_integer_graph_has_deeploys_kernels_per_layer():
    """Source B's microLlama graphs after Deeploy's passes: 26 kernels per layer in a prefill
    (no cache), 29 in a decode step (K and V concatenated onto the cache, the whole K transposed);
    the fp16 graph keeps the 16 operators of the mathematics."""
    p = load_platform("siracusa")
    e = estimate(microllama(), p, context_len=64, prefill_len=64)

    def per_layer(pas):
        return sum(1 for r in pas.ops if r.layer == 0)

    assert integer_graph(8) and not integer_graph(16)
    assert per_layer(e.prefill) == 26
    decode = estimate(microllama(), p, context_len=65).decode
    assert per_layer(decode) == 29
    names = {r.name for r in decode.ops if r.layer == 0}
    assert {"concat_k", "concat_v", "transpose_kt", "rope_q", "rope_k", "softmax_requant", "mul_requant"} <= names
    fp16 = estimate(smollm2_135m(), p, context_len=64).decode
    assert per_layer(fp16) == 16 and "concat_k" not in {r.name for r in fp16.ops}


def test_integer_graph_cache_copies_grow_with_the_kv_length():
    p = load_platform("siracusa")

    def cost(ctx):
        return next(r.cycles for r in estimate(microllama(), p, context_len=ctx).decode.ops
                    if r.layer == 0 and r.name == "concat_k")

    assert cost(512) > cost(64)
