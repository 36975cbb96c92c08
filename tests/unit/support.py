"""Helpers the Executor tests share (the fixtures are in this folder's conftest.py)."""

import asyncio
import io

import numpy as np
from docarray import DocList
from PIL import Image

from cliptuner.train import synthetic
from executors.schemas import ClipDoc

# a one-epoch /train, as request parameters arrive over gRPC (every number a float)
QUICK = {
    "epochs": 1.0,
    "batch_size": 8.0,
    "learning_rate": 1e-3,
    "warmup_steps": 1.0,
    "seed": 3.0,
    "eval_fraction": 0.25,
    "gate": False,  # one epoch on a few pairs may or may not beat the start: these tests are about what a run does
}


def run(coro):
    """Run an endpoint coroutine of an Executor called as a plain object."""
    return asyncio.run(coro)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pair_docs(n_images: int, seed: int, blobs: bool = False) -> DocList[ClipDoc]:
    """Synthetic ``domain`` pairs as /train docs: two captions per image, ``tags['image_id']`` tying them; the image
    as a tensor, or as a PNG blob with ``blobs``."""
    pairs = synthetic.generate(n_images, domain="domain", seed=seed, captions_per_image=2)
    return DocList[ClipDoc](
        [
            ClipDoc(
                id=f"p{i}",
                text=caption,
                tags={"image_id": pairs.image_ids[pairs.image_index[i]]},
                **(
                    {"blob": png(pairs.images[pairs.image_index[i]])}
                    if blobs
                    else {"tensor": pairs.images[pairs.image_index[i]]}
                ),
            )
            for i, caption in enumerate(pairs.captions)
        ]
    )
