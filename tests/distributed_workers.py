"""Worker functions for the two-process gloo tests (spawn needs them importable)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mocoplus import MoCoConfig, MoCoPlus, distributed
from mocoplus.queue import KeyQueue

TINY = {"arch": "resnet18", "width": 0.125, "cifar_stem": True, "embedding_dim": 8, "queue_size": 10}


def _init(rank: int, world: int, store: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def gather_into_queue(rank: int, world: int, store: Path, out: Path) -> None:
    _init(rank, world, store)
    queue = KeyQueue(10, 2)
    for step in range(3):  # 6 keys a step into 10 slots: wraps around
        keys = torch.full((3, 2), float(100 * step + 10 * rank)) + torch.arange(3.0).unsqueeze(1)
        queue.enqueue(distributed.concat_all_gather(keys))
    torch.save({"keys": queue.keys, "pointer": queue.pointer}, out / f"queue-{rank}.pt")
    dist.destroy_process_group()


def shuffle_bn_step(rank: int, world: int, store: Path, out: Path) -> None:
    _init(rank, world, store)
    torch.manual_seed(0)  # same initial weights on both ranks, as DDP expects
    model = MoCoPlus(MoCoConfig(**TINY, key_bn="auto"))
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(rank))

    shuffled, restore = distributed.shuffle_across_ranks(images)
    foreign = sum(int(not any(torch.equal(s, x) for x in images)) for s in shuffled)
    roundtrip = torch.equal(distributed.unshuffle_across_ranks(shuffled, restore), images)

    model.eval()
    direct = torch.nn.functional.normalize(model.key_encoder(images), dim=1)
    keys_match = torch.allclose(model.encode_keys(images), direct, atol=1e-6)

    model.train()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.query_encoder.parameters(), lr=0.1)
    out_step = ddp(images, images.flip(-1))
    out_step.loss.backward()
    optimizer.step()
    first_grad = next(model.query_encoder.parameters()).grad
    torch.save(
        {
            "key_bn": model.key_bn,
            "foreign": foreign,
            "roundtrip": roundtrip,
            "keys_match": keys_match,
            "loss": out_step.loss.detach(),
            "grad": first_grad,
            "queue": model.queue.keys.clone(),
            "pointer": int(model.queue.pointer),
        },
        out / f"step-{rank}.pt",
    )
    dist.destroy_process_group()


def streams_per_rank(rank: int, world: int, store: Path, out: Path) -> None:
    """Each rank streams the shard set in ``out/shards`` with 2 loader workers, ranks from the process group."""
    from pipeline.data.augment import small_grayscale_preset
    from pipeline.data.streams import EvalStream, StreamConfig, TrainStream

    _init(rank, world, store)
    config = StreamConfig(batch_size=32, workers=2, shuffle_buffer=50)
    train = TrainStream(out / "shards", small_grayscale_preset(), config)
    batches = list(train.epoch(0))
    evaluation = EvalStream(out / "shards", size=28, mode="L", config=config)
    keys = [key for batch in evaluation for key in batch.keys]
    torch.save(
        {
            "rank": train.rank,
            "batches": len(batches),
            "batches_per_epoch": train.batches_per_epoch,
            "first": batches[0].view1,
            "keys": keys,
        },
        out / f"streams-{rank}.pt",
    )
    dist.destroy_process_group()


def ddp_step_on_a_shared_gpu(rank: int, world: int, store: Path, out: Path, key_bn: str) -> None:
    """Two gloo ranks on one GPU (cuda:0): a DDP step with shuffle-BN or SyncBatchNorm, its results saved."""
    _init(rank, world, store)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.manual_seed(0)  # same initial weights on both ranks, as DDP expects
    model = MoCoPlus(MoCoConfig(**TINY, key_bn=key_bn)).to(device, memory_format=torch.channels_last)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(rank)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[0])
    optimizer = torch.optim.SGD(model.query_encoder.parameters(), lr=0.1)
    step = ddp(images, images.flip(-1))
    step.loss.backward()
    optimizer.step()
    synced = any(isinstance(module, torch.nn.SyncBatchNorm) for module in model.modules())
    torch.save(
        {
            "key_bn": model.key_bn,
            "synced": synced,
            "loss": float(step.loss),
            "grad": next(model.query_encoder.parameters()).grad.cpu(),
            "weights": next(model.query_encoder.parameters()).detach().cpu(),
            "queue": model.queue.keys.cpu(),
            "queue_device": str(model.queue.keys.device),
            "pointer": int(model.queue.pointer),
        },
        out / f"gpu-{rank}.pt",
    )
    dist.destroy_process_group()


def nccl_world_of_one(rank: int, world: int, store: Path, out: Path) -> None:
    """NCCL with one rank: the gathers and the shuffle are identities, a DDP step runs."""
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    keys = torch.arange(12.0, device=device).view(6, 2)
    gathered = distributed.concat_all_gather(keys)
    shuffled, restore = distributed.shuffle_across_ranks(keys)
    torch.manual_seed(0)
    model = MoCoPlus(MoCoConfig(**TINY, key_bn="shuffle")).to(device)
    ddp = DistributedDataParallel(model, device_ids=[0])
    images = torch.randn(8, 3, 16, 16, device=device)
    step = ddp(images, images.flip(-1))
    step.loss.backward()
    dist.barrier()
    torch.save(
        {
            "backend": dist.get_backend(),
            "gathered": torch.equal(gathered, keys),
            "roundtrip": torch.equal(distributed.unshuffle_across_ranks(shuffled, restore), keys),
            "loss": float(step.loss),
        },
        out / "nccl-0.pt",
    )
    dist.destroy_process_group()
