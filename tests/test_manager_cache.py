"""ModelManager placement defaults and its cache: LRU within a memory budget, one load per model, no blocking."""

import threading
import time

import pytest
import torch

from dalle_app.manager import LoadedModel, ModelLoadError, ModelManager
from dalle_app.manager.manager import default_device, default_dtype, parse_dtype, parse_size


def test_placement_defaults(monkeypatch):
    monkeypatch.delenv("DALLE_APP_DEVICE", raising=False)
    monkeypatch.delenv("DALLE_APP_DTYPE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device().type in (expected, "mps")
    assert default_dtype(torch.device("cpu")) == torch.float32
    if torch.cuda.is_available():
        assert default_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
    monkeypatch.setenv("DALLE_APP_DTYPE", "fp16")
    monkeypatch.setenv("DALLE_APP_DEVICE", "cpu")
    manager = ModelManager(memory_budget="1GB")
    assert manager.device == torch.device("cpu") and manager.dtype == torch.float16
    assert ModelManager(dtype="bf16", device="cpu", memory_budget=1).dtype == torch.bfloat16
    assert parse_size("6GB") == 6 * 1024 ** 3 and parse_size("512MB") == 512 * 1024 ** 2 and parse_size("1e3") == 1000
    with pytest.raises(ValueError):
        parse_dtype("int4")


class FakeLoads:
    """Stands in for resolve+build: counts loads, can be held open, makes models of a given size."""

    def __init__(self, nbytes=100, delay=0.0):
        self.calls, self.nbytes, self.delay = [], nbytes, delay
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def __call__(self, reference, *, tokenizer, vae, hparams, device, dtype):
        with self.lock:
            self.calls.append(reference)
        if reference in self.gates:
            assert self.gates[reference].wait(10)
        time.sleep(self.delay)
        if reference == "owner/broken":
            raise ModelLoadError("owner/broken cannot be loaded.")
        module = torch.nn.Linear(2, 2)
        return LoadedModel(dalle=module, vae=module, clip=None, tokenizer=None, config={}, device=device,
                           dtype=dtype, reference=reference, nbytes=self.nbytes)


def _manager(monkeypatch, fake, budget=10_000):
    manager = ModelManager(device="cpu", dtype="fp32", memory_budget=budget)
    monkeypatch.setattr(manager, "_load_uncached", fake)
    return manager


def test_concurrent_requests_load_once(monkeypatch):
    fake = FakeLoads(delay=0.3)
    manager = _manager(monkeypatch, fake)
    results = []
    threads = [threading.Thread(target=lambda: results.append(manager.load("owner/a"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert fake.calls == ["owner/a"] and len(results) == 6 and all(r is results[0] for r in results)
    assert manager.loads == 1


def test_loading_one_model_does_not_block_others(monkeypatch):
    fake = FakeLoads()
    manager = _manager(monkeypatch, fake)
    model_a = manager.load("owner/a")
    fake.gates["owner/slow"] = threading.Event()
    slow = threading.Thread(target=manager.load, args=("owner/slow",))
    slow.start()
    while "owner/slow" not in fake.calls:
        time.sleep(0.01)
    start = time.monotonic()
    assert manager.load("owner/a") is model_a  # cached model served while another one loads
    assert manager.load("owner/c").reference == "owner/c"  # and a third one loads in parallel
    assert time.monotonic() - start < 2
    assert slow.is_alive()
    fake.gates["owner/slow"].set()
    slow.join(10)
    assert manager.loaded() == ["owner/a", "owner/c", "owner/slow"]


def test_lru_eviction_within_budget(monkeypatch):
    fake = FakeLoads(nbytes=100)
    manager = _manager(monkeypatch, fake, budget=250)
    a = manager.load("owner/a")
    manager.load("owner/b")
    manager.load("owner/c")  # 300 bytes > 250: the least recently used (a) goes
    assert manager.loaded() == ["owner/b", "owner/c"]
    manager.load("owner/b")  # b becomes most recent
    manager.load("owner/d")
    assert manager.loaded() == ["owner/b", "owner/d"]
    assert a.dalle.weight.shape == (2, 2)  # a caller still holding an evicted model can keep using it
    manager.load("owner/a")
    assert fake.calls.count("owner/a") == 2
    big = _manager(monkeypatch, FakeLoads(nbytes=1000), budget=250)
    big.load("owner/huge")  # a model larger than the budget is still kept while it is the only one
    assert big.loaded() == ["owner/huge"]


def test_failed_load_is_not_cached_and_can_be_retried(monkeypatch):
    fake = FakeLoads()
    manager = _manager(monkeypatch, fake)
    for _ in range(2):
        with pytest.raises(ModelLoadError):
            manager.load("owner/broken")
    assert fake.calls == ["owner/broken", "owner/broken"] and manager.loaded() == []


def test_same_model_different_placement_is_cached_separately(monkeypatch, tmp_path):
    fake = FakeLoads()
    manager = _manager(monkeypatch, fake)
    assert manager.load("owner/a").dtype == torch.float32
    assert manager.load("owner/a", dtype="bf16").dtype == torch.bfloat16
    assert len(fake.calls) == 2
    manager.unload("owner/a")
    assert manager.loaded() == []
    with pytest.raises(ModelLoadError):  # references are checked before anything else
        manager.load("not a reference")
