// CUDA driver-API shim: opens libcuda.so.1 with dlopen on first use. It declares the few driver types and entry
// points it needs itself, so building it needs no CUDA toolkit.
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "backend.h"

namespace fa2rt {
namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
using CUstream = void*;

// Enum values of the CUDA driver API (cuda.h).
constexpr int kAttrWarpSize = 10;
constexpr int kAttrMultiprocessorCount = 16;
constexpr int kAttrCapabilityMajor = 75;
constexpr int kAttrCapabilityMinor = 76;
constexpr int kAttrSharedOptin = 97;
constexpr int kFuncSharedSizeBytes = 1;
constexpr int kFuncMaxDynamicShared = 8;
constexpr int kJitErrorLogBuffer = 5;
constexpr int kJitErrorLogBufferSize = 6;
constexpr int64_t kDefaultDynamicShared = 48 * 1024;  // above this a kernel must opt in
// cuTensorMapEncodeTiled's fixed choices, as Triton's launcher makes them: no interleave, 128-byte L2 promotion, zero
// fill out of bounds (a box past a sequence's end reads zeros).
constexpr int kTensorMapInterleaveNone = 0;
constexpr int kTensorMapL2Promotion128B = 2;
constexpr int kTensorMapOobFillNone = 0;
constexpr int kMaxTensorMapRank = 5;
constexpr int kLaunchAttributeProgrammaticStreamSerialization = 6;

// CUlaunchAttribute and CUlaunchConfig of cuda.h (CUDA 12+), for cuLaunchKernelEx.
struct LaunchAttribute {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int programmatic_stream_serialization;
  } value;
};
struct LaunchConfigEx {
  unsigned grid[3], block[3], shared_bytes;
  CUstream stream;
  LaunchAttribute* attrs;
  unsigned num_attrs;
};

struct Api {
  CUresult (*cuInit)(unsigned) = nullptr;
  CUresult (*cuDriverGetVersion)(int*) = nullptr;
  CUresult (*cuDeviceGetCount)(int*) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice) = nullptr;
  CUresult (*cuDeviceGetName)(char*, int, CUdevice) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*cuCtxPushCurrent)(CUcontext) = nullptr;
  CUresult (*cuCtxPopCurrent)(CUcontext*) = nullptr;
  CUresult (*cuModuleLoadDataEx)(CUmodule*, const void*, unsigned, int*, void**) = nullptr;
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*cuFuncGetAttribute)(int*, int, CUfunction) = nullptr;
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int) = nullptr;
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                             void**, void**) = nullptr;
  CUresult (*cuGetErrorName)(CUresult, const char**) = nullptr;
  // Optional (CUDA 12 drivers): programmatic dependent launches use it (without it they launch plainly, where the
  // dependent's own wait does nothing).
  CUresult (*cuLaunchKernelEx)(const LaunchConfigEx*, CUfunction, void**, void**) = nullptr;
  // Optional (CUDA 12 drivers): only images with tensor maps need it.
  CUresult (*cuTensorMapEncodeTiled)(void*, int, unsigned, void*, const uint64_t*, const uint64_t*, const unsigned*,
                                     const unsigned*, int, int, int, int) = nullptr;
};

class CudaBackend final : public Backend {
 public:
  Vendor vendor() const override { return Vendor::kCuda; }

  BackendStatus status() override {
    std::call_once(open_once_, [this] { open(); });
    return status_;
  }

  DeviceInfo probe(int index) override {
    require_available();
    CUdevice dev = device(index);
    DeviceInfo info;
    info.vendor = Vendor::kCuda;
    info.index = index;
    const int major = attribute(dev, kAttrCapabilityMajor), minor = attribute(dev, kAttrCapabilityMinor);
    info.arch = "sm" + std::to_string(major * 10 + minor);
    info.arch_raw = std::to_string(major) + "." + std::to_string(minor);
    char name[256] = {0};
    check(api_.cuDeviceGetName(name, sizeof(name) - 1, dev), "cuDeviceGetName");
    info.name = name;
    info.warp_size = attribute(dev, kAttrWarpSize);
    info.shared_optin_bytes = attribute(dev, kAttrSharedOptin);
    info.multiprocessors = attribute(dev, kAttrMultiprocessorCount);
    return info;
  }

  LoadedKernel load(int index, const std::string& data, const std::string& kernel_name, int64_t shared_bytes) override {
    require_available();
    ContextGuard guard(this, index);
    LoadedKernel k;
    char log[8192] = {0};
    int options[] = {kJitErrorLogBuffer, kJitErrorLogBufferSize};
    void* values[] = {log, reinterpret_cast<void*>(sizeof(log) - 1)};
    CUresult rc = api_.cuModuleLoadDataEx(&k.module, data.data(), 2, options, values);
    if (rc != 0) throw std::runtime_error(message(rc, "cuModuleLoadDataEx") + (log[0] ? ": " + std::string(log) : ""));
    check(api_.cuModuleGetFunction(&k.function, k.module, kernel_name.c_str()), "cuModuleGetFunction");
    if (shared_bytes > kDefaultDynamicShared) {
      // Opt in to the device's full shared memory, as Triton's own loader does.
      int static_bytes = 0;
      check(api_.cuFuncGetAttribute(&static_bytes, kFuncSharedSizeBytes, k.function), "cuFuncGetAttribute");
      const int optin = attribute(device(index), kAttrSharedOptin);
      check(api_.cuFuncSetAttribute(k.function, kFuncMaxDynamicShared, optin - static_bytes), "cuFuncSetAttribute");
    }
    return k;
  }

  void encode_tensor_map(int index, const TensorMap& map, uint64_t address, const std::vector<int64_t>& shape,
                         const std::vector<int64_t>& strides, void* out) override {
    require_available();
    ContextGuard guard(this, index);  // a thread torch never made current may call (the launch pushes it too)
    const size_t rank = map.box.size();
    if (api_.cuTensorMapEncodeTiled == nullptr)
      throw std::runtime_error("tensor map " + map.param + ": " + status_.library + " lacks cuTensorMapEncodeTiled");
    if (rank < 1 || rank > kMaxTensorMapRank || shape.size() != rank || strides.size() != rank)
      throw std::invalid_argument("tensor map " + map.param + ": expected rank 1-5 box, shape and strides");
    // The driver takes dims innermost first, strides in bytes without the innermost (which is the element).
    uint64_t dims[kMaxTensorMapRank], byte_strides[kMaxTensorMapRank];
    unsigned box[kMaxTensorMapRank], element_strides[kMaxTensorMapRank];
    for (size_t i = 0; i < rank; ++i) {
      const size_t d = rank - 1 - i;
      dims[i] = static_cast<uint64_t>(shape[d]);
      box[i] = static_cast<unsigned>(map.box[d]);
      element_strides[i] = 1;
      if (i > 0) byte_strides[i - 1] = static_cast<uint64_t>(strides[d]) * map.elem_size;
    }
    CUresult rc = api_.cuTensorMapEncodeTiled(
        out, map.dtype, static_cast<unsigned>(rank), reinterpret_cast<void*>(address), dims, byte_strides, box,
        element_strides, kTensorMapInterleaveNone, map.swizzle, kTensorMapL2Promotion128B, kTensorMapOobFillNone);
    if (rc != 0) {
      std::string dims_text;
      for (size_t i = 0; i < rank; ++i)
        dims_text += (i ? ", " : "") + std::to_string(shape[i]) + "@" + std::to_string(strides[i]);
      throw std::invalid_argument(message(rc, "cuTensorMapEncodeTiled") + " for tensor map " + map.param +
                                  " (shape@stride " + dims_text + ", address " + std::to_string(address) + ")");
    }
  }

  void launch(int index, const LoadedKernel& k, const LaunchConfig& c, void** params) override {
    require_available();
    ContextGuard guard(this, index);
    if (c.dependent && api_.cuLaunchKernelEx != nullptr) {
      LaunchAttribute attr{};
      attr.id = kLaunchAttributeProgrammaticStreamSerialization;
      attr.value.programmatic_stream_serialization = 1;
      LaunchConfigEx ex{};
      std::copy(c.grid, c.grid + 3, ex.grid);
      ex.block[0] = c.block, ex.block[1] = ex.block[2] = 1;
      ex.shared_bytes = c.shared_bytes;
      ex.stream = static_cast<CUstream>(c.stream);
      ex.attrs = &attr;
      ex.num_attrs = 1;
      check(api_.cuLaunchKernelEx(&ex, k.function, params, nullptr), "cuLaunchKernelEx");
      return;
    }
    check(api_.cuLaunchKernel(k.function, c.grid[0], c.grid[1], c.grid[2], c.block, 1, 1, c.shared_bytes,
                              static_cast<CUstream>(c.stream), params, nullptr),
          "cuLaunchKernel");
  }

 private:
  // Makes the device's primary context (the one torch uses) current for the scope, if it is not already.
  class ContextGuard {
   public:
    ContextGuard(CudaBackend* b, int index) : b_(b) {
      CUcontext want = b->primary_context(index), current = nullptr;
      b->check(b->api_.cuCtxGetCurrent(&current), "cuCtxGetCurrent");
      if (current != want) {
        b->check(b->api_.cuCtxPushCurrent(want), "cuCtxPushCurrent");
        pushed_ = true;
      }
    }
    ~ContextGuard() {
      CUcontext popped = nullptr;
      if (pushed_) b_->api_.cuCtxPopCurrent(&popped);
    }

   private:
    CudaBackend* b_;
    bool pushed_ = false;
  };

  void open() {
    const char* override_name = std::getenv("FA2RT_CUDA_LIBRARY");
    std::vector<std::string> names = {override_name && *override_name ? override_name : "libcuda.so.1"};
    std::string opened, tried;
    void* lib = open_library(names, &opened, &tried);
    status_.library = opened.empty() ? names.front() : opened;
    if (lib == nullptr) {
      status_.error = "cannot open the CUDA driver library (" + tried + ")";
      return;
    }
    std::string missing;
    auto bind = [&](auto& slot, const char* symbol) {
      slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(dlsym(lib, symbol));
      if (slot == nullptr) missing += std::string(missing.empty() ? "" : ", ") + symbol;
    };
    bind(api_.cuInit, "cuInit");
    bind(api_.cuDriverGetVersion, "cuDriverGetVersion");
    bind(api_.cuDeviceGetCount, "cuDeviceGetCount");
    bind(api_.cuDeviceGet, "cuDeviceGet");
    bind(api_.cuDeviceGetAttribute, "cuDeviceGetAttribute");
    bind(api_.cuDeviceGetName, "cuDeviceGetName");
    bind(api_.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    bind(api_.cuCtxGetCurrent, "cuCtxGetCurrent");
    bind(api_.cuCtxPushCurrent, "cuCtxPushCurrent_v2");
    bind(api_.cuCtxPopCurrent, "cuCtxPopCurrent_v2");
    bind(api_.cuModuleLoadDataEx, "cuModuleLoadDataEx");
    bind(api_.cuModuleGetFunction, "cuModuleGetFunction");
    bind(api_.cuFuncGetAttribute, "cuFuncGetAttribute");
    bind(api_.cuFuncSetAttribute, "cuFuncSetAttribute");
    bind(api_.cuLaunchKernel, "cuLaunchKernel");
    bind(api_.cuGetErrorName, "cuGetErrorName");
    api_.cuLaunchKernelEx = reinterpret_cast<decltype(api_.cuLaunchKernelEx)>(dlsym(lib, "cuLaunchKernelEx"));
    api_.cuTensorMapEncodeTiled =
        reinterpret_cast<decltype(api_.cuTensorMapEncodeTiled)>(dlsym(lib, "cuTensorMapEncodeTiled"));
    if (!missing.empty()) {
      status_.error = status_.library + " lacks " + missing;
      return;
    }
    CUresult rc = api_.cuInit(0);
    if (rc != 0) {
      status_.error = message(rc, "cuInit");
      return;
    }
    api_.cuDriverGetVersion(&status_.driver_version);
    api_.cuDeviceGetCount(&status_.device_count);
    status_.available = true;
  }

  void require_available() {
    BackendStatus s = status();
    if (!s.available) throw std::runtime_error("CUDA backend unavailable: " + s.error);
  }

  std::string message(CUresult rc, const char* call) {
    const char* name = nullptr;
    if (api_.cuGetErrorName == nullptr || api_.cuGetErrorName(rc, &name) != 0 || name == nullptr) name = "unknown";
    return std::string("CUDA driver: ") + call + " failed with " + name + " (" + std::to_string(rc) + ")";
  }

  void check(CUresult rc, const char* call) {
    if (rc != 0) throw std::runtime_error(message(rc, call));
  }

  CUdevice device(int index) {
    if (index < 0 || index >= status_.device_count)
      throw std::out_of_range("CUDA device index " + std::to_string(index) + " out of range [0, " +
                              std::to_string(status_.device_count) + ")");
    CUdevice dev = 0;
    check(api_.cuDeviceGet(&dev, index), "cuDeviceGet");
    return dev;
  }

  int attribute(CUdevice dev, int attr) {
    int value = 0;
    check(api_.cuDeviceGetAttribute(&value, attr, dev), "cuDeviceGetAttribute");
    return value;
  }

  CUcontext primary_context(int index) {
    std::lock_guard<std::mutex> lock(ctx_mutex_);
    auto it = contexts_.find(index);
    if (it != contexts_.end()) return it->second;
    CUcontext ctx = nullptr;
    check(api_.cuDevicePrimaryCtxRetain(&ctx, device(index)), "cuDevicePrimaryCtxRetain");
    contexts_[index] = ctx;  // retained for the life of the process, like torch's
    return ctx;
  }

  std::once_flag open_once_;
  BackendStatus status_;
  Api api_;
  std::mutex ctx_mutex_;
  std::map<int, CUcontext> contexts_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace fa2rt
