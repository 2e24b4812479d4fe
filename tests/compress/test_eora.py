"""EoRA's float32 fit: the kernel against brute force and gptqmodel's solver, the stage against
gptqmodel's ``adapter.generate`` on the same GPTQ folder."""

from __future__ import annotations

import pytest
import torch

from conftest import DATA_DIR, TINY_CALIB
from slmsearch import checkpoint
from slmsearch.compress import kernels
from slmsearch.errors import SlmsearchError


def anisotropic_inputs(n: int = 512, d: int = 24, used: int = 24, seed: int = 0) -> torch.Tensor:
    """``n`` inputs of ``d`` features spanning ``used`` directions, with very unequal scales."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0][:, :used]
    scales = torch.logspace(1, -1, used, dtype=torch.float64)  # variances 1e4 apart: above float32 noise
    return ((torch.randn(n, used, generator=g, dtype=torch.float64) * scales) @ basis.T).double()


def fit(delta: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.eigenspace_low_rank(delta, kernels.input_eigenspace(x.T @ x), rank)


def out_error(delta: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() @ (delta.double() - approx.double()).T))


def test_the_fit_is_the_best_rank_r_approximation_on_the_inputs():
    x = anisotropic_inputs()
    delta = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    # the optimum: the tail singular values of the outputs' error map (delta @ X.T)
    tail = torch.linalg.svdvals((x.double() @ delta.double().T).T)
    for rank in (1, 4, 8):
        a, b = fit(delta, x, rank)
        assert a.shape == (rank, 24) and b.shape == (16, rank) and a.dtype == torch.float32
        best = float(tail[rank:].square().sum().sqrt())
        assert out_error(delta, b @ a, x) == pytest.approx(best, rel=1e-4)
        # and it beats the plain SVD of delta (what a fit blind to the inputs does)
        u, s, vh = torch.linalg.svd(delta.double())
        plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert out_error(delta, b @ a, x) < out_error(delta, plain, x)
    a, b = fit(delta, x, 16)
    assert out_error(delta, b @ a, x) < 1e-4 * out_error(delta, torch.zeros_like(delta), x)


def test_directions_the_inputs_never_use_get_no_correction():
    x = anisotropic_inputs(used=10)  # 14 of 24 directions carry nothing
    delta = torch.randn(16, 24, generator=torch.Generator().manual_seed(2))
    a, b = fit(delta, x, 24)
    null = torch.linalg.svd(x.double(), full_matrices=True)[2][10:]  # [14, 24], orthogonal to every input
    assert float((a.double() @ null.T).abs().max()) < 1e-6 * float(a.abs().max())
    assert out_error(delta, b @ a, x) < 1e-4 * out_error(delta, torch.zeros_like(delta), x)


def test_a_rank_above_the_matrix_is_padded_and_bad_shapes_are_refused():
    x = anisotropic_inputs(d=8, used=8)
    delta = torch.randn(4, 8)
    a, b = fit(delta, x, 32)
    assert a.shape == (32, 8) and b.shape == (4, 32) and not a[4:].any() and not b[:, 4:].any()
    with pytest.raises(SlmsearchError, match="does not fit a delta"):
        kernels.eigenspace_low_rank(torch.randn(4, 9), kernels.input_eigenspace(x.T @ x), 2)
    with pytest.raises(SlmsearchError, match="must be square"):
        kernels.input_eigenspace(torch.randn(3, 4))
    with pytest.raises(SlmsearchError, match="rank must be >= 1"):
        kernels.eigenspace_low_rank(delta, kernels.input_eigenspace(x.T @ x), 0)


def test_the_kernel_agrees_with_gptqmodels_eora_solver():
    """The same factors' product as gptqmodel's ``eora_compute_lora`` (the solver its
    ``adapter.generate`` calls) on the same weight error and covariance."""
    from slmsearch.compress.gptqmodel_runtime import gptqmodel_env

    gptqmodel_env()
    from gptqmodel.eora.eora import eora_compute_lora

    x = anisotropic_inputs(n=2048, d=48, used=48)
    delta = torch.randn(32, 48, generator=torch.Generator().manual_seed(3)) * 0.01
    cov = (x.T @ x) / x.shape[0]
    a_ref, b_ref = eora_compute_lora(delta.float(), "m", cov.float(), 8, torch.float32, torch.device("cpu"))
    a, b = kernels.eigenspace_low_rank(delta, kernels.input_eigenspace(cov), 8)
    assert torch.allclose(b @ a, b_ref @ a_ref, rtol=1e-3, atol=1e-3 * float((b_ref @ a_ref).abs().max()))


def logits_of(folder, ids):
    model, _ = checkpoint.load(folder, dense=True)
    with torch.no_grad():
        return model(ids).logits.double()


def test_the_stage_recovers_what_gptqmodels_generate_recovers(quantized, tiny_base, tmp_path):
    """On the same GPTQ folder, calibration and rank, the float32 fit's model is at least as close
    to the dense model (KL of next-token distributions on held-out text) as the one gptqmodel's
    ``adapter.generate`` makes, and clearly closer than GPTQ alone."""
    from transformers import AutoModelForCausalLM

    from conftest import byte_tokenizer
    from slmsearch.checkpoint import ADAPTER_DIR, copy_folder
    from slmsearch.compress import gptqmodel_runtime as runtime
    from slmsearch.compress.calib import Calibration, CalibSettings
    from slmsearch.compress.gptq import calibration_rows

    gptq_dir = quantized["gptq"].checkpoint_dir
    calib = Calibration.from_data(byte_tokenizer(), DATA_DIR, CalibSettings(**TINY_CALIB))
    reference = tmp_path / "gptqmodel"
    copy_folder(gptq_dir, reference)
    runtime.gptqmodel_env()
    from gptqmodel import GPTQModel
    from gptqmodel.adapter.adapter import Lora

    with runtime.module_logs_out_of_the_working_directory():
        GPTQModel.adapter.generate(adapter=Lora(path=str(reference / ADAPTER_DIR), rank=16), model_id_or_path=str(tiny_base),
                                   quantized_model_id_or_path=str(gptq_dir), calibration_dataset=calibration_rows(calib),
                                   batch_size=4, tokenizer=calib.tokenizer, dtype=torch.bfloat16, device="cpu")
    ids = calib.samples(4, part="heldout", seqlen=64)  # the last 10% of wiki.valid: calibration never reads it
    dense = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        target = torch.log_softmax(dense(ids).logits.double(), -1)

    def kl(folder) -> float:
        log_q = torch.log_softmax(logits_of(folder, ids), -1)
        return float((target.exp() * (target - log_q)).sum(-1).mean())

    ours, theirs, plain = kl(quantized["eora"].checkpoint_dir), kl(reference), kl(gptq_dir)
    assert ours < 0.8 * plain
    assert ours <= 1.05 * theirs, (ours, theirs, plain)
