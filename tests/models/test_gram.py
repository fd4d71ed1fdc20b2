"""The calibration Hessian's upper-triangle accumulation (`qnpu.models.capture.add_upper_gram`)."""
import pytest
import torch

from qnpu.models.capture import SiteStats, add_upper_gram, mirror_upper


@pytest.mark.parametrize("width,block", [(5, 8), (8, 8), (20, 8), (23, 8), (576, 192), (200, 192)])
def test_upper_accumulation_then_mirror_equals_the_full_gram(width, block):
    g = torch.Generator().manual_seed(width)
    batches = [torch.randn(n, width, generator=g) for n in (7, 31, 64)]
    gram = torch.zeros(width, width)
    for rows in batches:
        add_upper_gram(gram, rows, block)
    mirror_upper(gram)
    x = torch.cat(batches).double()
    full = x.T @ x
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram.double(), full, rtol=1e-5, atol=1e-4)


def test_site_stats_hessian_is_the_mean_gram_of_every_row_added():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 50, 400, generator=g) for _ in range(3)]  # width 400 > one block
    site = SiteStats(max_tokens=16)
    for x in batches:
        site.add(x, None)
    rows = torch.cat([x.reshape(-1, 400) for x in batches]).double()
    h = site.result().hessian
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h.double(), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-5)
