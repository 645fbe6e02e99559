// SoA in, named outputs out: an exported model (TorchScript or AOTInductor) in a C++ program
// with no Python in the process, on the CPU or on a CUDA GPU (device pointers in the view, the
// framework's stream). See README.md for the framework-side snippets.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

// cudaStream_t without the CUDA headers: the CUDA runtime declares it as `struct CUstream_st*`
// (driver_types.h), so this header stays the same for CPU-only and CUDA builds.
struct CUstream_st;

namespace soa {

using CudaStream = CUstream_st*;

// One jagged collection (jet constituents, tracks) as a framework's SoA stores it: offsets of
// length rows + 1, non-decreasing, and one flat array per field; row i owns elements
// offsets[i] .. offsets[i + 1] - 1 of every field. The offsets may start at any k >= 0 and
// the fields may be longer than offsets[rows]: a view of a sub-range of a larger collection
// (offsets.subspan(first, rows + 1) with the whole field arrays) gives the same outputs as
// those rows cut out. Offsets that start below 0, decrease, or end past a field's length are
// refused (std::invalid_argument naming the collection).
struct Collection {
  std::span<const int64_t> offsets;
  std::map<std::string, std::span<const float>> fields;
};

// A batch of rows as named column pointers plus lengths. The view owns nothing: the model reads
// the caller's buffers in place (at::from_blob), so they must outlive the run() call. For a model
// on CUDA the spans hold device pointers (of the model's GPU): only their sizes are read on the
// host, and the buffers must stay allocated until the call's stream has run it.
struct SoAView {
  std::map<std::string, std::span<const float>> columns;  // one value per row
  std::map<std::string, Collection> collections;

  int64_t rows() const;  // length of the columns (or offsets - 1); throws if they disagree
};

// One input of the exported graph, in graph order, as manifest.json lists it.
struct InputSpec {
  std::string name;        // graph input name, e.g. "jet_pt", "part_offsets", "part_pt"
  std::string dtype;       // "float32" or "int64"
  std::string column;      // flat column name, or the collection name for offsets and fields
  std::string field;       // field name for a jagged field, empty otherwise
  bool is_offsets = false;
};

struct Tolerance {
  double abs = 0;
  double rel = 0;
};

enum class Format { TorchScript, AOTI };
Format parse_format(const std::string& name);  // "torchscript" | "aoti"
std::string format_name(Format format);

// Where the artifact runs: the export's CPU artifacts (model.ts, model.pt2) or its CUDA ones
// (model.cuda.ts, model.cuda.pt2). CUDA needs a library built with SOA_WITH_CUDA.
enum class Device { CPU, CUDA };
bool built_with_cuda();  // whether this library was built with its CUDA path

// A call enqueued on a CUDA stream by Model::enqueue. Nothing has waited for the stream: the
// outputs are device tensors that the stream fills in order, and the offsets check, made on the
// device, is read by check(). The tensors were allocated on that stream (PyTorch's caching
// allocator): a consumer on another stream orders itself after this one first.
struct CudaCall {
  // The graph's inputs in order: the view's device buffers in place, except each collection's
  // offsets, which are a checked copy (clamped into [0, length of the shortest field] and made
  // non-decreasing, so that bad offsets cannot make the graph read outside the fields: on CUDA
  // an out-of-range gather is a device-side assert, which ends the process's use of the GPU).
  // Valid offsets are copied unchanged.
  std::vector<at::Tensor> inputs;
  std::map<std::string, at::Tensor> outputs;  // keyed by the manifest's output names, (rows,)
  // Per collection (in `collections`' order), how many offsets entries the copy had to change;
  // int64 on the device, undefined when the contract has no collection.
  at::Tensor offsets_errors;
  std::vector<std::string> collections;
  CudaStream stream = nullptr;
  int device_index = 0;

  // Waits for the stream (the outputs are then ready) and throws std::invalid_argument naming
  // each collection whose offsets broke the rule (start below 0, decrease, or end past a
  // field's length); the outputs of such a call are not meaningful.
  void check() const;
};

// Threads: the host framework owns them. The first Model constructed in the process sets
// PyTorch's intra-op and inter-op pools to one thread (at::set_num_threads(1),
// at::set_num_interop_threads(1)); each call then runs on the caller's thread only.
void apply_single_thread_policy();

// An exported artifact loaded from an export directory, ready for concurrent calls.
//
// Sharing: one Model is shared by all threads of the process. run() is const and re-entrant:
// a TorchScript module is not mutated by inference, and an AOTInductor package gets
// `concurrency` runners (activation buffers) over one copy of the weights, so that many
// callers run at once instead of queueing for a single runner.
class Model {
 public:
  // Reads <export_dir>/manifest.json, picks the artifact of `format` for `device`, refuses it if
  // its sha256 differs from the manifest's or if it failed the export's parity check, and loads
  // it (on CUDA onto GPU `device_index`, after checking that the GPU is usable here).
  // `concurrency`: how many threads may call run() at the same time (AOTInductor runners).
  Model(const std::filesystem::path& export_dir, Format format, int concurrency = 1,
        Device device = Device::CPU, int device_index = 0);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // The graph inputs in order: the view's buffers wrapped as tensors, not copied.
  std::vector<at::Tensor> inputs(const SoAView& view) const;
  // Runs the graph on a view; outputs keyed by the manifest's output names (shape (rows,)).
  // The same as forward(inputs(view)) with the outputs named.
  std::map<std::string, at::Tensor> run(const SoAView& view) const;
  // The graph alone on ready inputs (graph order); outputs in the manifest's order.
  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs) const;

  // CUDA. inputs(), run() and forward() above are the CPU's: on a CUDA model they throw
  // std::logic_error, and enqueue() and forward(inputs, stream) throw it on a CPU model.
  //
  // Enqueues the call on `stream` (the framework's cudaStream_t, of the model's GPU; nullptr is
  // the default stream) and returns without waiting: the view's device buffers are wrapped in
  // place (at::from_blob, which also refuses a host pointer, naming the column), the offsets
  // are checked into a copy on the device, and the graph runs on the stream. Call check() on
  // the result before using its outputs. Const and re-entrant, as run().
  CudaCall enqueue(const SoAView& view, CudaStream stream) const;
  // The graph alone on ready device tensors, enqueued on `stream`; nothing waits for it.
  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs, CudaStream stream) const;

  const std::vector<InputSpec>& input_specs() const;
  const std::vector<std::string>& output_names() const;
  Tolerance tolerance() const;  // the export's parity tolerance for this artifact
  const std::string& name() const;  // the export's name
  const std::filesystem::path& artifact() const;
  Format format() const;
  Device device() const;
  int device_index() const;  // the GPU on CUDA, 0 on the CPU

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Hex SHA-256 of a file (OpenSSL EVP), as the manifest records it.
std::string sha256_file(const std::filesystem::path& path);

}  // namespace soa
