// A caching CPU allocator for libtorch, for training: blocks of 1 MiB and more are
// mapped from the kernel once and, when freed, kept by size for the next tensor of that
// size, which every step asks for again (PyTorch's CUDA caching allocator, on the CPU).
// What it replaces: glibc's heap never trimmed (`runtime::keep_freed_memory`), which
// reuses memory without the kernel zeroing fresh pages but fragments: on 135M- and
// 360M-parameter KD steps the heap held 1.6-2.7 GiB above the live tensors' peak.
// Returning every large block to the kernel instead (a low mmap threshold) holds nothing
// above the live peak but zeroes every page of every step again (0.6-0.8x the rate).
// Exact sizes (rounded up to 64 KiB, or to 2 MiB from 8 MiB, where transparent huge pages
// apply) reuse without splitting or merging, so nothing fragments; a block not asked for
// again within a whole step (`distill_cpu_cache_release_idle`, called after each
// optimiser step) goes back to the kernel, so shapes that change (another row length) do
// not pile up.
// Smaller blocks stay with glibc.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kSmallest = size_t(1) << 20;
constexpr size_t kHuge = size_t(2) << 20;

size_t rounded(size_t n) {
  const size_t unit = n >= 4 * kHuge ? kHuge : (size_t(64) << 10);
  return (n + unit - 1) / unit * unit;
}

struct Block {
  void* data;
  size_t size;
  uint64_t freed_at;  // the release round in which it came back to the cache
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n < kSmallest) {
      // Freed straight by glibc, without this allocator's lock (`give_back` serves them
      // too, for raw_deallocate).
      void* p = c10::alloc_cpu(n);
      return {p, p, &c10::free_cpu, cpu};
    }
    const size_t size = rounded(n);
    void* p = take(size);
    if (p == nullptr) p = map(size);
    // Data and context alike, so libtorch's raw_allocate / raw_deallocate work too.
    return {p, p, &give_back, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  // Unmaps the blocks that came back before the previous call and were not taken since.
  void release_idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [size, blocks] : free_) {
      std::vector<Block> kept;
      for (const Block& b : blocks) {
        if (b.freed_at < round_) {
          unmap(b);
        } else {
          kept.push_back(b);
        }
      }
      blocks.swap(kept);
    }
    ++round_;
  }

  size_t mapped() {
    std::lock_guard<std::mutex> lock(mutex_);
    return mapped_;
  }

  static CachingCpuAllocator& instance() {
    // Never destroyed: tensors may be freed during exit, after static destructors ran.
    static auto* allocator = new CachingCpuAllocator();
    return *allocator;
  }

 private:
  // Frees `data`: a block of this allocator goes back to its size's free list, a small
  // one (not in `live_`) to glibc.
  static void give_back(void* data) {
    auto& self = instance();
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.live_.find(data);
      if (it != self.live_.end()) {
        const size_t size = it->second;
        self.live_.erase(it);
        self.free_[size].push_back(Block{data, size, self.round_});
        return;
      }
    }
    c10::free_cpu(data);
  }

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(size);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back().data;
    it->second.pop_back();
    live_.emplace(p, size);
    return p;
  }

  void* map(size_t size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      release_all_idle();
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "distill's CPU allocator: out of memory allocating ", size, " bytes");
    }
    if (size >= kHuge) madvise(p, size, MADV_HUGEPAGE);
    std::lock_guard<std::mutex> lock(mutex_);
    mapped_ += size;
    live_.emplace(p, size);
    return p;
  }

  void release_all_idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [size, blocks] : free_) {
      for (const Block& b : blocks) unmap(b);
      blocks.clear();
    }
  }

  void unmap(const Block& b) {
    munmap(b.data, b.size);
    mapped_ -= b.size;
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block>> free_;
  std::unordered_map<void*, size_t> live_;  // this allocator's blocks in use, by address
  uint64_t round_ = 0;
  size_t mapped_ = 0;
};

}  // namespace

extern "C" {

// Makes the caching allocator libtorch's CPU allocator from now on (tensors made before
// keep their own deleters).
void distill_cpu_cache_install() { c10::SetCPUAllocator(&CachingCpuAllocator::instance(), /*priority=*/100); }

void distill_cpu_cache_release_idle() { CachingCpuAllocator::instance().release_idle(); }

// Bytes mapped by the allocator (in use and cached).
size_t distill_cpu_cache_mapped() { return CachingCpuAllocator::instance().mapped(); }
}
