// SoA in, named outputs out: an exported model (TorchScript or AOTInductor) in a C++ program
// with no Python in the process. See README.md for the framework-side snippet.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace soa {

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
// the caller's buffers in place (at::from_blob), so they must outlive the run() call.
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
  // Reads <export_dir>/manifest.json, picks the CPU artifact of `format`, refuses it if its
  // sha256 differs from the manifest's or if it failed the export's parity check, and loads it.
  // `concurrency`: how many threads may call run() at the same time (AOTInductor runners).
  Model(const std::filesystem::path& export_dir, Format format, int concurrency = 1);
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

  const std::vector<InputSpec>& input_specs() const;
  const std::vector<std::string>& output_names() const;
  Tolerance tolerance() const;  // the export's parity tolerance for this artifact
  const std::string& name() const;  // the export's name
  const std::filesystem::path& artifact() const;
  Format format() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Hex SHA-256 of a file (OpenSSL EVP), as the manifest records it.
std::string sha256_file(const std::filesystem::path& path);

}  // namespace soa
