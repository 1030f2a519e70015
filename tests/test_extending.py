"""docs/extending.md: its worked example, run exactly as the page shows it."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from jaxdeblur import blur, flow, metrics

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "docs/extending.md should hold one python block, the example"
    return blocks[0]


def test_the_example_is_under_60_lines():
    assert len(_example().splitlines()) < 60


def test_the_example_recovers_a_motion_blur():
    if not flow.PRETRAINED_WEIGHTS.exists():
        pytest.skip(f"the shipped flow prior {flow.PRETRAINED_WEIGHTS} is absent")
    namespace = {}
    exec(compile(_example(), str(DOC), "exec"), namespace)  # noqa: S102 - our own doc
    sharp = skimage.transform.resize(skimage.data.camera()[100:356, 150:406], (64, 64),
                                     anti_aliasing=True).astype(np.float32)[..., None]
    size = 19
    truth = np.zeros((size, size), np.float32)
    truth[size // 2, size // 2 - 4:size // 2 + 5] = 1.0 / 9.0  # a 9-px horizontal line
    blurry = blur.conv(jnp.asarray(sharp), jnp.asarray(truth), boundary="circular")
    blurry = blurry + 0.01 * jax.random.normal(jax.random.key(0), blurry.shape)

    restored, kernel = namespace["flow_map_deblur"](blurry)

    assert restored.shape == sharp.shape and kernel.shape == (size, size)
    np.testing.assert_allclose(float(jnp.sum(kernel)), 1.0, rtol=1e-5)
    # From the prior's mode (z = 0) to the line.
    assert metrics.kernel_cosine_similarity(kernel, truth) > 0.9
    # A blind estimate is defined up to a shift (the flow's kernels need not be centred):
    # PSNR at the best integer shift within 3 px, the protocol of SPEC.md §5.
    def aligned(x):
        return float(metrics.shift_searched_psnr(jnp.clip(x, 0, 1), jnp.asarray(sharp),
                                                 crop=3, max_shift=3, step=1.0))

    gain = aligned(restored) - aligned(blurry)
    assert gain > 1.5, f"PSNR gain {gain:.2f} dB"
