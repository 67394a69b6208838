"""UALMModel: the unified audio language model on megatron-core.

    tokens [B, S, K] --MultiStreamEmbedding--> [S, B, H]          (first pipeline stage)
        placeholder rows <- adapter(encoder(audio))               (first pipeline stage)
    --(SP scatter)--> TransformerBlock of Qwen2 layers (RoPE from position_ids,
        attention kept inside each packed example)
    --> final RMSNorm --> MultiStreamHead: per-stream CE           (last pipeline stage)

Pipeline parallelism: build one model per (virtual) stage with ``pre_process`` /
``post_process`` as megatron's ``is_pipeline_first_stage`` / ``is_pipeline_last_stage``
say (``build_ualm_model`` does it); a non-first stage receives its input through
``set_input_tensor``. Every stage needs ``position_ids`` and ``document_ids`` (RoPE and the
attention mask); only the first needs tokens and audio, only the last labels and weights.

Forward returns, on the last stage, ``StreamLosses`` (per-position CE and correctness,
see ``head.py``; reduce with ``loss.loss_sums``), or with ``return_logits=True`` the
inference logits; on other stages the hidden states [s(/TP), B, H] to send on.

Float16Module (bf16 training) casts *positional* float inputs to bf16 on the first stage:
pass ``audio_waveforms`` and ``loss_weights`` as keywords to keep them float32.

KV-cache inference: pass megatron's ``StaticInferenceContext`` (alias ``InferenceParams``);
each call appends the new rows' keys/values at ``inference_context.sequence_len_offset``,
which the caller advances. Positions during cached inference are
``sequence_len_offset + arange(S)`` (one example per row, no packing).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ualm.formats.vocab import UnifiedVocab
from megatron_ualm.kernels.profiling import scope
from megatron_ualm.model.attention import MaskCache
from megatron_ualm.model.batch import HostPlan, is_packed
from megatron_ualm.model.embedding import MultiStreamEmbedding
from megatron_ualm.model.head import MultiStreamHead, StreamLosses
from megatron_ualm.model.layer_spec import qwen2_block_spec
from megatron_ualm.model.rope import RotaryAngles, install_fused_rope

TP_VOCAB_MULTIPLE = 128


def padded_vocab(model_cfg, tensor_parallel: int) -> UnifiedVocab:
    """The unified vocabulary padded to a multiple of 128 * TP rows."""
    return UnifiedVocab(model_cfg.text_vocab_size, model_cfg.num_codebooks, model_cfg.codebook_size,
                        TP_VOCAB_MULTIPLE * tensor_parallel)


class UALMModel(MegatronModule):
    """One pipeline stage (or the whole model) of UALM.

    model_cfg: ``megatron_ualm.config.ModelConfig``; config: megatron ``TransformerConfig``
    from ``transformer_config_from``; pre_process / post_process: whether this stage holds
    the embeddings + audio encoder / the head; vp_stage: virtual pipeline stage index.
    """

    def __init__(self, model_cfg, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None):
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.share_embeddings_and_output_weights = False  # read by megatron's grad finalisation
        self.vocab = padded_vocab(model_cfg, config.tensor_model_parallel_size)
        self.mask_cache = MaskCache()
        self.decoder_graph = None  # training.cuda_graphs: a training.cuda_graphs.DecoderGraph
        self.rotary = RotaryAngles(config.kv_channels, model_cfg.rotary_base)
        install_fused_rope()  # CUDA only, same math (rope.py)

        self.audio_encoder = None
        if pre_process:
            self.embedding = MultiStreamEmbedding(config, self.vocab)
            enc = model_cfg.encoder
            if enc.kind != "none":
                # imported here: megatron_ualm.audio pulls in audio I/O (soundfile), which a
                # text-only or benchmark run on a bare GPU machine may not have
                from megatron_ualm.model.audio_encoder import AudioEncoder
                device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
                self.audio_encoder = AudioEncoder(enc, config.hidden_size, config.init_method_std,
                                                  dtype=config.params_dtype, device=device)
        self.decoder = TransformerBlock(
            config=config,
            spec=qwen2_block_spec(config, model_cfg.attention_backend, self.mask_cache, vp_stage=vp_stage),
            pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        if post_process:
            self.head = MultiStreamHead(config, self.vocab, model_cfg.audio_head)

    # --- megatron plumbing ------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline input of a non-first stage: [s(/TP), B, H] (megatron passes a list)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"UALMModel takes one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        """Embeddings and head are untied: nothing is shared between stages."""
        return None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's distributed-checkpoint view. The vocabulary is padded to 128 * TP rows,
        so the head's row count changes with TP: like megatron's own embedding (and
        LanguageModule's output layer) it is marked ``allow_shape_mismatch`` so checkpoints
        load under another TP size (only padding rows differ)."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}head.output_layer.weight"
        if key in sharded:
            sharded[key].allow_shape_mismatch = True
        return sharded

    # --- pieces -----------------------------------------------------------------------------------
    def embed(self, tokens: Tensor, audio_waveforms: Optional[Tensor] = None,
              audio_num_samples: Optional[Tensor] = None, audio_rows: Optional[Tensor] = None,
              plan: Optional[HostPlan] = None) -> Tensor:
        """Input embeddings [S, B, H] (full sequence): stream sum, then placeholder rows
        overwritten by the adapted encoder frames. ``plan``: the clips' sizes as host ints."""
        hidden = self.embedding(tokens)
        if audio_rows is not None and audio_rows.shape[0] > 0:
            if self.audio_encoder is None:
                raise ValueError("the batch has audio clips but the model has no audio encoder (encoder.kind='none')")
            if plan is not None and len(plan.audio_rows) == audio_rows.shape[0]:
                samples, spans = plan.audio_num_samples, plan.audio_rows
            else:
                samples, spans = audio_num_samples.tolist(), audio_rows.tolist()  # host syncs
            frames = self.audio_encoder(audio_waveforms, samples)  # [F, H]
            counts = self.audio_encoder.frame_counts(samples)
            for (b, row, n), expected in zip(spans, counts):
                if n != expected:
                    raise ValueError(f"audio span {(b, row, n)} has {n} rows; its clip gives {expected} frames")
            device = hidden.device
            seq_idx = torch.cat([torch.arange(row, row + n, device=device) for _, row, n in spans])
            batch_idx = torch.cat([torch.full((n,), b, device=device, dtype=torch.long) for b, _, n in spans])
            hidden = hidden.index_put((seq_idx, batch_idx), frames.to(hidden.dtype))
        elif self.audio_encoder is not None and torch.is_grad_enabled():
            # A batch without clips leaves the adapter out of the graph; megatron's overlapped
            # gradient reduce waits for a gradient of every trainable parameter, so keep it in
            # with a zero contribution.
            trainable = [p.sum() for p in self.audio_encoder.parameters() if p.requires_grad]
            if trainable:
                hidden = hidden + 0.0 * torch.stack(trainable).sum().to(hidden.dtype)
        return hidden

    def _rotary(self, position_ids: Tensor, inference_context) -> Tensor:
        if inference_context is not None:
            # megatron slices q angles at [offset, offset + S) and k angles at [0, offset + S)
            end = inference_context.sequence_len_offset + position_ids.shape[1]
            return self.rotary.arange(end, position_ids.device)
        return self.rotary(position_ids)

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, tokens: Optional[Tensor], position_ids: Tensor, document_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, loss_weights: Optional[Tensor] = None, *,
                audio_waveforms: Optional[Tensor] = None, audio_num_samples: Optional[Tensor] = None,
                audio_rows: Optional[Tensor] = None, inference_context=None, return_logits: bool = False,
                logits_last_only: bool = False, plan: Optional[HostPlan] = None, **_unused):
        """See the module docstring. Shapes as in ``batch.py``.

        Returns: non-last stage -> hidden [s(/TP), B, H]; last stage -> ``StreamLosses`` when
        ``labels`` is given, ``(stream0 [B, S, Vpad], streams [B, S, K-1, W])`` logits when
        ``return_logits``, else the final hidden states [s(/TP), B, H].
        ``plan``: ``batch.host_plan`` of this batch (computed from its CPU tensors), so that
        the forward makes no host sync; None: derived from the device tensors.
        """
        if self.pre_process:
            with scope("ualm.embed"):
                hidden = self.embed(tokens, audio_waveforms, audio_num_samples, audio_rows, plan)
            if self.config.sequence_parallel:
                hidden = scatter_to_sequence_parallel_region(hidden)
        else:
            hidden = None  # the decoder reads its pipeline input tensor

        attention_mask = None
        if inference_context is None and (plan.packed if plan is not None else is_packed(document_ids)):
            attention_mask = document_ids
        rotary = self._rotary(position_ids, inference_context)
        graph = self.decoder_graph
        if graph is not None and hidden is not None and graph.accepts(hidden, attention_mask, rotary, inference_context):
            hidden = graph(hidden, attention_mask, rotary)
        else:
            hidden = self.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary,
                                  inference_context=inference_context)
        if not self.post_process:
            return hidden
        if return_logits:
            return self.head.logits(hidden, last_only=logits_last_only)
        if labels is None:
            return hidden
        if loss_weights is None:
            raise ValueError("labels given without loss_weights")
        with scope("ualm.head"):
            targets = (plan.head_rows, plan.head_sizes) if plan is not None else None
            return self.head(hidden, labels, loss_weights, targets)

    @torch.no_grad()
    def logits(self, tokens: Tensor, position_ids: Tensor, document_ids: Optional[Tensor] = None,
               inference_context=None, last_only: bool = False, **audio) -> tuple[Tensor, Tensor]:
        """Inference logits (last stage): stream 0 [B, S, padded vocab] gathered over TP with
        padding rows at -inf, and streams 1..K-1 over their blocks [B, S, K-1, W]
        (S = 1 with ``last_only``). ``audio``: the audio_* keywords of ``forward``."""
        return self.forward(tokens, position_ids, document_ids, inference_context=inference_context,
                            return_logits=True, logits_last_only=last_only, **audio)


def build_ualm_model(model_cfg, config: TransformerConfig, vp_stage: Optional[int] = None,
                     pre_process: Optional[bool] = None, post_process: Optional[bool] = None) -> UALMModel:
    """UALMModel for this rank's pipeline stage (``pre/post_process`` from parallel_state)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return UALMModel(model_cfg, config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


__all__ = ["UALMModel", "StreamLosses", "build_ualm_model", "padded_vocab"]
