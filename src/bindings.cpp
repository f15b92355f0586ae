// Python bindings of the core: plain data in, plain data out. Policy (what to do with a rejection) is Python's.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <stdexcept>

#include "backend.h"
#include "runtime.h"
#include "select.h"
#include "sha256.h"

namespace py = pybind11;
using namespace fa2rt;

namespace {

// The images of one installed build, by name; Python fills it from the manifest.
class Registry {
 public:
  void add(const ImageInfo& image) {
    if (index_.count(image.name)) throw std::invalid_argument("image " + image.name + " registered twice");
    index_[image.name] = images_.size();
    images_.push_back(image);
  }
  const std::vector<ImageInfo>& images() const { return images_; }
  const ImageInfo& get(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) throw std::out_of_range("no image named " + name + " in the registry");
    return images_[it->second];
  }

 private:
  std::vector<ImageInfo> images_;
  std::map<std::string, size_t> index_;
};

Vendor checked_vendor(const std::string& name) {
  Vendor v = vendor_from_name(name);
  if (v == Vendor::kNone) throw std::invalid_argument("vendor: expected 'cuda' or 'rocm', got '" + name + "'");
  return v;
}

LoadMode mode_from_name(const std::string& name) {
  for (LoadMode m : {LoadMode::kNative, LoadMode::kBinaryCompat, LoadMode::kPtxJit})
    if (name == load_mode_name(m)) return m;
  throw std::invalid_argument("mode: expected native, binary-compat or ptx-jit, got '" + name + "'");
}

py::dict status_dict(const BackendStatus& s) {
  py::dict d;
  d["available"] = s.available;
  d["library"] = s.library;
  d["error"] = s.error;
  d["driver_version"] = s.driver_version;
  d["device_count"] = s.device_count;
  return d;
}

NamedArgs to_named_args(const py::dict& args) {
  NamedArgs out;
  for (auto item : args) {
    const std::string name = py::cast<std::string>(item.first);
    py::handle v = item.second;
    if (py::isinstance<py::bool_>(v) || !(py::isinstance<py::int_>(v) || py::isinstance<py::float_>(v)))
      throw std::invalid_argument("kernel argument " + name + ": expected an int or float");
    if (py::isinstance<py::int_>(v))
      out[name] = py::cast<int64_t>(v);
    else
      out[name] = py::cast<double>(v);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fa2rt native core: device model, registry, selection, module cache and launch";

  py::class_<DeviceInfo>(m, "DeviceInfo")
      .def(py::init<>())
      .def(py::init([](const std::string& vendor, const std::string& arch, int64_t shared_optin_bytes,
                       int multiprocessors, int warp_size, const std::string& name, int index,
                       const std::string& arch_raw) {
             DeviceInfo d;
             d.vendor = vendor_from_name(vendor);
             d.arch = arch;
             d.arch_raw = arch_raw.empty() ? arch : arch_raw;
             d.shared_optin_bytes = shared_optin_bytes;
             d.multiprocessors = multiprocessors;
             d.warp_size = warp_size;
             d.name = name;
             d.index = index;
             return d;
           }),
           py::arg("vendor"), py::arg("arch"), py::arg("shared_optin_bytes") = 0, py::arg("multiprocessors") = 0,
           py::arg("warp_size") = 0, py::arg("name") = "", py::arg("index") = -1, py::arg("arch_raw") = "")
      .def_property(
          "vendor", [](const DeviceInfo& d) { return std::string(vendor_name(d.vendor)); },
          [](DeviceInfo& d, const std::string& v) { d.vendor = vendor_from_name(v); })
      .def_readwrite("index", &DeviceInfo::index)
      .def_readwrite("arch", &DeviceInfo::arch)
      .def_readwrite("arch_raw", &DeviceInfo::arch_raw)
      .def_readwrite("name", &DeviceInfo::name)
      .def_readwrite("warp_size", &DeviceInfo::warp_size)
      .def_readwrite("shared_optin_bytes", &DeviceInfo::shared_optin_bytes)
      .def_readwrite("multiprocessors", &DeviceInfo::multiprocessors)
      .def("__repr__", [](const DeviceInfo& d) {
        return std::string("DeviceInfo(") + vendor_name(d.vendor) + ", " + d.arch +
               ", index=" + std::to_string(d.index) + ")";
      });

  py::class_<ImageFile>(m, "ImageFile")
      .def(py::init<>())
      .def_readwrite("path", &ImageFile::path)
      .def_readwrite("sha256", &ImageFile::sha256)
      .def_readwrite("target", &ImageFile::target)
      .def_readwrite("portable", &ImageFile::portable);

  py::class_<TensorMap>(m, "TensorMap")
      .def(py::init<>())
      .def_readwrite("param", &TensorMap::param)
      .def_readwrite("dtype", &TensorMap::dtype)
      .def_readwrite("elem_size", &TensorMap::elem_size)
      .def_readwrite("swizzle", &TensorMap::swizzle)
      .def_readwrite("box", &TensorMap::box);

  py::class_<ImageInfo>(m, "ImageInfo")
      .def(py::init<>())
      .def_readwrite("name", &ImageInfo::name)
      .def_readwrite("op", &ImageInfo::op)
      .def_property(
          "vendor", [](const ImageInfo& i) { return std::string(vendor_name(i.vendor)); },
          [](ImageInfo& i, const std::string& v) { i.vendor = checked_vendor(v); })
      .def_readwrite("arch", &ImageInfo::arch)
      .def_readwrite("dtype", &ImageInfo::dtype)
      .def_readwrite("head_dim", &ImageInfo::head_dim)
      .def_readwrite("d_mask", &ImageInfo::d_mask)
      .def_readwrite("features", &ImageInfo::features)
      .def_readwrite("full_band_only", &ImageInfo::full_band_only)
      .def_readwrite("max_seqlen_k", &ImageInfo::max_seqlen_k)
      .def_readwrite("one_split", &ImageInfo::one_split)
      .def_readwrite("dependent_launch", &ImageInfo::dependent_launch)
      .def_readwrite("layouts", &ImageInfo::layouts)
      .def_readwrite("page_multiple", &ImageInfo::page_multiple)
      .def_readwrite("optional_features", &ImageInfo::optional_features)
      .def_readwrite("block_m", &ImageInfo::block_m)
      .def_readwrite("block_n", &ImageInfo::block_n)
      .def_readwrite("num_warps", &ImageInfo::num_warps)
      .def_readwrite("warp_size", &ImageInfo::warp_size)
      .def_readwrite("shared_bytes", &ImageInfo::shared_bytes)
      .def_readwrite("align16", &ImageInfo::align16)
      .def_readwrite("strides8", &ImageInfo::strides8)
      .def_readwrite("kernel_name", &ImageInfo::kernel_name)
      .def_readwrite("params", &ImageInfo::params)
      .def_readwrite("scratch_params", &ImageInfo::scratch_params)
      .def_readwrite("family", &ImageInfo::family)
      .def_readwrite("flat_grid", &ImageInfo::flat_grid)
      .def_readwrite("ctas_per_sm", &ImageInfo::ctas_per_sm)
      .def_readwrite("tensor_maps", &ImageInfo::tensor_maps)
      .def_readwrite("binary", &ImageInfo::binary)
      .def_readwrite("has_ptx", &ImageInfo::has_ptx)
      .def_readwrite("ptx", &ImageInfo::ptx);

  py::class_<Problem>(m, "Problem")
      .def(py::init<>())
      .def_readwrite("op", &Problem::op)
      .def_readwrite("layout", &Problem::layout)
      .def_readwrite("page_size", &Problem::page_size)
      .def_readwrite("splits", &Problem::splits)
      .def_readwrite("multiprocessors", &Problem::multiprocessors)
      .def_readwrite("dtype", &Problem::dtype)
      .def_readwrite("batch", &Problem::batch)
      .def_readwrite("seqlen_q", &Problem::seqlen_q)
      .def_readwrite("seqlen_k", &Problem::seqlen_k)
      .def_readwrite("nheads", &Problem::nheads)
      .def_readwrite("nheads_k", &Problem::nheads_k)
      .def_readwrite("head_dim", &Problem::head_dim)
      .def_readwrite("features", &Problem::features)
      .def_readwrite("full_band", &Problem::full_band)
      .def_readwrite("aligned16", &Problem::aligned16)
      .def_readwrite("strides8", &Problem::strides8)
      .def_readwrite("max_head_extent", &Problem::max_head_extent);

  py::class_<Rejection>(m, "Rejection")
      .def_readonly("image", &Rejection::image)
      .def_property_readonly("code", [](const Rejection& r) { return std::string(reject_name(r.code)); })
      .def_readonly("message", &Rejection::message)
      .def("__repr__", [](const Rejection& r) {
        return "Rejection(" + (r.image.empty() ? std::string("<device>") : r.image) + ": " + r.message + ")";
      });

  py::class_<Registry>(m, "Registry")
      .def(py::init<>())
      .def("add", &Registry::add)
      .def("get", &Registry::get, py::return_value_policy::copy)
      .def("images", &Registry::images, py::return_value_policy::copy)
      .def("__len__", [](const Registry& r) { return r.images().size(); });

  m.def(
      "select",
      [](const Problem& p, const DeviceInfo& d, const Registry& r, const std::string& force_arch) {
        Selection s = select(p, d, r.images(), SelectOptions{force_arch});
        py::dict out;
        out["image"] = s.image ? py::cast(s.image->name) : py::none();
        out["mode"] = std::string(load_mode_name(s.mode));
        out["rejections"] = s.rejections;
        return out;
      },
      py::arg("problem"), py::arg("device"), py::arg("registry"), py::arg("force_arch") = "",
      "Chosen image name and load mode, or None with every candidate's rejection.");

  m.def(
      "compatible_archs",
      [](const DeviceInfo& d, const Registry& r) {
        std::vector<std::pair<std::string, std::string>> out;
        for (const auto& [arch, mode] : compatible_archs(d, r.images())) out.emplace_back(arch, load_mode_name(mode));
        return out;
      },
      "Image archs the device may run, best first, with their load modes.");

  m.def("arch_compat_table", [] {
    std::vector<std::tuple<std::string, std::string, std::string>> out;
    for (const auto& row : arch_compat_table())
      out.emplace_back(row.device_arch, row.image_arch, load_mode_name(row.mode));
    return out;
  });

  m.def("reject_codes", [] {
    std::vector<std::string> out;
    for (int i = 0; i <= static_cast<int>(Reject::kGridLimit); ++i) out.push_back(reject_name(static_cast<Reject>(i)));
    return out;
  });

  m.def("backend_status",
        [](const std::string& vendor) { return status_dict(backend_for(checked_vendor(vendor)).status()); });

  m.def(
      "probe_device",
      [](const std::string& vendor, int index) { return backend_for(checked_vendor(vendor)).probe(index); },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "launch",
      [](const Registry& r, const std::string& image, const std::string& mode, int device, uint64_t stream,
         const Problem& problem, const py::dict& args) {
        NamedArgs named = to_named_args(args);
        const ImageInfo& img = r.get(image);
        py::gil_scoped_release release;
        launch(img, mode_from_name(mode), device, reinterpret_cast<void*>(stream), problem, named);
      },
      py::arg("registry"), py::arg("image"), py::arg("mode"), py::arg("device"), py::arg("stream"), py::arg("problem"),
      py::arg("args"));

  py::class_<LaunchPlan>(m, "LaunchPlan",
                         "One image's launch for one problem, resolved once: per call only the pointer arguments' "
                         "addresses and the stream are given.")
      .def(py::init([](const Registry& r, const std::string& image, const std::string& mode, const Problem& problem,
                       const py::dict& args, const std::vector<std::string>& pointers, bool dependent) {
             return LaunchPlan(r.get(image), mode_from_name(mode), problem, to_named_args(args), pointers, dependent);
           }),
           py::arg("registry"), py::arg("image"), py::arg("mode"), py::arg("problem"), py::arg("args"),
           py::arg("pointers"), py::arg("dependent") = true)
      .def(
          "launch",
          [](const LaunchPlan& plan, int device, uint64_t stream, const std::vector<uint64_t>& addresses) {
            py::gil_scoped_release release;
            plan.launch(device, reinterpret_cast<void*>(stream), addresses);
          },
          py::arg("device"), py::arg("stream"), py::arg("addresses"))
      .def(
          "packed",
          [](const LaunchPlan& plan, const std::vector<uint64_t>& addresses) {
            std::vector<py::bytes> out;
            for (const auto& p : plan.packed(addresses)) out.emplace_back(p);
            return out;
          },
          "The launch parameter bytes for these addresses (testing aid; as pack_params returns them).")
      .def_property_readonly("image", [](const LaunchPlan& p) { return p.image().name; })
      .def_property_readonly("mode", [](const LaunchPlan& p) { return std::string(load_mode_name(p.mode())); })
      .def_property_readonly("pointers", &LaunchPlan::pointers)
      .def_property_readonly("grid",
                             [](const LaunchPlan& p) {
                               const LaunchConfig& c = p.config();
                               return py::make_tuple(c.grid[0], c.grid[1], c.grid[2]);
                             })
      .def_property_readonly("block", [](const LaunchPlan& p) { return p.config().block; })
      .def_property_readonly("shared_bytes", [](const LaunchPlan& p) { return p.config().shared_bytes; })
      .def_property_readonly("dependent", [](const LaunchPlan& p) { return p.config().dependent; });

  m.def(
      "pack_params",
      [](const Registry& r, const std::string& image, const py::dict& args) {
        std::vector<py::bytes> out;
        for (const auto& p : pack_params(r.get(image), to_named_args(args))) out.emplace_back(p);
        return out;
      },
      "The launch parameter bytes for an image (testing aid).");

  m.def("launch_config", [](const Registry& r, const std::string& image, const Problem& problem) {
    LaunchConfig c = launch_config(r.get(image), problem, nullptr);
    return py::make_tuple(py::make_tuple(c.grid[0], c.grid[1], c.grid[2]), c.block, c.shared_bytes);
  });

  m.def("cached_kernel_count", &cached_kernel_count);
  m.def("sha256_hex", [](const py::bytes& b) { return sha256_hex(std::string(b)); });
  m.attr("MAX_INT32_OFFSET") = kMaxInt32Offset;
  m.attr("MAX_GRID_Y") = kMaxGridY;
  m.attr("ALIGN_BYTES") = kAlignBytes;
  m.attr("STRIDE_MULTIPLE") = kStrideMultiple;
  m.attr("HEAD_DIM_MULTIPLE") = kHeadDimMultiple;
}
