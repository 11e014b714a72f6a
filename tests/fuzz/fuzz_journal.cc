// libFuzzer target for the backup's disk journal: recovery of a journal file
// (diskmirror/journal.h, journal_format.h) from whatever a crash, a bad disk
// or a hostile hand left in it.
//
// Input: byte 0 selects, the rest is the file.
//   bits 0-1  the disk size: 8 KiB, 64 KiB, 4 KiB, 512 bytes (small: the image lives in memory)
//   bit 2     JournalOptions::discard_after = byte 1 of the file part
//   bit 3     patch the checksums first (both superblock slots, and every
//             record the walk from offset 4096 reaches), so the fuzzer gets
//             past them
//   bit 4     the rest is the file as it is; else compact: two 52-byte
//             superblock slots, then the records, laid out at 0, 512, 4096
//   bits 5-7  == 7: the real io_uring FileIo, files in /dev/shm; else the
//             in-memory FaultyFileIo (fast)
// Open (recovery), then ApplyCommitted onto an image file, then reopen; then
// one more epoch appended, committed, reopened and applied.
// Checks: Open fails only with DataLoss or FailedPrecondition; recovered
// epochs are increasing and after the applied one; nothing is written to the
// image beyond the disk size; after ApplyCommitted a reopen finds nothing to
// apply and the applied epoch is the last committed one; a journal that
// recovered accepts the next epoch, and that epoch survives a reopen and
// lands in the image.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "common/io.h"
#include "common/log.h"
#include "diskmirror/faulty_file_io.h"
#include "diskmirror/journal.h"
#include "diskmirror/journal_format.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using namespace remus;
namespace jf = remus::journal;
constexpr const char* kTarget = "fuzz_journal";

void FixChecksums(std::vector<uint8_t>* f) {
  for (uint64_t slot : jf::kSlotOffset)
    if (f->size() >= slot + jf::kSuperUsed) StoreU32(f->data() + slot + 48, crc32c::Value(f->data() + slot, 48));
  size_t pos = jf::kDataStart;
  while (f->size() >= pos + jf::kRecordHeaderSize) {
    uint8_t* h = f->data() + pos;
    uint32_t len = LoadU32(h + 8);
    uint64_t data = h[4] == static_cast<uint8_t>(jf::RecordType::kWrite) ? len : 0;
    if (f->size() - pos - jf::kRecordHeaderSize < data) return;
    StoreU32(h + 12, jf::RecordCrc(h, {h + jf::kRecordHeaderSize, static_cast<size_t>(data)}));
    pos += jf::kRecordHeaderSize + data;
  }
}

std::vector<uint8_t> Layout(const uint8_t* d, size_t n, bool raw) {
  if (raw || n == 0) return std::vector<uint8_t>(d, d + n);
  std::vector<uint8_t> f(jf::kDataStart, 0);
  size_t a = std::min(n, jf::kSuperUsed);
  std::memcpy(f.data(), d, a);
  size_t b = std::min(n - a, jf::kSuperUsed);
  std::memcpy(f.data() + jf::kSlotSize, d + a, b);
  f.insert(f.end(), d + a + b, d + n);
  return f;
}

struct Env {
  std::unique_ptr<FileIo> io;
  FaultyFileIo* faulty = nullptr;
  std::string dir;
  std::string journal, image;
};

const std::string& ShmDir() {
  static std::string dir = [] {
    char t[] = "/dev/shm/fuzz_journal.XXXXXX";
    if (!::mkdtemp(t)) fuzz::Fail(kTarget, "mkdtemp failed");
    static std::string d = t;
    std::atexit([] {
      ::unlink((d + "/journal").c_str());
      ::unlink((d + "/image").c_str());
      ::rmdir(d.c_str());
    });
    return std::string(t);
  }();
  return dir;
}

StatusOr<std::unique_ptr<Journal>> Open(Env& env, uint64_t disk_size, std::optional<uint64_t> discard_after) {
  JournalOptions o;
  o.disk_size = disk_size;
  o.name = "fuzz";
  o.discard_after = discard_after;
  return Journal::Open(env.io.get(), env.journal, o);
}

void Run(const std::vector<uint8_t>& file, uint64_t disk_size, std::optional<uint64_t> discard_after, bool uring) {
  Env env;
  if (uring) {
    auto io = NewUringFileIo(8);
    if (!io.ok()) fuzz::Fail(kTarget, "io_uring is not available", io.status());
    env.io = std::move(io).value();
    env.dir = ShmDir();
    env.journal = env.dir + "/journal";
    env.image = env.dir + "/image";
    Fd fd(::open(env.journal.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!fd.valid() || !WriteFull(fd.get(), file.data(), file.size()).ok()) fuzz::Fail(kTarget, "writing the file");
    ::unlink(env.image.c_str());
  } else {
    auto io = std::make_unique<FaultyFileIo>();
    env.faulty = io.get();
    env.io = std::move(io);
    env.dir = "/fuzz";
    env.journal = "/fuzz/journal";
    env.image = "/fuzz/image";
    env.faulty->SetContents(env.journal, file);
  }

  auto j = Open(env, disk_size, discard_after);
  fuzz::Debug(kTarget, "Open", j.status());
  if (j.ok()) fuzz::Debug(kTarget, ("pending " + std::to_string((*j)->recovery().committed_pending.size())).c_str());
  if (!j.ok())
    return fuzz::CheckCode(j.status(), {Code::kDataLoss, Code::kFailedPrecondition}, kTarget,
                           "Open: unexpected error code");
  const JournalRecovery rec = (*j)->recovery();
  const std::optional<uint64_t> applied = (*j)->applied_epoch();
  const std::optional<uint64_t> last = (*j)->last_committed();
  for (size_t i = 0; i < rec.committed_pending.size(); ++i) {
    fuzz::Check(i == 0 || rec.committed_pending[i] > rec.committed_pending[i - 1], kTarget,
                "recovered epochs are not increasing");
    fuzz::Check(!applied || rec.committed_pending[i] > *applied, kTarget, "a recovered epoch is already applied");
    fuzz::Check(!discard_after || rec.committed_pending[i] <= *discard_after, kTarget,
                "an epoch after discard_after was kept");
  }
  if (!rec.committed_pending.empty())
    fuzz::Check(last == rec.committed_pending.back(), kTarget, "last_committed is not the last recovered epoch");
  fuzz::Check((*j)->pending_epochs() <= rec.committed_pending.size(), kTarget, "more pending epochs than recovered");

  auto image = env.io->Open(env.image, true);
  if (!image.ok()) fuzz::Fail(kTarget, "opening the image", image.status());
  const bool had_entries = (*j)->pending_epochs() > 0;
  Status s = (*j)->ApplyCommitted(image->get());
  if (!s.ok()) fuzz::Fail(kTarget, "ApplyCommitted of a recovered journal failed", s);
  auto isize = (*image)->Size();
  fuzz::Check(isize.ok() && *isize <= disk_size, kTarget, "the image grew beyond the disk");
  j->reset();

  auto again = Open(env, disk_size, discard_after);
  if (!again.ok()) fuzz::Fail(kTarget, "reopening after ApplyCommitted failed", again.status());
  fuzz::Check((*again)->pending_epochs() == 0, kTarget, "records to apply after ApplyCommitted");
  if (had_entries) fuzz::Check((*again)->applied_epoch() == last, kTarget, "the applied epoch is not the last committed");
  fuzz::Check((*again)->last_committed() == last, kTarget, "last_committed changed across a reopen");

  // One more epoch.
  if (last && *last == UINT64_MAX) return;
  const uint64_t next = last ? *last + 1 : 1;
  const uint8_t byte = 0x5a;
  s = (*again)->AppendWrite(next, disk_size - 1, {&byte, 1});
  if (s.ok()) s = (*again)->Commit(next);
  if (!s.ok()) fuzz::Fail(kTarget, "a recovered journal refused the next epoch", s);
  again->reset();
  auto third = Open(env, disk_size, std::nullopt);
  if (!third.ok()) fuzz::Fail(kTarget, "reopening after a commit failed", third.status());
  // The new epoch is the last one recovered. (Epochs before it may still be
  // listed: a COMMIT of no records, which Journal never writes but a file
  // may hold, has nothing to apply and stays until an apply truncates.)
  const auto& pend = (*third)->recovery().committed_pending;
  fuzz::Check(!pend.empty() && pend.back() == next, kTarget, "the committed epoch was not recovered");
  s = (*third)->ApplyCommitted(image->get());
  if (!s.ok()) fuzz::Fail(kTarget, "applying the new epoch failed", s);
  uint8_t got = 0;
  auto n = (*image)->Read(disk_size - 1, {&got, 1});
  fuzz::Check(n.ok() && *n == 1 && got == byte, kTarget, "the new epoch's write is not in the image");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool quiet = [] {
    SetLogLevel(LogLevel::kError);  // recovery warns about every torn tail
    return true;
  }();
  (void)quiet;
  if (size == 0) return 0;
  static constexpr uint64_t kSizes[] = {8 << 10, 64 << 10, 4096, 512};
  const uint8_t sel = data[0];
  std::vector<uint8_t> file = Layout(data + 1, size - 1, sel & 16);
  if (sel & 8) FixChecksums(&file);
  std::optional<uint64_t> discard;
  if ((sel & 4) && size > 1) discard = data[1];
  try {
    Run(file, kSizes[sel & 3], discard, (sel >> 5) == 7);
  } catch (...) {
    fuzz::Fail(kTarget, "threw");
  }
  return 0;
}
