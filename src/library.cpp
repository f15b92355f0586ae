#include <dlfcn.h>

#include <mutex>

#include "backend.h"

namespace fa2rt {

void* open_library(const std::vector<std::string>& names, std::string* opened, std::string* tried) {
  for (const auto& name : names) {
    // Share the copy torch (or anyone) already loaded before loading our own.
    void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
    if (handle == nullptr) handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) {
      *opened = name;
      return handle;
    }
    const char* err = dlerror();
    *tried += (tried->empty() ? "" : "; ") + name + ": " + (err ? err : "not found");
  }
  return nullptr;
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
