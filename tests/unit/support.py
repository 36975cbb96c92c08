"""Helpers the Executor tests share (the fixtures are in this folder's conftest.py)."""

import asyncio
import io

import numpy as np
from PIL import Image

# a one-epoch /train, as request parameters arrive over gRPC (every number a float)
QUICK = {"epochs": 1.0, "batch_size": 8.0, "learning_rate": 1e-3, "warmup_steps": 1.0, "seed": 3.0,
         "eval_fraction": 0.25}


def run(coro):
    """Run an endpoint coroutine of an Executor called as a plain object."""
    return asyncio.run(coro)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
