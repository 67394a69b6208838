"""``python -m megatron_ualm.evaluate``: the trainer's validation numbers from a checkpoint,
the text scores on hand-computed cases, generation scored end to end on a tiny HF export,
the CLAP cosine against a plain computation, and one-line errors for bad inputs."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from model_batches import tiny_model_cfg  # noqa: E402
from tiny_training import tiny_config  # noqa: E402

from megatron_ualm.audio.frames import num_encoder_frames  # noqa: E402
from megatron_ualm.evaluate import main  # noqa: E402
from megatron_ualm.evaluation import text_scores as S  # noqa: E402
from megatron_ualm.evaluation.run import EvaluateOptions, run_evaluation  # noqa: E402
from megatron_ualm.formats import templates as T  # noqa: E402


# --- text scores on hand-computed cases ---------------------------------------------------------
def test_wer_and_cer_on_hand_computed_cases():
    assert S.edit_distance("kitten", "sitting") == 3
    assert S.wer("the cat sat on the mat", "the cat sat on the mat") == 0.0
    # one substitution (sat -> sit), one deletion (the), one insertion (down): 3 / 6
    assert S.wer("the cat sat on the mat", "the cat sit down on mat") == pytest.approx(3 / 6)
    # normalisation: case and punctuation do not count
    assert S.wer("Hello, World!", "hello world") == 0.0
    assert S.wer("a b", "") == 1.0 and S.wer("a", "a b c") == 2.0
    assert S.cer("abc", "abd") == pytest.approx(1 / 3)
    # corpus level: edits and reference words summed before dividing
    e = S.ErrorRate()
    e.add(S.words("one two three four"), S.words("one two three four"))
    e.add(S.words("five"), S.words("six"))
    assert e.rate == pytest.approx(1 / 5)


def test_exact_match_and_token_f1_on_hand_computed_cases():
    assert S.exact_match("The Eiffel Tower.", "eiffel tower") == 1.0  # articles, case, punctuation
    assert S.exact_match("Paris", "paris france") == 0.0
    # reference 3 tokens, answer 2 tokens, 2 shared: p = 1, r = 2/3, F1 = 0.8
    assert S.token_f1("big red dog", "red dog") == pytest.approx(0.8)
    # multiset overlap: "dog dog" vs "dog": p = 1/2... shared 1, p = 1, r = 1/2 -> 2/3
    assert S.token_f1("dog dog", "dog") == pytest.approx(2 / 3)
    assert S.token_f1("a", "the") == 1.0  # both empty after normalisation
    assert S.token_f1("cat", "") == 0.0 and S.token_f1("cat", "mouse") == 0.0


# --- loss and accuracy equal the trainer's validation ---------------------------------------------
def test_loss_equals_the_trainers_validation_loss(tmp_path):
    from megatron_ualm.training.loop import pretrain
    data, exp = tmp_path / "data", tmp_path / "run"
    valid = ("data.valid=[{path: %s/text, task: text_only}, {path: %s/a2c, task: audio_to_caption}, "
             "{path: %s/tta, task: caption_to_audio}]" % (data, data, data))
    pretrain(tiny_config(str(data), str(exp), "training.train_iters=2", "training.eval_interval=2",
                         "training.eval_iters=1000", "data.cfg_dropout_prob=0.0", valid))
    logged = [json.loads(x) for x in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    trainer = next(r for r in logged if r["kind"] == "valid" and r["step"] == 2)

    doc = run_evaluation(EvaluateOptions(checkpoint=str(exp), micro_batch_size=3), show_progress=False)
    assert doc["checkpoint"]["iteration"] == 2 and doc["checkpoint"]["kind"] == "megatron"
    assert set(doc["tasks"]) == {"text_only", "audio_to_caption", "caption_to_audio"}
    for task, entry in doc["tasks"].items():
        assert entry["loss"] == pytest.approx(trainer[f"loss/{task}"], rel=1e-5), task
        assert entry["examples"] == 40 and entry["scored_examples"] == 40
        assert 0.0 <= entry["accuracy"] <= 1.0
    assert "audio_acc" in doc["tasks"]["caption_to_audio"]
    assert doc["tasks"]["caption_to_audio"]["accuracy"] == doc["tasks"]["caption_to_audio"]["audio_acc"]
    assert doc["tasks"]["text_only"]["accuracy"] == doc["tasks"]["text_only"]["text_acc"]

    # --max-examples: the first N documents of each set, from the iteration directory itself
    first = run_evaluation(EvaluateOptions(checkpoint=str(exp / "checkpoints" / "iter_0000002"),
                                           data=[f"{data}/text:text_only"], max_examples=5),
                           show_progress=False)
    assert first["tasks"]["text_only"]["examples"] == 5
    assert first["tasks"]["text_only"]["loss"] != pytest.approx(doc["tasks"]["text_only"]["loss"])


# --- generation end to end on a tiny export -------------------------------------------------------
def _tokenized(root, tok, vocab):
    """speech_to_transcription, text_only and caption_to_audio datasets of 3 examples each."""
    from megatron_ualm.data.indexed import FORMAT_NAME, FORMAT_VERSION, DocumentWriter
    K, C = vocab.num_codebooks, vocab.codebook_size

    def meta(task, n):
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "task": task,
                "vocab": {"tokenizer_length": len(tok), "num_codebooks": K, "codebook_size": C},
                "counts": {"documents": n}}

    texts = ["a dog barks near the river", "what is two and two", "the river"]
    w = DocumentWriter(str(root / "asr"), with_audio=True)
    for i, text in enumerate(texts):
        samples = 4000 + 1000 * i
        pcm = (np.sin(np.arange(samples) * 0.05 * (i + 1)) * 9000).astype(np.int16)
        ref = T.AudioRef(w.add_clip(pcm), samples, num_encoder_frames(samples, 0.3))
        w.add_document(T.build_segments(T.speech_to_transcription(ref, text, tok.encode), vocab))
    w.finalize(meta("speech_to_transcription", 3))
    w = DocumentWriter(str(root / "qa"), with_audio=False)
    for text in texts:
        w.add_document(T.build_segments(T.text_only([("user", text)], "two", tok.encode), vocab))
    w.finalize(meta("text_only", 3))
    w = DocumentWriter(str(root / "tta"), with_audio=False)
    for i, text in enumerate(texts):
        codes = (np.arange(6)[None, :] + i + np.arange(K)[:, None]) % C
        w.add_document(T.build_segments(T.caption_to_audio(text, codes, tok.encode), vocab))
    w.finalize(meta("caption_to_audio", 3))
    return texts


def tiny_clap(directory):
    """A tiny random CLAP (Roberta tokenizer of letters + ClapFeatureExtractor) saved locally."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer
    os.makedirs(directory, exist_ok=True)
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "\u0120"] + list("abcdefghijklmnopqrstuvwxyz")
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = RobertaTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    features = ClapFeatureExtractor(feature_size=64, max_length_s=1, truncation="rand_trunc")
    torch.manual_seed(0)
    cfg = ClapConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64),
        audio_config=dict(hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[1, 2],
                          window_size=8, num_mel_bins=64, spec_size=128, enable_fusion=False),
        projection_dim=16)
    ClapModel(cfg).eval().save_pretrained(directory)
    ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random UALM saved as a Megatron checkpoint and exported to HF, with its
    tokenizer, codec and three tokenized datasets."""
    from megatron_ualm.audio.codec import save_tiny_codec
    from megatron_ualm.config import DataConfig, PathsConfig, UALMConfig
    from megatron_ualm.convert import convert_megatron_to_hf
    from megatron_ualm.data.tokenizer import train_tiny_tokenizer
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel, padded_vocab
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.checkpoint import save_checkpoint
    root = tmp_path_factory.mktemp("export")
    tok = train_tiny_tokenizer(["a dog barks near the river", "what is two and two"] * 20, root / "tok", 280)
    codec = save_tiny_codec(root / "codec", 4, 16)
    cfg = UALMConfig(model=tiny_model_cfg(init_method_std=0.3), data=DataConfig(seq_length=256),
                     paths=PathsConfig(tokenizer=str(root / "tok"), codec=codec))
    init_runtime(device="cpu", seed=0)
    try:
        model = UALMModel(cfg.model, transformer_config_from(cfg.model, None, "fp32"))
        save_checkpoint(str(root / "run" / "checkpoints"), 0, [model], config=cfg)
    finally:
        shutdown_runtime()
    convert_megatron_to_hf(str(root / "run"), str(root / "hf"), tokenizer=str(root / "tok"), codec=codec,
                           show_progress=False)
    texts = _tokenized(root, tok, padded_vocab(cfg.model, 1))
    return root, tok, texts


def test_generation_scores_end_to_end_on_an_export(export, capsys):
    root, tok, texts = export
    clap = tiny_clap(root / "clap")
    out = root / "results.json"
    assert main(["--checkpoint", str(root / "hf"), "--data", f"{root}/asr:speech_to_transcription",
                 "--data", f"{root}/qa:text_only", "--data", f"{root}/tta:caption_to_audio",
                 "--generate", "on", "--max-new-tokens", "12", "--max-audio-seconds", "0.2",
                 "--clap", clap, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "speech_to_transcription" in table and "WER" in table and "CLAP" in table
    doc = json.loads(out.read_text())
    assert doc["checkpoint"]["kind"] == "hf_export" and doc["settings"]["generate"] == "on"
    assert doc["generation_settings"]["max_new_rows"] == 12
    for task in ("speech_to_transcription", "text_only", "caption_to_audio"):
        entry = doc["tasks"][task]
        assert {"examples", "loss", "accuracy", "generation"} <= set(entry) and entry["examples"] == 3
        assert math.isfinite(entry["loss"]) and entry["generation"]["generated"] == 3
    asr = doc["tasks"]["speech_to_transcription"]["generation"]
    assert [s["reference"] for s in asr["samples"]] == texts
    # the reported WER is the corpus WER of the answers it reports
    e = S.ErrorRate()
    for s in asr["samples"]:
        e.add(S.words(s["reference"]), S.words(s["answer"]))
    assert asr["wer"] == pytest.approx(e.rate) and asr["reference_words"] == 13
    qa = doc["tasks"]["text_only"]["generation"]
    assert qa["f1"] == pytest.approx(np.mean([S.token_f1("two", s["answer"]) for s in qa["samples"]]))
    assert "exact_match" in qa
    tta = doc["tasks"]["caption_to_audio"]["generation"]
    assert [s["caption"] for s in tta["samples"]] == texts
    assert tta["silent_answers"] == 0 and -1.0 <= tta["clap"] <= 1.0

    # the HF export and the Megatron checkpoint it came from give the same loss
    megatron = run_evaluation(EvaluateOptions(checkpoint=str(root / "run"), data=[f"{root}/qa:text_only"]),
                              show_progress=False)
    assert megatron["tasks"]["text_only"]["loss"] == pytest.approx(doc["tasks"]["text_only"]["loss"], rel=1e-5)


def test_prompt_of_an_example_equals_the_inference_prompt(export):
    """The context cut from a stored example is the prompt ``generate`` builds for the request."""
    from megatron_ualm.data.indexed import TokenizedDataset
    from megatron_ualm.evaluation.references import build_reference
    from megatron_ualm.inference.prompts import build_prompt
    from megatron_ualm.model.ualm_model import padded_vocab
    root, tok, texts = export
    vocab = padded_vocab(tiny_model_cfg(), 1)
    ref = build_reference(TokenizedDataset(str(root / "qa")), 1, "text_only", vocab, tok.decode)
    expected = build_prompt({"prompt": texts[1]}, vocab, tok.encode)
    np.testing.assert_array_equal(ref.prompt.rows, expected.rows)
    assert ref.modality == "text" and ref.text == "two"
    tta = build_reference(TokenizedDataset(str(root / "tta")), 0, "caption_to_audio", vocab, tok.decode)
    np.testing.assert_array_equal(tta.prompt.rows, build_prompt({"caption": texts[0]}, vocab, tok.encode).rows)
    assert tta.modality == "audio" and tta.caption == texts[0]


# --- CLAP -----------------------------------------------------------------------------------------
def test_clap_score_is_the_cosine_of_the_clap_embeddings(tmp_path):
    import soxr
    from transformers import ClapModel, ClapProcessor

    from megatron_ualm.evaluation.clap import ClapScorer
    directory = tiny_clap(tmp_path / "clap")
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(8000).astype(np.float32) * 0.1, np.sin(np.arange(12000) * 0.1).astype(np.float32)]
    captions = ["a dog barks", "rain on a roof"]
    got = ClapScorer(directory).scores(captions, waves)

    model, processor = ClapModel.from_pretrained(directory).eval(), ClapProcessor.from_pretrained(directory)
    with torch.no_grad():
        text = model.get_text_features(**processor(text=captions, return_tensors="pt", padding=True))
        audio = model.get_audio_features(**processor(
            audio=[soxr.resample(w, 16000, 48000) for w in waves], sampling_rate=48000, return_tensors="pt"))
    text = getattr(text, "pooler_output", text).numpy()
    audio = getattr(audio, "pooler_output", audio).numpy()
    want = [float(t @ a / (np.linalg.norm(t) * np.linalg.norm(a))) for t, a in zip(text, audio)]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(np.round(got, 6))) == 2  # the pairs differ


# --- bad inputs -------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(export, tmp_path, capsys):
    root, _, _ = export

    def error(*argv):
        assert main(["--checkpoint", str(root / "hf"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    assert f"{root}/nope" in error("--data", f"{root}/nope:text_only")
    assert "task" in error("--data", f"{root}/qa:speech_to_transcription")
    assert "not one of" in error("--data", f"{root}/qa:qa")
    assert "none given" in error()  # the export's config has no data.valid
    assert main(["--checkpoint", str(tmp_path / "gone"), "--data", f"{root}/qa:text_only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint:") and str(tmp_path / "gone") in err and "\n" not in err
