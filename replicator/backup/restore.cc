#include "replicator/backup/restore.h"

#include "common/io.h"
#include "common/log.h"
#include "replicator/qemu/qemu_stream.h"

namespace remus {

using qemu::kPageSize;

Status GenerateRestoreStream(const PageStore& store, std::string_view configuration_section,
                             const std::function<Status(std::string_view)>& emit,
                             RestoreStats* stats, const std::vector<bool>& mapped) {
  if (!store.has_committed())
    return FailedPrecondition("cannot restore from page store " + store.dir() + ": " +
                              store.invalid_reason());
  if (configuration_section.size() < 5 || configuration_section[0] != qemu::kSecConfiguration)
    return InvalidArgument("restore: the configuration section does not start with type 0x07");
  const std::string& blob = store.device_blob();
  if (blob.empty() || blob.back() != qemu::kSecEof)
    return FailedPrecondition("restore: the committed device state does not end in EOF");

  const auto& blocks = store.blocks();
  if (!mapped.empty() && mapped.size() != blocks.size())
    return InvalidArgument("restore: " + std::to_string(mapped.size()) + " mapping flags for " +
                           std::to_string(blocks.size()) + " RAM blocks");
  auto is_mapped = [&mapped](size_t b) { return !mapped.empty() && mapped[b]; };
  bool any_mapped = false;
  for (size_t b = 0; b < blocks.size(); ++b) any_mapped = any_mapped || is_mapped(b);

  RestoreStats st;
  RestoreProgress* progress = stats ? stats->progress : nullptr;
  st.progress = progress;
  uint64_t ram_before = 0;  // used_length of the blocks already streamed
  if (progress) {
    uint64_t total = 0;
    for (size_t b = 0; b < blocks.size(); ++b)
      if (!is_mapped(b)) total += blocks[b].used_length;
    progress->ram_done = 0;
    progress->ram_total = total;
  }
  // Every 4 MiB of guest RAM: cheap enough per page, fine enough for a bar.
  auto note = [progress, &ram_before](uint64_t off) {
    if (progress && off % (4u << 20) == 0) progress->ram_done.store(ram_before + off, std::memory_order_relaxed);
  };
  std::string buf;
  buf.reserve(kRestoreChunk + 2 * kPageSize + 512);
  qemu::StreamWriter w(&buf);
  auto flush = [&](bool force) -> Status {
    if (buf.empty() || (!force && buf.size() < kRestoreChunk)) return OkStatus();
    st.bytes += buf.size();
    Status s = emit(buf);
    buf.clear();
    return s;
  };

  w.Header();
  w.Raw(configuration_section);
  w.RamStart(kRestoreRamSectionId, blocks);
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (is_mapped(b)) {
      st.mapped_bytes += blocks[b].used_length;
      continue;
    }
    const uint8_t* base = store.BlockData(b);
    const uint64_t len = blocks[b].used_length;
    uint64_t off = 0;
    while (off < len) {
      // [off, data) is a hole: zero without touching memory.
      ASSIGN_OR_RETURN(uint64_t data, store.NextData(b, off));
      data = std::min(data - data % kPageSize, len);
      for (; off < data; off += kPageSize) {
        w.ZeroPage(static_cast<uint32_t>(b), blocks, off);
        ++st.zero_pages;
        RETURN_IF_ERROR(flush(false));
        note(off);
      }
      if (off >= len) break;
      ASSIGN_OR_RETURN(uint64_t hole, store.NextHole(b, off));
      hole = std::min((hole + kPageSize - 1) / kPageSize * kPageSize, len);
      if (hole <= off) hole = std::min(off + kPageSize, len);
      for (; off < hole; off += kPageSize) {
        const uint8_t* p = base + off;
        if (IsZeroPage(p)) {
          w.ZeroPage(static_cast<uint32_t>(b), blocks, off);
          ++st.zero_pages;
        } else {
          w.Page(static_cast<uint32_t>(b), blocks, off, p);
          ++st.pages;
        }
        RETURN_IF_ERROR(flush(false));
        note(off);
      }
    }
    ram_before += len;
    if (progress) progress->ram_done.store(ram_before, std::memory_order_relaxed);
  }
  w.Eos();
  w.Footer(kRestoreRamSectionId);
  w.RamSectionBegin(qemu::kSecEnd, kRestoreRamSectionId);
  w.Eos();
  w.Footer(kRestoreRamSectionId);
  RETURN_IF_ERROR(flush(true));
  // The blob can be large; hand it over in place rather than copying.
  for (size_t pos = 0; pos < blob.size(); pos += kRestoreChunk) {
    std::string_view part(blob.data() + pos, std::min(kRestoreChunk, blob.size() - pos));
    st.bytes += part.size();
    RETURN_IF_ERROR(emit(part));
  }
  w.EmptyVmDescription();
  RETURN_IF_ERROR(flush(true));
  LOG_INFO("restore") << "restore stream for " << store.dir() << " epoch "
                      << store.committed_epoch() << ": " << st.pages << " pages, "
                      << st.zero_pages << " zero pages, " << st.bytes << " bytes"
                      << (any_mapped ? ", " + std::to_string(st.mapped_bytes) + " bytes of RAM mapped instead" : "");
  if (stats) *stats = st;
  return OkStatus();
}

Status WriteRestoreStream(const PageStore& store, std::string_view configuration_section, int fd,
                          RestoreStats* stats, const std::vector<bool>& mapped) {
  return GenerateRestoreStream(
      store, configuration_section,
      [fd](std::string_view chunk) {
        return WriteFull(fd, chunk.data(), chunk.size()).Annotate("writing restore stream");
      },
      stats, mapped);
}

StatusOr<std::string> RestoreStreamToString(const PageStore& store,
                                            std::string_view configuration_section,
                                            RestoreStats* stats, const std::vector<bool>& mapped) {
  std::string out;
  RETURN_IF_ERROR(GenerateRestoreStream(
      store, configuration_section,
      [&out](std::string_view chunk) {
        out.append(chunk);
        return OkStatus();
      },
      stats, mapped));
  return out;
}

}  // namespace remus
