"""The integer geometry rules (torch-free), against hand-counted values and brute force."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slmsearch.compress.geometry import allowed_kv_group_removals, mlp_channels_to_remove, undivided_inputs
from slmsearch.errors import SlmsearchError


def test_allowed_kv_group_removals():
    assert allowed_kv_group_removals(576, 9, 3, 64, 64) == (0, 1, 2)  # SmolLM2-135M
    assert allowed_kv_group_removals(2048, 32, 8, 64, 64) == (0, 4, 6, 7)  # Llama-3.2-1B
    assert allowed_kv_group_removals(64, 4, 2, 16, 64) == (0,)  # 2 heads x 16 = 32: not a multiple of 64


@pytest.mark.parametrize("hidden,n_heads,n_kv,head_dim,multiple", [(576, 9, 3, 64, 64), (2048, 32, 8, 64, 128), (64, 4, 2, 16, 16)])
def test_allowed_kv_group_removals_keep_both_divisibilities(hidden, n_heads, n_kv, head_dim, multiple):
    rep = n_heads // n_kv
    for removed in range(n_kv):
        heads = (n_kv - removed) * rep
        ok = hidden % heads == 0 and heads * head_dim % multiple == 0
        assert (removed in allowed_kv_group_removals(hidden, n_heads, n_kv, head_dim, multiple)) == ok


def test_mlp_channels_to_remove_rounds_to_the_multiple_and_keeps_one():
    assert mlp_channels_to_remove(1536, 0.25, 64) == 384
    assert mlp_channels_to_remove(1536, 0.26, 64) == 384  # 399.4 -> 6 x 64
    assert mlp_channels_to_remove(1536, 0.0, 64) == 0
    assert mlp_channels_to_remove(128, 0.95, 32) == 96  # at least one multiple stays
    with pytest.raises(SlmsearchError, match="wanda.multiple=96 must divide the intermediate size 128"):
        mlp_channels_to_remove(128, 0.5, 96)


def test_undivided_inputs_names_the_sizes_a_group_does_not_divide():
    sizes = {"hidden": 576, "attn_out": 576, "intermediate": 1536}
    assert undivided_inputs(64, sizes) == {}
    assert undivided_inputs(128, sizes) == {"hidden": 576, "attn_out": 576}
    assert undivided_inputs(-1, {"hidden": 7}) == {}


def test_the_module_does_not_import_torch():
    code = "import sys, slmsearch.compress.geometry; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
