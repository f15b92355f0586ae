"""The seeded fuzz (tests/fuzz_cases.py) on the CPU: every generated call through fa2rt.attention (the CPU path)
against the float64 reference, gradients included; the calls the kernels would take also through the forward
kernel source in the Triton interpreter with a tile of every vendor; and the misuse list, each raising an error
that names its argument. The same generator runs on the GPU in tests/gpu/test_fuzz_gpu.py.
"""

import pytest
import test_kernel_interpreter as interp  # tests/cpu is on sys.path: pytest's default (prepend) import mode
import torch
from fuzz_cases import (
    BAD_INPUTS,
    LAYOUTS,
    MALFORMED,
    MALFORMED_ARGUMENT,
    PAGE_SIZES,
    VARLEN_LAYOUTS,
    build,
    build_varlen,
    call,
    call_varlen,
    check,
    check_varlen,
    generate,
    generate_paged,
    generate_varlen,
)

import fa2rt
from fa2rt import ops, policy
from fa2rt.validate import check_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = generate()
INTERPRETER_MAX_LEN = 80  # the interpreter runs each program in numpy: longer calls cost seconds each


@pytest.mark.filterwarnings("ignore::fa2rt.FallbackWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz_case(case):
    built = build(case)
    out, lse = call(case, built)
    check(case, built, out, lse)


VARLEN_CASES = generate_varlen()
PAGED_CASES = generate_paged()


@pytest.mark.filterwarnings("ignore::fa2rt.FallbackWarning")
@pytest.mark.parametrize("case", VARLEN_CASES + PAGED_CASES, ids=[c.id for c in VARLEN_CASES + PAGED_CASES])
def test_fuzz_varlen_case(case):
    built = build_varlen(case)
    if case.malformed:
        # Index tensors on the CPU: their values are checked, and the error names the argument that breaks a rule.
        with pytest.raises(ValueError) as info:
            call_varlen(case, built)
        assert str(info.value).split(":")[0] in MALFORMED_ARGUMENT[case.malformed], str(info.value)
        return
    out, lse = call_varlen(case, built)
    check_varlen(case, built, out, lse)


@pytest.mark.parametrize("name,make,exc,argument", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_argument(name, make, exc, argument):
    kwargs = make("cpu")
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(exc) as info:
        fa2rt.attention(q, k, v, **kwargs)
    assert str(info.value).startswith(f"{argument}: expected"), str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# The kernel source on the calls it would take: fp16/fp32 (bf16 misbehaves in the interpreter), forward only.

def _kernel_kind(shapes, bucket):
    """The first image kind of the variant grid that can run the call in this bucket, or None."""
    for kind in interp.variants.KINDS:
        if interp._image_takes(kind, bucket, shapes):
            return kind
    return None


def _bucket(head_dim):
    buckets = sorted({tile[2] for tile in interp.TILE_ARCHS})
    return next((b for b in buckets if b >= head_dim), None)


def _interpreter_case(case, views):
    """An interpreter Case running `case` on a tile of the vendor its index picks, or None when no kernel image
    would take the call (dtype, head dim, layout, length)."""
    (q, k, v), slopes = (views[name].detach() for name in "qkv"), views["slopes"]
    if case.dtype == "bf16" or case.head_dim % 8 or max(case.seqlen_q, case.seqlen_k) > INTERPRETER_MAX_LEN:
        return None
    bucket = _bucket(case.head_dim)
    if bucket is None or 0 in (case.seqlen_q, case.seqlen_k):
        return None
    api = check_inputs(q, k, v, causal=case.causal, softmax_scale=case.scale, window_size=case.window,
                       softcap=case.softcap, alibi_slopes=slopes)
    shapes = ops._shapes(q, k, api.softmax_scale, *api.window, api.softcap, slopes)
    problem = policy.problem_for(shapes, (q, k, v))
    kind = _kernel_kind(shapes, bucket)
    if not (problem.aligned16 and problem.strides8) or kind is None:
        return None
    vendor = ("cuda", "rocm")[case.index % 2]
    tiles = [(cfg["block_m"], cfg["block_n"], b) for v_, _, b, cfg in interp.CONFIGS if v_ == vendor and b == bucket]
    return interp.Case("apifuzz", tiles[case.index % len(tiles)], kind,
                       (case.batch, case.seqlen_q, case.seqlen_k, case.nheads, case.nheads_k), case.head_dim,
                       case.torch_dtype, case.causal, case.window, case.scale, case.softcap, None)


def _interpreter_cases():
    picked = []
    for case in CASES:
        built = build(case)
        views = dict(built.views, slopes=built.slopes)
        icase = _interpreter_case(case, views)
        if icase is not None:
            picked.append((case, icase))
    return picked


INTERPRETER_CASES = _interpreter_cases()


@pytest.mark.parametrize("case,icase", INTERPRETER_CASES, ids=[c.id for c, _ in INTERPRETER_CASES])
def test_fuzz_case_in_interpreter(case, icase):
    built = build(case)
    q, k, v = (built.views[name].detach() for name in "qkv")
    o, lse, o_buf, lse_buf = interp._outputs(q, strided=False)
    interp._launch(icase, q, k, v, built.slopes, o, lse)
    interp._check(icase, q, k, v, built.slopes, o, lse, o_buf, lse_buf)


# ---------------------------------------------------------------------------------------------------------------------
# The generator's coverage cannot shrink silently.

def test_generator_covers_what_the_issue_names():
    assert len(CASES) >= 200
    assert {c.layout for c in CASES} == set(LAYOUTS)
    assert {0, 1} <= {c.seqlen_q for c in CASES} and {0, 1} <= {c.seqlen_k for c in CASES}
    edges = {c.seqlen_k for c in CASES} | {c.seqlen_q for c in CASES}
    assert any({e - 1, e + 1} & edges for e in (64, 128)), "no length at a tile edge +- 1"
    assert {c.nheads // c.nheads_k for c in CASES} >= {1, 2, 4}
    assert any(c.head_dim % 8 for c in CASES) and any(c.head_dim == 256 for c in CASES)
    features = {(c.causal, c.window != (-1, -1), c.softcap > 0, c.alibi is not None) for c in CASES}
    assert len(features) >= 12, features
    assert any(c.grad and c.grad_layout == "sliced" for c in CASES) and any(c.out == "sliced" for c in CASES)
    assert len(INTERPRETER_CASES) >= 20, len(INTERPRETER_CASES)
    assert len(VARLEN_CASES) >= 60 and {c.layout for c in VARLEN_CASES} == set(VARLEN_LAYOUTS)
    assert {c.malformed for c in VARLEN_CASES} >= set(MALFORMED), "every kind of malformed cu_seqlens"
    assert any(0 in c.lengths_q for c in VARLEN_CASES) and any(1 in c.lengths_k for c in VARLEN_CASES)
    assert {c.layout for c, _ in INTERPRETER_CASES} >= {"contig", "expanded", "transposed", "packed"}
    assert {c.page_size for c in PAGED_CASES} == set(PAGE_SIZES) and not any(c.grad for c in PAGED_CASES)
    assert any(c.malformed == "table_outside" for c in PAGED_CASES) and any(c.causal for c in PAGED_CASES)


def test_sdpa_layout_rule():
    # On the GPU a view SDPA's kernels cannot take is copied first, and explain names the copy (run by
    # tests/gpu/test_fuzz_gpu.py); the rule itself is checked here on a stand-in that looks like a CUDA tensor to it.
    from fa2rt import fallback

    class Cuda:
        is_cuda = True

        def __init__(self, t, address):
            self.t, self.address = t, address

        def __getattr__(self, name):
            return getattr(self.t, name)

        def data_ptr(self):
            return self.address

    base = torch.zeros(2, 129, 4, 68, dtype=torch.float16)
    assert "stride 68 of dim 2" in fallback.sdpa_layout_problem(Cuda(base[..., :64], 0))
    assert fallback.sdpa_layout_problem(Cuda(base[..., :64].contiguous(), 0)) == ""
    assert "base address 2 bytes" in fallback.sdpa_layout_problem(Cuda(base[..., :64].contiguous(), 2))
    assert fallback.sdpa_layout_problem(Cuda(base[..., :5], 0)) == ""  # torch pads a head dim of 5 itself
    assert fallback.sdpa_layout_problem(base[..., :64]) == ""  # CPU tensors: no fused GPU kernel
    assert [n for n, _ in fallback.layout_copies(q=Cuda(base[..., :64], 0), k=Cuda(base[..., :64].contiguous(), 0),
                                                 v=None)] == ["q"]
