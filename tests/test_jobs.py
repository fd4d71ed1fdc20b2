"""The job layer behind the CLI: calibration ids from the committed slice, for any tokenizer."""
import pytest
import torch

from qnpu.data import read_slice
from qnpu.jobs import calibration_ids


class WordTokenizer:
    """Whitespace words hashed to ids: far fewer tokens per text than the default model's tokenizer."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [sum(map(ord, w)) % 1000 for w in text.split()]}


def test_a_coarser_tokenizer_still_gets_the_first_chunks():
    words = len(read_slice("calibration").split())
    assert words < 65536  # the manifest's count with the default tokenizer: it would not fit
    ids = calibration_ids(WordTokenizer(), 4, 128)
    assert ids.shape == (4, 128)
    assert torch.equal(ids.flatten(), torch.tensor(WordTokenizer()(read_slice("calibration"))["input_ids"][:512]))


def test_too_short_a_text_says_what_to_lower():
    words = len(read_slice("calibration").split())
    with pytest.raises(ValueError, match="lower --samples or --seq-len"):
        calibration_ids(WordTokenizer(), words // 100 + 1, 100)


def test_seeded_chunks_are_reproducible_and_in_range():
    a, b = calibration_ids(WordTokenizer(), 8, 64, seed=3), calibration_ids(WordTokenizer(), 8, 64, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, calibration_ids(WordTokenizer(), 8, 64, seed=4))
