"""data_tools/inspect_dataset.py --wav-out on codec datasets: the codec comes from the sidecar."""
import glob
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from megatron_ualm.audio.codec import Codec
from megatron_ualm.audio.io import load_audio
from megatron_ualm.data import indexed as I
from megatron_ualm.data import inspection
from megatron_ualm.data.demo import make_demo_data
from megatron_ualm.data.preprocess import PreprocessConfig, run_preprocess
from megatron_ualm.data.tokenizer import train_tiny_tokenizer
from megatron_ualm.errors import UserError
from megatron_ualm.formats import templates as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tta(tmp_path_factory):
    """A tiny caption_to_audio dataset tokenized with the tiny codec."""
    root = tmp_path_factory.mktemp("tta")
    d = make_demo_data(str(root / "raw"), num_clips=3, num_text=2, speech=False)
    captions = [json.loads(line)["caption"] for line in open(d.etta)]
    train_tiny_tokenizer(captions * 3, str(root / "tok"), vocab_size=300)
    run_preprocess(PreprocessConfig(inputs=[d.etta], task="caption_to_audio", out=str(root / "tta"),
                                    tokenizer=str(root / "tok"), codec="tiny", workers=1, progress=False))
    return root


def _inspect(capsys, *args):
    """Run the tool's main in this process (its imports are the slow part): (status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("inspect_dataset", os.path.join(ROOT, "data_tools",
                                                                                  "inspect_dataset.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    code = tool.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _decoded(ds, index):
    (seg,) = [s for s in ds.segments(index) if s.mode == T.MODE_CODEC_TARGET]
    codec = Codec("tiny")
    return codec.decode(seg.data.reshape(codec.num_codebooks, -1))


def test_wav_out_decodes_with_the_recorded_codec(tta, tmp_path, capsys):
    ds = I.TokenizedDataset(str(tta / "tta"))
    assert ds.meta["codec"]["path"] == "tiny" and inspection.recorded_codec(ds) == "tiny"
    code, out, err = _inspect(capsys, str(tta / "tta"), "--example", "1", "--wav-out", str(tmp_path / "x.wav"))
    assert code == 0, err
    assert "caption_to_audio" in out and "wrote" in out
    got = load_audio(str(tmp_path / "x.wav"))
    want = _decoded(ds, 1)
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got, want, atol=1.5 / 32768)  # 16-bit WAV quantisation


def test_missing_recorded_codec_is_one_line_naming_it(tta, tmp_path, capsys):
    moved = tmp_path / "moved"
    for path in glob.glob(str(tta / "tta") + ".*"):
        shutil.copy(path, str(moved) + path[len(str(tta / "tta")):])
    meta_path = str(moved) + ".meta.json"
    with open(meta_path) as f:
        meta = json.load(f)
    meta["codec"]["path"] = "/nonexistent/models/xcodec"
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(UserError, match="/nonexistent/models/xcodec"):
        inspection.recorded_codec(I.TokenizedDataset(str(moved)))
    code, _, err = _inspect(capsys, str(moved), "--example", "0", "--wav-out", str(tmp_path / "y.wav"))
    assert code == 2 and not os.path.exists(tmp_path / "y.wav")
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "/nonexistent/models/xcodec" in err and "--codec" in err
    code, _, err = _inspect(capsys, str(moved), "--example", "0", "--wav-out", str(tmp_path / "y.wav"),
                            "--codec", "tiny")
    assert code == 0, err
    np.testing.assert_allclose(load_audio(str(tmp_path / "y.wav")), _decoded(I.TokenizedDataset(str(moved)), 0),
                               atol=1.5 / 32768)
