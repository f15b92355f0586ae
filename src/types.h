// Plain data shared by the dispatcher, the module cache and the vendor backends.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fa2rt {

enum class Vendor { kNone, kCuda, kRocm };

const char* vendor_name(Vendor v);
Vendor vendor_from_name(const std::string& name);

// What the dispatcher needs to know about one device, probed through a backend or written by hand in tests.
struct DeviceInfo {
  Vendor vendor = Vendor::kNone;
  int index = -1;
  std::string arch;      // normalised: "sm90", "gfx942"
  std::string arch_raw;  // as the driver reported it: "9.0", "gfx942:sramecc+:xnack-"
  std::string name;
  int warp_size = 0;
  int64_t shared_optin_bytes = 0;  // largest shared memory (LDS) one block may opt in to
  int multiprocessors = 0;         // SMs or CUs
};

// One manifest row: a compiled kernel image and everything the dispatcher may check about it.
struct ImageFile {
  std::string path;  // absolute
  std::string sha256;
  std::string target;     // PTX only: ".target" of the PTX, e.g. "sm_80", "sm_90a"
  bool portable = false;  // PTX only: can be JIT-compiled for newer archs
};

// A TMA descriptor parameter (sm90 Gluon images): the launch encodes it from the address given for `param` and the
// rank int32 shape and rank int64 stride params that follow it (Triton's ABI: outermost dim first, strides in
// elements), with the element type, swizzle and box the kernel was compiled for.
struct TensorMap {
  std::string param;
  int dtype = 0;             // CUtensorMapDataType (host enum)
  int elem_size = 0;         // bytes
  int swizzle = 0;           // CUtensorMapSwizzle
  std::vector<int64_t> box;  // outermost dim first; its size is the rank
};

struct ImageInfo {
  std::string name;
  std::string op;  // "fwd"
  Vendor vendor = Vendor::kNone;
  std::string arch;                   // "sm80", "gfx942"
  std::string dtype;                  // "fp16", "bf16"
  int head_dim = 0;                   // the compiled head-dim bucket
  bool d_mask = false;                // also takes head dims below the bucket (multiples of 8), masking the tail
  std::vector<std::string> features;  // optional score terms compiled in: "softcap", "alibi"
  bool full_band_only = false;        // tile tuned for calls whose band covers every key: serves only those
  int64_t max_seqlen_k = 0;           // schedule tuned for short calls: serves only those of at most this many keys
  bool one_split = false;             // decode tile tuned for calls of one split: serves only those
  bool dependent_launch = false;      // launched as a programmatic dependent of the kernel before it (it waits itself)
  std::vector<std::string> layouts = {"dense"};  // call layouts the image takes: "dense", "varlen", "kvcache", ...
  int page_multiple = 0;  // "paged" images: the page sizes they take are multiples of this (0: takes no pages)
  // Features the image applies only when a call asks (ALiBi with slope 0; the decode kernels' run-time softcap), so
  // it also serves calls without them; the others it always applies.
  std::vector<std::string> optional_features = {"alibi"};
  int block_m = 0;
  int block_n = 0;
  int num_warps = 0;
  int warp_size = 0;
  int64_t shared_bytes = 0;
  bool align16 = false;   // assumes 16-byte aligned base pointers
  bool strides8 = false;  // takes q/k/v/out strides in units of 8 elements
  std::string kernel_name;
  std::vector<std::pair<std::string, std::string>> params;  // run-time params in launch order: (name, triton type)
  int scratch_params = 0;         // trailing scratch pointers Triton appends; always passed as null
  std::string family = "triton";  // the kernel source family, which fixes the argument names: "triton", "gluon_ws"
  bool flat_grid = false;         // one program per (block, batch, head) along x (a tile walk), instead of a 2-D grid
  int ctas_per_sm = 0;            // persistent (flat grid only): at most this many programs per SM walk the tiles
  std::vector<TensorMap> tensor_maps;
  ImageFile binary;  // cubin or hsaco
  bool has_ptx = false;
  ImageFile ptx;
};

// One attention call, as the dispatcher sees it.
struct Problem {
  std::string op = "fwd";
  std::string layout = "dense";  // "dense" (batch, seqlen, nheads, headdim); "varlen" (total, nheads, headdim)
  std::string dtype;
  int64_t batch = 0;     // varlen: the number of sequences
  int64_t seqlen_q = 0;  // varlen: the longest sequences (max_seqlen_q, max_seqlen_k)
  int64_t seqlen_k = 0;
  int64_t nheads = 0;
  int64_t nheads_k = 0;
  int64_t head_dim = 0;
  std::vector<std::string> features;  // score terms the call needs: "softcap", "alibi" (causal/window are run time)
  bool full_band = false;             // no causal and no window: every query row sees every key
  bool aligned16 = true;              // every base pointer 16-byte aligned
  bool strides8 = true;               // every q/k/v/out stride a multiple of 8 elements
  int64_t max_head_extent = 0;        // largest element offset inside one (batch, head) slice of any tensor
  int64_t page_size = 0;              // "paged" calls: tokens per cache page (0 otherwise)
  int64_t splits = 1;                 // decode: chunks each sequence's keys are split into (programs along axis 0)
  int64_t multiprocessors = 0;        // SMs (CUs) of the call's device; persistent images launch per SM (0: unknown)
};

// How an image reaches the device.
enum class LoadMode { kNative, kBinaryCompat, kPtxJit };
const char* load_mode_name(LoadMode m);

}  // namespace fa2rt
