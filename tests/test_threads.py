"""Concurrent generation for different tenants never mixes tenants, and edits of the tenants
wait for the calls running in other threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from multimoe import MultiTenantMixtralForCausalLM
from multimoe.concurrency import TenantLock

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


def test_adding_and_removing_tenants_while_others_generate(tenants, batch):
    """An edit renumbers the pool and the tenants' order; calls running in other threads see the
    tenant set before or after it, never half-edited (`matrix batch sizes have to match` before)."""
    model = MultiTenantMixtralForCausalLM.from_models({name: tenants[name] for name in ("base", "chat")}).eval()
    expected = references(tenants, batch)
    mixed_batch = {key: torch.cat([rows, rows]) for key, rows in batch.items()}
    stop = threading.Event()

    def edit() -> int:
        edits = 0
        while not stop.is_set():
            model.add_tenant("code", tenants["code"])
            model.add_tenant("tied", tenants["tied"])
            model.remove_tenant("code")
            model.remove_tenant("tied")
            edits += 1
        return edits

    def job(index: int) -> tuple[list[str], torch.Tensor]:
        rows = ["chat", "base", "base", "chat"] if index % 2 else ["base", "chat", "chat", "base"]
        return rows, model.generate(**mixed_batch, **SETTINGS, tenant_names=rows)

    with ThreadPoolExecutor(max_workers=4) as pool:
        editor = pool.submit(edit)
        try:
            results = list(pool.map(job, range(12)))
        finally:
            stop.set()  # also when a job failed: the editor must not keep the pool open
        assert editor.result() > 0
    for rows, output in results:
        for row, name in enumerate(rows):
            assert torch.equal(output[row], expected[name][row % 2]), (rows, row)


def test_an_edit_from_inside_a_call_of_the_same_model_is_refused(multi, tenants, batch):
    class AddTenant(LogitsProcessor):
        def __call__(self, input_ids, scores):
            multi.add_tenant("late", tenants["code"])
            return scores

    with pytest.raises(RuntimeError, match="cannot be edited from inside a forward or generate call"):
        multi.generate(**batch, **SETTINGS, tenant="base", logits_processor=LogitsProcessorList([AddTenant()]))
    assert "late" not in multi.tenants


def test_an_interrupted_wait_leaves_the_lock_usable():
    """A Ctrl-C while waiting must not leave a count behind: a stale waiting edit would hold every
    call back, a stale call would keep every edit out."""
    lock = TenantLock()

    def interrupted(section, holder):
        held, release = threading.Event(), threading.Event()

        def hold():
            with holder():
                held.set()
                release.wait(5)

        thread = threading.Thread(target=hold)
        thread.start()
        held.wait(5)
        waits = []
        original = threading.Condition.wait_for

        def interrupt(condition, predicate, timeout=None):
            waits.append(predicate)
            raise KeyboardInterrupt

        threading.Condition.wait_for = interrupt
        try:
            with pytest.raises(KeyboardInterrupt), section():
                pass
        finally:
            threading.Condition.wait_for = original
            release.set()
            thread.join()
        assert waits

    interrupted(lock.writing, lock.reading)  # an edit interrupted while calls run
    interrupted(lock.reading, lock.writing)  # a call interrupted while an edit runs
    usable = threading.Event()

    def use():
        with lock.writing():
            pass
        with lock.reading():
            usable.set()

    threading.Thread(target=use, daemon=True).start()
    assert usable.wait(5), "a count left by an interrupted wait blocks the lock"


def test_calls_held_back_by_an_interrupted_edit_get_in(monkeypatch):
    """An edit interrupted while it waits must let in the calls it held back meanwhile."""
    lock = TenantLock()
    running, finish, held_call_ran = threading.Event(), threading.Event(), threading.Event()

    def running_call():
        with lock.reading():
            running.set()
            finish.wait(5)

    def held_call():
        with lock.reading():
            held_call_ran.set()

    first, second = threading.Thread(target=running_call), threading.Thread(target=held_call)
    first.start()
    running.wait(5)
    editor, original = threading.current_thread(), threading.Condition.wait_for

    def interrupt_once_a_call_is_held(condition, predicate, timeout=None):
        if threading.current_thread() is not editor:
            return original(condition, predicate, timeout)
        second.start()
        while not lock._readers_held:
            condition.wait(0.01)  # lets the second call in to be held back
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Condition, "wait_for", interrupt_once_a_call_is_held)
    with pytest.raises(KeyboardInterrupt), lock.writing():
        pass
    monkeypatch.undo()
    try:
        assert held_call_ran.wait(5), "the call held back by the interrupted edit never got in"
    finally:
        finish.set()
        first.join()
        second.join(5)
