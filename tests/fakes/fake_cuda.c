/* A stand-in for libcuda.so.1 exporting what backends/cuda/cuda_backend.cpp binds. Built by the tests
 * (cc -shared -fPIC); behaviour comes from FAKE_CUDA_* environment variables read at call time, and every call
 * is appended to a log of JSON lines that the test reads back through fake_log().
 *   FAKE_CUDA_FAIL=cuInit:100,cuLaunchKernel:719  make calls return these codes
 *   FAKE_CUDA_DEVICES, FAKE_CUDA_CC (90 = 9.0), FAKE_CUDA_SMS, FAKE_CUDA_SHARED_OPTIN, FAKE_CUDA_NAME
 *   FAKE_CUDA_CURRENT=i       device whose primary context is current before anything is pushed (default: none)
 *   FAKE_CUDA_BAD_IMAGE=text  images starting with text fail to load with CUDA_ERROR_INVALID_PTX and
 *                             FAKE_CUDA_JIT_LOG in the JIT error log
 * -DFAKE_OMIT_LAUNCH leaves cuLaunchKernel out, -DFAKE_OMIT_LAUNCH_EX cuLaunchKernelEx,
 * -DFAKE_OMIT_TENSOR_MAP cuTensorMapEncodeTiled. */
#define FAKE_FAIL_VAR "FAKE_CUDA_FAIL"
#include "fake_common.h"

static void* ctx_stack[16];
static int ctx_depth, n_modules, n_functions;
static void* primary(int dev) { return (void*)(uintptr_t)(0xc0000 + dev); }

static void* current_ctx(void) {
  if (ctx_depth > 0) return ctx_stack[ctx_depth - 1];
  int dev = env_int("FAKE_CUDA_CURRENT", -1);
  return dev < 0 ? NULL : primary(dev);
}

int cuInit(unsigned flags) {
  say("{\"call\": \"cuInit\", \"flags\": %u}", flags);
  return fail("cuInit");
}

int cuDriverGetVersion(int* v) {
  *v = env_int("FAKE_CUDA_DRIVER", 12080);
  return fail("cuDriverGetVersion");
}

int cuDeviceGetCount(int* n) {
  *n = env_int("FAKE_CUDA_DEVICES", 1);
  return fail("cuDeviceGetCount");
}

int cuDeviceGet(int* dev, int ordinal) {
  say("{\"call\": \"cuDeviceGet\", \"ordinal\": %d}", ordinal);
  if (ordinal < 0 || ordinal >= env_int("FAKE_CUDA_DEVICES", 1)) return 101; /* CUDA_ERROR_INVALID_DEVICE */
  *dev = ordinal;
  return fail("cuDeviceGet");
}

int cuDeviceGetAttribute(int* v, int attr, int dev) {
  const int cc = env_int("FAKE_CUDA_CC", 90);
  say("{\"call\": \"cuDeviceGetAttribute\", \"attr\": %d, \"device\": %d}", attr, dev);
  *v = 0;
  if (attr == 10) *v = 32;
  if (attr == 16) *v = env_int("FAKE_CUDA_SMS", 132);
  if (attr == 75) *v = cc / 10;
  if (attr == 76) *v = cc % 10;
  if (attr == 97) *v = env_int("FAKE_CUDA_SHARED_OPTIN", 232448);
  return fail("cuDeviceGetAttribute");
}

int cuDeviceGetName(char* name, int len, int dev) {
  const char* v = getenv("FAKE_CUDA_NAME");
  snprintf(name, len, "%s", v ? v : "Fake NVIDIA GPU");
  say("{\"call\": \"cuDeviceGetName\", \"device\": %d, \"len\": %d}", dev, len);
  return fail("cuDeviceGetName");
}

int cuDevicePrimaryCtxRetain(void** ctx, int dev) {
  *ctx = primary(dev);
  say("{\"call\": \"cuDevicePrimaryCtxRetain\", \"device\": %d}", dev);
  return fail("cuDevicePrimaryCtxRetain");
}

int cuCtxGetCurrent(void** ctx) {
  *ctx = current_ctx();
  say("{\"call\": \"cuCtxGetCurrent\", \"ctx\": %llu}", (unsigned long long)(uintptr_t)*ctx);
  return fail("cuCtxGetCurrent");
}

int cuCtxPushCurrent_v2(void* ctx) {
  say("{\"call\": \"cuCtxPushCurrent_v2\", \"ctx\": %llu}", (unsigned long long)(uintptr_t)ctx);
  if (ctx_depth == 16) return 1;
  ctx_stack[ctx_depth++] = ctx;
  return fail("cuCtxPushCurrent_v2");
}

int cuCtxPopCurrent_v2(void** ctx) {
  *ctx = ctx_depth > 0 ? ctx_stack[--ctx_depth] : NULL;
  say("{\"call\": \"cuCtxPopCurrent_v2\", \"ctx\": %llu}", (unsigned long long)(uintptr_t)*ctx);
  return *ctx ? fail("cuCtxPopCurrent_v2") : 201; /* CUDA_ERROR_INVALID_CONTEXT */
}

int cuModuleLoadDataEx(void** module, const void* image, unsigned n_options, int* options, void** values) {
  char head[33];
  const size_t len = strlen((const char*)image);
  hex(head, image, len < 16 ? len : 16);
  say("{\"call\": \"cuModuleLoadDataEx\", \"head\": \"%s\", \"strlen\": %zu, \"options\": %u, \"ctx\": %llu}", head,
      len, n_options, (unsigned long long)(uintptr_t)current_ctx());
  const char* bad = getenv("FAKE_CUDA_BAD_IMAGE");
  if (bad && *bad && strncmp((const char*)image, bad, strlen(bad)) == 0) {
    const char* text = getenv("FAKE_CUDA_JIT_LOG");
    char* buf = NULL;
    size_t size = 0;
    for (unsigned i = 0; i < n_options; ++i) {
      if (options[i] == 5) buf = values[i];                     /* CU_JIT_ERROR_LOG_BUFFER */
      if (options[i] == 6) size = (size_t)(uintptr_t)values[i]; /* CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES */
    }
    if (buf && size) snprintf(buf, size, "%s", text ? text : "ptxas fatal: fake failure");
    return 218; /* CUDA_ERROR_INVALID_PTX */
  }
  *module = (void*)(uintptr_t)(0x10000 + ++n_modules);
  return fail("cuModuleLoadDataEx");
}

int cuModuleGetFunction(void** function, void* module, const char* name) {
  say("{\"call\": \"cuModuleGetFunction\", \"module\": %llu, \"name\": \"%s\"}", (unsigned long long)(uintptr_t)module,
      name);
  *function = (void*)(uintptr_t)(0x20000 + ++n_functions);
  return fail("cuModuleGetFunction");
}

int cuFuncGetAttribute(int* v, int attr, void* function) {
  *v = env_int("FAKE_CUDA_STATIC_SHARED", 0);
  say("{\"call\": \"cuFuncGetAttribute\", \"attr\": %d, \"function\": %llu}", attr,
      (unsigned long long)(uintptr_t)function);
  return fail("cuFuncGetAttribute");
}

int cuFuncSetAttribute(void* function, int attr, int value) {
  say("{\"call\": \"cuFuncSetAttribute\", \"attr\": %d, \"value\": %d, \"function\": %llu}", attr, value,
      (unsigned long long)(uintptr_t)function);
  return fail("cuFuncSetAttribute");
}

#ifndef FAKE_OMIT_LAUNCH
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) {
  char args[64 * 20 + 2 * 128];
  params_json(args, sizeof(args), params);
  say("{\"call\": \"cuLaunchKernel\", \"function\": %llu, \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], "
      "\"shared\": %u, \"stream\": %llu, \"ctx\": %llu, \"params\": [%s], \"extra\": %d}",
      (unsigned long long)(uintptr_t)f, gx, gy, gz, bx, by, bz, shared, (unsigned long long)(uintptr_t)stream,
      (unsigned long long)(uintptr_t)current_ctx(), args, extra != NULL);
  return fail("cuLaunchKernel");
}
#endif

#ifndef FAKE_OMIT_LAUNCH_EX
/* cuda.h's CUlaunchAttribute (id, padding to 8 bytes, a 64-byte value union) and CUlaunchConfig. */
typedef struct {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int flag;
  } value;
} FakeLaunchAttribute;
typedef struct {
  unsigned grid[3], block[3], shared;
  void* stream;
  FakeLaunchAttribute* attrs;
  unsigned num_attrs;
} FakeLaunchConfig;

/* Logs what cuLaunchKernel logs, and the attributes as [id, int value] pairs. */
int cuLaunchKernelEx(const FakeLaunchConfig* c, void* f, void** params, void** extra) {
  char args[64 * 20 + 2 * 128], attrs[256] = "";
  params_json(args, sizeof(args), params);
  for (unsigned i = 0; i < c->num_attrs && i < 8; ++i)
    snprintf(attrs + strlen(attrs), sizeof(attrs) - strlen(attrs), "%s[%d, %d]", i ? ", " : "", c->attrs[i].id,
             c->attrs[i].value.flag);
  say("{\"call\": \"cuLaunchKernelEx\", \"function\": %llu, \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], "
      "\"shared\": %u, \"stream\": %llu, \"ctx\": %llu, \"params\": [%s], \"attrs\": [%s], \"extra\": %d}",
      (unsigned long long)(uintptr_t)f, c->grid[0], c->grid[1], c->grid[2], c->block[0], c->block[1], c->block[2],
      c->shared, (unsigned long long)(uintptr_t)c->stream, (unsigned long long)(uintptr_t)current_ctx(), args, attrs,
      extra != NULL);
  return fail("cuLaunchKernelEx");
}
#endif

#ifndef FAKE_OMIT_TENSOR_MAP
/* Logs its arguments and writes a map whose first 8 bytes are the address and the rest 0xab, so a test can tell
 * the launch passed the map (128 bytes) and not the address slot. */
int cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* address, const uint64_t* dims,
                           const uint64_t* strides, const unsigned* box, const unsigned* element_strides,
                           int interleave, int swizzle, int l2, int oob) {
  char text[512] = "";
  for (unsigned i = 0; i < rank; ++i)
    snprintf(text + strlen(text), sizeof(text) - strlen(text), "%s[%llu, %llu, %u, %u]", i ? ", " : "",
             (unsigned long long)dims[i], i + 1 < rank ? (unsigned long long)strides[i] : 0ULL, box[i],
             element_strides[i]);
  say("{\"call\": \"cuTensorMapEncodeTiled\", \"aligned64\": %d, \"dtype\": %d, \"address\": %llu, "
      "\"dims_strides_box_estrides\": [%s], \"interleave\": %d, \"swizzle\": %d, \"l2\": %d, \"oob\": %d}",
      (int)((uintptr_t)map % 64 == 0), dtype, (unsigned long long)(uintptr_t)address, text, interleave, swizzle, l2,
      oob);
  memset(map, 0xab, 128);
  memcpy(map, &address, sizeof(address));
  return fail("cuTensorMapEncodeTiled");
}
#endif

int cuGetErrorName(int rc, const char** name) {
  *name = rc == 100   ? "CUDA_ERROR_NO_DEVICE"
          : rc == 101 ? "CUDA_ERROR_INVALID_DEVICE"
          : rc == 218 ? "CUDA_ERROR_INVALID_PTX"
          : rc == 719 ? "CUDA_ERROR_LAUNCH_FAILED"
                      : NULL;
  return *name ? 0 : 1; /* CUDA_ERROR_INVALID_VALUE, as the driver answers unknown codes */
}
