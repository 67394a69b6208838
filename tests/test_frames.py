from megatron_ualm.audio.frames import num_encoder_frames, window_sizes


def test_25_frames_per_second():
    assert num_encoder_frames(16_000) == 25
    assert num_encoder_frames(10 * 16_000) == 250
    assert num_encoder_frames(30 * 16_000) == 750


def test_long_audio_is_windowed_not_truncated():
    assert window_sizes(65 * 16_000) == [480_000, 480_000, 80_000]
    assert num_encoder_frames(65 * 16_000) == 750 + 750 + 125


def test_too_short_gives_no_frames():
    assert num_encoder_frames(100) == 0 and num_encoder_frames(320) == 0
    assert num_encoder_frames(480) == 1
    assert num_encoder_frames(640) == 1
