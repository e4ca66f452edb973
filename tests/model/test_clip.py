"""Zero-shot CLIP through open_clip, with a tiny randomly initialised model saved by the test."""

import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

from _zoo_support import write_tiny_clip
from mtlxray.config import ModelConfig
from mtlxray.errors import CheckpointError, ConfigError
from mtlxray.model import build_model
from mtlxray.model.clip import DEFAULT_PROMPTS

PROMPTS = [["a chest X-ray of a healthy patient"],
           ["a chest X-ray of a patient with pneumonia that is not COVID-19", "non-COVID pneumonia"],
           ["a chest X-ray of a patient with COVID-19"]]


@pytest.fixture
def tiny_clip(tmp_path):
    return write_tiny_clip(tmp_path)


def _cfg(arch, weights, **kw) -> ModelConfig:
    return ModelConfig(name="clip_zeroshot", img_size=64, clip_arch=str(arch), pretrained=str(weights), **kw)


def test_zero_shot_logits_are_scaled_similarities_to_the_mean_prompt_embedding(tiny_clip):
    arch, weights = tiny_clip
    model = build_model(_cfg(arch, weights, prompts=PROMPTS)).eval()
    assert model.tasks == {"cls"} and model.classifier_names() == []
    ref = open_clip.create_model(arch.stem, pretrained=str(weights)).eval()  # open_clip's own loader
    for key, value in ref.state_dict().items():
        assert torch.equal(model.clip.state_dict()[key], value), key
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
        # By hand: resize to 32 px, copy to RGB, CLIP-normalise; average each class's prompts.
        img = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        image = ref.encode_image((img.expand(-1, 3, -1, -1) - mean) / std, normalize=True)
        tok = open_clip.get_tokenizer(arch.stem)
        classes = torch.stack([F.normalize(ref.encode_text(tok(p), normalize=True).sum(0), dim=0) for p in PROMPTS])
        expected = ref.logit_scale.exp() * image @ classes.t()
    assert out["lung"] is None and out["inf"] is None and out["cls"].shape == (2, 3)
    assert torch.allclose(out["cls"], expected, atol=1e-5)
    assert model.clip.logit_scale.item() == pytest.approx(2.0)  # the saved value, not the random init


def test_default_prompts_cover_the_three_classes_and_grads_flow(tiny_clip):
    arch, weights = tiny_clip
    model = build_model(_cfg(arch, weights)).train()
    assert model.prompt_tokens.shape[0] == sum(len(p) for p in DEFAULT_PROMPTS)
    out = model(torch.rand(2, 1, 64, 64))
    out["cls"].logsumexp(1).mean().backward()
    assert torch.isfinite(model.clip.visual.conv1.weight.grad).all()


def test_prompts_must_match_the_class_count(tiny_clip):
    arch, weights = tiny_clip
    with pytest.raises(ConfigError, match="one list of prompts per class"):
        _cfg(arch, weights, prompts=PROMPTS[:2])
    with pytest.raises(ConfigError, match="model.num_classes=4"):
        build_model(_cfg(arch, weights, num_classes=4))


def test_missing_or_mismatched_clip_weights(tiny_clip, tmp_path):
    arch, _ = tiny_clip
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        build_model(_cfg(arch, tmp_path / "absent.safetensors"))
    other = tmp_path / "other.pth"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="does not fit open_clip"):
        build_model(_cfg(arch, other))
    with pytest.raises(ConfigError, match="clip_arch"):
        build_model(_cfg("no-such-arch", other))


def test_class_embeddings_are_kept_in_eval_and_dropped_on_train_or_load(tiny_clip):
    arch, weights = tiny_clip
    model = build_model(_cfg(arch, weights)).eval()
    with torch.no_grad():
        first = model.class_embeddings()
        assert model.class_embeddings() is first
        model.load_state_dict(model.state_dict())
        assert model.class_embeddings() is not first
        model.train()
        assert model._class_cache is None


def test_an_architecture_naming_a_hugging_face_tokenizer_says_transformers_is_missing(tmp_path, monkeypatch):
    import json

    from _zoo_support import TINY_CLIP
    from mtlxray.errors import MtlxError

    arch = tmp_path / "tiny-clip-hf-tokenizer.json"
    arch.write_text(json.dumps({**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"],
                                                          "hf_tokenizer_name": "bert-base-uncased"}}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises, installed or not
    with pytest.raises(MtlxError, match=r"Hugging Face tokenizer 'bert-base-uncased', which needs the "
                                        r"`transformers` package, not installed here \(pip install transformers\)"):
        build_model(ModelConfig(name="clip_zeroshot", img_size=64, clip_arch=str(arch)), pretrained=False)
