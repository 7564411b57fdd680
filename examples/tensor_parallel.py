"""Tensor-parallel attention with portattn: a layer's heads split over the GPUs.

One process per GPU (the way serving engines run tensor parallelism): rank ``r`` owns
query heads ``[r*Hq/W, (r+1)*Hq/W)`` and the matching KV heads (GQA groups stay whole),
keeps its own shard of the paged KV cache on ``cuda:r``, and runs
``portattn.attention`` on it. The shards' outputs are gathered over NCCL, joined along
the head dimension and compared, on rank 0, with the same layer computed on one GPU
(and with the float64 oracle). Exit status 0 when every comparison passes.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py
    python examples/tensor_parallel.py --spawn 2        # torch.multiprocessing instead
    python examples/tensor_parallel.py --spawn 2 --device cpu --backend torch_ref
                                                        # gloo on the CPU (tests the logic)

NVLink multicast (NVLS) stays off: ``NCCL_NVLS_ENABLE=0`` (set here unless given).
Every rank builds the full batch from the same seed on the CPU and keeps its shard, so no
tensor has to be sent before the attention; only the outputs travel.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist

import portattn
from portattn.testing import dense_attention, make_paged_batch, relative_error

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: Relative error allowed between the gathered shards and the one-GPU run (both run our
#: kernels; the variant can differ with the head count) and against the float64 oracle.
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawn", type=int, metavar="N", default=0,
                        help="start N processes with torch.multiprocessing (not torchrun)")
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--backend", default=None, help="force a portattn backend")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: one GPU per rank over NCCL; cpu: gloo (a logic check)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def head_shard(batch, rank: int, world: int):
    """This rank's q heads and KV-cache heads, as tensors of their own (contiguous)."""
    num_q, num_kv = batch.q.shape[1], batch.cache.num_kv_heads
    q_per, kv_per = num_q // world, num_kv // world
    q = batch.q[:, rank * q_per:(rank + 1) * q_per].contiguous()
    kv = slice(rank * kv_per, (rank + 1) * kv_per)
    cache = portattn.PagedKVCache(batch.cache.key_cache[:, :, kv].contiguous(),
                                  batch.cache.value_cache[:, :, kv].contiguous())
    return q, cache


def build_batch(args: argparse.Namespace, device: torch.device):
    """The same batch on every rank (same seed): mixed decode and prefill sequences."""
    query_lens = [1, 1, 1, 7, 1, 64]
    seq_lens = [300, 1500, 17, 420, 4096, 64]
    return make_paged_batch(query_lens, seq_lens, num_q_heads=args.num_q_heads,
                            num_kv_heads=args.num_kv_heads, head_size=args.head_size,
                            block_size=args.block_size, dtype=DTYPES[args.dtype],
                            device=device, seed=args.seed)


def run_rank(rank: int, world: int, args: argparse.Namespace,
             local_rank: int | None = None) -> bool:
    """One rank's work on GPU ``local_rank`` (default ``rank``); True on every rank when
    rank 0's comparisons passed."""
    if args.num_q_heads % world or args.num_kv_heads % world:
        raise SystemExit(f"--num-q-heads {args.num_q_heads} and --num-kv-heads "
                         f"{args.num_kv_heads} must both be multiples of {world} ranks")
    if args.device == "cuda":
        device = torch.device("cuda", rank if local_rank is None else local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = build_batch(args, device)
        q, cache = head_shard(batch, rank, world)
        local = portattn.attention(q, cache, batch.metadata, backend=args.backend)
        decision = portattn.explain(q, cache, batch.metadata, backend=args.backend)
        shards = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(shards, local)
        gathered = torch.cat(shards, dim=1)

        passed = torch.zeros(1, dtype=torch.int32, device=device)
        if rank == 0:
            whole = portattn.attention(batch.q, batch.cache, batch.metadata,
                                       backend=args.backend)
            oracle = dense_attention(batch.q.cpu(), batch.keys, batch.values,
                                     batch.query_lens)
            tolerance = TOLERANCE[DTYPES[args.dtype]]
            errors = {"vs_one_gpu": relative_error(gathered, whole),
                      "vs_oracle": relative_error(gathered, oracle),
                      "one_gpu_vs_oracle": relative_error(whole, oracle)}
            ok = all(e < tolerance for e in errors.values())
            passed.fill_(int(ok))
            print(json.dumps({"result": "PASS" if ok else "FAIL", "world_size": world,
                              "devices": _device_names(args.device, world),
                              "tolerance": tolerance, "errors": errors,
                              "shard_backend": decision.backend,
                              "shard_variant": decision.variant,
                              "heads_per_rank": q.shape[1]}), flush=True)
        dist.broadcast(passed, src=0)
        return bool(passed.item())
    finally:
        dist.destroy_process_group()


def _device_names(kind: str, world: int) -> list[str]:
    if kind != "cuda":
        return ["cpu"] * world
    return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(world)]


def _spawned(rank: int, world: int, args: argparse.Namespace) -> None:
    if not run_rank(rank, world, args):
        raise SystemExit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.spawn:
        if args.device == "cuda" and torch.cuda.device_count() < args.spawn:
            print(f"--spawn {args.spawn} needs {args.spawn} GPUs, this machine has "
                  f"{torch.cuda.device_count()}", file=sys.stderr)
            return 2
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import torch.multiprocessing as mp

        mp.spawn(_spawned, args=(args.spawn, args), nprocs=args.spawn, join=True)
        return 0  # a failed rank makes spawn raise
    if "RANK" not in os.environ:
        print("run under torchrun (torchrun --nproc-per-node 2 examples/tensor_parallel.py) "
              "or with --spawn N", file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return 0 if run_rank(rank, world, args, local_rank) else 1


if __name__ == "__main__":
    sys.exit(main())
