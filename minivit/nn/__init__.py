"""Modules: Parameter and Module, the layers, the Vision Transformer and the hybrid's
ResNet stem."""
from minivit.nn.layers import GELU, Dropout, LayerNorm, Linear, PatchDropout, RandomSource
from minivit.nn.module import Module, Parameter
from minivit.nn.resnet import BottleneckUnit, GroupNorm, ResNetStage, ResNetStem, StdConv
from minivit.nn.vit import (PRESETS, EncoderBlock, MLP, MultiHeadSelfAttention, PatchEmbedding,
                            ViTConfig, VisionTransformer, count_parameters, preset,
                            sincos_2d_position_embedding)
