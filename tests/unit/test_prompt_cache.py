"""The on-disk prompt-embedding cache: round trips, keys, fingerprints, LRU bound, corruption, concurrency."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time

import pytest
import torch

from leansd.prompts import cache as cache_module
from leansd.prompts.cache import (
    CACHE_SUBDIR,
    PromptCache,
    entry_key,
    fingerprint_tensors,
    text_encoder_fingerprint,
)
from leansd.prompts.encode import TokenChunks

D = 8


def _chunks(*ids: int, weight: float = 1.0) -> TokenChunks:
    row = (49406, *ids, 49407) + (49407,) * (75 - len(ids))
    mult = (1.0, *([weight] * len(ids)), 1.0) + (1.0,) * (75 - len(ids))
    return TokenChunks((row,), (mult,))


def _key(n: int) -> str:
    return entry_key("f" * 64, _chunks(n))


def _embedding(seed: int, chunks: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, 77 * chunks, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------ keys and fingerprints


def test_entry_key_depends_on_encoder_ids_and_multipliers():
    base = entry_key("a" * 64, _chunks(1, 2))
    assert base == entry_key("a" * 64, _chunks(1, 2))
    assert len(base) == 64 and int(base, 16) >= 0
    assert entry_key("b" * 64, _chunks(1, 2)) != base
    assert entry_key("a" * 64, _chunks(2, 1)) != base
    assert entry_key("a" * 64, _chunks(1, 2, weight=1.1)) != base
    assert entry_key("a" * 64, _chunks(1, 2, weight=1.1 + 1e-15)) != entry_key("a" * 64, _chunks(1, 2, weight=1.1))


def test_fingerprint_depends_on_weights_dtype_and_names():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert text_encoder_fingerprint(a) == text_encoder_fingerprint(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    c = torch.nn.Linear(4, 3)
    c.load_state_dict(a.state_dict())
    assert text_encoder_fingerprint(c) == text_encoder_fingerprint(a)
    assert fingerprint_tensors(b.state_dict()) != text_encoder_fingerprint(a)
    assert fingerprint_tensors({k: v.half() for k, v in a.state_dict().items()}) != text_encoder_fingerprint(a)
    assert fingerprint_tensors({"x." + k: v for k, v in a.state_dict().items()}) != text_encoder_fingerprint(a)
    assert fingerprint_tensors({k: v.bfloat16() for k, v in a.state_dict().items()})  # any dtype hashes


class _CountingLinear(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)
        self.state_dict_calls = 0

    def state_dict(self, *args, **kwargs):
        self.state_dict_calls += 1
        return super().state_dict(*args, **kwargs)


def test_fingerprint_is_memoised_per_module_and_released_with_it():
    module = _CountingLinear()
    first = text_encoder_fingerprint(module)
    assert text_encoder_fingerprint(module) == first
    assert module.state_dict_calls == 1
    assert module in cache_module._FINGERPRINTS
    count = len(cache_module._FINGERPRINTS)
    del module
    gc.collect()
    assert len(cache_module._FINGERPRINTS) == count - 1


# ------------------------------------------------------------------ get / put


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    cache = PromptCache(tmp_path)
    key = _key(1)
    assert cache.get(key) is None
    value = _embedding(0, chunks=2, dtype=dtype)
    assert cache.put(key, value, text="a cat")
    got = cache.get(key)
    assert got.dtype == dtype and torch.equal(got, value)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.written) == (1, 1, 1)
    assert [p.name for p, _, _ in cache.entries()] == [key + ".safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_default_directory_follows_leansd_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "c"))
    assert PromptCache().directory == tmp_path / "c" / CACHE_SUBDIR


def test_bad_key_and_bound_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a prompt cache key"):
        PromptCache(tmp_path).get("../../etc/passwd")
    with pytest.raises(ValueError, match="max_bytes"):
        PromptCache(tmp_path, max_bytes=-1)


def test_zero_bound_stores_nothing(tmp_path):
    cache = PromptCache(tmp_path, max_bytes=0)
    assert not cache.put(_key(1), _embedding(0))
    assert cache.get(_key(1)) is None


def test_unwritable_folder_is_not_an_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    cache = PromptCache(target / "sub")
    assert not cache.put(_key(1), _embedding(0))
    assert cache.get(_key(1)) is None


# ------------------------------------------------------------------ corrupt entries


def _corruptions(data: bytes) -> dict[str, bytes]:
    header_len = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a bit error in the tensor data
    return {
        "empty": b"",
        "garbage": b"\x00\x01 not safetensors at all" * 10,
        "truncated": data[: len(data) // 2],
        "header only": data[: 8 + header_len],
        "bad header": data[:8] + b"x" + data[9:],
        "flipped data": bytes(flipped),
    }


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "header only", "bad header", "flipped data"])
def test_corrupt_entry_is_ignored_and_rewritten(tmp_path, kind, caplog):
    cache = PromptCache(tmp_path)
    key = _key(2)
    value = _embedding(1)
    cache.put(key, value)
    path = cache.path_for(key)
    path.write_bytes(_corruptions(path.read_bytes())[kind])
    assert cache.get(key) is None
    assert cache.stats.corrupt == 1
    assert "corrupt" in caplog.text
    cache.put(key, value)
    assert torch.equal(cache.get(key), value)


def test_entry_under_another_key_is_rejected(tmp_path):
    cache = PromptCache(tmp_path)
    cache.put(_key(1), _embedding(0))
    cache.path_for(_key(2)).write_bytes(cache.path_for(_key(1)).read_bytes())
    assert cache.get(_key(2)) is None and cache.stats.corrupt == 1


# ------------------------------------------------------------------ LRU bound


def test_lru_eviction_respects_the_bound(tmp_path):
    probe = PromptCache(tmp_path / "probe")
    probe.put(_key(0), _embedding(0))
    size = probe.total_bytes()

    cache = PromptCache(tmp_path / "c", max_bytes=3 * size + size // 2)  # room for 3 entries
    now = time.time()
    for i in range(3):
        cache.put(_key(i), _embedding(i))
        os.utime(cache.path_for(_key(i)), (now - 100 + i, now - 100 + i))  # 0 oldest, 2 newest
    assert cache.get(_key(0)) is not None  # a hit makes 0 the most recently used
    cache.put(_key(3), _embedding(3))
    assert cache.total_bytes() <= cache.max_bytes
    assert {p.name[:64] for p, _, _ in cache.entries()} == {_key(0), _key(2), _key(3)}
    assert cache.stats.evicted == 1
    for i in range(4, 10):
        cache.put(_key(i), _embedding(i))
        assert cache.total_bytes() <= cache.max_bytes
    assert cache.get(_key(9)) is not None


def test_entry_bigger_than_the_bound_is_not_stored(tmp_path):
    cache = PromptCache(tmp_path, max_bytes=1000)
    assert not cache.put(_key(1), _embedding(0, chunks=3))
    assert cache.entries() == []


def test_stale_temporary_files_are_removed(tmp_path):
    cache = PromptCache(tmp_path)
    cache.put(_key(1), _embedding(0))
    old, fresh = tmp_path / ".abc-old.tmp", tmp_path / ".abc-new.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    cache.evict()
    assert not old.exists() and fresh.exists()


# ------------------------------------------------------------------ two processes, one key


def _writer(directory: str, key: str, seed: int, barrier, rounds: int) -> None:
    cache = PromptCache(directory)
    mine = _embedding(seed)
    others = {_embedding(s).numpy().tobytes() for s in (100, 101)}
    barrier.wait()
    for _ in range(rounds):
        cache.put(key, mine)
        got = cache.get(key)
        if got is None or got.numpy().tobytes() not in others:
            raise SystemExit(3)
    if cache.stats.corrupt:
        raise SystemExit(4)


def test_two_processes_writing_the_same_key(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    key = _key(7)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), key, 100 + i, barrier, 40)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = PromptCache(tmp_path).get(key)
    assert any(torch.equal(got, _embedding(s)) for s in (100, 101))
    assert sorted(os.listdir(tmp_path)) == [key + ".safetensors"]


def _run_with_timeout(fn, seconds: float):
    """Run fn in a daemon thread; fail the test (rather than hang the suite) if it blocks."""
    import threading

    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the prompt cache blocked"
    return out["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_fifo_entry_is_skipped_without_blocking(tmp_path, caplog):
    cache = PromptCache(tmp_path, max_bytes=10 * 2**20)
    key = _key(1)
    os.mkfifo(cache.path_for(key))  # a plain open() of a FIFO waits for a writer forever
    assert _run_with_timeout(lambda: cache.get(key), 10) is None
    assert cache.stats.misses == 1 and "not a regular file" in caplog.text
    assert cache.entries() == []  # never counted, never evicted as an entry
    assert _run_with_timeout(lambda: cache.put(key, _embedding(1)), 10)
    assert torch.equal(cache.get(key), _embedding(1))  # the FIFO was replaced by a real entry


def test_symlinked_entry_is_not_followed(tmp_path, caplog):
    cache = PromptCache(tmp_path / "cache", max_bytes=10 * 2**20)
    other = PromptCache(tmp_path / "elsewhere", max_bytes=10 * 2**20)
    key = _key(2)
    other.put(key, _embedding(2))
    cache.directory.mkdir()
    cache.path_for(key).symlink_to(other.path_for(key))
    assert cache.get(key) is None and cache.stats.misses == 1
    assert cache.entries() == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_pipeline_with_a_fifo_in_the_cache_does_not_block(tmp_path):
    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest
    from tests.helpers import tiny_bundle

    cache = PromptCache(tmp_path, max_bytes=10 * 2**20)
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=cache)
    request = GenerationRequest(prompt="a fox", num_inference_steps=2, width=64, height=64, seed=3)
    first = _run_with_timeout(lambda: engine.generate(request, progress_bar=False), 60)
    entries = [path for path, _, _ in cache.entries()]
    assert entries
    for path in entries:  # every entry becomes a FIFO
        path.unlink()
        os.mkfifo(path)
    second = _run_with_timeout(lambda: engine.generate(request, progress_bar=False), 60)
    assert (first.pixels == second.pixels).all()
