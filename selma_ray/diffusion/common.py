"""Diffusion pieces every stage shares: PNG encoding, and encoded images to model pixels
(resize, crop, optional flip)."""

from __future__ import annotations

import io


def png_bytes(array) -> bytes:
    """PNG-encode an HxWx3 float image in [0, 1]."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def resize_crop(img, size: int, crop: str = "center", rng=None):
    """Resize a PIL image so its shorter side is ``size``, then crop a ``size`` square;
    returns the crop and its (top, left) in the resized image (SDXL's crop coordinates)."""
    import numpy as np
    from PIL import Image

    img = img.convert("RGB")
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng()
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size)), (top, left)


def prepare_images(pngs, size: int, crop: str = "center", flip: bool = False, rng=None):
    """Encoded images -> (float32 pixels (N, 3, size, size) in [-1, 1], original (h, w) and
    crop (top, left) per image, both int64 (N, 2)); each image flipped horizontally with
    probability 0.5 when ``flip``."""
    import numpy as np
    from PIL import Image

    rng = rng if rng is not None else np.random.default_rng()
    pixels, sizes, crops = [], [], []
    for data in pngs:
        with Image.open(io.BytesIO(data)) as src:
            sizes.append((src.height, src.width))
            img, box = resize_crop(src, size, crop, rng)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        if flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        pixels.append(arr.transpose(2, 0, 1))
        crops.append(box)
    return (
        np.ascontiguousarray(np.stack(pixels)),
        np.asarray(sizes, dtype=np.int64),
        np.asarray(crops, dtype=np.int64),
    )


def pixel_array(pngs, size: int, crop: str = "center", flip: bool = False, rng=None):
    """Encoded images -> float32 array (N, 3, size, size) in [-1, 1]."""
    return prepare_images(pngs, size, crop, flip, rng)[0]


def decode_images(pngs, size: int):
    """Encoded images -> float tensor (N, 3, size, size) in [-1, 1], centre-cropped."""
    import torch

    return torch.from_numpy(pixel_array(pngs, size))
