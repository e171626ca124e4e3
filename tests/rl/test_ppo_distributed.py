"""Batch statistics across data-parallel ranks: two gloo processes holding half a batch each get
the statistics of the whole batch, identical on both ranks."""

import socket

import torch
import torch.multiprocessing as mp
from distributed_helpers import batch, rank_main

from lit_rlhf.rl.common import masked_mean, masked_whiten


def test_whitening_and_kl_controller_see_the_global_batch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(rank_main, args=(port, out), nprocs=2, join=True)
    values, mask = batch()
    whole = masked_whiten(values, mask)
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), whole)
    assert out[0][1] == out[1][1]  # the same on every rank
    torch.testing.assert_close(out[0][1], masked_mean(values, mask))
    assert out[0][2] == out[1][2]
