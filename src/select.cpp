#include "select.h"

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <sstream>

namespace fa2rt {

const char* vendor_name(Vendor v) {
  switch (v) {
    case Vendor::kCuda:
      return "cuda";
    case Vendor::kRocm:
      return "rocm";
    default:
      return "none";
  }
}

Vendor vendor_from_name(const std::string& name) {
  if (name == "cuda") return Vendor::kCuda;
  if (name == "rocm") return Vendor::kRocm;
  return Vendor::kNone;
}

const char* load_mode_name(LoadMode m) {
  switch (m) {
    case LoadMode::kNative:
      return "native";
    case LoadMode::kBinaryCompat:
      return "binary-compat";
    default:
      return "ptx-jit";
  }
}

const char* reject_name(Reject r) {
  static const char* const names[] = {
      "no_device",   "no_images",  "arch_unsupported", "arch_mismatch", "ptx_unusable", "forced_out", "layout",
      "page_size",   "dtype",      "head_dim",         "features",      "band",         "alignment",  "shared_memory",
      "index_range", "grid_limit",
  };
  return names[static_cast<int>(r)];
}

const std::vector<ArchCompat>& arch_compat_table() {
  // sm86/sm87 run sm80 SASS (same major); sm89 prefers its own image; sm90 cubins are sm_90a-only, and older
  // builds reach sm90 only through their PTX. AMD archs run only their own images.
  static const std::vector<ArchCompat> table = {
      {"sm80", "sm80", LoadMode::kNative},       {"sm86", "sm80", LoadMode::kBinaryCompat},
      {"sm87", "sm80", LoadMode::kBinaryCompat}, {"sm89", "sm89", LoadMode::kNative},
      {"sm89", "sm80", LoadMode::kBinaryCompat}, {"sm90", "sm90", LoadMode::kNative},
      {"sm90", "sm89", LoadMode::kPtxJit},       {"sm90", "sm80", LoadMode::kPtxJit},
      {"gfx90a", "gfx90a", LoadMode::kNative},   {"gfx942", "gfx942", LoadMode::kNative},
  };
  return table;
}

namespace {

int sm_number(const std::string& arch) {
  if (arch.rfind("sm", 0) != 0) return -1;
  return std::atoi(arch.c_str() + 2);
}

int ptx_target_number(const std::string& target) {  // "sm_90a" -> 90
  return target.rfind("sm_", 0) == 0 ? std::atoi(target.c_str() + 3) : -1;
}

std::string str(int64_t v) { return std::to_string(v); }

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : sep) + item;
  return out;
}

// A check returns an empty string when the image fits, else the message of its rejection.
using Check = std::function<std::string(const Problem&, const DeviceInfo&, const ImageInfo&, LoadMode)>;

bool contains(const std::vector<std::string>& items, const std::string& item) {
  return std::find(items.begin(), items.end(), item) != items.end();
}

std::string check_layout(const Problem& p, const DeviceInfo&, const ImageInfo& img, LoadMode) {
  if (contains(img.layouts, p.layout)) return "";
  return "layout: image takes " + join(img.layouts, "+") + " calls, problem is " + p.layout;
}

std::string check_page_size(const Problem& p, const DeviceInfo&, const ImageInfo& img, LoadMode) {
  if (p.page_size == 0) return "";
  if (img.page_multiple > 0 && p.page_size % img.page_multiple == 0) return "";
  if (img.page_multiple == 0) return "page_size: image takes no paged cache, problem has pages of " + str(p.page_size);
  return "page_size: image takes pages that are multiples of " + str(img.page_multiple) + ", problem has " +
         str(p.page_size);
}

std::string check_dtype(const Problem& p, const DeviceInfo&, const ImageInfo& img, LoadMode) {
  if (img.dtype == p.dtype) return "";
  return "dtype: image is " + img.dtype + ", problem is " + p.dtype;
}

std::string check_head_dim(const Problem& p, const DeviceInfo&, const ImageInfo& img, LoadMode) {
  if (!img.d_mask) {
    if (img.head_dim == p.head_dim) return "";
    return "head_dim: image is compiled for exactly " + str(img.head_dim) + ", problem has " + str(p.head_dim);
  }
  if (p.head_dim <= img.head_dim && p.head_dim % kHeadDimMultiple == 0) return "";
  return "head_dim: image takes multiples of " + str(kHeadDimMultiple) + " up to " + str(img.head_dim) +
         ", problem has " + str(p.head_dim);
}

std::string check_features(const Problem& p, const DeviceInfo&, const ImageInfo& img, LoadMode) {
  for (const auto& f : p.features)
    if (!contains(img.features, f))
      return "features: image has no " + f +
             " (compiled with: " + (img.features.empty() ? std::string("none") : join(img.features, "+")) + ")";
  for (const auto& f : img.features)
    if (!contains(p.features, f) && !contains(img.optional_features, f))
      return "features: image always applies " + f + ", problem has none";
  return "";
}

std::string check_band(const Problem& p, const DeviceInfo&, const ImageInfo& img, LoadMode) {
  if (img.full_band_only && !p.full_band)
    return "band: image's tile is tuned for calls without causal or window, problem has one";
  if (img.max_seqlen_k > 0 && p.seqlen_k > img.max_seqlen_k)
    return "band: image's schedule is tuned for calls of at most " + str(img.max_seqlen_k) + " keys, problem has " +
           str(p.seqlen_k);
  if (img.one_split && p.splits != 1)
    return "band: image's tile is tuned for decode calls of one split, problem has " + str(p.splits);
  return "";
}

std::string check_alignment(const Problem& p, const DeviceInfo&, const ImageInfo& img, LoadMode) {
  if (img.align16 && !p.aligned16)
    return "alignment: image assumes " + str(kAlignBytes) + "-byte aligned q/k/v/out pointers, and one is not";
  if (img.strides8 && !p.strides8)
    return "alignment: image takes every q/k/v/out stride in units of " + str(kStrideMultiple) +
           " elements, and one is not";
  return "";
}

std::string check_shared_memory(const Problem&, const DeviceInfo& d, const ImageInfo& img, LoadMode) {
  if (img.shared_bytes <= d.shared_optin_bytes) return "";
  return "shared_memory: image needs " + str(img.shared_bytes) + " bytes per block, device " + d.arch + " allows " +
         str(d.shared_optin_bytes);
}

std::string check_index_range(const Problem& p, const DeviceInfo&, const ImageInfo&, LoadMode) {
  if (p.max_head_extent <= kMaxInt32Offset) return "";
  return "index_range: offsets inside one (batch, head) slice reach " + str(p.max_head_extent) +
         ", kernels index them with int32 (max " + str(kMaxInt32Offset) + ")";
}

std::string check_grid(const Problem& p, const DeviceInfo&, const ImageInfo&, LoadMode) {
  if (p.batch * p.nheads <= kMaxGridY) return "";
  return "grid_limit: batch * nheads = " + str(p.batch * p.nheads) + " exceeds the grid's y limit " + str(kMaxGridY);
}

std::string check_ptx(const Problem&, const DeviceInfo& d, const ImageInfo& img, LoadMode mode) {
  if (mode != LoadMode::kPtxJit) return "";
  if (!img.has_ptx) return "ptx_unusable: image has no PTX";
  if (!img.ptx.portable) return "ptx_unusable: PTX target " + img.ptx.target + " is arch-specific";
  if (ptx_target_number(img.ptx.target) > sm_number(d.arch))
    return "ptx_unusable: PTX target " + img.ptx.target + " is newer than device " + d.arch;
  return "";
}

struct NamedCheck {
  Reject code;
  Check fn;
};

// The order the checks run in; the first failing check is the image's rejection.
const std::vector<NamedCheck>& checks() {
  static const std::vector<NamedCheck> list = {
      {Reject::kPtxUnusable, check_ptx},
      {Reject::kLayout, check_layout},
      {Reject::kPageSize, check_page_size},
      {Reject::kDtype, check_dtype},
      {Reject::kHeadDim, check_head_dim},
      {Reject::kFeatures, check_features},
      {Reject::kBand, check_band},
      {Reject::kAlignment, check_alignment},
      {Reject::kSharedMemory, check_shared_memory},
      {Reject::kIndexRange, check_index_range},
      {Reject::kGridLimit, check_grid},
  };
  return list;
}

std::string newest_portable_ptx_arch(const std::vector<ImageInfo>& images) {
  std::string best;
  for (const auto& img : images)
    if (img.vendor == Vendor::kCuda && img.has_ptx && img.ptx.portable && sm_number(img.arch) > sm_number(best))
      best = img.arch;
  return best;
}

}  // namespace

std::vector<std::pair<std::string, LoadMode>> compatible_archs(const DeviceInfo& device,
                                                               const std::vector<ImageInfo>& images) {
  std::vector<std::pair<std::string, LoadMode>> out;
  for (const auto& row : arch_compat_table())
    if (device.arch == row.device_arch) out.emplace_back(row.image_arch, row.mode);
  if (!out.empty() || device.vendor != Vendor::kCuda) return out;
  // A newer NVIDIA arch with no row of its own JIT-compiles the newest portable PTX.
  int newest_row = 0;
  for (const auto& row : arch_compat_table()) newest_row = std::max(newest_row, sm_number(row.device_arch));
  const std::string ptx_arch = newest_portable_ptx_arch(images);
  if (sm_number(device.arch) > newest_row && !ptx_arch.empty()) out.emplace_back(ptx_arch, LoadMode::kPtxJit);
  return out;
}

Selection select(const Problem& problem, const DeviceInfo& device, const std::vector<ImageInfo>& images,
                 const SelectOptions& options) {
  Selection sel;
  if (device.vendor == Vendor::kNone) {
    sel.rejections.push_back({"", Reject::kNoDevice, "no_device: no GPU with a usable driver holds the tensors"});
    return sel;
  }
  std::vector<const ImageInfo*> candidates;
  for (const auto& img : images)
    if (img.vendor == device.vendor && img.op == problem.op) candidates.push_back(&img);
  if (candidates.empty()) {
    sel.rejections.push_back(
        {"", Reject::kNoImages,
         std::string("no_images: this build has no '") + problem.op + "' images for " + vendor_name(device.vendor)});
    return sel;
  }
  auto archs = compatible_archs(device, images);
  if (archs.empty()) {
    sel.rejections.push_back(
        {"", Reject::kArchUnsupported,
         "arch_unsupported: device arch " + device.arch + " has no compatible build (see the architecture table)"});
    return sel;
  }
  if (!options.force_arch.empty()) {
    // Testing aid: run one older build on this device through its PTX.
    archs.assign(1, {options.force_arch, device.vendor == Vendor::kCuda ? LoadMode::kPtxJit : LoadMode::kNative});
  }
  // Rank: compatibility order first, the registry's order inside one arch.
  for (const auto& [arch, mode] : archs) {
    for (const ImageInfo* img : candidates) {
      if (img->arch != arch) continue;
      std::string why;
      Reject code = Reject::kArchMismatch;
      for (const auto& check : checks()) {
        why = check.fn(problem, device, *img, mode);
        if (!why.empty()) {
          code = check.code;
          break;
        }
      }
      if (why.empty() && sel.image == nullptr) {
        sel.image = img;
        sel.mode = mode;
      } else if (!why.empty()) {
        sel.rejections.push_back({img->name, code, why});
      }
    }
  }
  // Images of archs the device cannot run are rejections too, so the report accounts for every candidate.
  for (const ImageInfo* img : candidates) {
    bool listed = std::any_of(archs.begin(), archs.end(), [&](const auto& a) { return a.first == img->arch; });
    if (listed) continue;
    const bool forced = !options.force_arch.empty();
    sel.rejections.push_back({img->name, forced ? Reject::kForcedOut : Reject::kArchMismatch,
                              forced
                                  ? "forced_out: FA2RT_FORCE_ARCH=" + options.force_arch + " excludes arch " + img->arch
                                  : "arch_mismatch: " + img->arch + " images do not run on " + device.arch});
  }
  return sel;
}

}  // namespace fa2rt
