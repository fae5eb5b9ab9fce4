"""OpenAI's CLIP weights were trained with QuickGELU, and open_clip builds `RN50` and `ViT-B-16`
with GELU: every way of pointing at OpenAI's weights builds QuickGELU towers, and the weights load
into them. Files are written here with random values, in both of OpenAI's forms."""

import json
from pathlib import Path

import pytest
import torch

import ecvl_fast

from ecvl_fast.config import ModelCfg
from ecvl_fast.method.model import _open_clip, activation, activation_line, build_clip, quick_gelu_of


def towers(model) -> tuple[bool, bool]:
    """(QuickGELU in the image tower or none of its kind, QuickGELU in the text tower); a ResNet image
    tower runs ReLU, so there only the text tower tells."""
    gelu = lambda m: any(isinstance(x, torch.nn.GELU) for x in m.modules())  # noqa: E731
    visual = quick_gelu_of(model.visual) or not (gelu(model.visual) or quick_gelu_of(model.visual))
    return visual and not gelu(model.visual), quick_gelu_of(model.transformer) and not gelu(model.transformer)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.fixture(scope="module")
def source():
    """A random tiny CLIP (GELU, as its config says), the stand-in for a weights file's origin."""
    oc = _open_clip()
    torch.manual_seed(0)
    return oc.create_model("ecvl-tiny-vit").eval(), oc.get_tokenizer("ecvl-tiny-vit")


def test_openai_torchscript_archive_builds_quickgelu_and_loads(source, tmp_path):
    """OpenAI's own files are TorchScript archives (what `clip.load` downloads): QuickGELU whatever
    the model's name says; open_clip's weights_only reader refuses them, ours reads their tensors."""
    model, tokenizer = source
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), tokenizer(["a cat"])), check_trace=False).save(str(path))
    cfg = ModelCfg(name="ecvl-tiny-vit", pretrained=str(path))
    assert activation(cfg)[0] and "TorchScript" in activation_line(cfg)
    built, _ = build_clip(cfg, res=32)
    assert towers(built) == (True, True) and same_weights(built, model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the activation changes what the same weights compute
        assert not torch.allclose(built.eval().encode_image(x), model.encode_image(x))


def test_a_state_dict_is_built_as_its_model_name_says(source, tmp_path):
    """A plain state dict cannot say which activation it was trained with: the name decides, and the
    run says so. A `-quickgelu` config (as open_clip's RN50-quickgelu) builds QuickGELU."""
    model, _ = source
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    plain = ModelCfg(name="ecvl-tiny-vit", pretrained=str(path))
    assert not activation(plain)[0] and "the model name decides" in activation_line(plain)
    built, _ = build_clip(plain, res=32)
    assert not quick_gelu_of(built) and same_weights(built, model)
    oc = _open_clip()
    config = json.loads((Path(ecvl_fast.__file__).parent / "model_configs" / "ecvl-tiny-vit.json").read_text())
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "ecvl-test-tiny-quickgelu.json").write_text(json.dumps({**config, "quick_gelu": True}))
    oc.add_model_config(tmp_path / "cfg")
    quick = ModelCfg(name="ecvl-test-tiny-quickgelu", pretrained=str(path))
    built, _ = build_clip(quick, res=32)
    assert towers(built) == (True, True) and same_weights(built, model)
    assert "own config" in activation_line(quick)


def test_openai_tag_builds_quickgelu_with_or_without_its_weights():
    """open_clip's pretrained table says which tags need QuickGELU; the architecture is decided from
    the config alone, so a resumed run (no weights loaded) is rebuilt as it was trained."""
    assert activation(ModelCfg(name="ViT-B-16", pretrained="openai"))[0]
    assert not activation(ModelCfg(name="ViT-B-16", pretrained="laion2b_s34b_b88k"))[0]
    assert not activation(ModelCfg(name="RN50"))[0]
    built, _ = build_clip(ModelCfg(name="RN50", pretrained="openai"), load_weights=False)
    assert towers(built) == (True, True)
    for preset in ("cifar100-lt", "imagenet-lt", "places-lt", "lift-imagenet-lt", "lift-places-lt", "lift-cifar100-lt"):
        from ecvl_fast.config import load_config
        from ecvl_fast.experiments.presets import resolve

        cfg = load_config(resolve(preset), ["model.pretrained=/elsewhere/local-copy.pt"])  # a state dict copy
        assert activation(cfg.model)[0], preset


def test_text_features_skip_the_padding_and_match_open_clips(source):
    """The text tower run on the prompts' used length gives open_clip's features (causal mask,
    end-of-text pooling): the padding after the longest prompt changes nothing."""
    from ecvl_fast.method.model import encode_text, used_length

    model, tokenizer = source
    tokens = tokenizer(["a photo of a cat.", "a photo of a very long tailed bird, far away.", "x"])
    assert used_length(tokens) < tokens.shape[1]
    with torch.no_grad():
        full, short = model.encode_text(tokens), encode_text(model, tokens)
        subset = encode_text(model, tokens[[0, 2]], used_length(tokens))  # a subset, at the whole set's length
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subset, full[[0, 2]], rtol=1e-5, atol=1e-5)
