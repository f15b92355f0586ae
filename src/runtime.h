// Module cache per device and kernel launch: the mechanism half of a call, after selection chose an image.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "backend.h"
#include "types.h"

namespace fa2rt {

using ArgValue = std::variant<int64_t, double>;
using NamedArgs = std::map<std::string, ArgValue>;

// Loads (once per device, image and mode; thread-safe) and returns the kernel. Verifies the file's sha256 first.
LoadedKernel load_kernel(const ImageInfo& image, LoadMode mode, int device);

// A launch resolved once for one problem: the image, its load mode, the op's grid and every argument packed, except
// the pointer parameters named in `pointers`, whose addresses (with the stream) are all that changes between calls on
// tensors of the same shapes and strides. Training loops repeat a few problems, so callers keep plans per problem.
class LaunchPlan {
 public:
  // `args`: every other parameter of the image by name, checked and packed as pack_params does (int32 range
  // included). Throws when a name is missing, unknown, given twice, or a pointer name is not a pointer parameter.
  // `dependent`: launch a dependent_launch image as a programmatic dependent (false: plainly, which is as correct).
  LaunchPlan(const ImageInfo& image, LoadMode mode, const Problem& problem, const NamedArgs& args,
             const std::vector<std::string>& pointers, bool dependent = true);
  // `addresses` in the order of the constructor's `pointers`. Does nothing for an empty grid.
  void launch(int device, void* stream, const std::vector<uint64_t>& addresses) const;
  // The parameter bytes launch() passes (scratch pointers included), as pack_params returns them (testing aid);
  // a tensor map shows as its tensor's address, from which launch() encodes it.
  std::vector<std::string> packed(const std::vector<uint64_t>& addresses) const;

  const ImageInfo& image() const { return image_; }
  LoadMode mode() const { return mode_; }
  const LaunchConfig& config() const { return config_; }
  const std::vector<std::string>& pointers() const { return pointers_; }

 private:
  std::vector<uint64_t> with_addresses(const std::vector<uint64_t>& addresses) const;
  static std::vector<std::pair<size_t, size_t>> tensor_map_slots(const ImageInfo& image);
  // load_kernel's answer for this plan's image and mode, kept per device (no image-name key built per launch).
  LoadedKernel loaded(int device) const;
  // Copies tensor map k's encoding for this device and address into `out`, when one was kept.
  bool cached_map(size_t k, int device, uint64_t address, unsigned char* out) const;

  ImageInfo image_;  // a copy: the plan outlives any registry change
  LoadMode mode_;
  LaunchConfig config_;          // stream left null; launch() sets it
  std::vector<uint64_t> slots_;  // one 8-byte slot per parameter (narrower types in its first bytes)
  std::vector<size_t> sizes_;    // bytes of each parameter
  std::vector<std::string> pointers_;
  std::vector<size_t> pointer_slots_;
  std::vector<std::pair<size_t, size_t>> map_slots_;  // (param, tensor_maps entry) of each tensor map
  // Per-launch work kept across launches: the kernel per device, and the descriptors encoded so far by tensor map,
  // device and address (bounded): everything else a map encodes is fixed in the plan, and training loops and decode
  // steps hand the same buffers back call after call, layer after layer.
  struct LaunchCache;
  std::shared_ptr<LaunchCache> cache_;
};

// Packs `args` by the image's parameter list (every name exactly once), computes the op's grid and launches.
void launch(const ImageInfo& image, LoadMode mode, int device, void* stream, const Problem& problem,
            const NamedArgs& args);

// Exposed for tests: the packed parameter bytes, one entry per kernel parameter (scratch pointers included).
std::vector<std::string> pack_params(const ImageInfo& image, const NamedArgs& args);
LaunchConfig launch_config(const ImageInfo& image, const Problem& problem, void* stream);

size_t cached_kernel_count();

}  // namespace fa2rt
