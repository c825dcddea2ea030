"""Wall time of one call, waiting for the device when it runs asynchronously (CUDA)."""

from __future__ import annotations

import time


def seconds(function, device: str) -> float:
    synchronize = device.startswith("cuda")
    if synchronize:
        import torch

        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if synchronize:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - start
