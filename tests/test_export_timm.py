"""``hjepa export --format timm``: timm loads the weights strictly and computes our tokens.

Each architecture is a small random hjepa ViT whose every tensor is perturbed (so a swapped or
dropped tensor changes the output), saved as a run's checkpoint, exported by the CLI and
loaded the way docs/api.md says: ``timm.create_model(**card["create_model"])``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hjepa
from hjepa import checkpoint as ckpt
from hjepa.cli import main
from hjepa.config import Config, ModelConfig, load_config
from hjepa.eval.features import pooled_features
from hjepa.export_timm import (
    MAPPED_OPTIONS,
    ROPE_NAMES,
    UNUSED_OPTIONS,
    VIT_NAMES,
    NotExportable,
    check_exportable,
    timm_arguments,
    timm_state_dict,
)
from hjepa.models.hjepa import build_encoder
from hjepa.models.vit import VisionTransformer
from tests.conftest import TINY
from tests.timm_env import timm

TOLERANCE = 1e-5
# (overrides, timm class): both position embeddings, with and without LayerScale, 1 and 3
# channels, two widths, head counts and MLP ratios.
ARCHITECTURES = {
    "sincos": ([], "VisionTransformer"),
    "sincos_layerscale": (
        [
            "model.layer_scale=0.5",
            "data.channels=3",
            "model.embed_dim=48",
            "model.num_heads=4",
            "model.mlp_ratio=2.5",
            "model.depth=3",
        ],
        "VisionTransformer",
    ),  # fmt: skip
    "rope": (["model.pos_embed=rope"], "Eva"),
    "rope_layerscale": (
        [
            "model.pos_embed=rope",
            "model.layer_scale=0.3",
            "data.channels=3",
            "model.embed_dim=48",
            "model.num_heads=3",
            "model.patch_size=8",
        ],
        "Eva",
    ),  # fmt: skip
}


def _perturbed_encoder(cfg: Config) -> VisionTransformer:
    """A random hjepa ViT with every tensor moved: norms, biases and gains away from 1 and 0,
    weights large enough for attention to be far from uniform."""
    torch.manual_seed(0)
    backbone = build_encoder(cfg.model, cfg.data.image_size, cfg.data.channels).eval()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return backbone


def _random_run(run: Path, overrides: list[str]) -> hjepa.Encoder:
    """A run directory whose checkpoint holds a perturbed random target encoder."""
    cfg = load_config(None, [*TINY, f"run.dir={run}", *overrides])
    backbone = _perturbed_encoder(cfg)
    state = {"target_encoder": backbone.state_dict(), "config": cfg.to_dict(), "step": 7}
    ckpt.atomic_save(state, ckpt.checkpoint_dir(run) / ckpt.LAST)
    return hjepa.load_encoder(run)


def _export(run: Path, out: Path) -> dict:
    assert main(["export", str(run), "--format", "timm", "--out", str(out)]) == 0
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_timm_forward_features_are_our_tokens(arch, tmp_path):
    overrides, timm_class = ARCHITECTURES[arch]
    encoder = _random_run(tmp_path / "run", overrides)
    card = _export(tmp_path / "run", tmp_path / "out" / "enc.safetensors")
    model = timm.create_model(**card["create_model"]).eval()  # strict load from the file
    assert type(model).__name__ == timm_class
    # The same state dict also loads by hand with no missing or unexpected keys.
    spec = {k: v for k, v in card["create_model"].items() if k != "pretrained_cfg_overlay"}
    bare = timm.create_model(**dict(spec, pretrained=False))
    weights = tmp_path / "out" / "enc.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        assert f.metadata()["timm_model_name"] == card["create_model"]["model_name"]
    missing, unexpected = bare.load_state_dict(tensors, strict=False)
    assert missing == [] and unexpected == []

    # A user's path: images in [0, 1], timm's own data config for the normalisation.
    data = timm.data.resolve_data_config({}, model=model)
    size = encoder.image_size
    assert tuple(data["input_size"]) == (encoder.channels, size, size)
    images = torch.rand(5, encoder.channels, size, size, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        ours = encoder.tokens(images)
        theirs = model.forward_features((images - mean) / std)
        pooled = model.forward_head(theirs, pre_logits=True)
    assert theirs.shape == ours.shape == (5, encoder.backbone.grid_size**2, ours.shape[-1])
    assert (theirs - ours).abs().max() < TOLERANCE, arch
    # timm pools by the mean of the tokens; hjepa's features come from those same tokens.
    assert (pooled - ours.mean(1)).abs().max() < TOLERANCE
    levels = pooled_features(theirs, card["grid_size"], card["levels"])
    for level, feats in levels.items():
        assert (feats - encoder.features(images, level)).abs().max() < TOLERANCE, level


def test_presets_get_timm_names_and_vits16_computes_the_same():
    for preset, name in (("imagenet100_vits16", "vit_small_patch16_224"),
                         ("imagenet1k_vitb16", "vit_base_patch16_224")):  # fmt: skip
        assert timm_arguments(load_config(preset, []), 3)[0] == name
    cfg = load_config("imagenet100_vits16", [])
    torch.manual_seed(0)
    ours = build_encoder(cfg.model, 224, 3).eval()
    name, kwargs = timm_arguments(cfg, 3)
    model = timm.create_model(name, **kwargs).eval()
    model.load_state_dict(timm_state_dict(ours))  # strict
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.forward_features(x) - ours(x)).abs().max() < TOLERANCE


@pytest.mark.parametrize("names", [VIT_NAMES, ROPE_NAMES])
def test_named_timm_models_have_the_architecture_they_are_named_for(names):
    for (patch, width, depth, heads, mlp_ratio), name in names.items():
        model = timm.create_model(name, device="meta")  # the name's own arguments only
        block = model.blocks[0]
        assert model.patch_embed.proj.kernel_size == (patch, patch), name
        assert (model.embed_dim, len(model.blocks), block.attn.num_heads) == (width, depth, heads)
        assert block.mlp.fc1.out_features == width * mlp_ratio, name


def test_rope_needs_its_query_key_reordering():
    """Without the channel reordering the RoPE export loads but computes something else."""
    cfg = load_config(None, [*TINY, "model.pos_embed=rope"])
    ours = _perturbed_encoder(cfg)
    name, kwargs = timm_arguments(cfg, 1)
    model = timm.create_model(name, **kwargs).eval()
    tensors = timm_state_dict(ours)
    for key, value in ours.state_dict().items():
        if "attn.qkv" in key:
            tensors[key] = value  # our own channel order
    model.load_state_dict(tensors)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert (model.forward_features(x) - ours(x)).abs().max() > 100 * TOLERANCE


def test_refusals_name_the_option(tmp_path, capsys):
    _random_run(tmp_path / "run", ["model.stem=conv"])
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(tmp_path / "run"), "--format", "timm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "hjepa export: error: cannot export to timm: model.stem=conv (timm's ViT has no "
        "convolutional stem); `hjepa export RUN_DIR` without --format shares it for "
        "hjepa.load_encoder"
    )
    assert not out.exists()
    for stem in ("deepconv", "convpool"):
        with pytest.raises(NotExportable, match=f"model.stem={stem} "):
            check_exportable(ModelConfig(stem=stem))


def test_an_option_it_does_not_know_is_refused(monkeypatch):
    # Every option is classified: a new one must be mapped (or declared unused) to export.
    assert set(vars(ModelConfig())) == set(MAPPED_OPTIONS) | set(UNUSED_OPTIONS), (
        "classify the new model option in src/hjepa/export_timm.py: MAPPED_OPTIONS if the timm "
        "export maps it, UNUSED_OPTIONS if it never reaches the eval-mode target encoder"
    )
    check_exportable(ModelConfig(fpn="add"))
    monkeypatch.setattr("hjepa.export_timm.UNUSED_OPTIONS", ("levels",))  # fpn now unknown
    with pytest.raises(NotExportable, match=r"model\.fpn=add \(an option this exporter does"):
        check_exportable(ModelConfig(fpn="add"))
    check_exportable(ModelConfig())  # at their defaults, unknown options are not in the way


def test_a_weight_timm_has_no_place_for_is_refused():
    cfg = load_config(None, TINY)
    ours = build_encoder(cfg.model, cfg.data.image_size, 1)
    ours.register_buffer("register_tokens", torch.zeros(1, 4, 32))
    with pytest.raises(NotExportable, match="weight register_tokens "):
        timm_state_dict(ours)


def test_out_must_be_safetensors(tmp_path, capsys):
    _random_run(tmp_path / "run", [])
    assert main(["export", str(tmp_path / "run"), "--format", "timm", "--out", "x.pth"]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_default_out_and_the_printed_line_loads(tmp_path, capsys):
    encoder = _random_run(tmp_path / "run", ["model.pos_embed=rope"])
    assert main(["export", str(tmp_path / "run"), "--format", "timm"]) == 0
    printed = capsys.readouterr().out.splitlines()
    weights = tmp_path / "run" / "encoder_timm.safetensors"
    assert (
        printed[0] == f"wrote {weights} and {weights.with_suffix('.json')}; load it in timm with:"
    )
    model = eval(printed[1].strip(), {"timm": timm}).eval()  # the line a user pastes
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert (
            model.forward_features(encoder.normalize(x)) - encoder.tokens(x)
        ).abs().max() < TOLERANCE
