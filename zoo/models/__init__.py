"""Models assembled from ``zoo.nn`` blocks: decoder LM (per-layer mixer pattern), encoder classifier."""

from zoo.models.aaren import AarenStack as AarenStack
from zoo.models.classifier import EncoderClassifier as EncoderClassifier
from zoo.models.lm import Block as Block
from zoo.models.lm import DecoderLM as DecoderLM
from zoo.models.lm import LMState as LMState
from zoo.models.lm import generate as generate
from zoo.models.lm import param_count as param_count
from zoo.models.positional import PositionalTransformer as PositionalTransformer
from zoo.models.titans import TitansLM as TitansLM
