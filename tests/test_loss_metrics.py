"""``model/loss.loss_metrics``: the masked sums equal plain boolean-indexed sums, per task too."""
import torch

from megatron_ualm.model.loss import loss_metrics


def _reference(ce, correct, w, task_ids):
    text = w[..., 0] >= 1.0
    audio = (w > 0) & (w < 1.0)
    out = {"text_ce_sum": ce[..., 0][text].sum(), "text_count": text.sum().float(),
           "text_correct": correct[..., 0][text].sum().float(), "audio_ce_sum": ce[audio].sum(),
           "audio_count": audio.sum().float(), "audio_correct": correct[audio].sum().float()}
    per_pos = (ce * w).sum(-1)
    for t in torch.unique(task_ids[task_ids >= 0]).tolist():
        out[f"task{t}_loss_sum"] = per_pos[task_ids == t].sum()
        out[f"task{t}_count"] = ((task_ids == t) & (w[..., 0] > 0)).sum().float()
    return out


def test_masked_sums_equal_indexed_sums():
    g = torch.Generator().manual_seed(0)
    B, S, K = 3, 40, 4
    kind = torch.randint(0, 3, (B, S), generator=g)  # 0 none, 1 text, 2 audio
    w = torch.zeros(B, S, K)
    w[..., 0] = (kind == 1).float()
    w[kind == 2] = 1.0 / K
    ce = torch.rand(B, S, K, generator=g) * (w > 0)
    correct = (torch.rand(B, S, K, generator=g) > 0.5) & (w > 0)
    task_ids = torch.randint(-1, 4, (B, S), generator=g)
    task_ids[0] = -1
    want = _reference(ce, correct, w, task_ids)
    for num_tasks in (None, 6):
        got = loss_metrics(ce, correct, w, task_ids, num_tasks=num_tasks)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, msg=k)
        extra = set(got) - set(want)
        assert all(float(got[k]) == 0.0 for k in extra), extra
        assert (not extra) if num_tasks is None else extra == {f"task{t}_{n}" for t in (4, 5)
                                                              for n in ("loss_sum", "count")}


def test_packed_flops_count_real_tokens_and_each_documents_attention():
    import torch

    from megatron_ualm.training.metrics import (
        attention_flops, batch_flops, dense_flops_per_token, model_flops_per_token, packed_lengths,
    )
    shape = dict(num_layers=3, hidden_size=64, ffn_hidden_size=128, num_heads=4, num_query_groups=2,
                 head_dim=16, vocab_rows=1000)
    S = 12
    dense = dense_flops_per_token(**shape)
    # one row that is a single S-long document: the same as the full-row convention
    one = torch.zeros(1, S, dtype=torch.int32)
    tokens, squares = packed_lengths(one)
    assert (tokens, squares) == (S, S * S)
    assert batch_flops(dense, 3, 4, 16, tokens, squares) == model_flops_per_token(**shape, seq_length=S) * S
    # two rows: documents of 5, 4 and 3 tokens, and a document of 2 followed by padding
    ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0, 0] + [-1] * 10], dtype=torch.int32)
    tokens, squares = packed_lengths(ids)
    assert (tokens, squares) == (14, 25 + 16 + 9 + 4)
    # brute force: every (query, key <= query) pair of a document costs 4 * H forward, 3x with backward
    pairs = sum(n * n for n in (5, 4, 3, 2))  # n^2 convention (as S^2 for the full row)
    assert attention_flops(3, 4, 16, squares) == 6 * 3 * 4 * 16 * pairs
    honest = batch_flops(dense, 3, 4, 16, tokens, squares)
    assert honest == dense * 14 + 6 * 3 * 64 * pairs
    assert honest < model_flops_per_token(**shape, seq_length=S) * ids.numel()  # short documents, padding
