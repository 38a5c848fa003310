"""A tiny random LLaMA directory and a real uvicorn server on 127.0.0.1 for the server tests."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")  # not on a GPU host with only the engine's packages: see conftest

from tests.conftest import save_tiny_llama
from vramlite.engine import Engine
from vramlite.server.engine_loop import EngineLoop
from vramlite.server.runtime import engine_loader, make_engine_loop
from vramlite.server.serve import DrainingServer, build_server
from vramlite.server.settings import Settings

CONTEXT = 128


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, spm_tokenizer_dir: Path) -> Path:
    """A 2-layer random LLaMA with the 512-piece test tokenizer, in HF format."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), spm_tokenizer_dir)


@pytest.fixture(scope="session")
def chat_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny LLaMA with a chat template in tokenizer_config.json."""
    out = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama_dir, out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = (  # tools and tool calls as JSON, where a request has them; a variable of its own
        "{{ bos_token }}{% if tools %}[tools] {{ tools | tojson }}{{ eos_token }}{% endif %}"
        "{% if hint %}[hint] {{ hint }}{{ eos_token }}{% endif %}"
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config_file.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def long_chat_llama_dir(tmp_path_factory: pytest.TempPathFactory, chat_llama_dir: Path) -> Path:
    """The chat LLaMA (its template renders tools as JSON) with room for tools in its context (1024)."""
    out = tmp_path_factory.mktemp("long-chat-llama") / "model"
    shutil.copytree(chat_llama_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return out


@pytest.fixture(scope="module")
def long_chat_server(long_chat_llama_dir: Path) -> Iterator[Running]:
    """A server of the long chat LLaMA (context 1024), for conversations with tools."""
    with running_server(long_chat_llama_dir, context=1024) as running:
        yield running


@dataclass
class Running:
    """A started server: its base URL, the uvicorn server and the engine loop behind it."""

    url: str
    server: DrainingServer
    loop: EngineLoop
    thread: threading.Thread

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/health").status_code == 200:
                return
            if self.loop.fault:
                raise RuntimeError(self.loop.fault)
            time.sleep(0.02)
        raise TimeoutError("the server did not become ready")

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one sample on /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        headers = {"Authorization": f"Bearer {self.server.config.app.state.runtime.settings.api_key}"}
        text = httpx.get(self.url + "/metrics", headers=headers).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


def slowed(load: Callable[[], Engine], step_delay: float) -> Callable[[], Engine]:
    """A loader whose engine sleeps before every step, so tests can catch requests mid-flight."""

    def load_slow() -> Engine:
        engine = load()
        step = engine.step

        def slow_step():
            time.sleep(step_delay)
            return step()

        engine.step = slow_step
        return engine

    return load_slow


@contextlib.contextmanager
def running_server(model_dir: Path, load: Callable[[Settings], Callable[[], Engine]] | None = None,
                   wait: bool = True, **overrides) -> Iterator[Running]:
    """uvicorn on a free 127.0.0.1 port in a background thread; `load(settings)` replaces the model loader."""
    settings = Settings(**{"model": str(model_dir), "device": "cpu", "context": CONTEXT, "max_batch_size": 4,
                           "max_queue": 8, "log_level": "WARNING", **overrides})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    engine_loop = make_engine_loop(settings, load(settings) if load else None)
    server = build_server(settings, engine_loop)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    running = Running(f"http://127.0.0.1:{sock.getsockname()[1]}", server, engine_loop, thread)
    try:
        if wait:
            running.wait_ready()
        yield running
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def slow_loader(step_delay: float) -> Callable[[Settings], Callable[[], Engine]]:
    return lambda settings: slowed(engine_loader(settings), step_delay)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[Running]:
    """A shared server: batch 4, queue 8, context 128, no API key."""
    with running_server(tiny_llama_dir) as running:
        yield running


@pytest.fixture
def client(server: Running) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
