// Gradient masking as a C++ autograd hook: where(mask, grad, 0) * row on every sparse weight's AccumulateGrad
// node, with no Python in autograd's path (see sparseopt/native/gradient_masking.py for why and what it keeps).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace {

using torch::autograd::Node;
using torch::autograd::variable_list;
// shared_ptr or intrusive_ptr, by torch version
using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>()));

// One sparse weight: its mask (bool, read at every call: masks change in place), its per-neuron factors (or
// none), and what the hook saw since Python last cleared its arrival flag. The flag is a byte of a uint8 tensor
// that Python reads and clears through its address: a call into this class from Python costs more inside a
// training step (~30 us measured) than everything the hook does.
struct Entry {
  at::Tensor param, mask, row, flags;
  uint8_t* arrived = nullptr;  // into flags
  bool active = true, collect = false;
  int64_t copies = 0;  // arriving gradients transformed on a copy: someone else held them
  int64_t nanoseconds = 0;  // spent in the hook (benchmarks/bench_core_overhead.py reads it: the cost in situ)
  at::Tensor dense;  // the unmasked gradients summed over this step's backward passes, while collect
};

// A float's bits where its mask byte is set, else 0 (+0.0, NaN and inf included, as where() gives): an AND with
// all-ones or all-zeros, which vectorises.
template <typename Bits>
inline Bits kept(Bits x, uint8_t m) {
  return x & static_cast<Bits>(-static_cast<Bits>(m != 0));
}

// where(mask, x, 0) in place on x's bits, one pass split over torch's intra-op threads.
template <typename Bits>
void mask_bits_(void* data, const uint8_t* mask, int64_t n) {
  auto* x = static_cast<Bits*>(data);
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) x[i] = kept(x[i], mask[i]);
  });
}

// The integer type of each float size: masking multiplies the float's bits by the mask's bytes, as
// sparseopt.grad_hooks.scale_grad_ does (where() elsewhere: other dtypes).
std::optional<at::ScalarType> bits_type(const at::Tensor& t) {
  if (!t.is_floating_point()) return std::nullopt;
  switch (t.element_size()) {
    case 2: return at::kShort;
    case 4: return at::kInt;
    case 8: return at::kLong;
    default: return std::nullopt;
  }
}

void mask_(at::Tensor& t, const at::Tensor& mask) {
  auto bits = bits_type(t);
  if (!bits) {
    t.copy_(at::where(mask, t, at::zeros({}, t.options())));
  } else if (!t.device().is_cpu() || !t.is_contiguous() || !mask.is_contiguous()) {
    t.view(*bits).mul_(mask.view(at::kByte));
  } else {
    const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
    switch (t.element_size()) {
      case 2: mask_bits_<uint16_t>(t.mutable_data_ptr(), m, t.numel()); break;
      case 4: mask_bits_<uint32_t>(t.mutable_data_ptr(), m, t.numel()); break;
      default: mask_bits_<uint64_t>(t.mutable_data_ptr(), m, t.numel()); break;
    }
  }
}

// mask_ and then the multiply by the row factor c_r of each output row, fused into one pass (the same two
// operations per entry, so the same bits): for float32/float64 on the CPU with factors along dim 0 (Linear and
// convolution weights). The separate multiply was a second torch call, the larger part of the hook's time.
template <typename F, typename Bits>
void mask_rows_(F* x, const uint8_t* mask, const F* row, int64_t rows, int64_t inner) {
  static_assert(sizeof(F) == sizeof(Bits));
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(inner, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const F c = row[r];
      F* xr = x + r * inner;
      const uint8_t* mr = mask + r * inner;
      for (int64_t j = 0; j < inner; ++j) {
        Bits v;
        std::memcpy(&v, xr + j, sizeof(v));
        v = kept(v, mr[j]);
        F f;
        std::memcpy(&f, &v, sizeof(f));
        xr[j] = f * c;
      }
    }
  });
}

// Whether mask_rows_ applies: t and mask contiguous on the CPU, t float32/float64, row of t's dtype holding one
// factor per index of dim 0.
bool fuses_rows(const at::Tensor& t, const at::Tensor& mask, const at::Tensor& row) {
  return t.device().is_cpu() && t.dim() >= 1 && t.is_contiguous() && mask.is_contiguous() && row.is_contiguous() &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && row.scalar_type() == t.scalar_type() &&
         row.device().is_cpu() && row.dim() == t.dim() && row.size(0) == t.size(0) && row.numel() == t.size(0);
}

void mask_and_scale_(at::Tensor& t, const at::Tensor& mask, const at::Tensor& row) {
  if (!row.defined()) {
    mask_(t, mask);
  } else if (fuses_rows(t, mask, row)) {
    const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
    int64_t rows = t.size(0), inner = t.numel() / std::max<int64_t>(rows, 1);
    if (t.scalar_type() == at::kFloat)
      mask_rows_<float, uint32_t>(t.mutable_data_ptr<float>(), m, row.const_data_ptr<float>(), rows, inner);
    else
      mask_rows_<double, uint64_t>(t.mutable_data_ptr<double>(), m, row.const_data_ptr<double>(), rows, inner);
  } else {
    mask_(t, mask);
    t.mul_(row);
  }
}

// The arriving gradient may be transformed in place only when nothing else can see it: the engine's list holds
// the one reference to it, and its storage is its own or its base's, which only it holds (a Linear's weight
// gradient is the transposed view of a product); then AccumulateGrad steals it as .grad.
bool unshared(const at::Tensor& g) {
  if (g.use_count() != 1) return false;
  if (!g.is_view()) return g.storage().use_count() == 1;
  return g._base().use_count() == 1 && g.storage().use_count() == 2;
}

struct MaskingHook : torch::autograd::FunctionPreHook {
  std::shared_ptr<Entry> entry;
  explicit MaskingHook(std::shared_ptr<Entry> e) : entry(std::move(e)) {}

  variable_list operator()(const variable_list& grads) override {
    Entry& e = *entry;
    if (!e.active || grads.empty() || !grads[0].defined()) return grads;
    auto start = std::chrono::steady_clock::now();
    variable_list out = transform(e, grads);
    e.nanoseconds += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
                         .count();
    return out;
  }

  static variable_list transform(Entry& e, const variable_list& grads) {
    const at::Tensor& g = grads[0];
    if (e.collect) collect(e, g);
    *e.arrived = 1;
    bool in_place = !g.requires_grad() && unshared(g);  // before `out` adds a reference
    variable_list out(grads);
    at::Tensor& t = out[0];
    if (g.requires_grad()) {  // a gradient that builds a graph (create_graph=True): differentiable ops only
      t = at::where(e.mask, g, at::zeros({}, g.options()));
      if (e.row.defined()) t = t * e.row;
      return out;
    }
    if (!in_place) {
      t = g.clone(at::MemoryFormat::Contiguous);
      ++e.copies;
    }
    mask_and_scale_(t, e.mask, e.row);
    return out;
  }

  // A new accumulation starts when .grad was cleared (zero_grad, or zeroed after a skipped step); otherwise this
  // backward adds to the step's earlier ones.
  static void collect(Entry& e, const at::Tensor& g) {
    const at::Tensor& grad = e.param.grad();
    bool fresh = !grad.defined() || !*e.arrived || !e.dense.defined() || !grad.any().item<bool>();
    if (fresh) e.dense = g.detach().clone();
    else e.dense.add_(g);
  }
};

// The hooks of one SparseTraining: attach() hooks a weight's AccumulateGrad node (held here: a weight's node
// lives only as long as someone holds it), remove() or destruction switches every hook off and takes it out.
struct GradientHooks : torch::CustomClassHolder {
  std::vector<std::shared_ptr<Entry>> entries;
  std::vector<NodePtr> nodes;

  // Hooks `param`; its arrivals set flags[slot] (flags: a contiguous uint8 CPU tensor, kept alive here).
  int64_t attach(at::Tensor param, at::Tensor mask, std::optional<at::Tensor> row, at::Tensor flags, int64_t slot) {
    TORCH_CHECK(param.requires_grad(), "sparseopt: a hooked weight must require grad");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == param.sizes(),
                "sparseopt: a weight's mask must be bool and shaped like it");
    auto node = torch::autograd::impl::grad_accumulator(param);
    TORCH_CHECK(node, "sparseopt: the weight has no gradient accumulator (not a leaf?)");
    auto entry = std::make_shared<Entry>();
    entry->param = param;
    entry->mask = mask;
    entry->row = row.value_or(at::Tensor());
    TORCH_CHECK(flags.scalar_type() == at::kByte && flags.device().is_cpu() && flags.is_contiguous() && slot >= 0 &&
                    slot < flags.numel(), "sparseopt: arrival flags must be a contiguous uint8 CPU tensor with the slot");
    entry->flags = flags;
    entry->arrived = flags.mutable_data_ptr<uint8_t>() + slot;
    node->add_pre_hook(std::make_unique<MaskingHook>(entry));
    entries.push_back(entry);
    nodes.push_back(node);
    return static_cast<int64_t>(entries.size()) - 1;
  }

  void set_row(int64_t i, std::optional<at::Tensor> row) { entries.at(i)->row = row.value_or(at::Tensor()); }

  void set_collect(bool collect) {
    for (auto& e : entries) e->collect = collect;
  }

  // This step's dense gradient of entry i (undefined when none was collected), then none.
  std::optional<at::Tensor> take_dense(int64_t i) {
    auto& e = *entries.at(i);
    std::optional<at::Tensor> out;
    if (e.dense.defined()) out = std::move(e.dense);
    e.dense = at::Tensor();
    return out;
  }

  // How many arriving gradients were transformed on a copy rather than in place, over all entries.
  int64_t copies() const {
    int64_t n = 0;
    for (const auto& e : entries) n += e->copies;
    return n;
  }

  // Seconds spent in the hooks so far, over all entries.
  double seconds() const {
    int64_t ns = 0;
    for (const auto& e : entries) ns += e->nanoseconds;
    return static_cast<double>(ns) * 1e-9;
  }

  void remove() {
    for (size_t i = 0; i < entries.size(); ++i) {
      entries[i]->active = false;
      auto& hooks = nodes[i]->pre_hooks();
      for (auto it = hooks.begin(); it != hooks.end(); ++it) {
        auto* hook = dynamic_cast<MaskingHook*>(it->get());
        if (hook != nullptr && hook->entry == entries[i]) {
          hooks.erase(it);
          break;
        }
      }
    }
    entries.clear();
    nodes.clear();
  }

  ~GradientHooks() override { remove(); }
};

}  // namespace

TORCH_LIBRARY(sparseopt_gradient_masking, m) {
  m.class_<GradientHooks>("GradientHooks")
      .def(torch::init<>())
      .def("attach", &GradientHooks::attach)
      .def("set_row", &GradientHooks::set_row)
      .def("set_collect", &GradientHooks::set_collect)
      .def("take_dense", &GradientHooks::take_dense)
      .def("copies", &GradientHooks::copies)
      .def("seconds", &GradientHooks::seconds)
      .def("remove", &GradientHooks::remove);
}
