"""Options of the wrong Python type get torch's exception, on every path.

torch's argument parser refuses a string or None for a float, and anything but a ``bool`` for a
bool option; it takes numpy scalars and 0-d tensors for a float. Our own paths convert options with
``float()`` / ``bool()``, which would take ``"1"`` or ``1``: a call with a value that is not a plain
Python number / bool goes to torch's function instead (its ``TypeError``, or its result).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import triton_losses as tl_


def _case():
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.randint(0, 5, (4,))
    y = torch.ones(4, dtype=torch.float64)
    lp = torch.randn(6, 2, 4, dtype=torch.float64).log_softmax(2)
    ctc = (lp, torch.randint(1, 4, (2, 3)), torch.full((2,), 6), torch.full((2,), 3))
    return x, t, y, ctc


CALLS = {
    "multi_margin margin": lambda m, v, x, t, y, c: m.multi_margin_loss(x, t, margin=v),
    "cosine_embedding margin": lambda m, v, x, t, y, c: m.cosine_embedding_loss(x, x.flip(0), y, margin=v),
    "triplet p": lambda m, v, x, t, y, c: m.triplet_margin_loss(x, x.flip(0), -x, p=v),
    "triplet eps": lambda m, v, x, t, y, c: m.triplet_margin_loss(x, x.flip(0), -x, eps=v),
    "triplet swap": lambda m, v, x, t, y, c: m.triplet_margin_loss(x, x.flip(0), -x, swap=v),
    "triplet_with_distance margin": lambda m, v, x, t, y, c: m.triplet_margin_with_distance_loss(
        x, x.flip(0), -x, margin=v
    ),
    "poisson full": lambda m, v, x, t, y, c: m.poisson_nll_loss(x, x.abs(), full=v),
    "poisson log_input": lambda m, v, x, t, y, c: m.poisson_nll_loss(x, x.abs(), log_input=v),
    "ctc zero_infinity": lambda m, v, x, t, y, c: m.ctc_loss(*c, zero_infinity=v),
    "softmax dtype": lambda m, v, x, t, y, c: m.softmax(x, 1, dtype=v),
}
VALUES = ["1", 1, 2.0, None, np.float64(0.5), torch.tensor(0.5)]


def _outcome(fn):
    try:
        return "value", fn()
    except Exception as e:  # the exception is what is compared
        return type(e), str(e)


@pytest.mark.parametrize("value", VALUES, ids=repr)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_an_option_of_the_wrong_type_is_torchs_error(call, value):
    x, t, y, c = _case()
    fn = CALLS[call]
    ref = _outcome(lambda: fn(F, value, x, t, y, c))
    ours = _outcome(lambda: fn(tl_, value, x, t, y, c))
    assert ours[0] == ref[0]
    if ref[0] == "value":
        torch.testing.assert_close(ours[1], ref[1])
    else:
        assert ours[1] == ref[1]
