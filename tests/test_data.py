import shutil

import pytest

from slmsearch.data import FILES, calibration_tokens, data_path, resolve_data_dir, wikitext_test_text
from slmsearch.errors import SlmsearchError


def test_all_files_verify(data_dir):
    for key in FILES:
        assert data_path(data_dir, key).is_file()


def test_corrupt_file_named_in_error(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    target = copy / FILES["triviaqa_dev"].relpath
    target.chmod(0o644)
    target.write_text(target.read_text()[:-10])
    with pytest.raises(SlmsearchError, match="triviaqa_dev_2000.jsonl.*sha256"):
        data_path(copy, "triviaqa_dev")


def test_missing_dir():
    with pytest.raises(SlmsearchError, match="does not exist"):
        resolve_data_dir("/nonexistent/data")


def test_test_text_is_dataset_rows_joined(data_dir):
    text = wikitext_test_text(data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n")  # first row is empty, as in the HF dataset


def test_calibration_is_seeded_and_from_validation_only(default_model, data_dir):
    _, tok = default_model
    a = calibration_tokens(tok, data_dir, n_samples=4, seqlen=64, seed=0)
    b = calibration_tokens(tok, data_dir, n_samples=4, seqlen=64, seed=0)
    c = calibration_tokens(tok, data_dir, n_samples=4, seqlen=64, seed=1)
    held = calibration_tokens(tok, data_dir, n_samples=4, seqlen=64, seed=0, part="heldout")
    assert a.shape == (4, 64) and (a == b).all() and not (a == c).all()
    valid = (data_dir / FILES["wikitext_valid_tokens"].relpath).read_text()
    test = wikitext_test_text(data_dir)
    sample = tok.decode(a[0][8:40])
    assert sample.strip() and sample in tok.decode(tok(valid).input_ids)
    assert sample not in test
    assert not set(map(tuple, held.tolist())) & set(map(tuple, a.tolist()))
