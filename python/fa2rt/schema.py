"""The kernel manifest's layout version, the one contract between the AOT build and the run time: the build
(backends/kernels/aot.py, which loads this file by path without importing fa2rt) writes it into manifest.json, and
fa2rt refuses a build whose manifest carries another (builds.py).

History: 2: head-dim buckets with d_mask and features, strides in units of 8 elements; 3: rows say full_band_only;
4: rows say which call layouts they take ("layouts": ["dense"] or ["varlen"]), varlen rows take CU_Q, CU_K, total_q
and total_k after the other params; 5: ops decode and decode_combine (layouts "kvcache", "paged", "partials"), rows
say page_multiple (the page sizes a "paged" image takes, 0 for the others) and optional_features (features applied
only when a call asks), mma_instr may be null. Still 5 with the forward's "varlen_paged" rows (paged prefill: the
varlen params, then BLOCK_TABLE, stride_bt, page_size, pool_blocks, max_blocks; page_multiple 16): a runtime that does
not know the layout never selects them (its layout check), so no older reader misreads them. Still 5 with the
"append" op's rows (layouts "kvcache" and "paged"): a runtime that does not know the op never asks for it. 6: rows
say their kernel family ("triton", or "gluon_ws": sm90 warp-specialised Gluon kernels, whose argument names differ),
flat_grid (one program per (block, batch, head) along x) and tensor_maps (TMA descriptor params, type "tensormap",
encoded per launch); a fwd "gluon_ws" row fits the same problems as a Triton one, so an older runtime would select
it and fail to pack it. Still 6 with rows' max_seqlen_k (sm90's short Gluon forward images serve calls of at most
that many keys; 0 or absent: any): an older runtime ignores it and may give a short image a longer call, which it
computes correctly, only more slowly. Still 6 with rows' one_split (decode images tuned for calls of one split;
false or absent: any): likewise, an older runtime may give one a split call, which it computes correctly. Still 6
with rows' dependent_launch (sm90 merge images that wait for the decode grid themselves, launched as its programmatic
dependents; false or absent: a plain launch): an older runtime launches them plainly, where the wait does nothing.
"""

MANIFEST_SCHEMA = 6
