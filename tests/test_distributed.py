"""torch.distributed: DDP over a ShareLoRA model averages the shared tensors' gradients correctly."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharelora import ShareLoraConfig, get_sharelora_model

from conftest import assert_close_fp32, tiny_bert

WORLD = 2


def _model():
    return get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=4, share="A", target_modules=["query", "value"],
                                                            init_lora_weights=False))


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (4, 6), generator=g)
    return ids, torch.tensor([0, 1, 2, 1])


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    ids, labels = _batch()
    shard = slice(rank * 2, rank * 2 + 2)
    model(input_ids=ids[shard], labels=labels[shard]).loss.backward()
    if rank == 0:
        grads = {k: p.grad for k, p in model.module.sharelora_bank.items()}
        from safetensors.torch import save_file

        save_file({k.replace("/", "|"): v.contiguous() for k, v in grads.items()}, os.path.join(out_dir, "g.safetensors"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.numerics
def test_ddp_gradients_of_shared_tensors_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    from safetensors.torch import load_file

    ddp = load_file(str(tmp_path / "g.safetensors"))
    model = _model()
    ids, labels = _batch()
    # DDP averages the ranks' mean losses: the same as the mean of the two half-batch losses.
    loss = sum(model(input_ids=ids[i * 2:i * 2 + 2], labels=labels[i * 2:i * 2 + 2]).loss for i in range(WORLD)) / WORLD
    loss.backward()
    # each rank's half-batch gradient, all-reduced and halved, vs one backward of the mean (one thread vs
    # the default there): the same sums in another order
    for k, p in model.sharelora_bank.items():
        assert_close_fp32(ddp[k.replace("/", "|")], p.grad, what=k)
