"""Flax NNX modules: parameters (with logical axis names) around the ``zoo.attention`` transforms."""

from zoo.nn.attention import MultiHeadAttention as MultiHeadAttention
from zoo.nn.attention import attention_mixer as attention_mixer
from zoo.nn.attention import build_mixer as build_mixer
from zoo.nn.attention import get_mixer as get_mixer
from zoo.nn.attention import mixer_names as mixer_names
from zoo.nn.attention import register_mixer as register_mixer
from zoo.nn.attention import resolve_transform as resolve_transform
from zoo.nn.layers import AXES as AXES
from zoo.nn.layers import MLP as MLP
from zoo.nn.layers import Embed as Embed
from zoo.nn.layers import RMSNorm as RMSNorm
from zoo.nn.layers import ShortConv as ShortConv
from zoo.nn.layers import apply_rope as apply_rope
from zoo.nn.layers import axes as axes
from zoo.nn.layers import rope_frequencies as rope_frequencies
