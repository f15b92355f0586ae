// The interface every vendor shim implements. Shims live under backends/<vendor>/ and open their driver library
// with dlopen on first use; nothing here links a GPU runtime.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "types.h"

namespace fa2rt {

struct BackendStatus {
  bool available = false;
  std::string library;  // path or soname that was opened (or tried)
  std::string error;    // why it is unavailable
  int driver_version = 0;
  int device_count = 0;
};

// A loaded kernel: opaque module and function handles of the vendor API.
struct LoadedKernel {
  void* module = nullptr;
  void* function = nullptr;
};

struct LaunchConfig {
  unsigned grid[3] = {1, 1, 1};
  unsigned block = 0;
  unsigned shared_bytes = 0;
  void* stream = nullptr;
  bool dependent = false;  // a programmatic dependent launch (PDL: the kernel waits for the grid before it itself)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Vendor vendor() const = 0;
  // Opens the driver library once; never throws: a missing library is a status, not an error.
  virtual BackendStatus status() = 0;
  virtual DeviceInfo probe(int index) = 0;
  // data: a cubin/hsaco, or NUL-terminated PTX text.
  virtual LoadedKernel load(int device, const std::string& data, const std::string& kernel_name,
                            int64_t shared_bytes) = 0;
  virtual void launch(int device, const LoadedKernel& kernel, const LaunchConfig& config, void** params) = 0;
  // Writes the 128-byte TMA descriptor of a tensor at `address` on `device` (shape and strides in elements,
  // outermost first).
  virtual void encode_tensor_map(int device, const TensorMap& map, uint64_t address, const std::vector<int64_t>& shape,
                                 const std::vector<int64_t>& strides, void* out);
};

constexpr size_t kTensorMapBytes = 128;  // sizeof(CUtensorMap), aligned to 64 bytes

// Factories defined under backends/. The library name can be overridden (test doubles) by an environment variable.
std::unique_ptr<Backend> make_cuda_backend();
std::unique_ptr<Backend> make_rocm_backend();

// The process-wide backend for a vendor (created on first use, thread-safe).
Backend& backend_for(Vendor vendor);

// Opens a shared library: an already loaded copy first (RTLD_NOLOAD), then a fresh load. Returns null on failure
// and fills `tried` with what was attempted and why it failed.
void* open_library(const std::vector<std::string>& names, std::string* opened, std::string* tried);

}  // namespace fa2rt
