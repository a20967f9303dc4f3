"""Single-file checkpoint reading: round trips, the .ckpt allowlist, refusals and bad-input errors."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leansd.errors import ModelLoadError, UnsafeCheckpointError
from leansd.models import checkpoint
from leansd.models.checkpoint import model_hash, read_state_dict, state_dict_summary

LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=g),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "alphas_cumprod": torch.linspace(0.99, 0.01, 10, dtype=torch.float64),
        "bf16": torch.randn(5, generator=g).bfloat16(),
    }


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key


def _assert_one_line_error(exc_info: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc_info.value)
    assert path.name in message
    assert "\n" not in message
    return message


# --- round trips ----------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path: Path) -> None:
    sd = _tensors()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    _assert_same(read_state_dict(path), sd)
    _assert_same(read_state_dict(str(path)), sd)


def test_ckpt_plain_dict_round_trip(tmp_path: Path) -> None:
    sd = _tensors()
    path = tmp_path / "model.ckpt"
    torch.save(sd, path)
    _assert_same(read_state_dict(path), sd)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_ckpt_state_dict_wrapper_and_extras_dropped(tmp_path: Path, suffix: str) -> None:
    sd = _tensors()
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6, "name": "x", "hparams": {"lr": 1e-4}}, path)
    _assert_same(read_state_dict(path), sd)


def test_ckpt_top_level_non_tensors_dropped(tmp_path: Path) -> None:
    sd = _tensors()
    path = tmp_path / "model.ckpt"
    torch.save({**sd, "global_step": 12, "list": [1, 2]}, path)
    _assert_same(read_state_dict(path), sd)


def test_legacy_non_zip_ckpt_round_trip(tmp_path: Path) -> None:
    sd = _tensors()
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=False)
    _assert_same(read_state_dict(path), sd)


def test_state_dict_summary() -> None:
    sd = _tensors()
    summary = state_dict_summary(sd)
    assert summary["model.diffusion_model.input_blocks.0.0.weight"] == (8, 4, 3, 3)
    assert summary["cond_stage_model.transformer.text_model.embeddings.position_ids"] == (1, 77)
    assert set(summary) == set(sd)


# --- memory: tensors stay file-backed (no second copy in RAM) -------------------------------


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_reading_is_memory_mapped(tmp_path: Path, suffix: str) -> None:
    size_mib = 48
    sd = {f"w{i}": torch.ones(1024, 1024) for i in range(size_mib // 4)}  # 4 MiB each
    path = tmp_path / f"big{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    del sd
    before = _rss_anon_kib()
    loaded = read_state_dict(path)
    module = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.empty(1024, 1024, device="meta")) for k in loaded})
    module.load_state_dict(loaded, assign=True)
    total = sum(float(p.detach().sum()) for p in module.values())  # touch every page
    grown_mib = (_rss_anon_kib() - before) / 1024
    assert total == size_mib * 1024 * 1024 / 4
    assert grown_mib < size_mib / 4, f"anonymous memory grew by {grown_mib:.1f} MiB for a {size_mib} MiB file"


# --- the original SD .ckpt extras: numpy scalars/dtypes and Lightning's ModelCheckpoint class ---


class _LegacyNumpyNamePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes numpy scalars under numpy 1.x's `numpy.core.multiarray` name, as the 2022 files have it."""

    def save_global(self, obj, name=None):  # noqa: ANN001, ANN201
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy 1.x writes that name already
            from numpy.core import multiarray
        if obj is multiarray.scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


_legacy_pickle_module = types.SimpleNamespace(Pickler=_LegacyNumpyNamePickler, __name__="legacy_pickle")


def _save_like_original_sd(path: Path, sd: dict[str, torch.Tensor], *, legacy_numpy_names: bool) -> None:
    """Pickle a Lightning-style checkpoint with a fake pytorch_lightning present only while saving."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE]
    assert not any(n in sys.modules for n in names)
    fake = {n: types.ModuleType(n) for n in names}
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": LIGHTNING_MODULE})
    fake[LIGHTNING_MODULE].ModelCheckpoint = model_checkpoint
    obj = {
        "epoch": 6,
        "global_step": np.int64(470000),
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {
            model_checkpoint: {
                "monitor": None,
                "best_model_score": np.float64(0.1234),
                "current_score": np.float32(1.5),
                "dtypes": [np.dtype("float64"), np.dtype("int64"), np.dtype("float32"), np.dtype("<U3")],
            }
        },
        "state_dict": sd,
    }
    sys.modules.update(fake)
    try:
        if legacy_numpy_names:
            torch.save(obj, path, pickle_module=_legacy_pickle_module)
        else:
            torch.save(obj, path)
    finally:
        for n in names:
            del sys.modules[n]


def _pickled_globals(path: Path) -> set[str]:
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.mark.parametrize("legacy_numpy_names", [False, True])
def test_original_sd_ckpt_extras_load_without_lightning(tmp_path: Path, legacy_numpy_names: bool) -> None:
    sd = _tensors()
    path = tmp_path / "sd-v1-4.ckpt"
    _save_like_original_sd(path, sd, legacy_numpy_names=legacy_numpy_names)
    pickled = _pickled_globals(path)
    assert f"{LIGHTNING_MODULE}.ModelCheckpoint" in pickled
    assert "numpy.dtype" in pickled
    scalar_name = "numpy.core.multiarray.scalar" if legacy_numpy_names else "numpy._core.multiarray.scalar"
    assert scalar_name in pickled

    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses these files
        torch.load(path, weights_only=True)
    # torch registers some safe globals of its own on first use (e.g. NestedTensor when torch.nested
    # is first imported, which depends on what ran before): read once so that happens first.
    read_state_dict(path)
    before = list(torch.serialization.get_safe_globals())

    _assert_same(read_state_dict(path), sd)
    assert "pytorch_lightning" not in sys.modules
    assert LIGHTNING_MODULE not in sys.modules
    assert torch.serialization.get_safe_globals() == before  # the allowlist was scoped to the call


def test_allowlist_names() -> None:
    names = {name for _, name in checkpoint.ckpt_safe_globals()}
    assert f"{LIGHTNING_MODULE}.ModelCheckpoint" in names
    assert {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype"} <= names
    assert {"numpy.dtypes.Float64DType", "numpy.dtypes.Int64DType"} <= names
    assert not any(n.startswith(("os.", "posix.", "builtins.", "subprocess.")) for n in names)


# --- malicious pickles are refused and never run ----------------------------------------------


def _payloads(marker: Path) -> dict[str, tuple]:
    cmd = f"touch {marker}"
    return {
        "os.system": (os.system, (cmd,)),
        "eval": (builtins.eval, (f"__import__('os').system({cmd!r})",)),
        "exec": (builtins.exec, (f"import os; os.system({cmd!r})",)),
        "os.popen": (os.popen, (cmd,)),
    }


@pytest.mark.parametrize("kind", ["os.system", "os.popen", "eval", "exec"])
@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_ckpt_refused(tmp_path: Path, kind: str, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    reduce_value = _payloads(marker)[kind]

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return reduce_value

    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {**_tensors(), "x": Payload()}}, path, _use_new_zipfile_serialization=zip_format
    )
    with pytest.raises(UnsafeCheckpointError) as exc_info:
        read_state_dict(path)
    message = _assert_one_line_error(exc_info, path)
    assert "refuses" in message and ".safetensors" in message
    assert kind in message
    assert not marker.exists()


def test_malicious_ckpt_error_is_a_model_load_error(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(ModelLoadError, match="it references os.system"):
        read_state_dict(path)


# --- bad inputs: one clear line naming the file ------------------------------------------------


def _valid_zip_ckpt_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_tensors(), buf)
    return buf.getvalue()


def _valid_safetensors_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.safetensors"
    save_file(_tensors(), str(path))
    return path.read_bytes()


BAD_INPUTS = {
    "missing": ("missing.safetensors", None, "no such file"),
    "zero_byte_safetensors": ("empty.safetensors", lambda tmp: b"", "empty"),
    "zero_byte_ckpt": ("empty.ckpt", lambda tmp: b"", "empty"),
    "lfs_pointer": (
        "v1-5-pruned.safetensors",
        lambda tmp: b"version https://git-lfs.github.com/spec/v1\noid sha256:"
        + b"a" * 64
        + b"\nsize 4265380512\n",
        "git lfs pull",
    ),
    "lfs_pointer_ckpt": (
        "sd-v1-4.ckpt",
        lambda tmp: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
        "git-LFS pointer",
    ),
    "truncated_safetensors": (
        "half.safetensors",
        lambda tmp: (b := _valid_safetensors_bytes(tmp))[: len(b) // 2],
        "truncated",
    ),
    "safetensors_header_only": ("head.safetensors", lambda tmp: _valid_safetensors_bytes(tmp)[:6], "truncated"),
    "garbage_safetensors": (
        "garbage.safetensors",
        lambda tmp: (64).to_bytes(8, "little") + b"{not json" + b"\0" * 80,
        "corrupt",
    ),
    "random_ckpt": ("random.ckpt", lambda tmp: np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint"),
    "text_ckpt": ("notes.ckpt", lambda tmp: b"hello, this is not a checkpoint\n", "not a PyTorch checkpoint"),
    "truncated_zip_ckpt": (
        "half.ckpt",
        lambda tmp: (b := _valid_zip_ckpt_bytes())[: len(b) // 2],
        "truncated or corrupt",
    ),
    "truncated_legacy_ckpt": (
        "legacy-half.ckpt",
        lambda tmp: (b := _legacy_bytes())[: len(b) // 2],
        "truncated",
    ),
    "unknown_extension": ("model.gguf", lambda tmp: b"GGUF....", "supported: .safetensors, .ckpt"),
    "no_extension": ("model", lambda tmp: b"x", "supported"),
    "no_tensors_ckpt": ("empty-dict.ckpt", lambda tmp: _saved({"global_step": 5, "epoch": 1}), "no tensors"),
    "no_tensors_safetensors": ("empty.safetensors", lambda tmp: _saved_st(tmp, {}), "no tensors"),
    "bare_tensor_ckpt": ("tensor.pt", lambda tmp: _saved(torch.ones(3)), "not a state dict"),
}


def _legacy_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_tensors(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _saved_st(tmp_path: Path, sd: dict[str, torch.Tensor]) -> bytes:
    path = tmp_path / "st-tmp.safetensors"
    save_file(sd, str(path))
    return path.read_bytes()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs(tmp_path: Path, case: str) -> None:
    name, make, expected = BAD_INPUTS[case]
    path = tmp_path / "models" / name
    path.parent.mkdir()
    if make is not None:
        path.write_bytes(make(tmp_path))
    with pytest.raises(ModelLoadError) as exc_info:
        read_state_dict(path)
    assert not isinstance(exc_info.value, UnsafeCheckpointError)
    message = _assert_one_line_error(exc_info, path)
    assert expected in message


def test_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.mkdir()
    with pytest.raises(ModelLoadError) as exc_info:
        read_state_dict(path)
    assert "is a directory" in _assert_one_line_error(exc_info, path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.safetensors"
    save_file(_tensors(), str(path))
    path.chmod(0)
    try:
        with pytest.raises(ModelLoadError) as exc_info:
            read_state_dict(path)
        assert "cannot be read" in _assert_one_line_error(exc_info, path)
    finally:
        path.chmod(0o600)


# --- model hash -------------------------------------------------------------------------------


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = checkpoint._sha256_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(checkpoint, "_sha256_file", counting)
    return calls


def test_model_hash_value_and_cache(tmp_path: Path, hash_calls: list[Path]) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 * (1 << 20) + 123))  # several 1 MiB chunks plus a tail
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    cache = tmp_path / "cache"

    assert model_hash(path, cache_dir=cache) == expected
    assert len(hash_calls) == 1
    assert model_hash(path, cache_dir=cache) == expected
    assert model_hash(str(path), cache_dir=cache) == expected
    assert len(hash_calls) == 1  # served from the cache

    stored = json.loads((cache / "model_hashes.json").read_text())
    entry = stored[str(path.resolve())]
    assert entry["sha256"][:10] == expected and entry["size"] == path.stat().st_size
    assert sorted(p.name for p in cache.iterdir()) == ["model_hashes.json"]  # no temp files left


def test_model_hash_recomputes_when_mtime_changes(tmp_path: Path, hash_calls: list[Path]) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"a" * 1000)
    cache = tmp_path / "cache"
    first = model_hash(path, cache_dir=cache)
    st = path.stat()
    path.write_bytes(b"b" * 1000)  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = model_hash(path, cache_dir=cache)
    assert len(hash_calls) == 2
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()[:10]
    assert second == hashlib.sha256(b"b" * 1000).hexdigest()[:10]


def test_model_hash_ignores_corrupt_cache(tmp_path: Path, hash_calls: list[Path]) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"weights")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model_hashes.json").write_text("{not json")
    assert model_hash(path, cache_dir=cache) == hashlib.sha256(b"weights").hexdigest()[:10]
    assert json.loads((cache / "model_hashes.json").read_text())  # rewritten as valid JSON
    (cache / "model_hashes.json").write_text("[1, 2]")
    assert model_hash(path, cache_dir=cache) == hashlib.sha256(b"weights").hexdigest()[:10]
    assert len(hash_calls) == 2


def test_model_hash_default_cache_dir_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hash_calls: list[Path]
) -> None:
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "leansd-cache"))
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"x")
    model_hash(path)
    assert (tmp_path / "leansd-cache" / "model_hashes.json").is_file()
    monkeypatch.delenv("LEANSD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert checkpoint.user_cache_dir() == tmp_path / "xdg" / "leansd"


def test_model_hash_unwritable_cache_still_hashes(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"x")
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    assert model_hash(path, cache_dir=blocker / "sub") == hashlib.sha256(b"x").hexdigest()[:10]


def test_model_hash_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.safetensors"
    with pytest.raises(ModelLoadError) as exc_info:
        model_hash(path, cache_dir=tmp_path)
    _assert_one_line_error(exc_info, path)
