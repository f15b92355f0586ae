// Kernel selection: for a problem and a device, the chosen image or, for every candidate, why not.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "types.h"

namespace fa2rt {

// Why a device or an image cannot serve a problem. The names are stable: Python, the doctor and the tests read them.
enum class Reject {
  kNoDevice,         // no GPU behind the tensor, or its driver is unavailable
  kNoImages,         // nothing built for this vendor and op
  kArchUnsupported,  // the device arch has no entry in the compatibility table and is not newer than any build
  kArchMismatch,     // this image's arch cannot run on the device arch
  kPtxUnusable,      // the PTX is arch-specific or targets a newer arch than the device
  kForcedOut,        // FA2RT_FORCE_ARCH excludes this image
  kLayout,           // the image does not take the call's layout (dense, varlen, kvcache, paged)
  kPageSize,         // a paged call whose page size the image does not take
  kDtype,
  kHeadDim,
  kFeatures,
  kBand,  // an image tuned for a class of calls (full band, short, one split) the call is not in
  kAlignment,
  kSharedMemory,
  kIndexRange,
  kGridLimit,
};

const char* reject_name(Reject r);

struct Rejection {
  std::string image;  // empty for device-level reasons
  Reject code;
  std::string message;
};

struct SelectOptions {
  std::string force_arch;  // restrict to images of this arch, loaded through their PTX (testing older builds)
};

struct Selection {
  const ImageInfo* image = nullptr;  // owned by the registry
  LoadMode mode = LoadMode::kNative;
  std::vector<Rejection> rejections;
};

// One entry of the architecture compatibility table (DESIGN.md, point 5).
struct ArchCompat {
  const char* device_arch;
  const char* image_arch;
  LoadMode mode;
};

// The table itself, in preference order per device arch.
const std::vector<ArchCompat>& arch_compat_table();

// Image archs a device may run, best first. Empty when the device arch is unsupported.
std::vector<std::pair<std::string, LoadMode>> compatible_archs(const DeviceInfo& device,
                                                               const std::vector<ImageInfo>& images);

Selection select(const Problem& problem, const DeviceInfo& device, const std::vector<ImageInfo>& images,
                 const SelectOptions& options);

// Limits the checks and their messages share.
constexpr int64_t kMaxInt32Offset = 2147483647;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;  // 2**31 - 1 on both vendors
constexpr int kAlignBytes = 16;
constexpr int kStrideMultiple = 8;   // kernels take q/k/v/out strides in units of this (kernels/fwd.py)
constexpr int kHeadDimMultiple = 8;  // masked images take head dims that are multiples of this (kernels/fwd.py)

}  // namespace fa2rt
