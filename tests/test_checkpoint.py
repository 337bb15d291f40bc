"""Checkpoint loading and saving: official ``.pth``, ``.safetensors``, the registry, bad files.

Every failure must be a :class:`segany.CheckpointError` (a ``ValueError``) whose message names
the file, never a bare exception from torch, pickle or safetensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, randomize_, synthetic_image

import segany
from segany import CheckpointError, Predictor, build_model, build_sam, get_model_spec
from segany.build import instantiate
from segany.checkpoint import CONFIG_METADATA_KEY, infer_config, read_state_dict

OFFICIAL = ("vit_b", "vit_l", "vit_h")


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model() -> segany.Sam:
    return randomize_(build_sam(TINY), seed=11).eval()


@pytest.fixture(scope="module")
def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, state) -> dict[str, Path]:
    """The TINY model written in every supported form."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {
        "pth": d / "tiny.pth",
        "st_config": d / "tiny_config.safetensors",
        "st_plain": d / "tiny_plain.safetensors",
    }
    torch.save(state, out["pth"])  # the official format: a bare state dict
    segany.save_safetensors(model, out["st_config"], config=TINY)
    segany.save_safetensors(model, out["st_plain"])  # no config metadata
    return out


@pytest.fixture(scope="module")
def reference_outputs(model):
    return _outputs(model)


def _outputs(model: segany.Sam) -> tuple[np.ndarray, ...]:
    predictor = Predictor(model)
    predictor.set_image(synthetic_image())
    masks, iou, low = predictor.predict(
        point_coords=np.array([[60.0, 40.0], [120.0, 90.0]]), point_labels=np.array([1, 0])
    )
    return predictor.get_image_embedding().numpy(), masks, iou, low


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@contextmanager
def _raises_naming(path: Path, *fragments: str) -> Iterator[pytest.ExceptionInfo]:
    """Expects a CheckpointError whose message contains the path and every fragment."""
    with pytest.raises(CheckpointError) as info:
        yield info
    msg = str(info.value)
    assert str(path) in msg, f"message does not name the file: {msg}"
    for f in fragments:
        assert f in msg, f"{f!r} not in message: {msg}"


# ---------------------------------------------------------------------------------- round trips
def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("kind", ["pth", "st_config", "st_plain"])
def test_round_trip_infers_variant_and_gives_identical_outputs(
    files, kind, state, reference_outputs
):
    loaded = build_model(checkpoint=files[kind])
    assert loaded.config == TINY
    assert not loaded.training
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    torch.testing.assert_close(loaded.pixel_mean.flatten(), torch.tensor(TINY.pixel_mean))
    for a, b in zip(_outputs(loaded), reference_outputs):
        np.testing.assert_array_equal(a, b)


def test_safetensors_metadata_holds_config(files):
    _, meta = read_state_dict(files["st_config"])
    assert segany.SamConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY])) == TINY
    _, meta = read_state_dict(files["st_plain"])
    assert CONFIG_METADATA_KEY not in meta


def test_embedded_config_is_used_instead_of_shapes(tmp_path, model):
    """A config in the metadata wins over inference: a wrong one is reported as a mismatch."""
    path = tmp_path / "lying.safetensors"
    segany.save_safetensors(model, path, config=get_model_spec("vit_b").config)
    with _raises_naming(path, "does not match the model"):
        build_model(checkpoint=path)


def test_invalid_embedded_config(tmp_path, model):
    path = tmp_path / "badmeta.safetensors"
    segany.save_safetensors(model, path, extra_metadata={CONFIG_METADATA_KEY: "{not json"})
    with _raises_naming(path, "invalid embedded config"):
        build_model(checkpoint=path)


def _header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("target", [0x5680, 0x014B50], ids=["starts-0x80", "starts-PK"])
def test_safetensors_whose_length_prefix_looks_like_torch_magic(tmp_path, model, target):
    """Regression: the 8-byte header length may begin with b"\x80" (pickle) or b"PK" (zip);
    such files are still safetensors and their embedded config must be used."""
    path = tmp_path / "magic.safetensors"
    pad = 0
    for _ in range(50):
        segany.save_safetensors(model, path, config=TINY, extra_metadata={"pad": "x" * pad})
        n = _header_length(path)
        if n == target:
            break
        pad += max(1, target - n) if n < target else -max(1, (n - target) // 2)
    assert _header_length(path) == target
    head = path.read_bytes()[:2]
    assert head[:1] == b"\x80" or head == b"PK"
    state, meta = read_state_dict(path)
    assert CONFIG_METADATA_KEY in meta and meta["pad"] == "x" * pad
    assert build_model(checkpoint=path).config == TINY


def test_half_precision_checkpoint_is_cast_to_model_dtype(tmp_path, state):
    path = _save({k: v.half() for k, v in state.items()}, tmp_path / "half.pth")
    loaded = build_model(checkpoint=path)
    for k, v in loaded.state_dict().items():
        if k in state:
            assert v.dtype == state[k].dtype, k
            torch.testing.assert_close(v, state[k].half().float(), atol=0, rtol=0)


def test_wrappers_and_ddp_prefix_load(tmp_path, state, reference_outputs):
    ddp = {f"module.{k}": v for k, v in state.items()}
    for name, obj in {
        "ddp.pth": ddp,
        "model.pth": {"model": state, "epoch": 3, "optimizer": {"lr": 0.1}},
        "state_dict.pth": {"state_dict": state},
        "model_ddp.pth": {"model": ddp},
    }.items():
        loaded = build_model(checkpoint=_save(obj, tmp_path / name))
        assert loaded.config == TINY, name
        for a, b in zip(_outputs(loaded), reference_outputs):
            np.testing.assert_array_equal(a, b)


def test_legacy_torch_format_loads(tmp_path, state):
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    assert build_model(checkpoint=path).config == TINY


def test_device_argument(files):
    loaded = build_model(checkpoint=files["pth"], device="cpu")
    assert loaded.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())


# ---------------------------------------------------------------------------------- registry
def test_list_models_names_official_variants():
    specs = segany.list_models()
    names = [s.name for s in specs]
    assert set(OFFICIAL) <= set(names)
    assert names == sorted(names)
    for n in OFFICIAL:
        spec = get_model_spec(n)
        assert spec.checkpoint_file and spec.checkpoint_file.startswith(f"sam_{n}_")
        assert spec.url and spec.url.endswith(spec.checkpoint_file)
    assert get_model_spec("default").name == "vit_h"


def test_unknown_model_name_lists_known_ones(files):
    with pytest.raises(ValueError, match="vit_b"):
        get_model_spec("vit_x")
    with pytest.raises(ValueError, match="unknown model 'vit_x'"):
        build_model("vit_x", checkpoint=files["pth"])


@pytest.mark.parametrize("name", OFFICIAL)
def test_infer_config_recovers_registered_official_configs(name):
    config = get_model_spec(name).config
    with torch.device("meta"):
        m = build_sam(config)
    assert infer_config(m.state_dict()) == config


@pytest.mark.parametrize("name", OFFICIAL)
def test_registered_configs_match_official_builders(name):
    """Same keys and shapes as ``segment_anything.sam_model_registry[name]`` (on meta)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ours = build_sam(get_model_spec(name).config).state_dict()
        official = sam_model_registry[name]().state_dict()
    assert ours.keys() == official.keys()
    for k, v in official.items():
        assert ours[k].shape == v.shape, k


def test_named_variant_with_wrong_checkpoint_reports_shape_mismatch(files):
    path = files["pth"]
    with _raises_naming(path, "does not match the model", "wrong shape") as info:
        build_model("vit_b", checkpoint=path)
    msg = str(info.value)
    assert "missing keys" in msg  # vit_b has 12 blocks, the file 3
    assert "image_encoder.blocks.0.attn.qkv.weight (file (96, 32), model (2304, 768))" in msg


def test_build_model_without_checkpoint_is_helpful(tmp_path, monkeypatch):
    monkeypatch.setattr(segany.registry, "WEIGHTS_DIR", tmp_path)  # as if not installed
    with pytest.raises(CheckpointError, match="segany-lite.*no bundled weights installed"):
        build_model()
    with pytest.raises(CheckpointError) as info:
        build_model("vit_b")
    msg = str(info.value)
    assert "sam_vit_b_01ec64.pth" in msg and "checkpoint=PATH" in msg
    with pytest.raises(CheckpointError, match="sam_vit_h_4b8939.pth"):
        build_model("default")


def test_bundled_weights_are_the_default(tmp_path, monkeypatch):
    """No name and no checkpoint: the weights file in ``segany/weights`` for segany-lite."""
    from segany.registry import SEGANY_LITE_CONFIG

    lite = randomize_(build_sam(SEGANY_LITE_CONFIG), seed=3).eval()
    spec = get_model_spec("segany-lite")
    segany.save_safetensors(lite, tmp_path / spec.bundled, config=SEGANY_LITE_CONFIG)
    monkeypatch.setattr(segany.registry, "WEIGHTS_DIR", tmp_path)
    for built in (build_model(), build_model("segany-lite")):
        assert built.config == SEGANY_LITE_CONFIG
        for k, v in lite.state_dict().items():
            assert torch.equal(built.state_dict()[k], v), k


def test_unknown_name_is_reported_before_the_file_is_read(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'vit_x'"):
        build_model("vit_x", checkpoint=tmp_path / "does_not_exist.pth")


# ---------------------------------------------------------------------------------- bad files
def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with _raises_naming(path, "not found"):
        build_model(checkpoint=path)


def test_directory_is_not_a_checkpoint(tmp_path):
    with _raises_naming(tmp_path):
        build_model(checkpoint=tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with _raises_naming(path, "empty"):
        build_model(checkpoint=path)


@pytest.mark.parametrize(
    "head",
    [b"", b"PK\x03\x04", b"\x80\x02", b"\x10\x00\x00\x00\x00\x00\x00\x00{"],
    ids=["random", "zip-magic", "pickle-magic", "safetensors-magic"],
)
def test_random_bytes(tmp_path, head):
    """Random content, also behind each header that the format sniffing recognises."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.bin"
    body = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if not head:
        body = b"\x01" + body  # no recognised magic by construction
    path.write_bytes(head + body)
    with _raises_naming(path):
        build_model(checkpoint=path)


def test_text_file(tmp_path):
    path = tmp_path / "readme.pth"
    path.write_text("this is not a checkpoint\n" * 20)
    with _raises_naming(path, "not a PyTorch"):
        build_model(checkpoint=path)


@pytest.mark.parametrize("kind", ["pth", "st_config"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(tmp_path, files, kind, keep):
    data = files[kind].read_bytes()
    path = tmp_path / f"cut{files[kind].suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    with _raises_naming(path):
        build_model(checkpoint=path)


@pytest.mark.parametrize(
    "obj",
    [{"a": 1}, [torch.zeros(2)], {}, torch.zeros(3), {"model": {"x": torch.zeros(1)}, "y": 2}],
    ids=["dict-of-int", "list", "empty-dict", "bare-tensor", "mixed-wrapper"],
)
def test_pth_without_state_dict(tmp_path, obj):
    path = _save(obj, tmp_path / "odd.pth")
    with _raises_naming(path):
        build_model(checkpoint=path)


def test_unrelated_tensors_cannot_be_inferred(tmp_path):
    path = _save({"foo.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with _raises_naming(path, "does not look like a SAM checkpoint"):
        build_model(checkpoint=path)
    st = tmp_path / "other.safetensors"
    segany.save_safetensors({"foo.weight": torch.zeros(2, 2)}, st)
    with _raises_naming(st, "does not look like a SAM checkpoint"):
        build_model(checkpoint=st)


def test_missing_keys_are_listed(tmp_path, state):
    dropped = ["mask_decoder.iou_token.weight", "prompt_encoder.no_mask_embed.weight"]
    path = _save({k: v for k, v in state.items() if k not in dropped}, tmp_path / "m.pth")
    with _raises_naming(path, "2 missing keys", *dropped):
        build_model(checkpoint=path)
    # Also when the variant is given rather than inferred.
    with _raises_naming(path, *dropped):
        instantiate(TINY, read_state_dict(path)[0], str(path))


def test_unexpected_keys_are_listed(tmp_path, state):
    path = _save({**state, "extra.head.weight": torch.zeros(3)}, tmp_path / "u.pth")
    with _raises_naming(path, "1 unexpected keys", "extra.head.weight"):
        build_model(checkpoint=path)


def test_many_missing_keys_are_abbreviated(tmp_path, state):
    kept = {k: v for k, v in state.items() if not k.startswith("mask_decoder.")}
    path = _save(kept, tmp_path / "nodec.pth")
    n = len(state) - len(kept)
    with _raises_naming(path, f"{n} missing keys", f"({n - 8} more)"):
        instantiate(TINY, kept, str(path))


def test_wrong_shapes_are_listed(tmp_path, state):
    key = "mask_decoder.output_upscaling.0.weight"  # not used to infer the variant
    bad = dict(state)
    bad[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    path = _save(bad, tmp_path / "s.pth")
    with _raises_naming(path, "wrong shape", key, str(tuple(bad[key].shape))):
        build_model(checkpoint=path)
    with _raises_naming(path, "wrong shape", key):
        instantiate(TINY, bad, str(path))


class _Payload:
    """Pickles to a call that creates a marker file: loading must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_and_not_executed(tmp_path, state):
    marker = tmp_path / "pwned"
    for name, obj in {
        "payload.pth": {"weights": _Payload(marker)},
        "payload_in_state.pth": {**state, "evil": _Payload(marker)},
    }.items():
        path = _save(obj, tmp_path / name)
        with _raises_naming(path):
            build_model(checkpoint=path)
        assert not marker.exists(), "loading a checkpoint executed pickled code"
    # The payload is live: an unsafe load would have run it (so the check above bites).
    torch.load(tmp_path / "payload.pth", weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------- saving
def test_save_safetensors_is_atomic_on_success(tmp_path, model):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    segany.save_safetensors(model, path, config=TINY)
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
    assert build_model(checkpoint=path).config == TINY


def test_save_safetensors_accepts_state_dict_and_extra_metadata(tmp_path, state):
    path = tmp_path / "sd.safetensors"
    segany.save_safetensors(state, path, extra_metadata={"source": "unit-test"})
    loaded, meta = read_state_dict(path)
    assert meta["source"] == "unit-test"
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_save_safetensors_non_tensor_value_creates_nothing(tmp_path, state):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError, match="step"):
        segany.save_safetensors({**state, "step": 3}, path)  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == []


def test_save_safetensors_failure_keeps_old_file_and_removes_temp(tmp_path, model, monkeypatch):
    """A crash while writing leaves the previous file intact and no temporary file behind."""
    import safetensors.torch

    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"previous content")
    real_save = safetensors.torch.save_file

    def half_written(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        segany.save_safetensors(model, path)
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]
    assert path.read_bytes() == b"previous content"


def test_safetensors_truncated_inside_header(tmp_path, files):
    path = tmp_path / "head.safetensors"
    path.write_bytes(files["st_config"].read_bytes()[:200])
    with _raises_naming(path, "truncated or corrupt"):
        build_model(checkpoint=path)
