/* A stand-in for libamdhip64.so exporting what backends/rocm/hip_backend.cpp binds. Built by the tests
 * (cc -shared -fPIC); behaviour comes from FAKE_HIP_* environment variables read at call time, and every call
 * is appended to a log of JSON lines that the test reads back through fake_log().
 *   FAKE_HIP_FAIL=hipInit:100,hipModuleLaunchKernel:719  make calls return these codes
 *   FAKE_HIP_DEVICES, FAKE_HIP_ARCH (gcnArchName), FAKE_HIP_CUS, FAKE_HIP_LDS, FAKE_HIP_WARP, FAKE_HIP_NAME
 *   FAKE_HIP_CURRENT=i       the calling thread's current device before anyone sets it (default 0)
 *   FAKE_HIP_BAD_IMAGE=text  images starting with text fail to load with hipErrorInvalidImage
 * -DFAKE_OMIT_LAUNCH leaves hipModuleLaunchKernel out; -DFAKE_ROCM5 exports the ROCm 5 hipGetDeviceProperties
 * (old struct layout) instead of hipGetDevicePropertiesR0600. */
#define FAKE_FAIL_VAR "FAKE_HIP_FAIL"
#include "fake_common.h"

static int current = -1, n_modules, n_functions;

static int bad_device(int dev) { return dev < 0 || dev >= env_int("FAKE_HIP_DEVICES", 1); }

static int current_device(void) { return current >= 0 ? current : env_int("FAKE_HIP_CURRENT", 0); }

int hipInit(unsigned flags) {
  say("{\"call\": \"hipInit\", \"flags\": %u}", flags);
  return fail("hipInit");
}

int hipDriverGetVersion(int* v) {
  *v = env_int("FAKE_HIP_DRIVER", 60342134);
  return fail("hipDriverGetVersion");
}

int hipRuntimeGetVersion(int* v) {
  *v = env_int("FAKE_HIP_RUNTIME", 60342134);
  return fail("hipRuntimeGetVersion");
}

int hipGetDeviceCount(int* n) {
  *n = env_int("FAKE_HIP_DEVICES", 1);
  return *n == 0 ? 100 : fail("hipGetDeviceCount"); /* hipErrorNoDevice, as the runtime answers */
}

int hipDeviceGetAttribute(int* v, int attr, int dev) {
  say("{\"call\": \"hipDeviceGetAttribute\", \"attr\": %d, \"device\": %d}", attr, dev);
  if (bad_device(dev)) return 101; /* hipErrorInvalidDevice */
  *v = -1;
  if (attr == 63) *v = env_int("FAKE_HIP_CUS", 304);
  if (attr == 74) *v = env_int("FAKE_HIP_LDS", 65536);
  if (attr == 87) *v = env_int("FAKE_HIP_WARP", 64);
  return fail("hipDeviceGetAttribute");
}

int hipDeviceGetName(char* name, int len, int dev) {
  const char* v = getenv("FAKE_HIP_NAME");
  say("{\"call\": \"hipDeviceGetName\", \"device\": %d, \"len\": %d}", dev, len);
  if (bad_device(dev)) return 101;
  snprintf(name, len, "%s", v ? v : "Fake AMD GPU");
  return fail("hipDeviceGetName");
}

/* Writes the whole struct, as the runtime does: a caller's buffer must hold all of it. */
static int fill_props(const char* call, unsigned char* props, size_t size, size_t warp_at, size_t cus_at,
                      size_t arch_at, int dev) {
  const char* arch = getenv("FAKE_HIP_ARCH");
  const int warp = env_int("FAKE_HIP_WARP", 64), cus = env_int("FAKE_HIP_CUS", 304);
  say("{\"call\": \"%s\", \"device\": %d}", call, dev);
  if (bad_device(dev)) return 101;
  memset(props, 0, size);
  snprintf((char*)props, 256, "%s", "Fake AMD GPU");
  memcpy(props + warp_at, &warp, sizeof(int));
  memcpy(props + cus_at, &cus, sizeof(int));
  snprintf((char*)props + arch_at, 256, "%s", arch ? arch : "gfx942:sramecc+:xnack-");
  return fail(call);
}

#ifdef FAKE_ROCM5
int hipGetDeviceProperties(void* props, int dev) {
  return fill_props("hipGetDeviceProperties", props, 792, 276, 336, 396, dev);
}
#else
int hipGetDevicePropertiesR0600(void* props, int dev) {
  return fill_props("hipGetDevicePropertiesR0600", props, 1472, 308, 388, 1160, dev);
}
#endif

int hipGetDevice(int* dev) {
  *dev = current_device();
  say("{\"call\": \"hipGetDevice\", \"device\": %d}", *dev);
  return fail("hipGetDevice");
}

int hipSetDevice(int dev) {
  say("{\"call\": \"hipSetDevice\", \"device\": %d}", dev);
  if (bad_device(dev)) return 101;
  current = dev;
  return fail("hipSetDevice");
}

int hipModuleLoadData(void** module, const void* image) {
  char head[33];
  const size_t len = strlen((const char*)image);
  hex(head, image, len < 16 ? len : 16);
  say("{\"call\": \"hipModuleLoadData\", \"head\": \"%s\", \"strlen\": %zu, \"device\": %d}", head, len,
      current_device());
  const char* bad = getenv("FAKE_HIP_BAD_IMAGE");
  if (bad && *bad && strncmp((const char*)image, bad, strlen(bad)) == 0) return 200; /* hipErrorInvalidImage */
  *module = (void*)(uintptr_t)(0x10000 + ++n_modules);
  return fail("hipModuleLoadData");
}

int hipModuleGetFunction(void** function, void* module, const char* name) {
  say("{\"call\": \"hipModuleGetFunction\", \"module\": %llu, \"name\": \"%s\"}", (unsigned long long)(uintptr_t)module,
      name);
  *function = (void*)(uintptr_t)(0x20000 + ++n_functions);
  return fail("hipModuleGetFunction");
}

#ifndef FAKE_OMIT_LAUNCH
int hipModuleLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                          unsigned shared, void* stream, void** params, void** extra) {
  char args[64 * 20];
  params_json(args, sizeof(args), params);
  say("{\"call\": \"hipModuleLaunchKernel\", \"function\": %llu, \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], "
      "\"shared\": %u, \"stream\": %llu, \"device\": %d, \"params\": [%s], \"extra\": %d}",
      (unsigned long long)(uintptr_t)f, gx, gy, gz, bx, by, bz, shared, (unsigned long long)(uintptr_t)stream,
      current_device(), args, extra != NULL);
  return fail("hipModuleLaunchKernel");
}
#endif

const char* hipGetErrorName(int rc) {
  return rc == 100   ? "hipErrorNoDevice"
         : rc == 101 ? "hipErrorInvalidDevice"
         : rc == 200 ? "hipErrorInvalidImage"
         : rc == 719 ? "hipErrorLaunchFailure"
                     : "hipErrorUnknown";
}
