// HIP runtime shim: opens libamdhip64 with dlopen on first use. It declares the few HIP types and entry points it
// needs itself, so building it needs no ROCm install.
#include <dlfcn.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "backend.h"

namespace fa2rt {
namespace {

using hipError_t = int;
using hipModule_t = void*;
using hipFunction_t = void*;
using hipStream_t = void*;

// hipDeviceAttribute_t values of hip/hip_runtime_api.h, ROCm 5.0 to 7.x (the enum that starts at
// hipDeviceAttributeCudaCompatibleBegin = 0; ROCm 4.x numbered them differently).
constexpr int kAttrMultiprocessorCount = 63;
constexpr int kAttrMaxSharedMemoryPerBlock = 74;
constexpr int kAttrWarpSize = 87;

// hipDeviceProp_tR0600 of hip/hip_runtime_api.h (ROCm 6.0+, filled by hipGetDevicePropertiesR0600), up to
// gcnArchName, the one field read here. Runs of fields not read are folded into arrays named after them.
struct PropsR0600 {
  char name[256], uuid[16], luid[8];
  unsigned luidDeviceNodeMask;
  size_t totalGlobalMem, sharedMemPerBlock;
  int regsPerBlock, warpSize;
  size_t memPitch;
  int maxThreadsPerBlock, maxThreadsDim[3], maxGridSize[3], clockRate;
  size_t totalConstMem;
  int major, minor;
  size_t textureAlignment, texturePitchAlignment;
  int deviceOverlap, multiProcessorCount, kernelExecTimeoutEnabled, integrated, canMapHostMemory, computeMode;
  int maxTexture1D_to_maxSurfaceCubemapLayered[40];
  size_t surfaceAlignment;
  int concurrentKernels_to_localL1CacheSupported[16];
  size_t sharedMemPerMultiprocessor;
  int regsPerMultiprocessor_to_cooperativeMultiDeviceLaunch[12];
  size_t sharedMemPerBlockOptin;
  int pageableMemoryAccessUsesHostPageTables_to_accessPolicyMaxWindowSize[4];
  size_t reservedSharedMemPerBlock;
  int hostRegisterSupported_to_unifiedFunctionPointers[13];
  int reserved[63], hipReserved[32];
  char gcnArchName[256];
};
// Offsets as the ROCm 6 header lays them out (whole struct: 1472 bytes).
static_assert(offsetof(PropsR0600, warpSize) == 308, "hipDeviceProp_tR0600 layout");
static_assert(offsetof(PropsR0600, multiProcessorCount) == 388, "hipDeviceProp_tR0600 layout");
static_assert(offsetof(PropsR0600, surfaceAlignment) == 568, "hipDeviceProp_tR0600 layout");
static_assert(offsetof(PropsR0600, sharedMemPerBlockOptin) == 696, "hipDeviceProp_tR0600 layout");
static_assert(offsetof(PropsR0600, gcnArchName) == 1160, "hipDeviceProp_tR0600 layout");

// hipDeviceProp_t of ROCm 5.x (hipDeviceProp_tR0000 since 6.0), filled by hipGetDeviceProperties there.
struct PropsR0000 {
  char name[256];
  size_t totalGlobalMem, sharedMemPerBlock;
  int regsPerBlock, warpSize, maxThreadsPerBlock, maxThreadsDim[3], maxGridSize[3], clockRate, memoryClockRate,
      memoryBusWidth;
  size_t totalConstMem;
  int major, minor, multiProcessorCount, l2CacheSize, maxThreadsPerMultiProcessor, computeMode, clockInstructionRate,
      arch, concurrentKernels, pciDomainID, pciBusID, pciDeviceID;
  size_t maxSharedMemoryPerMultiProcessor;
  int isMultiGpuBoard, canMapHostMemory, gcnArch;
  char gcnArchName[256];
};
static_assert(offsetof(PropsR0000, multiProcessorCount) == 336, "hipDeviceProp_t (ROCm 5) layout");
static_assert(offsetof(PropsR0000, gcnArchName) == 396, "hipDeviceProp_t (ROCm 5) layout");

// Room for either struct in full and for fields a later release appends.
union Props {
  PropsR0600 r0600;
  PropsR0000 r0000;
  char bytes[4096];
};

struct Api {
  hipError_t (*hipInit)(unsigned) = nullptr;
  hipError_t (*hipDriverGetVersion)(int*) = nullptr;
  hipError_t (*hipRuntimeGetVersion)(int*) = nullptr;
  hipError_t (*hipGetDeviceCount)(int*) = nullptr;
  hipError_t (*hipDeviceGetAttribute)(int*, int, int) = nullptr;
  hipError_t (*hipDeviceGetName)(char*, int, int) = nullptr;
  hipError_t (*hipGetDeviceProperties)(Props*, int) = nullptr;
  hipError_t (*hipGetDevice)(int*) = nullptr;
  hipError_t (*hipSetDevice)(int) = nullptr;
  hipError_t (*hipModuleLoadData)(hipModule_t*, const void*) = nullptr;
  hipError_t (*hipModuleGetFunction)(hipFunction_t*, hipModule_t, const char*) = nullptr;
  hipError_t (*hipModuleLaunchKernel)(hipFunction_t, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                      unsigned, hipStream_t, void**, void**) = nullptr;
  const char* (*hipGetErrorName)(hipError_t) = nullptr;
};

class RocmBackend final : public Backend {
 public:
  Vendor vendor() const override { return Vendor::kRocm; }

  BackendStatus status() override {
    std::call_once(open_once_, [this] { open(); });
    return status_;
  }

  DeviceInfo probe(int index) override {
    require_available();
    check_index(index);
    DeviceInfo info;
    info.vendor = Vendor::kRocm;
    info.index = index;
    Props props{};
    check(api_.hipGetDeviceProperties(&props, index), props_call_);
    const char* raw = props_r0600_ ? props.r0600.gcnArchName : props.r0000.gcnArchName;
    info.arch_raw = std::string(raw, strnlen(raw, sizeof(props.r0600.gcnArchName)));
    info.arch = info.arch_raw.substr(0, info.arch_raw.find(':'));  // "gfx942:sramecc+:xnack-" -> "gfx942"
    char name[256] = {0};
    check(api_.hipDeviceGetName(name, sizeof(name) - 1, index), "hipDeviceGetName");
    info.name = name;
    info.warp_size = attribute(index, kAttrWarpSize);
    info.shared_optin_bytes = attribute(index, kAttrMaxSharedMemoryPerBlock);
    info.multiprocessors = attribute(index, kAttrMultiprocessorCount);
    return info;
  }

  // HIP needs no opt-in for dynamic LDS up to the per-block limit, so shared_bytes needs no action here.
  LoadedKernel load(int index, const std::string& data, const std::string& kernel_name, int64_t) override {
    require_available();
    DeviceGuard guard(this, index);
    LoadedKernel k;
    check(api_.hipModuleLoadData(&k.module, data.data()), "hipModuleLoadData");
    check(api_.hipModuleGetFunction(&k.function, k.module, kernel_name.c_str()), "hipModuleGetFunction");
    return k;
  }

  void launch(int index, const LoadedKernel& k, const LaunchConfig& c, void** params) override {
    require_available();
    DeviceGuard guard(this, index);
    check(api_.hipModuleLaunchKernel(k.function, c.grid[0], c.grid[1], c.grid[2], c.block, 1, 1, c.shared_bytes,
                                     static_cast<hipStream_t>(c.stream), params, nullptr),
          "hipModuleLaunchKernel");
  }

 private:
  // HIP's current device is per thread: make `index` current for the scope and give the caller's back afterwards.
  class DeviceGuard {
   public:
    DeviceGuard(RocmBackend* b, int index) : b_(b) {
      b->check_index(index);
      b->check(b->api_.hipGetDevice(&previous_), "hipGetDevice");
      if (previous_ != index) {
        b->check(b->api_.hipSetDevice(index), "hipSetDevice");
        switched_ = true;
      }
    }
    ~DeviceGuard() {
      if (switched_) b_->api_.hipSetDevice(previous_);
    }

   private:
    RocmBackend* b_;
    int previous_ = 0;
    bool switched_ = false;
  };

  void open() {
    const char* override_name = std::getenv("FA2RT_HIP_LIBRARY");
    std::vector<std::string> names;
    if (override_name && *override_name)
      names = {override_name};
    else
      names = {"libamdhip64.so", "libamdhip64.so.7", "libamdhip64.so.6", "libamdhip64.so.5"};
    std::string opened, tried;
    void* lib = open_library(names, &opened, &tried);
    status_.library = opened.empty() ? names.front() : opened;
    if (lib == nullptr) {
      status_.error = "cannot open the HIP runtime library (" + tried + ")";
      return;
    }
    std::string missing;
    auto bind = [&](auto& slot, const char* symbol) {
      slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(dlsym(lib, symbol));
      if (slot == nullptr) missing += std::string(missing.empty() ? "" : ", ") + symbol;
    };
    bind(api_.hipInit, "hipInit");
    bind(api_.hipDriverGetVersion, "hipDriverGetVersion");
    bind(api_.hipRuntimeGetVersion, "hipRuntimeGetVersion");
    bind(api_.hipGetDeviceCount, "hipGetDeviceCount");
    bind(api_.hipDeviceGetAttribute, "hipDeviceGetAttribute");
    bind(api_.hipDeviceGetName, "hipDeviceGetName");
    bind(api_.hipGetDevice, "hipGetDevice");
    bind(api_.hipSetDevice, "hipSetDevice");
    bind(api_.hipModuleLoadData, "hipModuleLoadData");
    bind(api_.hipModuleGetFunction, "hipModuleGetFunction");
    bind(api_.hipModuleLaunchKernel, "hipModuleLaunchKernel");
    bind(api_.hipGetErrorName, "hipGetErrorName");
    // ROCm 6 exports the new layout under a versioned name; ROCm 5 has only the old one.
    props_r0600_ = dlsym(lib, "hipGetDevicePropertiesR0600") != nullptr;
    props_call_ = props_r0600_ ? "hipGetDevicePropertiesR0600" : "hipGetDeviceProperties";
    bind(api_.hipGetDeviceProperties, props_call_);
    if (!missing.empty()) {
      status_.error = status_.library + " lacks " + missing;
      return;
    }
    hipError_t rc = api_.hipInit(0);
    if (rc != 0) {
      status_.error = message(rc, "hipInit");
      return;
    }
    if (api_.hipDriverGetVersion(&status_.driver_version) != 0 || status_.driver_version == 0)
      api_.hipRuntimeGetVersion(&status_.driver_version);
    if (api_.hipGetDeviceCount(&status_.device_count) != 0) status_.device_count = 0;  // hipErrorNoDevice
    status_.available = true;
  }

  void require_available() {
    BackendStatus s = status();
    if (!s.available) throw std::runtime_error("ROCm backend unavailable: " + s.error);
  }

  std::string message(hipError_t rc, const char* call) {
    const char* name = api_.hipGetErrorName ? api_.hipGetErrorName(rc) : nullptr;
    return std::string("HIP runtime: ") + call + " failed with " + (name ? name : "unknown") + " (" +
           std::to_string(rc) + ")";
  }

  void check(hipError_t rc, const char* call) {
    if (rc != 0) throw std::runtime_error(message(rc, call));
  }

  void check_index(int index) {
    if (index < 0 || index >= status_.device_count)
      throw std::out_of_range("ROCm device index " + std::to_string(index) + " out of range [0, " +
                              std::to_string(status_.device_count) + ")");
  }

  int attribute(int index, int attr) {
    int value = 0;
    check(api_.hipDeviceGetAttribute(&value, attr, index), "hipDeviceGetAttribute");
    return value;
  }

  std::once_flag open_once_;
  BackendStatus status_;
  Api api_;
  bool props_r0600_ = true;
  const char* props_call_ = "hipGetDevicePropertiesR0600";
};

}  // namespace

std::unique_ptr<Backend> make_rocm_backend() { return std::make_unique<RocmBackend>(); }

}  // namespace fa2rt
