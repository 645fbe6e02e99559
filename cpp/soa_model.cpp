#include "soa_model.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <iostream>
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
  // forward() is not const in the API, but inference does not mutate the module.
  mutable torch::jit::Module module;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
};

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
at::Tensor wrap(std::span<const T> s, at::ScalarType dtype) {
  return at::from_blob(const_cast<T*>(s.data()), {static_cast<int64_t>(s.size())},
                       at::TensorOptions().dtype(dtype));
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

}  // namespace

Model::Model(const std::filesystem::path& export_dir, Format format, int concurrency)
    : impl_(std::make_unique<Impl>()) {
  apply_single_thread_policy();
  const json manifest = read_json(export_dir / "manifest.json");
  impl_->name = manifest.at("name");
  impl_->format = format;
  impl_->inputs = read_inputs(manifest);
  for (const auto& o : manifest.at("outputs")) impl_->outputs.push_back(o.at("name"));

  // CPU only: a CUDA artifact would also need its inputs copied to the GPU first.
  const std::string fmt = format_name(format), device = "cpu";
  const json* entry = nullptr;
  for (const auto& a : manifest.at("artifacts"))
    if (a.at("format") == fmt && a.at("device") == device) entry = &a;
  if (!entry)
    throw std::runtime_error("export " + export_dir.string() + " has no " + fmt +
                             " artifact for " + device);
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
    impl_->module = torch::jit::load(impl_->artifact.string(), torch::kCPU);
    impl_->module.eval();
  } else {
    // Unzips the package to a temporary directory and dlopens its compiled .so; nothing is
    // compiled at load time. Each runner has its own activation buffers over shared weights.
    impl_->package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        impl_->artifact.string(), "model", /*run_single_threaded=*/false,
        static_cast<size_t>(std::max(concurrency, 1)));
  }
}

Model::~Model() = default;

std::vector<at::Tensor> Model::inputs(const SoAView& view) const {
  const int64_t rows = view.rows();
  std::vector<at::Tensor> tensors;
  tensors.reserve(impl_->inputs.size());
  for (const auto& in : impl_->inputs) {
    if (in.field.empty() && !in.is_offsets) {
      auto it = view.columns.find(in.column);
      if (it == view.columns.end())
        throw std::invalid_argument("SoAView has no column '" + in.column + "'");
      tensors.push_back(wrap(it->second, at::kFloat));
      continue;
    }
    auto it = view.collections.find(in.column);
    if (it == view.collections.end())
      throw std::invalid_argument("SoAView has no collection '" + in.column + "'");
    const Collection& coll = it->second;
    if (in.is_offsets) {
      check_offsets(in.column, coll.offsets);
      tensors.push_back(wrap(coll.offsets, at::kLong));
      continue;
    }
    auto f = coll.fields.find(in.field);
    if (f == coll.fields.end())
      throw std::invalid_argument("collection '" + in.column + "' has no field '" + in.field + "'");
    // A view may hand over the collection's whole field arrays: longer is fine, shorter is not.
    if (static_cast<int64_t>(f->second.size()) < coll.offsets[rows])
      throw std::invalid_argument("field '" + in.name + "' has " +
                                  std::to_string(f->second.size()) +
                                  " values, but the offsets of '" + in.column + "' end at " +
                                  std::to_string(coll.offsets[rows]));
    tensors.push_back(wrap(f->second, at::kFloat));
  }
  return tensors;
}

std::vector<at::Tensor> Model::forward(const std::vector<at::Tensor>& inputs) const {
  // Thread-local: no autograd bookkeeping for this call, whichever thread makes it.
  c10::InferenceMode guard;
  std::vector<at::Tensor> outputs;
  if (impl_->package) {
    outputs = impl_->package->run(inputs);
  } else {
    std::vector<c10::IValue> args(inputs.begin(), inputs.end());
    c10::IValue result = impl_->module.forward(std::move(args));
    if (result.isTensor()) {
      outputs.push_back(result.toTensor());
    } else {
      for (const auto& v : result.isTuple() ? result.toTupleRef().elements().vec()
                                            : result.toList().vec())
        outputs.push_back(v.toTensor());
    }
  }
  if (outputs.size() != impl_->outputs.size())
    throw std::runtime_error("model returned " + std::to_string(outputs.size()) +
                             " outputs, manifest lists " + std::to_string(impl_->outputs.size()));
  return outputs;
}

std::map<std::string, at::Tensor> Model::run(const SoAView& view) const {
  std::vector<at::Tensor> outputs = forward(inputs(view));
  std::map<std::string, at::Tensor> named;
  for (size_t i = 0; i < outputs.size(); ++i) named.emplace(impl_->outputs[i], outputs[i]);
  return named;
}

const std::vector<InputSpec>& Model::input_specs() const { return impl_->inputs; }
const std::vector<std::string>& Model::output_names() const { return impl_->outputs; }
Tolerance Model::tolerance() const { return impl_->tolerance; }
const std::string& Model::name() const { return impl_->name; }
const std::filesystem::path& Model::artifact() const { return impl_->artifact; }
Format Model::format() const { return impl_->format; }

}  // namespace soa
