/* Recording and configuration shared by the driver test doubles (fake_cuda.c, fake_hip.c). The includer defines
 * FAKE_FAIL_VAR, the environment variable listing "call:code" failures. Every call is logged as one JSON line that
 * the tests read through fake_log(); fake_set_param_sizes() tells the launch call how to split its parameters. */
#ifndef FA2RT_FAKE_COMMON_H
#define FA2RT_FAKE_COMMON_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char* log_buf;
static size_t log_len, log_cap;
static int param_sizes[64], n_param_sizes;

static void say(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (log_len + n + 2 > log_cap) {
    log_cap = (log_len + n + 2) * 2;
    log_buf = realloc(log_buf, log_cap);
  }
  va_start(ap, fmt);
  vsnprintf(log_buf + log_len, n + 1, fmt, ap);
  va_end(ap);
  log_len += n;
  log_buf[log_len++] = '\n';
  log_buf[log_len] = '\0';
}

const char* fake_log(void) { return log_buf ? log_buf : ""; }

void fake_set_param_sizes(const int* sizes, int n) {
  n_param_sizes = n < 64 ? n : 64;
  memcpy(param_sizes, sizes, sizeof(int) * n_param_sizes);
}

static int env_int(const char* name, int fallback) {
  const char* v = getenv(name);
  return v && *v ? atoi(v) : fallback;
}

/* The code FAKE_FAIL_VAR assigns to `call`, or 0. */
static int fail(const char* call) {
  const char* spec = getenv(FAKE_FAIL_VAR);
  size_t n = strlen(call);
  for (const char* p = spec; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
    if (strncmp(p, call, n) == 0 && p[n] == ':') return atoi(p + n + 1);
  return 0;
}

static void hex(char* out, const void* data, size_t n) {
  for (size_t i = 0; i < n; ++i) sprintf(out + 2 * i, "%02x", ((const unsigned char*)data)[i]);
  out[2 * n] = '\0';
}

/* The launch parameters as hex strings, comma separated, split by the sizes fake_set_param_sizes() gave (one
 * parameter may be a 128-byte TMA descriptor). */
static void params_json(char* out, size_t cap, void** params) {
  char one[2 * 128 + 1];
  out[0] = '\0';
  for (int i = 0; i < n_param_sizes && param_sizes[i] <= 128; ++i) {
    hex(one, params[i], param_sizes[i]);
    snprintf(out + strlen(out), cap - strlen(out), "%s\"%s\"", i ? ", " : "", one);
  }
}

#endif
