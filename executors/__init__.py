"""Jina Executors over the cliptuner core: CLIPTuner (/train), CLIPEncoder (/encode), CLIPIndexer (/index, /search),
behind CLIPGateway (API keys and roles at the door).

This package is the ``py_modules`` entry of ``config.yml`` and ``flows/flow.yml``; the doc types are in
:mod:`executors.schemas`.
"""

from .encoder import CLIPEncoder
from .gateway import CLIPGateway
from .indexer import CLIPIndexer
from .schemas import ClipDoc, MatchDoc
from .shards import ShardMerger
from .tuner import CLIPTuner

__all__ = ["CLIPGateway", "CLIPTuner", "CLIPEncoder", "CLIPIndexer", "ShardMerger", "ClipDoc", "MatchDoc"]
