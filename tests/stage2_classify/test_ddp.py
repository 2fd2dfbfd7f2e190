"""Two-process gloo DDP training: replicas' parameters stay identical, rank 0 writes the model."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, penalty: float = 0.0) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from data_prep.distributed import cleanup_distributed, init_distributed
    from stage2_classify.config import tiny_config
    from stage2_classify.train import train_on_samples
    from tests.stage2_classify.conftest import toy_samples

    di = init_distributed(prefer_cuda=False)
    cfg = tiny_config()
    cfg.train.epochs = 2
    cfg.train.batch_size = 2
    cfg.train.aug_prob = 0.5
    cfg.train.margin_grad_penalty = penalty
    samples = toy_samples(cfg, 6, seed=3)

    def dump(epoch, module, row):
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()},
                   os.path.join(out, f"rank{rank}_epoch{epoch}.pt"))

    try:
        train_on_samples(samples, cfg, os.path.join(out, "model"), dist_info=di, callback=dump)
    finally:
        cleanup_distributed()


@pytest.mark.parametrize("penalty", [0.0, 1.0], ids=["plain", "margin_grad_penalty"])
def test_ddp_two_processes_keep_replicas_identical(tmp_path, penalty):
    """Also with the input-gradient penalty, whose double back-propagation runs inside DDP's forward."""
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path), penalty), nprocs=2, join=True)
    for epoch in (1, 2):
        a = torch.load(tmp_path / f"rank0_epoch{epoch}.pt", weights_only=True)
        b = torch.load(tmp_path / f"rank1_epoch{epoch}.pt", weights_only=True)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"epoch {epoch}: replicas differ in {k}"
    a1 = torch.load(tmp_path / "rank0_epoch1.pt", weights_only=True)
    a2 = torch.load(tmp_path / "rank0_epoch2.pt", weights_only=True)
    assert any(not torch.equal(a1[k], a2[k]) for k in a1)  # it trained
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, a2["net." + k])
