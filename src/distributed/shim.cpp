// c10d (the engine of PyTorch's DDP and FSDP) for distill: a TCPStore rendezvous and a
// Gloo (CPU) or NCCL (CUDA) process group, behind a small C API that Rust calls.
//
// The torch wheel ships c10d's headers but not gloo's, and ProcessGroupGloo.hpp includes
// gloo's, so it cannot be compiled here; likewise ProcessGroupNCCL.hpp needs CUDA
// compiler headers the wheel lacks. Both classes are exported by libtorch, so we call
// their exported constructors by their mangled names (checked at link time, as the
// autocast binding does) on storage we allocate, and then use the groups only through
// c10d::Backend's virtual interface, whose header compiles. Two layouts are mirrored
// from the headers: ProcessGroupGloo::Options (Backend::Options + devices + threads) and
// the storage bound for each group object. `tests in distributed::group` construct, use
// and destroy a group on every CI run, so a torch upgrade that moves them fails loudly.
//
// Every function catches C++ exceptions and returns them as a malloc'd message (NULL on
// success): an exception must not unwind into Rust.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <string>

namespace mirror {
// ProcessGroupGloo::Options (ProcessGroupGloo.hpp, torch 2.11): Backend::Options, then
// `std::vector<std::shared_ptr<::gloo::transport::Device>> devices` and `int threads`.
// shared_ptr's layout does not depend on its pointee, so void stands in for the device.
struct GlooOptions : c10d::Backend::Options {
  std::vector<std::shared_ptr<void>> devices;
  int threads{2};
};
}  // namespace mirror

// c10d::ProcessGroupGloo::Options::create_default(std::chrono::milliseconds)
extern c10::intrusive_ptr<mirror::GlooOptions> distill_gloo_options(std::chrono::milliseconds) __asm__(
    "_ZN4c10d16ProcessGroupGloo7Options14create_defaultENSt6chrono8durationIlSt5ratioILl1ELl1000EEEE");
// c10d::ProcessGroupGloo::ProcessGroupGloo(intrusive_ptr<Store> const&, int, int, intrusive_ptr<Options>)
extern void distill_gloo_construct(void* self, const c10::intrusive_ptr<c10d::Store>&, int, int,
                                   c10::intrusive_ptr<mirror::GlooOptions>) __asm__(
    "_ZN4c10d16ProcessGroupGlooC1ERKN3c1013intrusive_ptrINS_5StoreENS1_6detail34intrusive_target_default_"
    "null_typeIS3_EEEEiiNS2_INS0_7OptionsENS5_ISA_EEEE");

#ifdef DISTILL_WITH_NCCL
// c10d::ProcessGroupNCCL::Options::Options(bool is_high_priority_stream)
extern void distill_nccl_options_construct(void* self, bool) __asm__("_ZN4c10d16ProcessGroupNCCL7OptionsC1Eb");
// c10d::ProcessGroupNCCL::ProcessGroupNCCL(intrusive_ptr<Store>, int, int, intrusive_ptr<Options>)
extern void distill_nccl_construct(void* self, c10::intrusive_ptr<c10d::Store>, int, int,
                                   c10::intrusive_ptr<c10d::Backend::Options>) __asm__(
    "_ZN4c10d16ProcessGroupNCCLC1EN3c1013intrusive_ptrINS_5StoreENS1_6detail34intrusive_target_default_null_"
    "typeIS3_EEEEiiNS2_INS0_7OptionsENS5_IS8_EEEE");
#endif

// Upper bounds on the objects' sizes (sizeof is not knowable without their headers).
// Over-allocating is harmless; the object never learns how much storage it got.
static constexpr size_t kGroupStorage = 1 << 20;
static constexpr size_t kOptionsStorage = 1 << 12;

struct DistillGroup {
  // The TCPStore under this job's prefix.
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

static char* message(const std::string& m) {
  char* out = static_cast<char*>(std::malloc(m.size() + 1));
  std::memcpy(out, m.c_str(), m.size() + 1);
  return out;
}

#define GUARD(...)                             \
  try {                                        \
    __VA_ARGS__;                               \
    return nullptr;                            \
  } catch (const std::exception& e) {          \
    return message(e.what());                  \
  } catch (...) {                              \
    return message("unknown C++ exception");   \
  }

// Held while a collective is issued (not while it is waited for). torch 2.11's flight
// recorder, which every collective goes through, adds a group to a map before taking its
// own lock (FlightRecorderDetail.hpp, `recordWithResetEnabled`), so two groups issuing
// their first collectives at once corrupt the map (SIGSEGV): several ranks in one process
// (the tests) or several groups in one rank. Issuing a Gloo collective only enqueues it,
// so the lock is short; NCCL's first collective also creates the communicator, which
// waits for the other ranks, harmless while each process has one group (distill's case).
static std::mutex issue_mutex;

template <typename F>
static c10::intrusive_ptr<c10d::Work> issue(F f) {
  std::lock_guard<std::mutex> lock(issue_mutex);
  return f();
}

static std::vector<at::Tensor> tensors(at::Tensor* const* ts, int n) {
  std::vector<at::Tensor> v;
  for (int i = 0; i < n; i++) v.push_back(*ts[i]);
  return v;
}

extern "C" {

void distill_free_message(char* m) { std::free(m); }

// Rendezvous on host:port and the process group. `serve`: this rank serves the store
// (rank 0, unless a launcher's agent serves it: torchrun); `count`: the ranks count
// themselves in at the store (not in an agent's store, whose server does not wait for
// them; Gloo's own rendezvous then waits); keys go under `prefix`.
// `nccl`: NCCL (tensors on cuda:LOCAL_RANK), else Gloo. `timeout_ms` bounds the
// rendezvous and every collective.
char* distill_group_new(const char* host, int port, bool serve, bool count, const char* prefix, int rank, int world,
                        int64_t timeout_ms, bool nccl, DistillGroup** out) {
  GUARD({
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = serve;
    so.numWorkers = world;
    so.waitWorkers = count;
    so.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    c10::intrusive_ptr<c10d::Store> base = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    void* mem = ::operator new(kGroupStorage);
    std::memset(mem, 0, kGroupStorage);
    try {
      if (nccl) {
#ifdef DISTILL_WITH_NCCL
        void* omem = ::operator new(kOptionsStorage);
        distill_nccl_options_construct(omem, false);
        auto options = c10::intrusive_ptr<c10d::Backend::Options>::unsafe_steal_from_new(
            static_cast<c10d::Backend::Options*>(omem));
        options->timeout = std::chrono::milliseconds(timeout_ms);
        distill_nccl_construct(mem, base, rank, world, options);
#else
        throw std::runtime_error("this build of distill has no NCCL (libtorch_cuda was not found at build time)");
#endif
      } else {
        auto options = distill_gloo_options(std::chrono::milliseconds(timeout_ms));
        distill_gloo_construct(mem, base, rank, world, options);
      }
    } catch (...) {
      ::operator delete(mem);
      throw;
    }
    // unsafe_steal_from_new: the constructor left the refcount at 0 as make_intrusive
    // expects (reclaim would assert on teardown).
    auto backend = c10::intrusive_ptr<c10d::Backend>::unsafe_steal_from_new(static_cast<c10d::Backend*>(mem));
    *out = new DistillGroup{base, backend};
  })
}

void distill_group_free(DistillGroup* g) { delete g; }

char* distill_backend_name(DistillGroup* g, char** out) { GUARD(*out = message(g->backend->getBackendName())) }

// Sums each tensor over the ranks in place: one collective per tensor (a bucket), all
// issued before any is waited for.
char* distill_allreduce(DistillGroup* g, at::Tensor* const* ts, int n) {
  GUARD({
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    {
      std::lock_guard<std::mutex> lock(issue_mutex);
      for (int i = 0; i < n; i++) {
        std::vector<at::Tensor> one{*ts[i]};
        works.push_back(g->backend->allreduce(one));
      }
    }
    for (auto& w : works) w->wait();
  })
}

// Copies `root`'s tensor to every rank, in place.
char* distill_broadcast(DistillGroup* g, at::Tensor* t, int root) {
  GUARD({
    std::vector<at::Tensor> one{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    issue([&] { return g->backend->broadcast(one, o); })->wait();
  })
}

// outputs[r] = rank r's input (all the same shape).
char* distill_allgather(DistillGroup* g, at::Tensor* input, at::Tensor* const* outputs, int n) {
  GUARD({
    std::vector<std::vector<at::Tensor>> out{tensors(outputs, n)};
    std::vector<at::Tensor> in{*input};
    issue([&] { return g->backend->allgather(out, in); })->wait();
  })
}

char* distill_barrier(DistillGroup* g) {
  GUARD(issue([&] { return g->backend->barrier(); })->wait())
}

char* distill_store_set(DistillGroup* g, const char* key, const uint8_t* value, size_t len) {
  GUARD(g->store->set(std::string(key), std::vector<uint8_t>(value, value + len)))
}

// The value of `key`, waiting at most `timeout_ms` for it to appear; `*found` false
// when it did not.
char* distill_store_get(DistillGroup* g, const char* key, int64_t timeout_ms, bool* found, uint8_t** value,
                        size_t* len) {
  GUARD({
    std::string k(key);
    *found = false;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!g->store->check({k})) {
      if (std::chrono::steady_clock::now() >= deadline) return nullptr;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    auto v = g->store->get(k);
    *value = static_cast<uint8_t*>(std::malloc(v.size() + 1));
    std::memcpy(*value, v.data(), v.size());
    *len = v.size();
    *found = true;
  })
}

}  // extern "C"
