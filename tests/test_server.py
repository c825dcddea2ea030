"""`multimoe serve`: the OpenAI-compatible server, tested with the real `openai` client against a
server on 127.0.0.1 (a free port), serving the shipped testbed's four task tenants."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from openai import APIError, APITimeoutError, OpenAI

from multimoe import testbed
from multimoe.cli import main
from multimoe.serving import Request
from multimoe.serving.continuous import Job, ServingLoop
from multimoe.serving.openai_server import ApiError, OpenAIServer, UvicornServer, load_for_serving

class Running:
    """A server in a thread of this process, on a free port, with its `openai` client."""

    def __init__(self, server: OpenAIServer):
        self.server = server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = UvicornServer(server)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.uvicorn.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler calls
        self.thread.join(60)
        assert not self.thread.is_alive()

    def post(self, path: str, data: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def metric(self, name: str, **labels) -> float:
        text = urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()
        selector = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))  # as Prometheus writes them
        found = re.search(rf"^{name}\{{{selector}\}} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def loaded():
    """The testbed's task tenants, each with its own tokenizer and chat template, and the shared tokenizer."""
    model, tokenizer = load_for_serving(None, testbed=True)
    assert set(model.tenant_tokenizers) == set(model.tenants)
    return model, tokenizer


@pytest.fixture(scope="module")
def running(loaded):
    model, tokenizer = loaded
    server = Running(OpenAIServer(model, tokenizer, tenant_tokenizers=model.tenant_tokenizers, max_batch_size=4))
    yield server
    server.stop()


def own_answer(name: str, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """What the tenant's own original model generates, greedily, and why it stopped."""
    model, tokenizer = testbed.load(name), testbed.tokenizer()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    reason = "stop" if new[-1] == model.generation_config.eos_token_id else "length"
    return tokenizer.decode(new, skip_special_tokens=True), reason


REQUESTS = [(task.name, example.prompt) for task in testbed.TASKS.values() for example in task.held_out(3)]


def test_models_are_the_tenants(running):
    assert [model.id for model in running.client.models.list()] == ["add", "reverse", "sort", "shift"]


def test_concurrent_clients_get_their_own_tenants_greedy_answers(running):
    def ask(item):
        name, prompt = item
        answer = running.client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        return answer.model, answer.choices[0].text, answer.choices[0].finish_reason, answer.usage

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, REQUESTS * 2))
    for (name, prompt), (model, text, reason, usage) in zip(REQUESTS * 2, answers):
        assert model == name and (text, reason) == own_answer(name, prompt, 12), (name, prompt)
        assert usage.prompt_tokens == len(testbed.tokenizer()(prompt)["input_ids"])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("settings", [{"temperature": 0}, {"temperature": 1.5, "top_p": 0.9, "seed": 7, "ignore_eos": True}])
def test_streaming_gives_what_the_whole_answer_gives(running, settings):
    extra = {"ignore_eos": settings.pop("ignore_eos")} if "ignore_eos" in settings else None
    for name, prompt in REQUESTS[::3]:
        whole = running.client.completions.create(model=name, prompt=prompt, max_tokens=10, extra_body=extra, **settings)
        chunks = list(running.client.completions.create(model=name, prompt=prompt, max_tokens=10, stream=True,
                                                        extra_body=extra, **settings))
        assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage == whole.usage


@pytest.mark.parametrize("name, prompt, expected", [("add", "12+34=", "46"), ("reverse", "rev abcd=", "dcba")])
def test_chat_applies_the_tenants_own_template(running, name, prompt, expected):
    messages = [{"role": "user", "content": prompt}]
    answer = running.client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == len(testbed.tokenizer()(prompt, add_special_tokens=False)["input_ids"])
    streamed = list(running.client.chat.completions.create(model=name, messages=messages, max_tokens=8,
                                                           temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == expected


def test_chat_needs_a_chat_template(loaded):
    model, tokenizer = loaded  # the shared tokenizer has none
    server = OpenAIServer(model, tokenizer)
    with pytest.raises(ApiError, match="The model 'add' has no chat template; use /v1/completions"):
        server.request({"model": "add", "messages": [{"role": "user", "content": "1+1="}]}, chat=True)


def test_a_seed_repeats_a_sample_and_a_stop_string_cuts_it(running):
    ask = dict(model="reverse", prompt="rev abcd=", max_tokens=20, temperature=1.8, seed=3, extra_body={"ignore_eos": True})
    first, again = (running.client.completions.create(**ask).choices[0].text for _ in range(2))
    assert first == again and len(first) > 4
    stop = first[2:4]
    cut = running.client.completions.create(**ask, stop=[stop]).choices[0]
    assert cut.text == first[: first.find(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "nobody", "prompt": "1+1="}, 404, "model", "The model 'nobody' does not exist"),
    ({"prompt": "1+1="}, 400, "model", "'model' must name a tenant"),
    ({"model": "add", "prompt": ""}, 400, "prompt", "'prompt' must be a non-empty string"),
    ({"model": "add", "prompt": "1+1=", "temperature": 3}, 400, "temperature", "'temperature' must be in [0, 2]"),
    ({"model": "add", "prompt": "1+1=", "temperature": "hot"}, 400, "temperature", "must be a finite number"),
    ({"model": "add", "prompt": "1+1=", "top_p": 0}, 400, "top_p", "'top_p' must be in (0, 1]"),
    ({"model": "add", "prompt": "1+1=", "max_tokens": 0}, 400, "max_tokens", "'max_tokens' must be in [1, inf]"),
    ({"model": "add", "prompt": "1+1=", "max_tokens": 2.5}, 400, "max_tokens", "must be an integer"),
    ({"model": "add", "prompt": "1+1=", "seed": -1}, 400, "seed", "'seed' must be in"),
    ({"model": "add", "prompt": "1+1=", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "a list of 1 to 4"),
    ({"model": "add", "prompt": "1+1=", "stream": "yes"}, 400, "stream", "'stream' must be a boolean"),
    ({"model": "add", "prompt": "1+1=", "n": 2}, 400, "n", "Only n=1 is supported"),
    ({"model": "add", "prompt": "1+1=", "logprobs": 2}, 400, "logprobs", "Unsupported parameter 'logprobs'"),
    ({"model": "add", "prompt": "1" * 70}, 400, "prompt", "maximum context length is 64 tokens"),
    ({"model": "add", "prompt": "1+1=", "max_tokens": 61}, 400, "prompt", "maximum context length is 64 tokens"),
    ({"model": "add", "prompt": "1+1=", "messages": []}, 400, "messages", "Unsupported parameter 'messages'"),
])
def test_bad_requests_get_openai_errors(running, body, status, param, message):
    code, answer = running.post("/v1/completions", json.dumps(body).encode())
    assert code == status and message in answer["error"]["message"] and answer["error"]["param"] == param, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b"\xff"])
def test_malformed_json_gets_a_400(running, data):
    code, answer = running.post("/v1/chat/completions", data)
    assert code == 400 and "JSON" in answer["error"]["message"]


def test_health_and_metrics_per_tenant(running):
    assert json.loads(urllib.request.urlopen(running.url + "/health", timeout=30).read()) == {"status": "ok"}
    before = running.metric("multimoe_requests_total", tenant="shift", reason="stop")
    tokens = running.metric("multimoe_generated_tokens_total", tenant="shift")
    answer = running.client.completions.create(model="shift", prompt="next abc=", max_tokens=8, temperature=0)
    assert running.metric("multimoe_requests_total", tenant="shift", reason="stop") == before + 1
    assert running.metric("multimoe_generated_tokens_total", tenant="shift") == tokens + answer.usage.completion_tokens
    assert running.metric("multimoe_time_to_first_token_seconds_count", tenant="shift") >= 1
    assert running.metric("multimoe_turnaround_seconds_count", tenant="shift") >= 1
    assert running.metric("multimoe_queue_length", tenant="sort") == 0


def slowed(server: OpenAIServer, seconds: float) -> None:
    """Each decode step takes at least `seconds` (the testbed is too quick to catch mid-answer)."""
    decode = server.loop.engine.decode

    def slow(batch):
        time.sleep(seconds)
        return decode(batch)

    server.loop.engine.decode = slow


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_row(loaded, stream):
    """A closed stream frees the row at the next step; a client that stops waiting for a whole
    answer, within half a second (the server looks twice a second)."""
    model, tokenizer = loaded
    server = Running(OpenAIServer(model, tokenizer, max_batch_size=4))
    slowed(server.server, 0.05)
    ask = dict(model="sort", prompt="sort dcba=", max_tokens=50, temperature=0, extra_body={"ignore_eos": True})
    try:
        if stream:
            answer = server.client.completions.create(**ask, stream=True)
            for _, _ in zip(range(2), answer):
                pass
            assert server.metric("multimoe_running_requests", tenant="sort") == 1
            answer.close()
        else:
            impatient = server.client.with_options(timeout=0.5)
            with pytest.raises(APITimeoutError):
                impatient.completions.create(**ask)
        deadline = time.monotonic() + 1.5  # well before the 50 steps (2.5 s) the answer would take
        while server.metric("multimoe_running_requests", tenant="sort") != 0:
            assert time.monotonic() < deadline, "the row was not freed"
            time.sleep(0.02)
        assert server.metric("multimoe_requests_total", tenant="sort", reason="cancelled") == 1
    finally:
        server.stop()


@pytest.mark.parametrize("timeout, finishes", [(30.0, True), (0.0, False)])
def test_shutdown_finishes_or_cleanly_aborts_requests_in_flight(loaded, timeout, finishes):
    model, tokenizer = loaded
    server = Running(OpenAIServer(model, tokenizer, max_batch_size=4, shutdown_timeout_s=timeout))
    slowed(server.server, 0.02)
    stream = server.client.completions.create(model="add", prompt="12+34=", max_tokens=40, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    if finishes:
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 40
    else:
        with pytest.raises(APIError, match="The server shut down before this request finished"):
            list(stream)
    stopping.join(60)
    assert not server.thread.is_alive()
    with pytest.raises(Exception):
        server.client.models.list()


def test_the_serve_command_starts_and_exits_on_sigterm(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "multimoe.cli", "serve", "--testbed", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = client.completions.create(model="add", prompt="12+34=", max_tokens=8, temperature=0)
                break
            except Exception:
                assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()
                time.sleep(0.2)
        assert answer.choices[0].text == "46"
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down, then raises the signal again so that the exit status says why it stopped.
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        process.kill()
    assert f"serving add, reverse, sort, shift at http://127.0.0.1:{port}/v1" in process.stdout.read()


def test_a_flood_for_one_tenant_does_not_starve_another(loaded):
    """Admission is a round-robin over tenants with waiting requests: a request for `sort` that
    arrives after 20 for `add` is admitted among the next free rows, not after the flood."""
    model, tokenizer = loaded
    server = OpenAIServer(model, tokenizer, max_batch_size=2)  # the loop is not started: admission alone
    jobs = [Job(Request(index, "add", 0.0, "12+34=", 4), lambda text, reason: None) for index in range(20)]
    jobs += [Job(Request(20, "sort", 0.0, "sort cba=", 4), lambda text, reason: None)]
    for job in jobs:
        server.loop.submit(job)
    assert server.metrics.exposition().decode().count('multimoe_queue_length{tenant="add"} 20.0') == 1
    first = server.loop.admit()
    assert [job.request.tenant for job in first] == ["add", "sort"]
    server.loop.jobs = first  # both rows taken
    assert server.loop.admit() == []
    server.loop.jobs = []
    assert [job.request.request_id for job in server.loop.admit()] == [1, 2]  # then add's backlog, in order


@pytest.mark.parametrize("arguments, message", [
    (["serve"], "give a model (directory or Hub id) or --testbed, not both"),
    (["serve", "some/model", "--testbed"], "give a model (directory or Hub id) or --testbed, not both"),
    (["serve", "--testbed", "--port", "0"], "port must be positive"),
    (["serve", "--testbed", "--max-batch-size", "2.5"], "max_batch_size must be an int"),
    (["serve", "--testbed", "--shutdown-timeout", "nan"], "shutdown_timeout must be a finite number"),
])
def test_the_serve_command_refuses_bad_arguments_before_loading(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_request_the_engine_fails_gets_a_500_and_the_server_goes_on(loaded):
    model, tokenizer = loaded
    server = Running(OpenAIServer(model, tokenizer, max_batch_size=4))
    prefill, decode = server.server.loop.engine.prefill, server.server.loop.engine.decode
    failures = {"decode": 1}

    def failing_prefill(requests):
        if any("boom" in request.prompt for request in requests):
            raise RuntimeError("boom")
        return prefill(requests)

    def failing_decode(batch):
        if failures["decode"]:
            failures["decode"] -= 1
            raise RuntimeError("out of memory")
        return decode(batch)

    server.server.loop.engine.prefill = failing_prefill
    try:
        with pytest.raises(APIError, match="The engine failed on this request: RuntimeError: boom") as failed:
            server.client.completions.create(model="add", prompt="boom", max_tokens=4)
        assert failed.value.code == "engine_error"
        server.server.loop.engine.decode = failing_decode
        with pytest.raises(APIError, match="The engine failed on this request: RuntimeError: out of memory"):
            list(server.client.completions.create(model="add", prompt="12+34=", max_tokens=4, stream=True))
        answer = server.client.completions.create(model="add", prompt="12+34=", max_tokens=4, temperature=0)
        assert answer.choices[0].text == "46"
        assert json.loads(urllib.request.urlopen(server.url + "/health", timeout=30).read()) == {"status": "ok"}
        assert server.metric("multimoe_requests_total", tenant="add", reason="error") == 2
    finally:
        server.stop()


def test_a_tiny_temperature_samples_the_greedy_token(running):
    ask = dict(model="add", prompt="12+34=", max_tokens=4)
    tiny = running.client.completions.create(**ask, temperature=1e-40, seed=1).choices[0].text
    assert tiny == running.client.completions.create(**ask, temperature=0).choices[0].text == "46"


@pytest.mark.parametrize("extra", [
    {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "echo": False},
    {"stream": None, "n": 1, "user": "me", "logprobs": None},
])
def test_neutral_values_of_unimplemented_parameters_are_accepted(running, extra):
    code, answer = running.post("/v1/completions", json.dumps(
        {"model": "add", "prompt": "12+34=", "max_tokens": 4, "temperature": 0, **extra}).encode())
    assert code == 200 and answer["choices"][0]["text"] == "46"


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", {"n": True}, "n", "Only n=1 is supported"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty", "Unsupported parameter 'presence_penalty'"),
    ("/v1/completions", {"max_tokens": 10**400}, "max_tokens", "'max_tokens' must be an integer"),
    ("/v1/completions", {"seed": 10**400}, "seed", "'seed' must be an integer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages", "renders these messages to an empty prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs",
     "Unsupported parameter 'logprobs'"),
])
def test_more_bad_requests_get_400s(running, path, body, param, message):
    base = {"model": "add", "prompt": "12+34="} if path == "/v1/completions" else {"model": "add"}
    code, answer = running.post(path, json.dumps(base | body).encode())
    assert code == 400 and message in answer["error"]["message"] and answer["error"]["param"] == param, answer


def test_a_chat_template_that_refuses_the_messages_gets_a_400(loaded):
    model, tokenizer = loaded
    strict = testbed.tokenizer()
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}x"
    server = OpenAIServer(model, tokenizer, tenant_tokenizers={"add": strict})
    with pytest.raises(ApiError, match="The chat template of 'add' refused the messages: no system messages"):
        server.request({"model": "add", "messages": [{"role": "system", "content": "be brief"}]}, chat=True)


def byte_level_tokenizer():
    """A GPT-2-style byte-level tokenizer: a character outside ASCII takes several tokens, and
    decoding only some of them gives a replacement character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {character: index for index, character in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=True)


@pytest.mark.parametrize("answer, stop", [("xa\u3002yz", ("a\u3002",)), ("a b . c", ()), ("\u00e9t\u00e9 !", ("!",))])
def test_streamed_text_is_the_whole_answer_token_by_token(answer, stop):
    """The loop's stream, fed one token at a time, adds up to the engine's whole answer: a
    multi-byte character is held back until complete, then what a stop string could still claim,
    and spaces are never cleaned up after they were sent."""
    from types import SimpleNamespace

    from multimoe.serving.engine import Engine
    from multimoe.serving.metrics import ServingMetrics

    tokenizer = byte_level_tokenizer()
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None), config=None)
    engine = Engine(model, tokenizer, None)
    loop = ServingLoop(engine, max_batch_size=1, metrics=ServingMetrics(["t"]))
    request = Request(0, "t", 0.0, "p", len(ids), stop=stop)
    pieces = []
    loop.jobs = [Job(request, lambda text, reason: pieces.append(text))]
    loop.running = SimpleNamespace(requests=[request], tokens=[[]], finish_reasons=[None], keep=lambda rows, config: None)
    for count in range(1, len(ids) + 1):
        loop.running.tokens[0] = ids[:count]
        loop.running.finish_reasons[0] = engine.finish_reason(request, ids[:count])
        loop.publish()
        if not loop.jobs:
            break
    whole = engine.text(SimpleNamespace(requests=[request], tokens=[ids[:count]]), 0)
    assert "".join(pieces) == whole and "\ufffd" not in "".join(pieces)
    assert whole == (answer[: answer.find(stop[0])] if stop else answer)
