"""The codec wrapper: tiny random X-Codec, equal-length batching, save/load, decode."""
import numpy as np
import pytest

from megatron_ualm.audio.codec import Codec, save_tiny_codec


@pytest.fixture(scope="module")
def codec():
    return Codec("tiny")


def _clips(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def test_shape_and_range(codec):
    assert (codec.num_codebooks, codec.codebook_size, codec.info.hop_length) == (8, 1024, 320)
    (codes,) = codec.encode(_clips([16000]))
    assert codes.shape == (8, 50) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 1024
    assert len(np.unique(codes)) > 20  # random codebooks: not a constant code


def test_batched_equals_alone(codec):
    clips = _clips([8000, 8000, 4800, 8000, 4800, 6400], seed=1)
    batched = codec.encode(clips, batch_size=4)
    for clip, codes in zip(clips, batched):
        (alone,) = codec.encode([clip])
        np.testing.assert_array_equal(codes, alone)
    assert [c.shape[1] for c in batched] == [25, 25, 15, 25, 15, 20]


def test_too_short_raises(codec):
    with pytest.raises(ValueError, match="shorter than one codec frame"):
        codec.encode(_clips([100]))


def test_save_load_decode(tmp_path, codec):
    path = save_tiny_codec(tmp_path / "codec")
    loaded = Codec(path)
    clips = _clips([3200], seed=2)
    np.testing.assert_array_equal(loaded.encode(clips)[0], codec.encode(clips)[0])
    wav = loaded.decode(loaded.encode(clips)[0])
    assert wav.dtype == np.float32 and wav.shape == (3200,)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        Codec(tmp_path / "missing")
