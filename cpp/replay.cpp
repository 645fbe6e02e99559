// Replays an export's golden set through its TorchScript and AOTInductor artifacts from C++:
// at batch 1 (one row per call, as a framework module sees one jet) and at the full golden
// batch; prints max |diff| against the expected outputs and the latency per call on one
// thread, optionally checks that N threads sharing the model reproduce the one-thread results,
// and exits 1 on any difference beyond the manifest's tolerance (2 on errors). It also measures
// what the SoA layer (view to tensors, outputs named) adds over the graph alone on ready
// tensors, at batch 1, at the golden batch and at --soa-batch rows (golden rows repeated).
// With --device cuda it replays the export's CUDA artifacts as a framework would hand them its
// data: the golden inputs copied once into device buffers of its own (cudaMalloc), views of
// those device pointers, every call enqueued on a stream of its own (each thread its own).
//
//   replay EXPORT_DIR GOLDEN_DIR [--format torchscript|aoti|all] [--threads N] [--min-time S]
//          [--soa-batch N] [--device cpu|cuda|cuda:N]
//
// GOLDEN_DIR is golden.npz unpacked by unpack_golden.py into raw little-endian arrays plus an
// index.json: reading numpy's zip container is not this program's business.
#include "soa_model.h"

#include <ATen/Parallel.h>
#include <ATen/ops/equal.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#ifdef SOA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <memory>
#include <thread>

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Golden {
  int64_t rows = 0;
  std::map<std::string, std::vector<float>> f32;
  std::map<std::string, std::vector<int64_t>> i64;
};

template <typename T>
std::vector<T> read_raw(const std::filesystem::path& path, int64_t n) {
  std::vector<T> v(static_cast<size_t>(n));
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
  if (!in || in.peek() != EOF) throw std::runtime_error(path.string() + " is not " +
                                                        std::to_string(n) + " values");
  return v;
}

Golden read_golden(const std::filesystem::path& dir) {
  std::ifstream in(dir / "index.json");
  if (!in) throw std::runtime_error("no index.json in " + dir.string() + " (run unpack_golden.py)");
  const json index = json::parse(in);
  Golden g;
  g.rows = index.at("rows");
  for (const auto& [name, a] : index.at("arrays").items()) {
    int64_t n = 1;
    for (int64_t d : a.at("shape")) n *= d;
    const auto path = dir / a.at("file").get<std::string>();
    if (a.at("dtype") == "float32") g.f32[name] = read_raw<float>(path, n);
    else if (a.at("dtype") == "int64") g.i64[name] = read_raw<int64_t>(path, n);
  }
  return g;
}

const std::vector<float>& f32(const Golden& g, const std::string& name) {
  auto it = g.f32.find(name);
  if (it == g.f32.end()) throw std::runtime_error("golden set has no float32 array " + name);
  return it->second;
}

#ifdef SOA_WITH_CUDA
void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// A stream of the program's own, as a framework's: non-blocking (it does not wait for the
// legacy default stream), on the model's GPU.
class Stream {
 public:
  explicit Stream(int device) {
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
               "cudaStreamCreateWithFlags");
  }
  ~Stream() {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }
  void synchronize() const { cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  cudaStream_t stream_ = nullptr;
};
#endif

// Where the calls run. On the CPU the views are the host buffers and the calls the model's
// run(), inputs() and forward(). On CUDA every host array the views point into is first copied
// once into a device buffer of its own (add); place() turns a view of host spans into the same
// view of the device copies (a sub-span stays a sub-span of the same device buffer), and a call
// is enqueue() on one of the streams (`lane`: one per thread) followed by check(), so that it
// returns with its outputs ready, as run() does.
class Target {
 public:
  Target(const soa::Model& model, int lanes) : model_(model) {
#ifdef SOA_WITH_CUDA
    if (cuda())
      for (int i = 0; i < lanes; ++i)
        streams_.push_back(std::make_unique<Stream>(model.device_index()));
#else
    (void)lanes;
#endif
  }
  Target(const Target&) = delete;
  Target& operator=(const Target&) = delete;
  ~Target() {
#ifdef SOA_WITH_CUDA
    for (const auto& [host, region] : regions_) cudaFree(region.device);
#endif
  }

  bool cuda() const { return model_.device() == soa::Device::CUDA; }
  std::string where() const {
    return cuda() ? "cuda:" + std::to_string(model_.device_index()) : "cpu";
  }

  template <typename T>
  void add(const std::vector<T>& host) {
#ifdef SOA_WITH_CUDA
    if (!cuda() || host.empty()) return;
    const size_t bytes = host.size() * sizeof(T);
    void* device = nullptr;
    cuda_check(cudaMalloc(&device, bytes), "cudaMalloc");
    regions_[reinterpret_cast<const char*>(host.data())] = {bytes, static_cast<char*>(device)};
    const Stream& s = *streams_.front();
    cuda_check(cudaMemcpyAsync(device, host.data(), bytes, cudaMemcpyHostToDevice, s.get()),
               "cudaMemcpyAsync");
    s.synchronize();  // from pageable memory: copied only once the stream has run the copy
#else
    (void)host;
#endif
  }

  // Frees the device copy of `host` (before the host array goes away).
  template <typename T>
  void forget(const std::vector<T>& host) {
#ifdef SOA_WITH_CUDA
    auto it = regions_.find(reinterpret_cast<const char*>(host.data()));
    if (it == regions_.end()) return;
    cudaFree(it->second.device);
    regions_.erase(it);
#else
    (void)host;
#endif
  }

  template <typename T>
  std::span<const T> place(std::span<const T> host) const {
#ifdef SOA_WITH_CUDA
    if (!cuda()) return host;
    const char* p = reinterpret_cast<const char*>(host.data());
    auto it = regions_.upper_bound(p);
    if (it != regions_.begin()) {
      --it;
      if (p + host.size_bytes() <= it->first + it->second.bytes)
        return {reinterpret_cast<const T*>(it->second.device + (p - it->first)), host.size()};
    }
    if (host.empty()) return {};  // an empty span that points into no copied array
    throw std::logic_error("replay: a view points into a host array that has no device copy");
#else
    return host;
#endif
  }

  soa::SoAView place(const soa::SoAView& host) const {
    if (!cuda()) return host;
    soa::SoAView v;
    for (const auto& [name, col] : host.columns) v.columns[name] = place(col);
    for (const auto& [name, coll] : host.collections) {
      auto& c = v.collections[name];
      c.offsets = place(coll.offsets);
      for (const auto& [field, values] : coll.fields) c.fields[field] = place(values);
    }
    return v;
  }

  // A placed view's outputs, ready (on the model's device).
  std::map<std::string, at::Tensor> run(const soa::SoAView& placed, int lane = 0) const {
#ifdef SOA_WITH_CUDA
    if (cuda()) {
      soa::CudaCall call = model_.enqueue(placed, stream(lane));
      call.check();
      return std::move(call.outputs);
    }
#endif
    (void)lane;
    return model_.run(placed);
  }

  // The graph's inputs for a placed view: on CUDA those of a call that passed check().
  std::vector<at::Tensor> inputs(const soa::SoAView& placed) const {
#ifdef SOA_WITH_CUDA
    if (cuda()) {
      soa::CudaCall call = model_.enqueue(placed, stream(0));
      call.check();
      return std::move(call.inputs);
    }
#endif
    return model_.inputs(placed);
  }

  // The graph alone on ready inputs, its outputs ready.
  void forward(const std::vector<at::Tensor>& ready) const {
#ifdef SOA_WITH_CUDA
    if (cuda()) {
      model_.forward(ready, stream(0));
      streams_.front()->synchronize();
      return;
    }
#endif
    model_.forward(ready);
  }

#ifdef SOA_WITH_CUDA
  soa::CudaStream stream(int lane) const { return streams_.at(static_cast<size_t>(lane))->get(); }
#endif

 private:
  const soa::Model& model_;
#ifdef SOA_WITH_CUDA
  struct Region {
    size_t bytes;
    char* device;
  };
  std::map<const char*, Region> regions_;  // host array -> its device copy
  std::vector<std::unique_ptr<Stream>> streams_;
#endif
};

// The whole golden batch as a framework would hand it over: pointers into its columns.
soa::SoAView full_view(const soa::Model& model, const Golden& g) {
  soa::SoAView view;
  for (const auto& in : model.input_specs()) {
    if (in.is_offsets) view.collections[in.column].offsets = g.i64.at(in.name);
    else if (!in.field.empty()) view.collections[in.column].fields[in.field] = f32(g, in.name);
    else view.columns[in.column] = f32(g, in.name);
  }
  return view;
}

// The golden rows repeated to `rows` rows (row i is golden row i % g.rows), in new buffers:
// flat columns row by row, each collection's offsets and fields object by object.
Golden tile(const soa::Model& model, const Golden& g, int64_t rows) {
  Golden t;
  t.rows = rows;
  for (const auto& in : model.input_specs()) {
    if (in.is_offsets) {
      const auto& off = g.i64.at(in.name);
      auto& out = t.i64[in.name];
      out.assign(1, 0);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = i % g.rows;
        out.push_back(out.back() + off[r + 1] - off[r]);
      }
    } else if (!in.field.empty()) {
      const auto& off = g.i64.at(in.column + "_offsets");
      const auto& src = f32(g, in.name);
      auto& dst = t.f32[in.name];
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = i % g.rows;
        dst.insert(dst.end(), src.begin() + off[r], src.begin() + off[r + 1]);
      }
    } else {
      const auto& src = f32(g, in.name);
      auto& dst = t.f32[in.name];
      for (int64_t i = 0; i < rows; ++i) dst.push_back(src[static_cast<size_t>(i % g.rows)]);
    }
  }
  return t;
}

// Row i alone: sub-spans of the same columns; a collection's offsets become {0, n_i}, kept in
// `offsets` (two entries per collection per row, sized before any span points into it).
std::vector<soa::SoAView> row_views(const soa::SoAView& full, int64_t rows,
                                    std::vector<int64_t>& offsets) {
  offsets.assign(static_cast<size_t>(rows) * full.collections.size() * 2, 0);
  std::vector<soa::SoAView> views(static_cast<size_t>(rows));
  size_t k = 0;
  for (int64_t i = 0; i < rows; ++i) {
    auto& v = views[static_cast<size_t>(i)];
    for (const auto& [name, col] : full.columns) v.columns[name] = col.subspan(i, 1);
    for (const auto& [name, coll] : full.collections) {
      const int64_t begin = coll.offsets[i], n = coll.offsets[i + 1] - begin;
      offsets[k + 1] = n;
      auto& c = v.collections[name];
      c.offsets = std::span<const int64_t>(&offsets[k], 2);
      k += 2;
      for (const auto& [field, values] : coll.fields) c.fields[field] = values.subspan(begin, n);
    }
  }
  return views;
}

struct Check {
  double max_abs = 0;
  bool ok = true;
};

// Rows [first, first + n) as a framework hands over a sub-range of its collections: the
// columns' sub-spans, each collection's offsets from row `first` (starting at k > 0) and its
// whole field arrays, which go on past the view's last object.
soa::SoAView sub_range_view(const soa::SoAView& full, int64_t first, int64_t n) {
  soa::SoAView v;
  for (const auto& [name, col] : full.columns) v.columns[name] = col.subspan(first, n);
  for (const auto& [name, coll] : full.collections) {
    auto& c = v.collections[name];
    c.offsets = coll.offsets.subspan(first, n + 1);
    c.fields = coll.fields;
  }
  return v;
}

// Views with inconsistent offsets (starting below 0, decreasing, ending past the fields) must
// be refused with std::invalid_argument; returns how many were, printing each message. `full`
// is the host view; the bad offsets are placed where the target runs.
int refused_bad_offsets(Target& target, const soa::SoAView& full, const std::string& tag) {
  if (full.collections.empty()) return 3;
  const auto& [name, coll] = *full.collections.begin();
  const size_t n = coll.offsets.size();
  std::vector<int64_t> negative(coll.offsets.begin(), coll.offsets.end());
  for (auto& o : negative) o -= coll.offsets[n - 1] + 1;
  std::vector<int64_t> decreasing(coll.offsets.begin(), coll.offsets.end());
  std::swap(decreasing[1], decreasing[n - 1]);
  std::vector<int64_t> past(coll.offsets.begin(), coll.offsets.end());
  for (auto& o : past) o += 1;
  past[0] = coll.offsets[0];
  int refused = 0;
  for (const auto* bad : {&negative, &decreasing, &past}) {
    soa::SoAView v = full;
    v.collections[name].offsets = std::span<const int64_t>(*bad);
    target.add(*bad);
    try {
      target.run(target.place(v));
      std::printf("%s inconsistent offsets NOT refused\n", tag.c_str());
    } catch (const std::invalid_argument& e) {
      std::printf("%s refused: %s\n", tag.c_str(), e.what());
      ++refused;
    }
    target.forget(*bad);
  }
  return refused;
}

// Outputs of rows [first, first + n): |got - expected| <= abs + rel * |expected| everywhere and
// finite, the export's parity rule.
void compare(const std::map<std::string, at::Tensor>& got, const Golden& g, int64_t first,
             int64_t n, soa::Tolerance tol, Check& check) {
  for (const auto& [name, t] : got) {
    const auto& expected = f32(g, name);
    const at::Tensor c = t.to(at::kCPU).contiguous();  // itself on the CPU
    if (c.numel() != n) {
      std::fprintf(stderr, "%s: %lld values for %lld rows\n", name.c_str(),
                   static_cast<long long>(c.numel()), static_cast<long long>(n));
      check = {INFINITY, false};
      continue;
    }
    const float* p = c.data_ptr<float>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      const double e = expected[static_cast<size_t>(first + i)], d = std::abs(p[i] - e);
      if (!std::isfinite(p[i]) || d > tol.abs + tol.rel * std::abs(e)) check.ok = false;
      check.max_abs = std::max(check.max_abs, std::isfinite(d) ? d : INFINITY);
    }
  }
}

struct Latency {
  double median_us = 0, mean_us = 0;
  int64_t calls = 0;
};

// Latency of fn(i) over calls cycling through i = 0..n-1, after one warm-up pass, for at least
// min_time seconds and at least n calls. The median is what to quote on a shared machine: other
// processes' load shows in the mean, not in the typical call.
template <typename F>
Latency time_calls(int64_t n, double min_time, F&& fn) {
  for (int64_t i = 0; i < n; ++i) fn(i);
  std::vector<double> us;
  double total = 0;
  while (static_cast<int64_t>(us.size()) < n || total < min_time * 1e6) {
    const auto t0 = Clock::now();
    fn(static_cast<int64_t>(us.size()) % n);
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    total += us.back();
  }
  const double mean = total / static_cast<double>(us.size());
  std::nth_element(us.begin(), us.begin() + static_cast<std::ptrdiff_t>(us.size() / 2), us.end());
  return {us[us.size() / 2], mean, static_cast<int64_t>(us.size())};
}

// CPU time of the calling thread: with one thread doing all the work it is the latency on an
// idle machine, without the time spent waiting for a busy core (as benchmark.py --clock cpu).
double thread_us() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) * 1e-3;
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

struct Pair {
  double raw_us = 0, full_us = 0, added_us = 0;
  int64_t calls = 0;
};

double wall_us() {
  return std::chrono::duration<double, std::micro>(Clock::now().time_since_epoch()).count();
}

// raw(i) and full(i) alternately, i cycling through 0..n-1, for at least min_time seconds and
// n pairs, each of the two first in every other pair (the second call of a pair finds what
// the first left in cache): their medians and the median of full minus raw within a pair (a
// slow spell of the machine, shared by both calls of a pair, cancels there). `clock` is
// thread_us or wall_us.
template <typename R, typename F>
Pair time_pair(int64_t n, double min_time, double (*clock)(), R&& raw, F&& full) {
  for (int64_t i = 0; i < n; ++i) raw(i), full(i);
  std::vector<double> r, f, d;
  double total = 0;
  auto timed = [clock](auto& fn, int64_t i) {
    const double t0 = clock();
    fn(i);
    return clock() - t0;
  };
  while (static_cast<int64_t>(r.size()) < n || total < min_time * 1e6) {
    const int64_t i = static_cast<int64_t>(r.size()) % n;
    double tr, tf;
    if (r.size() % 2 == 0) {
      tr = timed(raw, i);
      tf = timed(full, i);
    } else {
      tf = timed(full, i);
      tr = timed(raw, i);
    }
    r.push_back(tr);
    f.push_back(tf);
    d.push_back(tf - tr);
    total += tr + tf;
  }
  return {median(r), median(f), median(d), static_cast<int64_t>(r.size())};
}

// What run(view) adds over forward() on ready tensors, for placed `views` cycled one per call.
// On the CPU in thread CPU time (one thread does all the work); on CUDA in wall time, each call
// waited for (the GPU's work and the wait are not the thread's CPU time).
void soa_cost(const Target& target, const std::string& tag, int64_t batch,
              const std::vector<soa::SoAView>& views, double min_time) {
  std::vector<std::vector<at::Tensor>> ready;
  for (const auto& v : views) ready.push_back(target.inputs(v));
  const auto n = static_cast<int64_t>(views.size());
  const Pair p = time_pair(
      n, min_time, target.cuda() ? wall_us : thread_us,
      [&](int64_t i) { target.forward(ready[static_cast<size_t>(i)]); },
      [&](int64_t i) { target.run(views[static_cast<size_t>(i)]); });
  const double added = std::max(p.full_us - p.raw_us, p.added_us);
  std::printf("%s soa batch=%-5lld raw=%.1f full=%.1f us/call added=%+.1f us (%+.1f%%) "
              "(%s, medians of %lld alternated pairs)\n",
              tag.c_str(), static_cast<long long>(batch), p.raw_us, p.full_us, added,
              100 * added / p.raw_us, target.cuda() ? "wall time" : "thread CPU time",
              static_cast<long long>(p.calls));
}

bool identical(const std::map<std::string, at::Tensor>& a,
               const std::map<std::string, at::Tensor>& b) {
  for (const auto& [name, t] : a)
    if (!at::equal(t.to(at::kCPU), b.at(name).to(at::kCPU))) return false;
  return true;
}

// Runs one format; returns false on a mismatch.
bool replay(const std::filesystem::path& export_dir, const Golden& g, soa::Format format,
            soa::Device device, int device_index, int threads, double min_time,
            int64_t soa_batch) {
  const std::string tag = "[" + soa::format_name(format) + "]";
  const auto t0 = Clock::now();
  const soa::Model model(export_dir, format, threads, device, device_index);
  const double load_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const auto tol = model.tolerance();
  std::printf("%s loaded %s in %.3f s, sha256 verified; tolerance abs=%g rel=%g\n", tag.c_str(),
              model.artifact().filename().c_str(), load_s, tol.abs, tol.rel);

  // Views are made of host spans, then placed where the model runs (device copies on CUDA).
  Target target(model, threads);
  for (const auto& [name, a] : g.f32) target.add(a);
  for (const auto& [name, a] : g.i64) target.add(a);
  const soa::SoAView full_host = full_view(model, g);
  std::vector<int64_t> offsets;
  const std::vector<soa::SoAView> rows_host = row_views(full_host, g.rows, offsets);
  target.add(offsets);
  const soa::SoAView full = target.place(full_host);
  std::vector<soa::SoAView> rows;
  for (const auto& v : rows_host) rows.push_back(target.place(v));

  // The graph's inputs must be the caller's buffers, not copies of them; on CUDA but the
  // offsets, which are read into a checked copy on the device.
  const auto tensors = target.inputs(full);
  size_t shared = 0, offsets_inputs = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& in = model.input_specs()[i];
    const void* expected =
        in.is_offsets ? static_cast<const void*>(target.place(std::span(g.i64.at(in.name))).data())
                      : static_cast<const void*>(target.place(std::span(f32(g, in.name))).data());
    shared += tensors[i].data_ptr() == expected;
    offsets_inputs += in.is_offsets;
  }
  bool ok;
  if (target.cuda()) {
    std::printf("%s zero-copy: %zu/%zu inputs read the device buffers in place (on %s; %zu "
                "offsets arrays read into a checked copy)\n",
                tag.c_str(), shared, tensors.size(), target.where().c_str(), offsets_inputs);
    ok = shared == tensors.size() - offsets_inputs;
  } else {
    std::printf("%s zero-copy: %zu/%zu inputs read the SoA buffers in place\n", tag.c_str(),
                shared, tensors.size());
    ok = shared == tensors.size();
  }

  // Batch 1, every row; then the golden batch in one call.
  std::vector<std::map<std::string, at::Tensor>> ref_rows;
  Check one;
  for (int64_t i = 0; i < g.rows; ++i) {
    ref_rows.push_back(target.run(rows[static_cast<size_t>(i)]));
    compare(ref_rows.back(), g, i, 1, tol, one);
  }
  const Latency one_t =
      time_calls(g.rows, min_time, [&](int64_t i) { target.run(rows[static_cast<size_t>(i)]); });
  const auto ref_full = target.run(full);
  Check all;
  compare(ref_full, g, 0, g.rows, tol, all);
  const Latency all_t = time_calls(1, min_time, [&](int64_t) { target.run(full); });
  for (const auto& [batch, c, t] :
       {std::tuple{int64_t{1}, one, one_t}, std::tuple{g.rows, all, all_t}}) {
    std::printf("%s batch=%-4lld max|diff|=%.3e %s latency=%.1f us/call (median; mean %.1f; "
                "1 thread, %lld calls)\n",
                tag.c_str(), static_cast<long long>(batch), c.max_abs, c.ok ? "PASS" : "FAIL",
                t.median_us, t.mean_us, static_cast<long long>(t.calls));
    ok &= c.ok;
  }

  // A sub-range view (offsets from row `first`, the whole field arrays) gives the rows' outputs.
  {
    const int64_t first = g.rows / 4, n = g.rows / 2;
    const soa::SoAView view = sub_range_view(full_host, first, n);
    Check v;
    compare(target.run(target.place(view)), g, first, n, tol, v);
    const int64_t k = view.collections.empty() ? 0 : view.collections.begin()->second.offsets[0];
    std::printf("%s view rows=%lld..%lld offsets from %lld max|diff|=%.3e %s\n", tag.c_str(),
                static_cast<long long>(first), static_cast<long long>(first + n - 1),
                static_cast<long long>(k), v.max_abs, v.ok ? "PASS" : "FAIL");
    ok &= v.ok;
    const int refused = refused_bad_offsets(target, full_host, tag);
    std::printf("%s inconsistent offsets refused: %d/3\n", tag.c_str(), refused);
    ok &= refused == 3;
  }

  // On CUDA, host memory handed over as if it were device memory is refused, naming a column.
  if (target.cuda()) {
    try {
      target.run(full_host);
      std::printf("%s host memory NOT refused\n", tag.c_str());
      ok = false;
    } catch (const std::invalid_argument& e) {
      std::printf("%s host memory refused: %s\n", tag.c_str(), e.what());
    }
  }

  // The SoA layer's cost: what run(view) adds over the graph on ready tensors (the larger of
  // the difference of medians and the median difference, as scripts/benchmark.py reports it).
  soa_cost(target, tag, 1, rows, min_time);
  soa_cost(target, tag, g.rows, {full}, min_time);
  if (soa_batch > 0 && soa_batch != g.rows) {
    const Golden tiled = tile(model, g, soa_batch);
    for (const auto& [name, a] : tiled.f32) target.add(a);
    for (const auto& [name, a] : tiled.i64) target.add(a);
    soa_cost(target, tag, soa_batch, {target.place(full_view(model, tiled))}, min_time);
    for (const auto& [name, a] : tiled.f32) target.forget(a);
    for (const auto& [name, a] : tiled.i64) target.forget(a);
  }

  if (threads > 1) {
    // All threads share `model` and start together; each replays every row (from a different
    // starting row) and the full batch, and must reproduce the one-thread outputs bit for bit.
    // On CUDA each thread enqueues on a stream of its own.
    std::barrier start(threads);
    std::vector<int> same(static_cast<size_t>(threads), 1), intra(static_cast<size_t>(threads));
    std::vector<std::thread> pool;
    const int passes = 3;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        start.arrive_and_wait();
        intra[static_cast<size_t>(t)] = at::get_num_threads();  // the policy, seen per thread
        for (int p = 0; p < passes; ++p) {
          for (int64_t k = 0; k < g.rows; ++k) {
            const auto i = static_cast<size_t>((k + t * g.rows / threads) % g.rows);
            if (!identical(target.run(rows[i], t), ref_rows[i])) same[static_cast<size_t>(t)] = 0;
          }
          if (!identical(target.run(full, t), ref_full)) same[static_cast<size_t>(t)] = 0;
        }
      });
    }
    for (auto& th : pool) th.join();
    const bool all_same = std::all_of(same.begin(), same.end(), [](int s) { return s != 0; });
    const int max_intra = *std::max_element(intra.begin(), intra.end());
    const auto calls = static_cast<long long>(threads * passes * (g.rows + 1));
    std::printf("%s threads=%d calls=%lld intra-op threads per caller=%d identical to one thread: "
                "%s\n", tag.c_str(), threads, calls, max_intra, all_same ? "yes" : "NO");
    ok &= all_same && max_intra == 1;
  }
  return ok;
}

int usage() {
  std::cerr << "usage: replay EXPORT_DIR GOLDEN_DIR [--format torchscript|aoti|all] "
               "[--threads N] [--min-time SECONDS] [--soa-batch ROWS] [--device cpu|cuda|cuda:N]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  const std::filesystem::path export_dir = argv[1], golden_dir = argv[2];
  std::string format = "all", device_name = "cpu";
  int threads = 1;
  double min_time = 0.2;
  int64_t soa_batch = 1024;
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage();
    if (arg == "--format") format = argv[++i];
    else if (arg == "--threads") threads = std::max(1, std::stoi(argv[++i]));
    else if (arg == "--min-time") min_time = std::stod(argv[++i]);
    else if (arg == "--soa-batch") soa_batch = std::max<int64_t>(0, std::stoll(argv[++i]));
    else if (arg == "--device") device_name = argv[++i];
    else return usage();
  }
  soa::Device device = soa::Device::CPU;
  int device_index = 0;
  if (device_name.starts_with("cuda")) {
    device = soa::Device::CUDA;
    const std::string index = device_name.substr(4);
    if (!index.empty() && (index[0] != ':' || index.size() == 1 ||
                           index.find_first_not_of("0123456789", 1) != std::string::npos))
      return usage();
    if (!index.empty()) device_index = std::stoi(index.substr(1));
  } else if (device_name != "cpu") {
    return usage();
  }
  try {
    if (format != "all") soa::parse_format(format);  // reject unknown names before any work
    const Golden g = read_golden(golden_dir);
    std::printf("replay %s: %lld golden rows, libtorch %s, on %s\n", export_dir.c_str(),
                static_cast<long long>(g.rows), TORCH_VERSION, device_name.c_str());
    bool ok = true;
    for (const char* f : {"torchscript", "aoti"})
      if (format == "all" || format == f)
        ok &= replay(export_dir, g, soa::parse_format(f), device, device_index, threads, min_time,
                     soa_batch);
    std::printf("RESULT %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
