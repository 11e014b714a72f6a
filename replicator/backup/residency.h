// How much of a backup's page store lives in the page cache, and keeping all
// of it there.
//
// A domain's store (page_store.h) is one sparse, fallocated file per RAM
// block. At failover a new QEMU maps those same files (memory-backend-file,
// share=on), so the store's residency decides how fast the guest runs right
// after a failover: a resident page is a minor fault, a page the kernel wrote
// back and dropped is a disk read. Each domain has a residency policy:
//   hot    the whole store is locked in the page cache (ResidencyPin); costs
//          the domain's full memory size on the backup, always.
//   paged  the kernel keeps what it likes and writes back the rest; lets one
//          backup protect more guest memory than it has (N-to-1).
//
// Thread-safety: the free functions are thread-safe. A ResidencyPin is not:
// one owner calls Refresh and destroys it; locked_bytes() may be read from
// any thread (e.g. for status) while it lives.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace remus {

enum class Residency { kPaged, kHot };

// "hot" or "paged"; InvalidArgument naming the allowed values otherwise.
StatusOr<Residency> ParseResidency(std::string_view s);
// "hot" / "paged" (what ParseResidency accepts).
std::string_view ResidencyName(Residency r);

struct ResidentBytes {
  uint64_t resident_bytes = 0;  // bytes whose page is in the page cache
  uint64_t total_bytes = 0;     // sum of the files' sizes
};

// How MeasureResidency asks the kernel. kBest: cachestat(2) (Linux 6.5+),
// else mincore. kMincore: mincore(2) only (tests; kernels without cachestat).
enum class ResidencyProbe { kBest, kMincore };

// Page-cache residency of the files (e.g. a store's ram-*.img files). Faults
// nothing in and reads no data, so it does not change what it measures.
// NotFound if a file is missing. Exact to the byte by mincore; by cachestat,
// a file whose size is not a page multiple may count up to one page's
// remainder too many (store files are page multiples). On tmpfs, pages
// fallocate allocated and nothing touched yet count as resident by cachestat
// (they hold memory) but not by mincore.
//   cachestat counts the file's page-cache entries: measured on this 2-core
//   VM (kernel 6.18, ext4, busy): 0.05 ms per GiB for a fully resident
//   fallocated 8 GiB file (large folios), 2.5 ms per GiB when every 17th page
//   is resident in 4 KiB folios (the worst shape: many small entries), ~0
//   when nothing is; on tmpfs 15-27 ms per GiB.
//   mincore maps each file PROT_READ MAP_SHARED and calls mincore(2) 1 GiB
//   at a time (a 256 KiB vector): one page-cache lookup per page, ~11-26 ms
//   per GiB on ext4 and ~20-28 ms per GiB on tmpfs, resident or not.
// So `status` can call it per request: an 8 GiB store costs well under a
// millisecond on ext4 with cachestat (~90-210 ms with mincore only).
// The kernel reports real residency only to the file's owner, a caller that
// may write it, or CAP_FOWNER (since 5.0; mincore tells anyone else "all
// resident", cachestat refuses); remusd owns its stores.
StatusOr<ResidentBytes> MeasureResidency(const std::vector<std::string>& files,
                                         ResidencyProbe probe = ResidencyProbe::kBest);

// Keeps files (a store's ram-*.img files) entirely in the page cache: each is
// mapped MAP_SHARED PROT_READ and mlock(2)ed. mlock on a shared file mapping
// locks the file's page-cache pages, faulting holes and unwritten extents in
// as zero-filled page-cache pages (no disk reads, no blocks allocated), so the
// whole store is resident and reclaim, fadvise(DONTNEED) and drop_caches leave
// it alone. The store's own writable mapping (and a QEMU started at failover)
// share those pages; writeback still happens as usual.
// Truncating or punching a hole in a file drops its pages even when locked,
// and pages the store writes afterwards are not locked until Refresh() (the
// store truncates its files when a new initial sync starts: call Refresh()
// once that sync has committed).
// Cost: Pin faults in every page of the store. Measured on this 2-core VM
// (kernel 6.18, busy with builds), fallocated never-written files:
//   ext4   0.13-0.23 s per GiB with warm memory, 0.8-2.2 s per GiB when the
//          VM's memory is first touched (host faults behind a balloon);
//          pinning pages already in the cache: ~0.002 s per GiB (large folios).
//   tmpfs  0.64-0.93 s per GiB; already touched pages: 0.14-0.2 s per GiB.
// Refresh of a fully resident store: ~0.0003 s per GiB on ext4, 0.06 on tmpfs.
// So pinning an 8 GiB store takes seconds: run it off latency-critical threads.
class ResidencyPin {
 public:
  // Maps and locks every file (empty files are skipped). On failure nothing
  // stays locked. If the kernel refuses to lock that much (RLIMIT_MEMLOCK
  // without CAP_IPC_LOCK, or memory that cannot be locked): ResourceExhausted
  // saying how many bytes, the limit and what to do. NotFound if a file is
  // missing. With CAP_IPC_LOCK the kernel does not refuse for lack of memory:
  // it reclaims other memory and as a last resort OOM-kills, so admit the
  // store with CheckHotAdmission first.
  static StatusOr<std::unique_ptr<ResidencyPin>> Pin(const std::vector<std::string>& files);

  ~ResidencyPin();  // munlock + munmap
  ResidencyPin(const ResidencyPin&) = delete;
  ResidencyPin& operator=(const ResidencyPin&) = delete;

  // Locks everything again: faults back in and locks pages that a truncate or
  // hole punch dropped, and pages written since. A file that was replaced
  // (another inode at the path) or resized is mapped afresh, so a deleted
  // file's pages do not stay locked behind the store's back. On error a file
  // locked before stays locked (some dropped pages may not be back yet), a
  // file mapped afresh is left unlocked (locked_bytes() says how much is);
  // destroying the pin still unlocks everything.
  Status Refresh();

  // Bytes mapped and locked (the files' sizes).
  uint64_t locked_bytes() const { return locked_bytes_.load(std::memory_order_relaxed); }

 private:
  struct Mapping {
    std::string path;
    uint64_t dev = 0;  // which file is mapped, to notice a replaced one
    uint64_t ino = 0;
    void* addr = nullptr;  // null for an empty file
    uint64_t len = 0;
    bool locked = false;
  };
  ResidencyPin() = default;
  // Opens and maps m.path read-only (nothing is faulted in yet).
  static Status Map(Mapping& m);
  static void Unmap(Mapping& m);
  // mlock(2)s m; total_bytes is the whole store, for the error message.
  Status Lock(Mapping& m, uint64_t total_bytes);

  std::vector<Mapping> maps_;
  std::atomic<uint64_t> locked_bytes_{0};
};

// Memory admission for hot stores.
struct MemInfo {
  uint64_t mem_total = 0;      // bytes (MemTotal)
  uint64_t mem_available = 0;  // bytes (MemAvailable)
};

// Parses MemTotal and MemAvailable ("Name:   123 kB" lines). DataLoss if
// either is missing or malformed.
StatusOr<MemInfo> ReadMemInfo(const std::string& path = "/proc/meminfo");

// Whether a hot store of store_bytes may be pinned now: ResourceExhausted
// (one sentence: size, MemAvailable, headroom, the fix) unless
//   mem_available >= store_bytes + pending_bytes + headroom_bytes.
// Why store_bytes in full: pages the kernel may reclaim (clean and dirty file
// cache) count in MemAvailable, locked ones do not (they sit on the
// unevictable list). Pinning moves the store's already-resident pages out of
// MemAvailable and takes the rest from it, so the whole store comes off
// whatever its residency is now. (A store on tmpfs is counted in neither, so
// there the check is conservative by its resident part.)
// pending_bytes: hot stores this daemon has admitted whose Pin has not
// finished, which MemAvailable does not reflect yet. Stores already pinned
// must not be counted: the kernel already left them out of MemAvailable, and
// adding them again would refuse admissions that fit. (A Pin in progress is
// partly in both; counting it whole is conservative for those seconds.)
// Pure: the caller reads MemInfo and knows its pending pins; it adds the
// domain's name to the message.
Status CheckHotAdmission(uint64_t store_bytes, uint64_t pending_bytes, const MemInfo& mi,
                         uint64_t headroom_bytes);

}  // namespace remus
