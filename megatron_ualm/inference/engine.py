"""The generation engine: batched, KV-cached decoding of text and audio answers.

``Engine(model).generate(prompts, settings)`` decodes a list of :class:`Prompt` (rows built
by ``inference.prompts`` from the training templates) in batches of
``settings.batch_size``. Per batch:

1. Left-pad the prompts to the longest (``forward.left_pad_layout``: positions restart at 0
   for every request, pads are masked). Under guidance the batch has 2B rows: requests
   [0, B), then their unconditional twins [B, 2B). A twin's prompt is all ``<|pad|>`` of the
   same length; it is fed ``<|pad|>`` until its request's first audio row and the request's
   own rows from there on -- what training's CFG dropout (``templates.cfg_dropout``) shows
   the model. Cond and uncond run as ONE forward pass.
2. Prefill, then one row per step for every request. ``state.RowState`` says which ids each
   stream may take; audio rows use ``g * cond - (g - 1) * uncond`` before masking.
3. A request stops at ``<|eos|>`` or after its row budget; the batch stops when all have.

Reasoning (``Prompt.reasoning``, SPEC section 9, UALM-Reason): whenever an audio part ends
with ``<|eot|>``, the clip is decoded by the codec (16 kHz) and appended as the model
listening to it -- ``<|assistant|> <|audio|>``, one placeholder row per encoder frame (the
encoder front end of understanding prompts fills them), ``<|eot|> <|assistant|>``, the
layout of ``formats.templates`` for an assistant audio_in message -- in ONE forward call
that prefills only these rows into the KV cache; decoding then goes on with a modality
choice. The answer stops at ``<|eos|>``, at the length limits, or when ``max_rounds`` clips
have been generated (finish_reason "max_rounds"). Reasoning prompts are batched apart from
the others; the rows a request appends take slots in every row of its batch, where the
others get masked holes (``_place``), so no answer depends on its batch. Graph or full
backend only.

Guidance runs only when ``guidance_scale != 1`` and some request may produce audio (its
modality is not forced to text); otherwise the batch is B rows. A request forced to text
is never guided, so no request's answer depends on what else shares its batch.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from megatron_ualm.audio.frames import HOP_LENGTH, MIN_MEL_FRAMES, num_encoder_frames
from megatron_ualm.formats import vocab as V
from megatron_ualm.inference.forward import BACKENDS, SplitForward, default_backend, left_pad_layout
from megatron_ualm.inference.sampling import NEG_INF, GenerationSettings, select
from megatron_ualm.inference.state import (
    MASK_AUDIO0, MASK_AUDIO0_OR_END, MASK_END, MASK_MODALITY, MASK_TEXT, RowSpec, RowState, Segment,
)


@dataclass
class Prompt:
    """One request, ready for the model.

    rows: int64 [n, K] unified ids, the last row ``<|assistant|>``.
    spans: (row, num_rows) of each continuous-audio placeholder span, one per clip.
    clips: float32 [samples] 16 kHz waveforms, one per span.
    modality: "text" / "audio" / "speech" forces the first answer segment; None: the model picks.
    seed: seed of this request's sampling generator.
    reasoning: listen to every generated clip that ends with ``<|eot|>`` (see the module doc).
    """
    rows: np.ndarray
    spans: list = field(default_factory=list)
    clips: list = field(default_factory=list)
    modality: Optional[str] = None
    seed: int = 0
    reasoning: bool = False


@dataclass
class Generation:
    """The answer to one Prompt. rows: int64 [G, K] every generated row as fed back;
    segments: per answer segment (``state.Segment``); finish_reason: "eos" or "length";
    timing: seconds of the batch's prefill and decode, its size and number of steps.
    Reasoning: sequence int64 [S, K] the answer's rows as the model saw them (generated and
    appended); audio_in [(row in sequence, num_rows)] of the appended placeholder spans."""
    segments: list
    rows: np.ndarray
    finish_reason: str
    timing: dict
    sequence: Optional[np.ndarray] = None
    audio_in: list = field(default_factory=list)


class Engine:
    """Decoding over one ``UALMModel`` (a single pipeline stage, in eval mode).

    backend: "graph" (own KV cache, decode steps as CUDA graph replays), "cached" (megatron's
        KV cache) or "full" (recompute every step; the test reference). None: "graph" for a
        single stage with TP = 1 and no sequence parallelism, else "cached".
    split_guidance: run cond and uncond rows as two batches (tests only).
    force_uncond: run the unconditional rows even when guidance_scale == 1 (tests only).
    tokenizer_size: text ids the tokenizer has; the text rows above it (embedding padding,
        never a training target) are masked. None: every text row is allowed.
    """

    def __init__(self, model, backend: Optional[str] = None, split_guidance: bool = False,
                 force_uncond: bool = False, tokenizer_size: Optional[int] = None):
        backend = backend or default_backend(model)
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} not in {sorted(BACKENDS)}")
        self.model = model.eval()
        self.vocab = model.vocab
        self.backend, self.split_guidance, self.force_uncond = backend, split_guidance, force_uncond
        self.device = next(model.parameters()).device
        self.max_positions = model.model_cfg.max_position_embeddings
        self.tokenizer_size = tokenizer_size
        self._build_masks()

    def _build_masks(self):
        vocab, K = self.vocab, self.vocab.num_codebooks
        m = torch.zeros(5, vocab.padded_size, dtype=torch.bool)
        m[MASK_MODALITY, [V.TEXT, V.AUDIO, V.SPEECH]] = True
        # named specials (never <|pad|> or the unused slots) and the tokenizer's text rows
        m[MASK_TEXT, 1:len(V.SPECIAL_TOKENS)] = True
        text_end = vocab.audio_start if self.tokenizer_size is None else vocab.text_offset + self.tokenizer_size
        m[MASK_TEXT, vocab.text_offset:min(text_end, vocab.audio_start)] = True
        lo0, hi0 = vocab.codebook_range(0)
        m[MASK_AUDIO0, lo0 + 1:hi0] = True
        m[MASK_AUDIO0_OR_END, lo0:hi0] = True
        m[MASK_AUDIO0_OR_END, [V.EOS, V.EOT]] = True
        m[MASK_END, [V.EOS, V.EOT]] = True
        self.stream0_masks = m.to(self.device)
        head = self.model.head
        self.stream_lo = [head.stream_block(k)[0] for k in range(1, K)]
        width = head.stream_block(1)[1] - self.stream_lo[0]
        sm = torch.zeros(K - 1, width, dtype=torch.bool)
        for k in range(1, K):
            lo, hi = vocab.codebook_range(k)
            sm[k - 1, lo + 1 - self.stream_lo[k - 1]:hi - self.stream_lo[k - 1]] = True  # codes, not the pad
        self.stream_masks = sm.to(self.device)
        self._lo = torch.tensor(self.stream_lo, device=self.device)

    def max_new_rows(self, prompt_rows: int, settings: GenerationSettings) -> int:
        """Rows a request with this prompt may generate (0: the prompt is too long)."""
        return max(0, min(settings.max_new_rows, self.max_positions - prompt_rows))

    # --- public -----------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], settings: GenerationSettings, codec=None) -> list[Generation]:
        """Answers in prompt order, decoded ``settings.batch_size`` prompts at a time
        (reasoning prompts batched apart from the others; they need ``codec``, an
        ``audio.codec.Codec``)."""
        if any(p.reasoning for p in prompts):
            if codec is None:
                raise ValueError("reasoning requests need a codec to decode the clips the model listens to")
            if self.backend == "cached" or self.split_guidance:
                raise ValueError("reasoning runs on the graph or full backend, without split_guidance")
        out: list = [None] * len(prompts)
        with _sdpa_attention(self.model):
            for i in range(0, len(prompts), settings.batch_size):
                idx = range(i, min(i + settings.batch_size, len(prompts)))
                for reasoning in (False, True):
                    part = [j for j in idx if prompts[j].reasoning == reasoning]
                    if part:
                        gens = self._generate_batch([prompts[j] for j in part], settings,
                                                    codec if reasoning else None)
                        for j, g in zip(part, gens):
                            out[j] = g
        return out

    # --- one batch --------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_batch(self, prompts: list[Prompt], settings: GenerationSettings,
                        codec=None) -> list[Generation]:
        """codec: given, every prompt is a reasoning request (see the module doc)."""
        B, K, dev = len(prompts), self.vocab.num_codebooks, self.device
        lengths = [int(p.rows.shape[0]) for p in prompts]
        budgets = [self.max_new_rows(n, settings) for n in lengths]
        if min(budgets) <= 0:
            raise ValueError(f"a prompt of {max(lengths)} rows leaves no room under {self.max_positions} positions")
        N = max(lengths)
        L = N + max(budgets)
        min_frames = settings.min_audio_frames
        if codec is not None:
            # every listening of any request takes slots in every row of the batch
            L += B * settings.max_rounds * self._listen_rows(settings.max_audio_frames, codec)
            # a clip must give the encoder at least one frame
            min_frames = max(min_frames, -(-MIN_MEL_FRAMES * HOP_LENGTH // codec.info.hop_length))
        # a request forced to answer in text is never guided (not even a later audio segment),
        # so its answer does not depend on what else shares the batch
        wants = [p.modality != "text" for p in prompts]
        guided = (settings.guidance_scale != 1 or self.force_uncond) and any(wants)
        R = 2 * B if guided else B

        docs, positions, pads = left_pad_layout(lengths, L, R, dev)
        tokens = torch.zeros(R, L, K, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            tokens[b, pads[b]:N] = torch.as_tensor(p.rows, dtype=torch.long, device=dev)
        masked = N != min(lengths) or codec is not None  # reasoning: holes beside appended rows
        audio = self._audio_inputs(prompts, pads)

        states = [RowState(self.vocab, p.modality, budgets[b], min_frames,
                           max(min_frames, settings.max_audio_frames)) for b, p in enumerate(prompts)]
        gens = [torch.Generator(device=dev).manual_seed(int(p.seed)) for p in prompts]
        backend = BACKENDS[self.backend]
        forward = (SplitForward(backend, self.model, R, L) if guided and self.split_guidance
                   else backend(self.model, R, L))

        t0 = time.perf_counter()
        logits = forward(tokens, docs, positions, 0, N, audio, masked)
        _sync(dev)
        t1 = time.perf_counter()
        cur, steps, listened, ends = N, 0, [], {}
        while True:
            rows = self._choose([s.spec() for s in states], logits, B, guided and wants, settings, gens)
            fed = [states[b].accept(rows[b]) for b in range(B)]
            if guided:
                fed += [fed[b] if states[b].audio_started else [V.PAD] * K for b in range(B)]
            start, steps, audio = cur, steps + 1, None
            if codec is None:
                tokens[:, cur] = torch.tensor(fed, dtype=torch.long, device=dev)
                cur += 1
            else:
                cur, audio = self._place(states, fed, tokens, docs, positions, cur, L, settings, codec, listened)
                ends.update({b: cur for b, st in enumerate(states) if st.done and b not in ends})
            if all(s.done for s in states) or cur >= L:
                break
            logits = forward(tokens, docs, positions, start, cur, audio, masked)
        _sync(dev)
        t2 = time.perf_counter()
        timing = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "batch_size": B, "steps": steps,
                  "guided": guided}
        answers = [Generation(s.segments, np.asarray(s.rows, dtype=np.int64).reshape(-1, K),
                              s.finish_reason or "length", dict(timing)) for s in states]
        if codec is not None:
            real = (docs[:B, N:cur] != -1).cpu().numpy()
            seq = tokens[:B, N:cur].cpu().numpy()
            for b, answer in enumerate(answers):
                end = ends.get(b, cur) - N
                answer.sequence = seq[b, :end][real[b, :end]]
                answer.audio_in = [(int(real[b][:slot - N].sum()), n) for bb, slot, n in listened if bb == b]
        return answers

    # --- reasoning: listening to a generated clip ---------------------------------------------
    def _listen_rows(self, frames: int, codec) -> int:
        """Rows appended for a clip of ``frames`` codec frames: header (2), placeholders, END
        and the next part's ``<|assistant|>``."""
        window = self.model.model_cfg.encoder.window_seconds
        return 4 + num_encoder_frames(frames * codec.info.hop_length, window)

    def _heard(self, state: RowState, last_position, settings: GenerationSettings, codec):
        """After an audio part that ended with ``<|eot|>``: (rows to append [m, K], 16 kHz
        clip, encoder rows n), or None -- also when the request stops here: at ``max_rounds``
        clips, or when the rows would pass the model's positions. last_position: a callable
        giving the request's last position (read only then: a device sync)."""
        seg = state.segments[-1] if state.segments else None
        if (state.done or state.phase != "role" or seg.modality == "text" or seg.end != V.EOT
                or seg.listened_rows is not None):
            return None
        if sum(s.modality != "text" for s in state.segments) >= settings.max_rounds:
            state.stop("max_rounds")
            return None
        from megatron_ualm.inference.outputs import segment_codes  # soundfile only when reasoning
        codes = segment_codes(seg, self.vocab)
        wave = (np.clip(codec.decode(codes), -1.0, 1.0).astype(np.float32) if codes.shape[1]
                else np.zeros(0, np.float32))
        n = num_encoder_frames(len(wave), self.model.model_cfg.encoder.window_seconds)
        rows = np.zeros((n + 4, self.vocab.num_codebooks), dtype=np.int64)
        # <|audio|> whatever the clip's modality: the layout of the ``reasoning`` task
        rows[[0, 1, n + 2, n + 3], 0] = [V.ASSISTANT, V.AUDIO, V.EOT, V.ASSISTANT]
        if n == 0 or last_position() + len(rows) + 1 >= self.max_positions:
            state.stop("length")
            return None
        return rows, wave, n

    def _place(self, states: list, fed: list, tokens: Tensor, docs: Tensor, positions: Tensor, cur: int,
               L: int, settings: GenerationSettings, codec, listened: list) -> tuple[int, Optional[dict]]:
        """Write this step's rows of a reasoning batch at slot ``cur``; returns (new cur, the
        heard clips' audio dict at absolute slots, or None).

        Requests whose clip just ended with ``<|eot|>`` also get the rows of hearing it
        (``_heard``). The rows of one step are right-aligned in a window as wide as the
        longest: each row r (its unconditional twin alike) gets ``<|pad|>`` holes
        (docs -1, attended by no real row) first, then its generated row and its appended
        rows; its positions go on from its last real row. So every row's last slot is real
        and the next forward's logits are read there."""
        B, R = len(states), tokens.shape[0]
        heard = {}
        for b, state in enumerate(states):
            got = self._heard(state, lambda: int(positions[b, cur - 1]), settings, codec)
            if got is not None:
                heard[b] = got
        if not heard:  # the common step: one row each, positions already run on
            tokens[:, cur] = torch.tensor(fed, dtype=torch.long, device=tokens.device)
            return cur + 1, None
        last = positions[:, cur - 1].tolist()
        width = 1 + max((len(h[0]) for h in heard.values()), default=0)
        if cur + width >= L:  # no slots left for the appended rows
            for b in heard:
                states[b].stop("length")
            heard, width = {}, 1
        spans, clips = [], []
        for r in range(R):
            b = r % B
            content = [fed[r]] + (heard[b][0].tolist() if b in heard else [])
            hole = width - len(content)
            first = cur + hole
            docs[r, cur:first] = -1
            tokens[r, cur:first] = V.PAD
            positions[r, cur:first] = 0
            tokens[r, first:cur + width] = torch.tensor(content, dtype=torch.long, device=tokens.device)
            positions[r, first:] = int(last[r]) + 1 + torch.arange(positions.shape[1] - first, device=positions.device)
            if b in heard:
                spans.append((r, first + 3, heard[b][2]))
                clips.append(heard[b][1])
                if r < B:
                    listened.append((b, first + 3, heard[b][2]))
                    states[b].listened(heard[b][2], heard[b][1],
                                       self.max_positions - 1 - (int(last[r]) + len(content)))
        if not clips:
            return cur + width, None
        wave = torch.zeros(len(clips), max(len(c) for c in clips))
        for i, c in enumerate(clips):
            wave[i, :len(c)] = torch.from_numpy(c)
        return cur + width, {"audio_waveforms": wave.to(self.device),
                             "audio_num_samples": torch.tensor([len(c) for c in clips], device=self.device),
                             "audio_rows": torch.tensor(spans, dtype=torch.long, device=self.device)}

    def _audio_inputs(self, prompts: list[Prompt], pads: list[int]) -> Optional[dict]:
        spans, clips = [], []
        for b, p in enumerate(prompts):
            if len(p.spans) != len(p.clips):
                raise ValueError(f"prompt {b}: {len(p.spans)} audio spans but {len(p.clips)} clips")
            for (row, n), clip in zip(p.spans, p.clips):
                spans.append((b, pads[b] + row, n))
                clips.append(np.asarray(clip, dtype=np.float32))
        if not clips:
            return None
        wave = torch.zeros(len(clips), max(len(c) for c in clips))
        for i, c in enumerate(clips):
            wave[i, :len(c)] = torch.from_numpy(c)
        return {"audio_waveforms": wave.to(self.device),
                "audio_num_samples": torch.tensor([len(c) for c in clips], device=self.device),
                "audio_rows": torch.tensor(spans, dtype=torch.long, device=self.device)}

    # --- choosing one row per request -------------------------------------------------------
    def _choose(self, specs: list[RowSpec], logits: tuple[Tensor, Tensor], B: int, guided,
                settings: GenerationSettings, gens) -> list[list[int]]:
        """The next row [K] of every request: forced entries as the specs say, the rest
        sampled from (guided, masked) logits with each request's generator.
        guided: False, or per request whether its audio rows are guided (rows B + b hold
        request b's unconditional logits)."""
        stream0, streams = logits[0][:B].float(), logits[1][:B].float()
        if guided:
            g = settings.guidance_scale
            audio_rows = [b for b in range(B) if specs[b].audio and guided[b]]
            if audio_rows:
                idx = torch.tensor(audio_rows, device=self.device)
                stream0, streams = stream0.clone(), streams.clone()
                stream0[idx] = g * stream0[idx] - (g - 1) * logits[0][B + idx].float()
                streams[idx] = g * streams[idx] - (g - 1) * logits[1][B + idx].float()

        rows = [[s.forced0] + list(s.forced) for s in specs]
        for audio in (False, True):
            temp, top_k, top_p = ((settings.audio_temperature, settings.audio_top_k, settings.audio_top_p)
                                  if audio else
                                  (settings.text_temperature, settings.text_top_k, settings.text_top_p))
            need0 = [b for b in range(B) if specs[b].audio == audio and specs[b].stream0 is not None]
            if need0:
                idx = torch.tensor(need0, device=self.device)
                allowed = self.stream0_masks[torch.tensor([specs[b].stream0 for b in need0], device=self.device)]
                picked = select(stream0[idx].masked_fill(~allowed, NEG_INF), temp, top_k, top_p,
                                [gens[b] for b in need0]).tolist()
                for b, tok in zip(need0, picked):
                    rows[b][0] = tok
            need = [b for b in range(B) if specs[b].audio == audio and any(f is None for f in specs[b].forced)]
            if need:
                idx = torch.tensor(need, device=self.device)
                lg = streams[idx].masked_fill(~self.stream_masks[None], NEG_INF)
                picked = (select(lg, temp, top_k, top_p, [gens[b] for b in need]) + self._lo).tolist()
                for b, ids in zip(need, picked):
                    rows[b] = [rows[b][0]] + [f if f is not None else int(x)
                                              for f, x in zip(specs[b].forced, ids)]
        return rows


@contextlib.contextmanager
def _sdpa_attention(model):
    """Run core attention as SDPA while generating: the left-padded prefill is a "packed"
    call that would pick FlexAttention on GPU, compiled per shape (every new prompt length
    and cache length would recompile). The model's setting is restored afterwards."""
    from megatron_ualm.model.attention import UALMCoreAttention
    mods = [m for m in model.modules() if isinstance(m, UALMCoreAttention) and m.backend in ("auto", "flex")]
    saved = [m.backend for m in mods]
    for m in mods:
        m.backend = "sdpa"
    try:
        yield
    finally:
        for m, b in zip(mods, saved):
            m.backend = b


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
