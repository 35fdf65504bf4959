"""Modules: Parameter and Module, the layers, and the Vision Transformer."""
from minivit.nn.layers import GELU, Dropout, LayerNorm, Linear, RandomSource
from minivit.nn.module import Module, Parameter
from minivit.nn.vit import (PRESETS, EncoderBlock, MLP, MultiHeadSelfAttention, PatchEmbedding,
                            ViTConfig, VisionTransformer, count_parameters, preset,
                            sincos_2d_position_embedding)
