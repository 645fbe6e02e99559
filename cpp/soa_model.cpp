#include "soa_model.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#ifdef SOA_WITH_CUDA
// c10's CUDA headers, not ATen/cuda/CUDAContext.h: that one also includes the cuBLAS, cuSPARSE
// and cuSOLVER headers, which a CUDA toolkit need not have; at::cuda::getStreamFromExternal is
// this c10::cuda function, re-exported.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <array>
#include <fstream>
#include <iostream>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>

namespace soa {

using json = nlohmann::json;

int64_t SoAView::rows() const {
  std::optional<int64_t> n;
  auto agree = [&](int64_t len, const std::string& what) {
    if (n && *n != len)
      throw std::invalid_argument("SoAView: " + what + " has " + std::to_string(len) +
                                  " rows, other columns have " + std::to_string(*n));
    n = len;
  };
  for (const auto& [name, col] : columns) agree(static_cast<int64_t>(col.size()), name);
  for (const auto& [name, coll] : collections) {
    if (coll.offsets.empty())
      throw std::invalid_argument("SoAView: collection " + name + " has no offsets (rows + 1)");
    agree(static_cast<int64_t>(coll.offsets.size()) - 1, name + " offsets");
  }
  if (!n) throw std::invalid_argument("SoAView: no columns");
  return *n;
}

Format parse_format(const std::string& name) {
  if (name == "torchscript") return Format::TorchScript;
  if (name == "aoti") return Format::AOTI;
  throw std::invalid_argument("unknown format '" + name + "': use torchscript or aoti");
}

std::string format_name(Format format) {
  return format == Format::TorchScript ? "torchscript" : "aoti";
}

bool built_with_cuda() {
#ifdef SOA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void apply_single_thread_policy() {
  static std::once_flag once;
  std::call_once(once, [] {
    // The inter-op pool can be sized only before it starts; a host that already started it
    // with another size keeps it, and we say so rather than fail.
    try {
      at::set_num_interop_threads(1);
    } catch (const c10::Error&) {
      if (at::get_num_interop_threads() != 1)
        std::cerr << "soa::Model: inter-op pool already started with "
                  << at::get_num_interop_threads() << " threads; leaving it\n";
    }
    // Sets the process-wide value; other threads pick it up lazily on their first parallel
    // region (at::internal::lazy_init_num_threads), so callers' threads need no set-up.
    at::set_num_threads(1);
  });
}

std::string sha256_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("OpenSSL: cannot initialise SHA-256");
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(in.gcount()));
  }
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md.data(), &len);
  std::ostringstream hex;
  for (unsigned int i = 0; i < len; ++i)
    hex << "0123456789abcdef"[md[i] >> 4] << "0123456789abcdef"[md[i] & 15];
  return hex.str();
}

struct Model::Impl {
  std::string name;
  Format format;
  std::filesystem::path artifact;
  std::vector<InputSpec> inputs;
  std::vector<std::string> outputs;
  Tolerance tolerance;
  at::Device device{at::kCPU};
  // Options of the wrapped columns: on the CPU the dtype alone, as before CUDA existed here.
  at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  at::TensorOptions i64 = at::TensorOptions().dtype(at::kLong);
  // forward() is not const in the API, but inference does not mutate the module.
  mutable torch::jit::Module module;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;

  // The graph on ready inputs; `stream` is the CUDA stream handed to AOTInductor (nullptr on the
  // CPU; TorchScript runs on the current stream, which the CUDA callers set).
  std::vector<at::Tensor> graph(const std::vector<at::Tensor>& inputs, void* stream) const;
  // Refuses a CPU method on a CUDA model and the other way round.
  void require(Device wanted, const char* method) const;
};

void Model::Impl::require(Device wanted, const char* method) const {
  if (device.is_cuda() == (wanted == Device::CUDA)) return;
  throw std::logic_error(std::string("soa::Model::") + method + " is for a model on " +
                         (wanted == Device::CUDA ? "CUDA" : "the CPU") + "; " + name + " runs on " +
                         device.str() +
                         (device.is_cuda() ? ": use enqueue(view, stream)" : ": use run(view)"));
}

namespace {

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  return json::parse(in);
}

// Graph input names to SoA coordinates, from the contract: "<col>" is a flat column,
// "<coll>_offsets" a collection's offsets, "<coll>_<field>" one of its fields.
std::vector<InputSpec> read_inputs(const json& manifest) {
  std::map<std::string, InputSpec> known;
  for (const auto& f : manifest.at("contract").at("flat")) {
    std::string n = f.at("name");
    known[n] = {n, "float32", n, "", false};
  }
  for (const auto& c : manifest.at("contract").at("jagged")) {
    std::string coll = c.at("name");
    known[coll + "_offsets"] = {coll + "_offsets", "int64", coll, "", true};
    for (const auto& f : c.at("fields")) {
      std::string field = f.at("name");
      known[coll + "_" + field] = {coll + "_" + field, "float32", coll, field, false};
    }
  }
  std::vector<InputSpec> specs;
  for (const auto& in : manifest.at("inputs")) {
    std::string n = in.at("name"), dtype = in.at("dtype");
    auto it = known.find(n);
    if (it == known.end())
      throw std::runtime_error("manifest input '" + n + "' is not in its contract");
    if (it->second.dtype != dtype)
      throw std::runtime_error("manifest input '" + n + "' has dtype " + dtype + ", expected " +
                               it->second.dtype);
    specs.push_back(it->second);
  }
  return specs;
}

// The caller's buffer as a 1-D tensor without a copy. from_blob wants a non-const pointer;
// the graph only reads its inputs. at::from_blob, not torch::from_blob: the inputs never
// need autograd metadata (run() is under InferenceMode), and making it costs a heap
// allocation per column per call.
template <typename T>
at::Tensor wrap(std::span<const T> s, const at::TensorOptions& options) {
  return at::from_blob(const_cast<T*>(s.data()), {static_cast<int64_t>(s.size())}, options);
}

// Offsets index the field arrays from any k >= 0 and never decrease (the graph gathers with
// them as they are, so a bad entry would read the wrong objects, not fail).
void check_offsets(const std::string& collection, std::span<const int64_t> offsets) {
  if (offsets.front() < 0)
    throw std::invalid_argument("offsets of '" + collection + "' start at " +
                                std::to_string(offsets.front()) + "; they must be >= 0");
  for (size_t i = 1; i < offsets.size(); ++i)
    if (offsets[i] < offsets[i - 1])
      throw std::invalid_argument("offsets of '" + collection + "' decrease at row " +
                                  std::to_string(i - 1) + " (" + std::to_string(offsets[i - 1]) +
                                  " then " + std::to_string(offsets[i]) +
                                  "); they must be non-decreasing");
}

// The view's buffers for one graph input, looked up by the contract's names.
std::span<const float> column(const SoAView& view, const InputSpec& in) {
  auto it = view.columns.find(in.column);
  if (it == view.columns.end())
    throw std::invalid_argument("SoAView has no column '" + in.column + "'");
  return it->second;
}

const Collection& collection(const SoAView& view, const InputSpec& in) {
  auto it = view.collections.find(in.column);
  if (it == view.collections.end())
    throw std::invalid_argument("SoAView has no collection '" + in.column + "'");
  return it->second;
}

std::span<const float> field(const Collection& coll, const InputSpec& in) {
  auto f = coll.fields.find(in.field);
  if (f == coll.fields.end())
    throw std::invalid_argument("collection '" + in.column + "' has no field '" + in.field + "'");
  return f->second;
}

#ifdef SOA_WITH_CUDA
// GPU `index` if the CUDA runtime sees it; the runtime's reason otherwise (no driver, no device,
// CUDA_VISIBLE_DEVICES empty).
at::Device usable_gpu(int index) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the process may go on on the CPU
    throw std::runtime_error("device cuda:" + std::to_string(index) +
                             ": no CUDA device is usable here (cudaGetDeviceCount: " +
                             cudaGetErrorString(err) + ")");
  }
  if (index < 0 || index >= count)
    throw std::runtime_error("device cuda:" + std::to_string(index) + ": this machine has " +
                             std::to_string(count) + " CUDA device(s)");
  return {at::kCUDA, static_cast<c10::DeviceIndex>(index)};
}

// A device buffer as a 1-D tensor without a copy. at::from_blob with the device's index asks
// the CUDA runtime where the pointer lives and refuses host memory or another GPU's; that
// message is passed on with the column's name. An empty span has no allocation to ask about
// (its pointer may be one past the end of one, or null), so it is placed on the device as given.
template <typename T>
at::Tensor wrap_device(std::span<const T> s, const at::TensorOptions& options,
                       const std::string& name) {
  auto* data = const_cast<T*>(s.data());
  if (s.empty())
    return at::for_blob(data, {0}).options(options).target_device(options.device()).make_tensor();
  try {
    return at::from_blob(data, {static_cast<int64_t>(s.size())}, options);
  } catch (const c10::Error& e) {
    throw std::invalid_argument("column '" + name + "' is not device memory of " +
                                options.device().str() + ": " + e.what_without_backtrace());
  }
}
#endif

}  // namespace

Model::Model(const std::filesystem::path& export_dir, Format format, int concurrency,
             Device device, int device_index)
    : impl_(std::make_unique<Impl>()) {
  apply_single_thread_policy();
  if (device == Device::CUDA) {
#ifdef SOA_WITH_CUDA
    impl_->device = usable_gpu(device_index);
    impl_->f32 = impl_->f32.device(impl_->device);
    impl_->i64 = impl_->i64.device(impl_->device);
#else
    throw std::runtime_error(
        "device cuda: this soa_model was built without CUDA; configure it with "
        "-DSOA_WITH_CUDA=ON where a CUDA toolkit is installed (cpp/README.md)");
#endif
  }
  const json manifest = read_json(export_dir / "manifest.json");
  impl_->name = manifest.at("name");
  impl_->format = format;
  impl_->inputs = read_inputs(manifest);
  for (const auto& o : manifest.at("outputs")) impl_->outputs.push_back(o.at("name"));

  const std::string fmt = format_name(format), where = device == Device::CUDA ? "cuda" : "cpu";
  const json* entry = nullptr;
  for (const auto& a : manifest.at("artifacts"))
    if (a.at("format") == fmt && a.at("device") == where) entry = &a;
  if (!entry)
    throw std::runtime_error(
        "export " + export_dir.string() + " has no " + fmt + " artifact for " + where +
        (device == Device::CUDA ? " (export with devices=[cpu,cuda] on a machine with a GPU)"
                                : ""));
  if (!entry->value("passed", false))
    throw std::runtime_error(fmt + " artifact of " + impl_->name +
                             " failed the export's parity check; refusing to load it");
  Tolerance& tol = impl_->tolerance;
  tol = {1e300, 1e300};  // the strictest of the parity checks it passed
  for (const auto& p : entry->at("parity")) {
    tol.abs = std::min(tol.abs, p.at("tolerance").at("abs").get<double>());
    tol.rel = std::min(tol.rel, p.at("tolerance").at("rel").get<double>());
  }

  // The manifest vouches for exactly these bytes; anything else is not the validated model.
  impl_->artifact = export_dir / entry->at("file").get<std::string>();
  const std::string expected = entry->at("sha256"), actual = sha256_file(impl_->artifact);
  if (actual != expected)
    throw std::runtime_error("sha256 mismatch for " + impl_->artifact.string() +
                             ": manifest has " + expected + ", file has " + actual);

  if (format == Format::TorchScript) {
    impl_->module = torch::jit::load(impl_->artifact.string(), impl_->device);
    impl_->module.eval();
  } else {
    // Unzips the package to a temporary directory and dlopens its compiled .so; nothing is
    // compiled at load time. Each runner has its own activation buffers over shared weights.
    // A CUDA package's runners are made for GPU device_index (-1, the default, on the CPU).
    impl_->package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        impl_->artifact.string(), "model", /*run_single_threaded=*/false,
        static_cast<size_t>(std::max(concurrency, 1)),
        impl_->device.is_cuda() ? impl_->device.index() : c10::DeviceIndex{-1});
  }
}

Model::~Model() = default;

std::vector<at::Tensor> Model::inputs(const SoAView& view) const {
  impl_->require(Device::CPU, "inputs(view)");
  const int64_t rows = view.rows();
  std::vector<at::Tensor> tensors;
  tensors.reserve(impl_->inputs.size());
  for (const auto& in : impl_->inputs) {
    if (in.field.empty() && !in.is_offsets) {
      tensors.push_back(wrap(column(view, in), impl_->f32));
      continue;
    }
    const Collection& coll = collection(view, in);
    if (in.is_offsets) {
      check_offsets(in.column, coll.offsets);
      tensors.push_back(wrap(coll.offsets, impl_->i64));
      continue;
    }
    const std::span<const float> values = field(coll, in);
    // A view may hand over the collection's whole field arrays: longer is fine, shorter is not.
    if (static_cast<int64_t>(values.size()) < coll.offsets[rows])
      throw std::invalid_argument("field '" + in.name + "' has " + std::to_string(values.size()) +
                                  " values, but the offsets of '" + in.column + "' end at " +
                                  std::to_string(coll.offsets[rows]));
    tensors.push_back(wrap(values, impl_->f32));
  }
  return tensors;
}

std::vector<at::Tensor> Model::forward(const std::vector<at::Tensor>& inputs) const {
  impl_->require(Device::CPU, "forward(inputs)");
  return impl_->graph(inputs, nullptr);
}

std::vector<at::Tensor> Model::Impl::graph(const std::vector<at::Tensor>& inputs,
                                           void* stream) const {
  // Thread-local: no autograd bookkeeping for this call, whichever thread makes it.
  c10::InferenceMode guard;
  std::vector<at::Tensor> outputs;
  if (package) {
    outputs = package->run(inputs, stream);
  } else {
    std::vector<c10::IValue> args(inputs.begin(), inputs.end());
    c10::IValue result = module.forward(std::move(args));
    if (result.isTensor()) {
      outputs.push_back(result.toTensor());
    } else {
      for (const auto& v : result.isTuple() ? result.toTupleRef().elements().vec()
                                            : result.toList().vec())
        outputs.push_back(v.toTensor());
    }
  }
  if (outputs.size() != this->outputs.size())
    throw std::runtime_error("model returned " + std::to_string(outputs.size()) +
                             " outputs, manifest lists " + std::to_string(this->outputs.size()));
  return outputs;
}

std::map<std::string, at::Tensor> Model::run(const SoAView& view) const {
  std::vector<at::Tensor> outputs = forward(inputs(view));
  std::map<std::string, at::Tensor> named;
  for (size_t i = 0; i < outputs.size(); ++i) named.emplace(impl_->outputs[i], outputs[i]);
  return named;
}

#ifdef SOA_WITH_CUDA
CudaCall Model::enqueue(const SoAView& view, CudaStream stream) const {
  impl_->require(Device::CUDA, "enqueue(view, stream)");
  view.rows();  // the columns' lengths agree; sizes only: the values are on the device
  const c10::DeviceIndex index = impl_->device.index();
  // The framework's stream becomes the current one: every kernel below, the graph's included,
  // is enqueued on it, in order after the work that filled the view.
  const c10::cuda::CUDAStreamGuard on_stream(c10::cuda::getStreamFromExternal(stream, index));
  const c10::InferenceMode no_autograd;
  CudaCall call;
  call.stream = stream;
  call.device_index = index;
  call.inputs.reserve(impl_->inputs.size());
  std::vector<at::Tensor> errors;
  for (const auto& in : impl_->inputs) {
    if (in.field.empty() && !in.is_offsets) {
      call.inputs.push_back(wrap_device(column(view, in), impl_->f32, in.name));
      continue;
    }
    const Collection& coll = collection(view, in);
    if (!in.is_offsets) {
      call.inputs.push_back(wrap_device(field(coll, in), impl_->f32, in.name));
      continue;
    }
    // The offsets rule on the device, without waiting: the copy the graph reads is in
    // [0, shortest field] and non-decreasing, equal to the given offsets where they are valid;
    // how many entries differ is the verdict that check() reads.
    int64_t shortest = std::numeric_limits<int64_t>::max();
    for (const auto& other : impl_->inputs)
      if (other.column == in.column && !other.field.empty())
        shortest = std::min(shortest, static_cast<int64_t>(field(coll, other).size()));
    const at::Tensor given = wrap_device(coll.offsets, impl_->i64, in.name);
    const at::Tensor safe = std::get<0>(at::cummax(given.clamp(0, shortest), 0));
    errors.push_back(at::ne(safe, given).sum());
    call.collections.push_back(in.column);
    call.inputs.push_back(safe);
  }
  if (!errors.empty()) call.offsets_errors = at::stack(errors);
  const std::vector<at::Tensor> outputs = impl_->graph(call.inputs, stream);
  for (size_t i = 0; i < outputs.size(); ++i) call.outputs.emplace(impl_->outputs[i], outputs[i]);
  return call;
}

std::vector<at::Tensor> Model::forward(const std::vector<at::Tensor>& inputs,
                                       CudaStream stream) const {
  impl_->require(Device::CUDA, "forward(inputs, stream)");
  const c10::cuda::CUDAStreamGuard on_stream(
      c10::cuda::getStreamFromExternal(stream, impl_->device.index()));
  return impl_->graph(inputs, stream);
}

void CudaCall::check() const {
  const c10::cuda::CUDAStream on = c10::cuda::getStreamFromExternal(
      stream, static_cast<c10::DeviceIndex>(device_index));
  if (!offsets_errors.defined()) {
    on.synchronize();
    return;
  }
  const c10::cuda::CUDAStreamGuard on_stream(on);
  // A copy into host memory waits for the stream: the outputs are ready once it returns.
  const at::Tensor counts = offsets_errors.to(at::kCPU);
  const int64_t* n = counts.data_ptr<int64_t>();
  std::string problems;
  for (size_t i = 0; i < collections.size(); ++i)
    if (n[i] != 0)
      problems += (problems.empty() ? "" : "; ") + std::string("offsets of '") + collections[i] +
                  "': " + std::to_string(n[i]) +
                  " entries break the offsets rule (they must be >= 0, non-decreasing and at "
                  "most the length of the collection's fields)";
  if (!problems.empty())
    throw std::invalid_argument(problems + "; the outputs of this call are not meaningful");
}
#else
// Built without CUDA: no Model runs on CUDA (the constructor refuses it), so these are misuse.
CudaCall Model::enqueue(const SoAView&, CudaStream) const {
  impl_->require(Device::CUDA, "enqueue(view, stream)");
  throw std::logic_error("soa::Model::enqueue: built without CUDA");
}

std::vector<at::Tensor> Model::forward(const std::vector<at::Tensor>&, CudaStream) const {
  impl_->require(Device::CUDA, "forward(inputs, stream)");
  throw std::logic_error("soa::Model::forward(inputs, stream): built without CUDA");
}

void CudaCall::check() const { throw std::logic_error("soa::CudaCall::check: built without CUDA"); }
#endif

const std::vector<InputSpec>& Model::input_specs() const { return impl_->inputs; }
const std::vector<std::string>& Model::output_names() const { return impl_->outputs; }
Tolerance Model::tolerance() const { return impl_->tolerance; }
const std::string& Model::name() const { return impl_->name; }
const std::filesystem::path& Model::artifact() const { return impl_->artifact; }
Format Model::format() const { return impl_->format; }
Device Model::device() const { return impl_->device.is_cuda() ? Device::CUDA : Device::CPU; }
int Model::device_index() const { return impl_->device.is_cuda() ? impl_->device.index() : 0; }

}  // namespace soa
