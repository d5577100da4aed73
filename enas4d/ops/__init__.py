"""Elastic ops: each small class owns one weight-slicing rule; the arch is always an argument."""

from .bn import DynamicBatchNorm2d
from .common import ACTIVATIONS, activation, make_divisible
from .conv import DynamicConv2d
from .kernel import ElasticDepthwiseConv2d
from .se import DynamicSE

__all__ = ["ACTIVATIONS", "DynamicBatchNorm2d", "DynamicConv2d", "DynamicSE", "ElasticDepthwiseConv2d", "activation",
           "make_divisible"]
