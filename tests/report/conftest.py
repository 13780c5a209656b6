"""Fixtures for the web app and report tests: a random model of shapes-llava's shape (the trained
zoo model is not needed to test the plumbing), and image files made on the fly."""

import io

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vlm():
    import vlmscope as vs
    from vlmscope.data import build_processor
    from vlmscope.zoo import shapes_llava

    return vs.load(shapes_llava.build_model(seed=0).eval(), build_processor())


def _image_file(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    from PIL import Image

    im = Image.fromarray(array)
    if mode is not None:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _scene(seed: int) -> np.ndarray:
    from vlmscope.data import render, sample_scene

    return render(sample_scene(np.random.default_rng(seed)))


@pytest.fixture(scope="session")
def image_file():
    """image_file(array, mode=None, fmt="PNG") -> the bytes of that image saved as a file."""
    return _image_file


@pytest.fixture(scope="session")
def scene():
    """scene(seed) -> the rendered shapes-world scene of a seed, uint8 (72, 72, 3)."""
    return _scene
