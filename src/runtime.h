// Module cache per device and kernel launch: the mechanism half of a call, after selection chose an image.
#pragma once

#include <map>
#include <string>
#include <variant>

#include "backend.h"
#include "types.h"

namespace fa2rt {

using ArgValue = std::variant<int64_t, double>;
using NamedArgs = std::map<std::string, ArgValue>;

// Loads (once per device, image and mode; thread-safe) and returns the kernel. Verifies the file's sha256 first.
LoadedKernel load_kernel(const ImageInfo& image, LoadMode mode, int device);

// Packs `args` by the image's parameter list (every name exactly once), computes the op's grid and launches.
void launch(const ImageInfo& image, LoadMode mode, int device, void* stream, const Problem& problem,
            const NamedArgs& args);

// Exposed for tests: the packed parameter bytes, one entry per kernel parameter (scratch pointers included).
std::vector<std::string> pack_params(const ImageInfo& image, const NamedArgs& args);
LaunchConfig launch_config(const ImageInfo& image, const Problem& problem, void* stream);

size_t cached_kernel_count();

}  // namespace fa2rt
