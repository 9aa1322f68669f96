"""DALI pipelines fed encoded images from Python, and the decode-only pipeline that
`data prepare` checks files with (the loaders' own decoder).

    decode = FedPipeline(functools.partial(decode_pipeline, batch_size=1, num_threads=1, device_id=None))
    (images,) = decode([jpeg_bytes])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

ENCODED_INPUT = "encoded"  # the input of pipelines fed from Python: encoded images, one uint8 array each


@pipeline_def
def decode_pipeline():
    """Decoding alone, on the CPU, with the decoder the loaders use: `data prepare`'s check."""
    encoded = fn.external_source(name=ENCODED_INPUT, dtype=types.UINT8, ndim=1)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


class FedPipeline:
    """A pipeline fed from Python (`ENCODED_INPUT`) that builds itself anew when a run fails.

    DALI leaves a pipeline that failed unusable ("Current pipeline object is no longer valid"),
    so one image it cannot decode would fail every later call. Such images pass PIL: a JPEG
    whose Huffman-table marker is damaged decodes there (libjpeg skips to the next marker and
    takes its standard tables) and stops DALI's parser.

    Args:
        new_pipeline: returns the pipeline, not yet built (a `pipeline_def` function with its
            arguments bound).
    """

    def __init__(self, new_pipeline: Callable[[], Pipeline]):
        self.new_pipeline = new_pipeline
        self.pipe = self._built()

    def _built(self) -> Pipeline:
        pipe = self.new_pipeline()
        pipe.build()
        return pipe

    def __call__(self, encoded: list[bytes]) -> tuple:
        """The pipeline's outputs for one batch of encoded images."""
        try:
            self.pipe.feed_input(ENCODED_INPUT, [np.frombuffer(b, dtype=np.uint8) for b in encoded])
            return self.pipe.run()
        except Exception:
            self.pipe = self._built()
            raise
