"""Shared helpers of the model tests."""

from mtlxray.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A 32×32 Swin-UNet, window 4, two blocks per stage (stage 1 has a shifted block), narrow decoders."""
    fields = dict(img_size=32, window_size=4, embed_dim=12, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], ppm_channels=8,
                  decoder_channels=[32, 16, 16, 8], cross_attn_heads=[4, 2, 2, 1], head_channels=8,
                  cls_channels=8, drop_path_rate=0.1)
    fields.update(overrides)
    return ModelConfig(**fields)
