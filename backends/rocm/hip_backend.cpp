// Placeholder replaced by the HIP shim.
#include <stdexcept>

#include "backend.h"

namespace fa2rt {
namespace {
class RocmBackend final : public Backend {
 public:
  Vendor vendor() const override { return Vendor::kRocm; }
  BackendStatus status() override {
    BackendStatus s;
    s.error = "not implemented";
    return s;
  }
  DeviceInfo probe(int) override { throw std::runtime_error("not implemented"); }
  LoadedKernel load(int, const std::string&, const std::string&, int64_t) override {
    throw std::runtime_error("not implemented");
  }
  void launch(int, const LoadedKernel&, const LaunchConfig&, void**) override {
    throw std::runtime_error("not implemented");
  }
};
}  // namespace
std::unique_ptr<Backend> make_rocm_backend() { return std::make_unique<RocmBackend>(); }
}  // namespace fa2rt
