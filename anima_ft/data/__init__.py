"""Pre-encoded webdataset shards (``shard_format``, index schema in ``index_schema``), ``anima-ft prepare``
(``prepare``), ``anima-ft verify`` (``verify``), and the streaming target/replay mixer the trainer iterates
(``MixedStream``)."""

from anima_ft.data.mixer import MixedStream
from anima_ft.data.shard_format import FORMAT_VERSION, EncodedSample, ShardWriter, make_fingerprint, read_index
from anima_ft.data.sources import SourceSpec

__all__ = ["FORMAT_VERSION", "EncodedSample", "MixedStream", "ShardWriter", "SourceSpec", "make_fingerprint",
           "read_index"]
