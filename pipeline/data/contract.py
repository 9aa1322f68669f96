"""A trained model's preprocessing contract: what an encoded image goes through before the
network, as validation ran it (`pipeline.data.loader.eval_transform`). The registry stores it with
every version (tag `preprocessing`, and the mean image as an artifact where there is one), so that
every runtime that serves the version applies the same transform.

    contract(job.data)
    # {"resize_shorter_px": 256, "crop_px": 224, "normalize": "channel", "mean": [...], "std": [...]}
    # {"resize_shorter_px": 32, "crop_px": 32, "normalize": "pixel_mean", "mean_image": "mean_image.npy",
    #  "scale": 255.0}: (pixels - mean image) / 255, the mean image H x W x 3 on the 0..255 scale
"""

from __future__ import annotations

from pipeline.config import Data

MEAN_IMAGE = "mean_image.npy"  # the artifact of a pixel_mean model: the training images' mean


def contract(data: Data) -> dict:
    """The evaluation transform of `data`, as plain values: RGB, the shorter side resized
    (bilinear, antialiased) to `resize_shorter_px`, a center crop of `crop_px`, then the
    normalisation; the tensor is N x 3 x crop x crop float32."""
    common = {"color": "RGB", "layout": "NCHW", "resize_shorter_px": data.val_resize_px,
              "crop_px": data.val_crop_px}  # fmt: skip
    if data.normalize == "pixel_mean":
        return common | {"normalize": "pixel_mean", "mean_image": MEAN_IMAGE, "scale": 255.0}
    return common | {"normalize": "channel", "mean": list(data.mean), "std": list(data.std), "scale": 255.0}
