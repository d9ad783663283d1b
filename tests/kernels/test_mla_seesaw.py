"""The Gluon seesaw MLA decode kernel (Hopper) against the fp32 reference and the Triton kernel.

GPU only (sm_90): Gluon has no interpreter. The cases cover partial last tiles (the kernel zeroes
the dead rows of a page in shared memory), odd and even tile counts per unit, sequences of length 0,
pages of 64 and 128 tokens, two and three head blocks, fp16, and NaN in every cache slot no
sequence owns.
"""

from __future__ import annotations

import math

import pytest
import torch

from moecluster.kernels import mla_decode as mla
from moecluster.kernels import mla_seesaw
from tests.kernels.test_mla_decode import make_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"
    ),
]


def _poison_unowned(p) -> None:
    """NaN in every cache slot no sequence owns: the tail of each last page and the spare pages."""
    block_size = p.kv_cache.shape[1]
    owned = torch.zeros(p.kv_cache.shape[:2], dtype=torch.bool)
    tables = p.block_tables.cpu()
    for i, n in enumerate(p.seq_lens.tolist()):
        for t in range(n):
            owned[tables[i, t // block_size], t % block_size] = True
    p.kv_cache[~owned.to(p.kv_cache.device)] = float("nan")


@pytest.fixture(autouse=True)
def _fresh_kernel_state(monkeypatch) -> None:
    """Each test starts with the kernel on; a launch failure in one must not pass silently in another."""
    monkeypatch.setattr(mla_seesaw, "_failed", [])


def _run(p, monkeypatch, seesaw: bool, allow: bool | None = None, **knobs) -> torch.Tensor:
    calls = []
    real = mla_seesaw.launch_stage1
    monkeypatch.setattr(mla_seesaw, "launch_stage1", lambda *a: (calls.append(1), real(*a)))
    monkeypatch.setenv("MOECLUSTER_MLA_SEESAW", "1" if (seesaw if allow is None else allow) else "0")
    out = torch.full((p.q.shape[0], p.q.shape[1], p.kv_lora_rank), float("nan"), dtype=p.q.dtype, device="cuda")
    mla.mla_decode(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, p.kv_lora_rank, out=out, **knobs)
    assert bool(calls) == seesaw, "the launcher did not take the expected kernel"
    assert not mla_seesaw._failed, f"the seesaw kernel failed and the Triton kernel ran: {mla_seesaw._failed}"
    assert not torch.isnan(out).any(), "unwritten (or NaN) output elements"
    return out.float()


CASES = [
    # (lens, heads, block_size, dtype, num_splits)
    ([1, 63, 64, 65, 127, 128, 129, 1000, 4096, 2047], 128, 64, torch.bfloat16, None),
    ([1, 63, 64, 65, 127, 128, 129, 1000, 4096, 2047], 128, 64, torch.bfloat16, 1),
    ([300, 64, 1, 191, 5000], 128, 64, torch.bfloat16, 3),
    ([1, 2, 700], 64, 128, torch.float16, 7),  # the long one in 7 units, the short ones in one each
    ([0, 1, 700, 0, 129], 128, 64, torch.bfloat16, None),  # sequences of length 0: zeros
    ([129, 65, 4000], 192, 128, torch.bfloat16, None),  # three head blocks, pages of 128
    ([255, 256, 257, 3], 64, 256, torch.bfloat16, 2),  # pages of 256: four tiles a page
    ([9000, 3, 700], 128, 64, torch.bfloat16, None),  # tables over 8,192 tokens (the output by TMA at any width)
]


@pytest.mark.parametrize("lens,heads,block_size,dtype,splits", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_reference(monkeypatch, lens, heads, block_size, dtype, splits) -> None:
    gen = torch.Generator().manual_seed(len(lens) * 1000 + heads + block_size)
    p = make_problem(gen, torch.device("cuda"), lens, heads, 512, 64, block_size, dtype)
    p.scale = 1.0 / math.sqrt(192)
    exact = mla.mla_decode_reference(p.q.float(), p.kv_cache.float(), p.block_tables, p.seq_lens, p.scale, 512)
    _poison_unowned(p)
    knobs = {} if splits is None else dict(num_splits=splits)
    got = _run(p, monkeypatch, True, **knobs)
    triton_out = _run(p, monkeypatch, False, **knobs)
    rel = ((got - exact).norm() / exact.norm()).item()
    rel_triton = ((triton_out - exact).norm() / exact.norm()).item()
    assert rel < max(1e-2, 2 * rel_triton), (rel, rel_triton)
    torch.testing.assert_close(got, exact, rtol=2e-2, atol=2e-2)


def test_rising_maxima(monkeypatch) -> None:
    """Scores that climb along each sequence, by steps below and above the kernel's LAZY threshold and
    by sudden jumps, so that the running max is raised (and the output rescaled) in later tiles too,
    not only the first: random scores settle their max in the first tile or two. The rope columns
    carry the climb: q's are one vector u, token t's are r_t u / |u|^2 with r_t = climb_t / (scale
    log2 e), adding climb_t log2 units to the scores."""
    gen = torch.Generator().manual_seed(13)
    lens = [4096, 1000, 129, 700]
    p = make_problem(gen, torch.device("cuda"), lens, 128, 512, 64, 64, torch.bfloat16)
    u = torch.randn(64, generator=gen)
    p.q[..., 512:] = u.to(p.q)
    log2e = 1.0 / math.log(2.0)
    tables, page = p.block_tables.cpu(), p.kv_cache.shape[1]
    for i, n in enumerate(lens):
        t = torch.arange(n)
        tile = t // mla_seesaw.TILE
        climb = 2.5 * tile + 20.0 * (tile % 7 == 3) - 6.0 * (tile % 5 == 4) + 0.05 * (t % mla_seesaw.TILE)
        rows = (climb / (p.scale * log2e))[:, None] * (u / u.dot(u))[None, :]
        p.kv_cache[tables[i, t // page].to("cuda"), (t % page).to("cuda"), 512:] = rows.to(p.kv_cache)
    exact = mla.mla_decode_reference(p.q.float(), p.kv_cache.float(), p.block_tables, p.seq_lens, p.scale, 512)
    _poison_unowned(p)
    for splits in (None, 1, 5):
        knobs = {} if splits is None else {"num_splits": splits}
        torch.testing.assert_close(_run(p, monkeypatch, True, **knobs), exact, rtol=2e-2, atol=2e-2)


def test_strided_q_and_int64_tables(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(7)
    p = make_problem(gen, torch.device("cuda"), [77, 640, 1], 64, 512, 64, 64, torch.bfloat16, index_dtype=torch.int64)
    wide = torch.randn(*p.q.shape[:2], 576 + 8, device="cuda", dtype=p.q.dtype)
    wide[..., :576] = p.q
    p.q = wide[..., :576]  # a view into a wider buffer: the launcher copies it to a contiguous q
    assert not p.q.is_contiguous()
    exact = mla.mla_decode_reference(p.q.float(), p.kv_cache.float(), p.block_tables, p.seq_lens, p.scale, 512)
    torch.testing.assert_close(_run(p, monkeypatch, True), exact, rtol=2e-2, atol=2e-2)


def test_strided_out(monkeypatch) -> None:
    """The output may be a view (heads strided): the kernel stores through its strides."""
    monkeypatch.setenv("MOECLUSTER_MLA_SEESAW", "1")
    gen = torch.Generator().manual_seed(5)
    p = make_problem(gen, torch.device("cuda"), [300, 64], 64, 512, 64, 64, torch.bfloat16)
    wide = torch.full((2, 64, 512 + 16), float("nan"), dtype=p.q.dtype, device="cuda")
    out = wide[..., :512]
    mla.mla_decode(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, 512, out=out)
    assert not mla_seesaw._failed
    exact = mla.mla_decode_reference(p.q.float(), p.kv_cache.float(), p.block_tables, p.seq_lens, p.scale, 512)
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)
    assert torch.isnan(wide[..., 512:]).all(), "wrote past the view"


def test_misaligned_q_takes_the_triton_kernel() -> None:
    gen = torch.Generator().manual_seed(9)
    p = make_problem(gen, torch.device("cuda"), [100], 64, 512, 64, 64, torch.bfloat16)
    flat = torch.empty(64 * 576 + 1, dtype=p.q.dtype, device="cuda")
    q = flat[1:].view(1, 64, 576)  # contiguous, 2 bytes off a 16-byte boundary
    q.copy_(p.q)
    assert q.is_contiguous() and q.data_ptr() % 16
    assert not mla_seesaw.supported(q, p.kv_cache, 512)


def test_out_of_scope_calls_take_the_triton_kernel(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(3)
    p = make_problem(gen, torch.device("cuda"), [100, 7], 32, 512, 64, 64, torch.bfloat16)  # 32 heads
    assert not mla_seesaw.supported(p.q, p.kv_cache, 512)
    p = make_problem(gen, torch.device("cuda"), [100, 7], 64, 512, 64, 32, torch.bfloat16)  # pages of 32
    assert not mla_seesaw.supported(p.q, p.kv_cache, 512)
    p = make_problem(gen, torch.device("cuda"), [100, 7], 64, 512, 64, 64, torch.bfloat16)
    assert mla_seesaw.supported(p.q, p.kv_cache, 512)
    _run(p, monkeypatch, False, allow=True, block_n=32)  # pinned Triton tiles keep the Triton kernel


def test_cuda_graph_replays_new_inputs(monkeypatch) -> None:
    """Captured in a CUDA graph (as the engine runs decode steps), a replay reads the q, lengths and
    block tables in place at replay time: the TMA descriptors carry addresses, not contents."""
    monkeypatch.setenv("MOECLUSTER_MLA_SEESAW", "1")
    gen = torch.Generator().manual_seed(11)
    p = make_problem(gen, torch.device("cuda"), [700, 64, 130], 128, 512, 64, 64, torch.bfloat16)
    out = torch.empty(3, 128, 512, dtype=p.q.dtype, device="cuda")
    clean = p.kv_cache.clone()  # the reference multiplies masked rows by 0: it needs finite ones
    _poison_unowned(p)
    calls = []
    real = mla_seesaw.launch_stage1
    monkeypatch.setattr(mla_seesaw, "launch_stage1", lambda *a: (calls.append(1), real(*a)))
    call = lambda: mla.mla_decode(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, 512, out=out)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the poisoned cache is written on the current stream
    with torch.cuda.stream(stream):
        call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        call()
    assert calls and not mla_seesaw._failed, "the seesaw kernel was not the one captured"
    for lens in ([700, 64, 130], [1, 63, 65]):  # within each sequence's blocks (the rest is NaN)
        p.q.copy_(torch.randn(p.q.shape, generator=gen).to(p.q))
        p.seq_lens.copy_(torch.tensor(lens, dtype=p.seq_lens.dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        exact = mla.mla_decode_reference(p.q.float(), clean.float(), p.block_tables, p.seq_lens, p.scale, 512)
        torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)
