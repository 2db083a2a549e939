"""WebDataset shards (DESIGN §4): write with `write_shards`, read with `ShardStream`.

The code lives in shard_writer.py, shard_reader.py (+ shard_plan.py for order/splitting,
shard_decode.py for untrusted bytes, shard_loader.py for DataLoader workers, shard_schema.py for
sample validation); this module is the public entry point.
"""

from vlpost.data.shard_decode import DEFAULT_MAX_IMAGE_PIXELS, read_index, verify_shards
from vlpost.data.shard_loader import StatefulLoader
from vlpost.data.shard_reader import ShardStream
from vlpost.data.shard_schema import SampleError, check_sample
from vlpost.data.shard_writer import INDEX_FILE, write_shards

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "INDEX_FILE",
    "SampleError",
    "ShardStream",
    "StatefulLoader",
    "check_sample",
    "read_index",
    "verify_shards",
    "write_shards",
]
