"""Concurrent generation for different tenants never mixes tenants."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import LogitsProcessor, LogitsProcessorList

SETTINGS = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
NAMES = ["base", "chat", "code", "tied"]


def references(tenants, batch):
    return {name: tenants[name].generate(**batch, **SETTINGS) for name in NAMES}


def churn(multi, stop: threading.Event) -> int:
    """Switch the global active tenant as fast as possible until told to stop."""
    switches = 0
    while not stop.wait(0.0002):
        multi.set_active_model(NAMES[switches % len(NAMES)])
        switches += 1
    return switches


def test_threads_with_per_call_tenants_and_scoped_blocks_never_mix(multi, tenants, batch):
    expected = references(tenants, batch)
    stop = threading.Event()
    deadline = time.monotonic() + 60

    def job(index: int) -> tuple[str, torch.Tensor]:
        name = NAMES[index % len(NAMES)]
        if index % 2:
            return name, multi.generate(**batch, **SETTINGS, tenant=name)
        with multi.active(name):
            return name, multi.generate(**batch, **SETTINGS)

    with ThreadPoolExecutor(max_workers=9) as pool:
        switcher = pool.submit(churn, multi, stop)
        results = list(pool.map(job, range(24)))
        stop.set()
        assert switcher.result() > 0
    assert time.monotonic() < deadline
    for name, output in results:
        assert torch.equal(output, expected[name]), name


def test_generation_pins_the_tenant_active_when_it_started(multi, tenants, batch):
    expected = references(tenants, batch)

    class SwitchMidway(LogitsProcessor):
        """Switches the model's active tenant after the second generated token."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == batch["input_ids"].shape[1] + 2:
                multi.set_active_model("base")
            return scores

    multi.set_active_model("tied")
    output = multi.generate(**batch, **SETTINGS, logits_processor=LogitsProcessorList([SwitchMidway()]))
    assert multi.active_model == "base"
    assert torch.equal(output, expected["tied"])


def test_active_block_is_local_to_its_thread(multi):
    multi.set_active_model("base")
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with multi.active("chat"):
            seen["worker"] = multi.model.resolve_tenant(None)
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    seen["main"] = multi.model.resolve_tenant(None)
    release.set()
    thread.join()
    assert seen == {"worker": "chat", "main": "base"}
    assert multi.active_model == "base"
