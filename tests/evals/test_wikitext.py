import json
import math

import pytest


def test_rolling_loglikelihood_matches_direct_logits(default_model, data_dir):
    """lm-eval's rolling log-likelihood of one short page equals the sum computed from the logits."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    model, tok = default_model
    pages = [json.loads(line) for line in (data_dir / "wikitext-2/wiki.test.pages.jsonl").open()]
    page = min(pages, key=lambda p: len(p["page"]))
    text = wikitext_detokenizer(page)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=2048, device="cpu")
    req = Instance(request_type="loglikelihood_rolling", doc=page, arguments=(text,), idx=0)
    (rolling,) = lm.loglikelihood_rolling([req], disable_tqdm=True)

    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) < 2048, "the shortest page must fit one window for this check"
    inputs = torch.tensor([[lm.prefix_token_id] + ids[:-1]])
    with torch.inference_mode():
        logp = torch.log_softmax(model(inputs).logits.double(), -1)[0]
    direct = float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
    assert math.isclose(rolling, direct, rel_tol=1e-4)


def test_word_perplexity_through_local_task(default_model, data_dir):
    from slmsearch.evals.wikitext import word_perplexity

    model, tok = default_model
    out = word_perplexity(model, tok, data_dir, pages=1, max_length=1024)
    assert out["wikitext_pages"] == 1
    assert 5 < out["wikitext_word_ppl"] < 100
    assert out["wikitext_byte_ppl"] == pytest.approx(2 ** out["wikitext_bits_per_byte"], rel=1e-6)


def test_token_windows_are_bounded(default_model, data_dir):
    from slmsearch.errors import SlmsearchError
    from slmsearch.evals.wikitext import test_windows

    _, tok = default_model
    assert test_windows(tok, data_dir, 512, 3).shape == (3, 512)
    with pytest.raises(SlmsearchError, match="between 1 and"):
        test_windows(tok, data_dir, 512, 10**6)


def test_window_nlls_are_each_windows_mean_next_token_loss(default_model, data_dir):
    import torch

    from slmsearch.evals.wikitext import test_windows, window_nlls

    model, tok = default_model
    windows = test_windows(tok, data_dir, 64, 3)
    got = window_nlls(model, windows, batch_size=2)
    with torch.no_grad():
        expected = [
            torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1].double(), w[1:]).item() for w in windows
        ]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
