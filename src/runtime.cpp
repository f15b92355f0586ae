#include "runtime.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "select.h"
#include "sha256.h"

namespace fa2rt {
namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("kernel image missing: cannot open " + path);
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

std::string read_verified(const ImageFile& file) {
  std::string data = read_file(file.path);
  const std::string actual = sha256_hex(data);
  if (actual != file.sha256)
    throw std::runtime_error("kernel image corrupt: sha256 of " + file.path + " is " + actual + ", manifest expects " +
                             file.sha256);
  return data;
}

using CacheKey = std::tuple<int, int, std::string, int>;  // vendor, device, image, mode

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::map<CacheKey, LoadedKernel>& cache() {
  static std::map<CacheKey, LoadedKernel> c;
  return c;
}

template <typename T>
std::string bytes_of(T value) {
  return std::string(reinterpret_cast<const char*>(&value), sizeof(T));
}

constexpr const char* kTensorMapType = "tensormap";

bool is_address(const std::string& type) { return type.rfind('*', 0) == 0 || type == kTensorMapType; }

std::string pack_one(const std::string& name, const std::string& type, const ArgValue& value) {
  // A tensor map packs as its tensor's address; the launch encodes the descriptor from it.
  if (is_address(type) || type == "i64") {
    if (!std::holds_alternative<int64_t>(value))
      throw std::invalid_argument("kernel argument " + name + ": expected an integer for type " + type);
    return bytes_of<int64_t>(std::get<int64_t>(value));
  }
  if (type == "i32") {
    if (!std::holds_alternative<int64_t>(value))
      throw std::invalid_argument("kernel argument " + name + ": expected an integer for type i32");
    int64_t v = std::get<int64_t>(value);
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
      throw std::out_of_range("kernel argument " + name + ": expected a value in int32 range, got " +
                              std::to_string(v));
    return bytes_of<int32_t>(static_cast<int32_t>(v));
  }
  if (type == "fp32") {
    double v =
        std::holds_alternative<double>(value) ? std::get<double>(value) : static_cast<double>(std::get<int64_t>(value));
    return bytes_of<float>(static_cast<float>(v));
  }
  throw std::invalid_argument("kernel argument " + name + ": unsupported parameter type " + type);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::vector<std::string> pack_params(const ImageInfo& image, const NamedArgs& args) {
  std::vector<std::string> packed;
  for (const auto& [name, type] : image.params) {
    auto it = args.find(name);
    if (it == args.end()) throw std::invalid_argument("kernel argument " + name + " of " + image.name + " missing");
    packed.push_back(pack_one(name, type, it->second));
  }
  if (args.size() != image.params.size()) {
    for (const auto& [name, value] : args) {
      bool known = false;
      for (const auto& p : image.params) known = known || p.first == name;
      if (!known) throw std::invalid_argument("kernel argument " + name + " is not a parameter of " + image.name);
    }
  }
  for (int i = 0; i < image.scratch_params; ++i) packed.push_back(bytes_of<uint64_t>(0));
  return packed;
}

namespace {

// Launch geometry per op: what one program along x covers a block of, and whether the grid's y axis runs over query
// heads or KV heads. Query rows: fwd, bwd_dq, decode_combine, and append (its problem's seqlen_q is the new tokens of
// one KV head). Keys: the dK/dV kernel sums the query heads of a KV head itself. Packed rows: a decode program takes
// the seqlen_q * (nheads / nheads_k) rows of one KV head's query heads, once per split of the keys (problem.splits).
enum class BlockAxis { kQueryRows, kKeys, kPackedRowsPerSplit };
struct OpGeometry {
  const char* op;
  BlockAxis axis;
  bool kv_heads;
};
constexpr OpGeometry kOpGeometry[] = {{"fwd", BlockAxis::kQueryRows, false},
                                      {"bwd_dq", BlockAxis::kQueryRows, false},
                                      {"bwd_dkdv", BlockAxis::kKeys, true},
                                      {"bwd_prep", BlockAxis::kQueryRows, false},
                                      {"bwd_ws", BlockAxis::kKeys, true},
                                      {"bwd_convert", BlockAxis::kQueryRows, false},
                                      {"decode", BlockAxis::kPackedRowsPerSplit, true},
                                      {"decode_combine", BlockAxis::kQueryRows, false},
                                      {"append", BlockAxis::kQueryRows, true}};

int64_t blocks_along_x(const OpGeometry& geo, const ImageInfo& image, const Problem& p) {
  switch (geo.axis) {
    case BlockAxis::kQueryRows:
      return ceil_div(p.seqlen_q, image.block_m);
    case BlockAxis::kKeys:
      return ceil_div(p.seqlen_k, image.block_n);
    case BlockAxis::kPackedRowsPerSplit:
      return p.splits * ceil_div(p.seqlen_q * (p.nheads_k > 0 ? p.nheads / p.nheads_k : 0), image.block_m);
  }
  return 0;
}

const OpGeometry& geometry_of(const std::string& op) {
  for (const auto& g : kOpGeometry)
    if (op == g.op) return g;
  throw std::invalid_argument("no launch geometry for op " + op);
}

}  // namespace

LaunchConfig launch_config(const ImageInfo& image, const Problem& problem, void* stream) {
  const OpGeometry& geo = geometry_of(image.op);
  // launch() takes any problem, not only selected ones: refuse what would wrap around the unsigned grid.
  if (problem.seqlen_q < 0 || problem.seqlen_k < 0 || problem.batch < 0 || problem.nheads < 0 || problem.nheads_k < 0)
    throw std::invalid_argument("problem: expected non-negative batch, seqlen_q, seqlen_k, nheads and nheads_k");
  if (problem.splits < 1) throw std::invalid_argument("problem: expected splits >= 1");
  const int64_t heads = geo.kv_heads ? problem.nheads_k : problem.nheads;
  if (problem.batch * heads > kMaxGridY)
    throw std::out_of_range("problem: batch * heads = " + std::to_string(problem.batch * heads) +
                            " exceeds the grid's y limit " + std::to_string(kMaxGridY));
  LaunchConfig cfg;
  // One program per block of query rows (or keys) of one (batch, head).
  const int64_t blocks = blocks_along_x(geo, image, problem);
  if (blocks > kMaxGridX)
    throw std::out_of_range("problem: " + std::to_string(blocks) + " programs along x exceed the grid's x limit " +
                            std::to_string(kMaxGridX));
  cfg.grid[0] = static_cast<unsigned>(blocks);
  cfg.grid[1] = static_cast<unsigned>(problem.batch * heads);
  if (image.flat_grid) {  // a tile walk: every (block, batch, head) along x
    int64_t programs = blocks * problem.batch * heads;
    if (programs > kMaxGridX)
      throw std::out_of_range("problem: " + std::to_string(programs) + " programs exceed the grid's x limit " +
                              std::to_string(kMaxGridX));
    // A persistent image's programs walk the tiles, so the grid needs only fill the device.
    if (image.ctas_per_sm > 0 && problem.multiprocessors > 0)
      programs = std::min(programs, problem.multiprocessors * image.ctas_per_sm);
    cfg.grid[0] = static_cast<unsigned>(programs);
    cfg.grid[1] = 1;
  }
  cfg.block = static_cast<unsigned>(image.num_warps * image.warp_size);
  cfg.shared_bytes = static_cast<unsigned>(image.shared_bytes);
  cfg.stream = stream;
  cfg.dependent = image.dependent_launch;
  return cfg;
}

LoadedKernel load_kernel(const ImageInfo& image, LoadMode mode, int device) {
  const CacheKey key{static_cast<int>(image.vendor), device, image.name, static_cast<int>(mode)};
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto it = cache().find(key);
  if (it != cache().end()) return it->second;
  std::string data;
  if (mode == LoadMode::kPtxJit) {
    if (!image.has_ptx) throw std::runtime_error("image " + image.name + " has no PTX to JIT-compile");
    data = read_verified(image.ptx);
    data.push_back('\0');  // the driver takes PTX as a C string
  } else {
    data = read_verified(image.binary);
  }
  LoadedKernel k = backend_for(image.vendor).load(device, data, image.kernel_name, image.shared_bytes);
  cache().emplace(key, k);
  return k;
}

size_t cached_kernel_count() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  return cache().size();
}

namespace {

size_t pointer_param(const ImageInfo& image, const std::string& name) {
  for (size_t i = 0; i < image.params.size(); ++i) {
    if (image.params[i].first != name) continue;
    if (!is_address(image.params[i].second))
      throw std::invalid_argument("kernel argument " + name + " of " + image.name +
                                  ": expected a pointer parameter, got type " + image.params[i].second);
    return i;
  }
  throw std::invalid_argument("kernel argument " + name + " is not a parameter of " + image.name);
}

std::string join_names(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// One tensor map's descriptor bytes, aligned as cuTensorMapEncodeTiled requires.
struct alignas(64) MapBytes {
  unsigned char bytes[kTensorMapBytes];
};

}  // namespace

struct LaunchPlan::LaunchCache {
  // Enough for every layer of a model to keep its buffers' maps; cleared when full, as the other per-call caches.
  static constexpr size_t kCapacity = 512;
  std::mutex mutex;  // plans are shared by threads (autograd's device threads, the caller's)
  std::map<std::tuple<size_t, int, uint64_t>, MapBytes> maps;  // (tensor map, device, address) -> descriptor
  std::map<int, LoadedKernel> kernels;  // by device: load_kernel's answer (modules stay loaded for the process)
};

LaunchPlan::LaunchPlan(const ImageInfo& image, LoadMode mode, const Problem& problem, const NamedArgs& args,
                       const std::vector<std::string>& pointers, bool dependent)
    : image_(image), mode_(mode), pointers_(pointers) {
  // Pointers pack as placeholders here, so every name and value goes through pack_params' checks once.
  NamedArgs all = args;
  for (const auto& name : pointers)
    if (!all.emplace(name, int64_t{0}).second)
      throw std::invalid_argument("kernel argument " + name + " of " + image.name + " given twice");
  for (const auto& bytes : pack_params(image_, all)) {
    uint64_t slot = 0;
    std::memcpy(&slot, bytes.data(), bytes.size());
    slots_.push_back(slot);
    sizes_.push_back(bytes.size());
  }
  config_ = launch_config(image_, problem, nullptr);
  config_.dependent = config_.dependent && dependent;
  for (const auto& name : pointers) pointer_slots_.push_back(pointer_param(image_, name));
  map_slots_ = tensor_map_slots(image_);
  cache_ = std::make_shared<LaunchCache>();
}

std::vector<std::pair<size_t, size_t>> LaunchPlan::tensor_map_slots(const ImageInfo& image) {
  // Every tensormap param has a manifest entry, and Triton's shape (i32) and stride (i64) params follow it.
  std::vector<std::pair<size_t, size_t>> slots;
  for (size_t i = 0; i < image.params.size(); ++i) {
    if (image.params[i].second != kTensorMapType) continue;
    size_t entry = 0;
    while (entry < image.tensor_maps.size() && image.tensor_maps[entry].param != image.params[i].first) ++entry;
    const std::string where = "image " + image.name + ": tensor map " + image.params[i].first;
    if (entry == image.tensor_maps.size()) throw std::invalid_argument(where + " has no tensor_maps entry");
    const size_t rank = image.tensor_maps[entry].box.size();
    bool follows = i + 2 * rank < image.params.size();
    for (size_t r = 1; follows && r <= 2 * rank; ++r)
      follows = image.params[i + r].second == (r <= rank ? "i32" : "i64");
    if (!follows)
      throw std::invalid_argument(where + ": expected " + std::to_string(rank) + " i32 shape and " +
                                  std::to_string(rank) + " i64 stride params after it");
    slots.emplace_back(i, entry);
  }
  return slots;
}

std::vector<uint64_t> LaunchPlan::with_addresses(const std::vector<uint64_t>& addresses) const {
  if (addresses.size() != pointer_slots_.size())
    throw std::invalid_argument("launch plan of " + image_.name + ": expected " +
                                std::to_string(pointer_slots_.size()) + " addresses (" + join_names(pointers_) +
                                "), got " + std::to_string(addresses.size()));
  std::vector<uint64_t> slots = slots_;
  for (size_t i = 0; i < addresses.size(); ++i) slots[pointer_slots_[i]] = addresses[i];
  return slots;
}

std::vector<std::string> LaunchPlan::packed(const std::vector<uint64_t>& addresses) const {
  std::vector<uint64_t> slots = with_addresses(addresses);
  std::vector<std::string> out;
  for (size_t i = 0; i < slots.size(); ++i) out.emplace_back(reinterpret_cast<const char*>(&slots[i]), sizes_[i]);
  return out;
}

void LaunchPlan::launch(int device, void* stream, const std::vector<uint64_t>& addresses) const {
  std::vector<uint64_t> slots = with_addresses(addresses);
  if (config_.grid[0] == 0 || config_.grid[1] == 0) return;  // empty problem: nothing to launch
  LaunchConfig cfg = config_;
  cfg.stream = stream;
  const LoadedKernel kernel = loaded(device);
  std::vector<void*> params(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) params[i] = &slots[i];  // each value sits at the start of its slot
  Backend& backend = backend_for(image_.vendor);
  // Tensor maps hold their tensor's address, so they are encoded for each launch's address (the slot), from the
  // shape and strides in the params after the map; an address the map was encoded for before reuses that encoding.
  std::vector<MapBytes> maps(map_slots_.size());
  for (size_t k = 0; k < map_slots_.size(); ++k) {
    const auto [i, entry] = map_slots_[k];
    params[i] = maps[k].bytes;
    if (cached_map(k, device, slots[i], maps[k].bytes)) continue;
    const TensorMap& map = image_.tensor_maps[entry];
    const size_t rank = map.box.size();
    std::vector<int64_t> shape(rank), strides(rank);
    for (size_t r = 0; r < rank; ++r) {
      int32_t dim = 0;
      std::memcpy(&dim, &slots[i + 1 + r], sizeof(dim));
      shape[r] = dim;
      std::memcpy(&strides[r], &slots[i + 1 + rank + r], sizeof(int64_t));
    }
    backend.encode_tensor_map(device, map, slots[i], shape, strides, maps[k].bytes);
    std::lock_guard<std::mutex> lock(cache_->mutex);
    if (cache_->maps.size() >= LaunchCache::kCapacity) cache_->maps.clear();
    cache_->maps[{k, device, slots[i]}] = maps[k];
  }
  backend.launch(device, kernel, cfg, params.data());
}

LoadedKernel LaunchPlan::loaded(int device) const {
  {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    const auto it = cache_->kernels.find(device);
    if (it != cache_->kernels.end()) return it->second;
  }
  const LoadedKernel kernel = load_kernel(image_, mode_, device);  // outside the lock: a first load takes a while
  std::lock_guard<std::mutex> lock(cache_->mutex);
  cache_->kernels[device] = kernel;
  return kernel;
}

bool LaunchPlan::cached_map(size_t k, int device, uint64_t address, unsigned char* out) const {
  std::lock_guard<std::mutex> lock(cache_->mutex);
  const auto it = cache_->maps.find({k, device, address});
  if (it == cache_->maps.end()) return false;
  std::memcpy(out, it->second.bytes, kTensorMapBytes);
  return true;
}

void launch(const ImageInfo& image, LoadMode mode, int device, void* stream, const Problem& problem,
            const NamedArgs& args) {
  LaunchPlan(image, mode, problem, args, {}).launch(device, stream, {});
}

}  // namespace fa2rt
