"""A DDP rank that reads a stream (tests/unit/test_streaming.py spawns two): kept apart from the test module so that
the spawned processes import torch and the stream modules only, not the model stack."""

import json
import os

import numpy as np
import torch

from cliptuner.train.stream_loader import StreamLoader
from cliptuner.train.streaming import open_stream


def pixels(image):
    """A stand-in transform: the image as an ``[3, 8, 8]`` float tensor."""
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def tokens(texts):
    """A stand-in tokenizer: ``[batch, 1]``."""
    return torch.tensor([[len(text)] for text in texts])


def read_epochs(rank, world_size, init_file, folder, out_dir, epochs=2):
    """Read ``epochs`` epochs of the stream in ``folder`` as rank ``rank``; write what it saw to ``rank<r>.json``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loader = StreamLoader(
            open_stream(folder), pixels, tokens, 8, seed=3, shuffle_buffer=16, num_replicas=world_size, rank=rank
        )
        record = {}
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            batches = sum(1 for _ in loader)
            record[epoch] = {"seen": sorted(loader.seen[epoch]), "batches": batches, "done": loader.state()["done"]}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(record, fh)
    finally:
        torch.distributed.destroy_process_group()
