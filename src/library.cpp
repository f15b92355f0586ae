#include <dlfcn.h>

#include <mutex>
#include <stdexcept>

#include "backend.h"

namespace fa2rt {

void* open_library(const std::vector<std::string>& names, std::string* opened, std::string* tried) {
  // Share a copy torch (or anyone) already loaded under any of the names before loading one of our own: a second
  // copy of a GPU runtime would not know torch's streams.
  for (const auto& name : names) {
    if (void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL)) {
      *opened = name;
      return handle;
    }
  }
  for (const auto& name : names) {
    if (void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL)) {
      *opened = name;
      return handle;
    }
    const char* err = dlerror();
    *tried += (tried->empty() ? "" : "; ") + name + ": " + (err ? err : "not found");
  }
  return nullptr;
}

void Backend::encode_tensor_map(int, const TensorMap& map, uint64_t, const std::vector<int64_t>&,
                                const std::vector<int64_t>&, void*) {
  throw std::runtime_error(std::string("tensor map ") + map.param + ": TMA descriptors are a CUDA feature, the " +
                           vendor_name(vendor()) + " backend has none");
}

Backend& backend_for(Vendor vendor) {
  static std::once_flag cuda_once, rocm_once;
  static std::unique_ptr<Backend> cuda, rocm;
  if (vendor == Vendor::kCuda) {
    std::call_once(cuda_once, [] { cuda = make_cuda_backend(); });
    return *cuda;
  }
  std::call_once(rocm_once, [] { rocm = make_rocm_backend(); });
  return *rocm;
}

}  // namespace fa2rt
