// The epoch thread: the initial copy, then one checkpoint per QEMU request.
// Speculative execution: LOADED goes out as soon as a checkpoint is staged;
// backpressure holds it while the backup is too far behind.
#include <chrono>
#include <cstdio>

#include "common/log.h"
#include "replicator/link/messages.h"
#include "replicator/primary/lifecycle.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

namespace {

constexpr size_t kBatchBytes = PrimaryLifecycle::kBatchBytes;

// Collects page records into PAGES payloads of about kBatchBytes. With a
// delta filter, pages the backup's image holds become KEEP runs instead.
// Order: a KEEP and a PAGES frame are applied in the order they are sent, and
// a page sent twice must end as its last copy says. Within one pass of QEMU
// over the blocks (positions rising) no page comes twice, so the sink flushes
// both (KEEP first) whenever the position goes back, and at the end.
class BatchingSink final : public qemu::PageSink {
 public:
  using Flush = std::function<void(std::string&&)>;
  BatchingSink(Flush flush, Flush flush_keep, wire::DeltaFilter* delta)
      : flush_(std::move(flush)), flush_keep_(std::move(flush_keep)), delta_(delta) {
    cur_.reserve(kBatchBytes + 8192);
  }
  Status OnPage(uint32_t block, uint64_t offset, const uint8_t* data) override {
    if (first_page_) {
      first_page_();
      first_page_ = nullptr;
    }
    if (delta_) {
      if (seen_ && (block < last_block_ || (block == last_block_ && offset <= last_offset_))) Drain();
      seen_ = true;
      last_block_ = block;
      last_offset_ = offset;
      if (delta_->Decide(block, offset, data)) {
        keep_.Add(block, offset / wire::kPageSize);
        if (keep_.size() >= kMaxKeepBytes) Drain();
        return OkStatus();
      }
    }
    wire::AppendPageRecord(&cur_, block, offset, data);
    pages_++;
    if (data == nullptr) zero_pages_++;
    if (cur_.size() >= kBatchBytes) Drain();
    return OkStatus();
  }
  void Drain() {
    if (!keep_.empty()) flush_keep_(keep_.Take());
    if (cur_.empty()) return;
    bytes_ += cur_.size();
    flush_(std::move(cur_));
    cur_ = std::string();
    cur_.reserve(kBatchBytes + 8192);
  }
  void OnFirstPage(std::function<void()> f) { first_page_ = std::move(f); }
  uint64_t pages() const { return pages_; }
  uint64_t zero_pages() const { return zero_pages_; }
  uint64_t bytes() const { return bytes_; }

 private:
  static constexpr size_t kMaxKeepBytes = 1u << 20;
  Flush flush_;
  Flush flush_keep_;
  wire::DeltaFilter* delta_;
  wire::KeepRunBuilder keep_;
  bool seen_ = false;
  uint32_t last_block_ = 0;
  uint64_t last_offset_ = 0;
  std::function<void()> first_page_;
  std::string cur_;
  uint64_t pages_ = 0, zero_pages_ = 0, bytes_ = 0;
};

// Records the pages of a checkpoint without copying them (see DeferredPages).
class DeferredSink final : public qemu::PageSink {
 public:
  explicit DeferredSink(wire::DeferredPages* pages) : pages_(pages) {}
  Status OnPage(uint32_t block, uint64_t offset, const uint8_t* data) override {
    pages_->Add(block, offset, data);
    return OkStatus();
  }

 private:
  wire::DeferredPages* pages_;
};

}  // namespace

// Wall-clock seconds with microseconds, for debug lines that tests line up
// with packet timestamps taken elsewhere on the host.
std::string PrimaryLifecycle::WallSeconds() {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                std::chrono::system_clock::now().time_since_epoch()).count();
  char b[32];
  std::snprintf(b, sizeof b, "%lld.%06lld", static_cast<long long>(us / 1000000), static_cast<long long>(us % 1000000));
  return b;
}

void PrimaryLifecycle::EpochLoop() {
  Status s = RunInitialSync();
  for (uint64_t epoch = 1; s.ok(); epoch++) s = RunCheckpoint(epoch);
  if (stopping_) return;
  if (QemuExited()) {
    Post({Unavailable("QEMU exited: " + s.message()), true, false});
  } else {
    Post({s.Annotate("checkpoint stream from QEMU"), false, false});
  }
}

Status PrimaryLifecycle::RunInitialSync() {
  qemu::InitialInfo info;
  Status disk_start;
  BatchingSink sink([this](std::string&& b) { Enqueue({MsgType::kPages, 0, std::move(b)}); },
                    [this](std::string&& k) { Enqueue({MsgType::kKeep, 0, std::move(k)}); }, delta_.get());
  sink.OnFirstPage([&] {
    wire::SyncBeginMsg begin{source_->blocks(), info.configuration, 0};
    for (const auto& b : begin.blocks) begin.total_bytes += b.used_length;
    sync_total_bytes_ = begin.total_bytes;
    Enqueue({MsgType::kSyncBegin, 0, wire::EncodeSyncBegin(begin)});
    if (delta_) {
      size_t matched = delta_->Bind(begin.blocks);
      LOG_INFO(Tag()) << "delta resync: " << matched << " of " << begin.blocks.size()
                      << " RAM blocks match the backup's image (" << delta_->offered_pages() << " pages to compare)";
    }
    // The disks' background copy runs alongside the memory copy and on into
    // the first checkpoints; every write is tagged with its epoch. It starts
    // after SYNC_BEGIN, which opens the backup's journals.
    if (disks_) disk_start = disks_->Start();
  });
  // Progress in guest bytes covered, counted as pages pass through the sink.
  struct ProgressSink final : qemu::PageSink {
    BatchingSink* inner;
    std::atomic<uint64_t>* done;
    Status OnPage(uint32_t b, uint64_t o, const uint8_t* d) override {
      *done += wire::kPageSize;
      return inner->OnPage(b, o, d);
    }
  } progress;
  progress.inner = &sink;
  progress.done = &sync_done_bytes_;
  RETURN_IF_ERROR(source_->ReadInitial(&progress, &info));
  RETURN_IF_ERROR(disk_start);
  sink.Drain();
  // The guest is paused for its device state: output buffering starts here,
  // so everything the guest sends from now on waits for its checkpoint.
  if (make_netbuf_) {
    auto nb = make_netbuf_();
    if (!nb.ok()) return nb.status().Annotate("domain " + opts_.domain + ": output buffering");
    netbuf_owner_ = std::move(nb).value();
  } else {
    netbuf_owner_ = std::make_unique<NoOutputBuffer>();
  }
  netbuf_ = netbuf_owner_.get();
  // QEMU stopped the guest for the device state; let it run again right away.
  Enqueue({MsgType::kDevice, 0, info.device_state});
  wire::CommitInfo ci{sink.pages(), sink.bytes(), info.device_state.size()};
  initial_sent_pages_ = sink.pages();
  if (delta_) {
    // The backup checks its image against this before it commits it.
    ci.kept_pages = delta_->kept();
    ci.image_digest = wire::PageHashHex(delta_->Digest());
    initial_kept_pages_ = delta_->kept();
    uint64_t all = delta_->kept() + delta_->sent();
    std::string note = "delta resync: kept " + std::to_string(delta_->kept()) + " of " + std::to_string(all) +
                       " pages (" + std::to_string((delta_->kept() * wire::kPageSize) >> 20) + " MiB not sent)";
    LOG_INFO(Tag()) << note;
    MutexLock l(mu_);
    resync_note_ = note;
  }
  {
    MutexLock l(mu_);
    cv_.Wait(mu_, [&]() REQUIRES(mu_) { return stopping_ || queued_bytes_ < kInitialQueueBound; });
    unacked_.push_back({0, 0});
    PushCommitLocked(0, ci);
    cv_.NotifyAll();
  }
  RETURN_IF_ERROR(source_->SendReady());
  LOG_INFO(Tag()) << "initial copy sent: " << sink.pages() << " pages (" << sink.zero_pages() << " zero), "
                  << info.device_state.size() << " bytes of device state";
  // QEMU 10.0 completes the migration here instead of entering COLO.
  Status colo;
  for (int i = 0; i < 50; i++) {
    colo = source_->CheckInColo();
    if (colo.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return colo;
}

Status PrimaryLifecycle::RunCheckpoint(uint64_t epoch) {
  RETURN_IF_ERROR(source_->WaitForRequest());
  RETURN_IF_ERROR(source_->BeginPause());  // QEMU stops the guest now
  const TimePoint t_reply = clock_.Now();
  // A switchover was asked for: this checkpoint is the final one, and the
  // guest stays paused from here on (LOADED is never sent).
  const bool final_checkpoint = switch_requested_.load();
  if (opts_.fault == "stall-after-reply@" + std::to_string(epoch)) {
    LOG_WARN(Tag()) << "fault injection: stalling after REPLY of epoch " << epoch;
    MutexLock l(mu_);
    cv_.Wait(mu_, [&]() REQUIRES(mu_) { return stopping_ || qemu_dead_; });
    return Aborted("the injected stall ended: " + std::string(qemu_dead_ ? "QEMU exited" : "stopped"));
  }
  // Inside the pause only parse: the pages stay in the stream's read buffers
  // and the sender copies them into PAGES batches once the guest runs again.
  auto pages_ref = std::make_shared<wire::DeferredPages>();
  pages_ref->Reserve(last_epoch_pages_);
  DeferredSink sink(pages_ref.get());
  uint64_t pages = 0;
  ASSIGN_OR_RETURN(std::string blob, source_->ReadCheckpoint(&sink, &pages));
  pages_ref->Adopt(source_->TakeRetained(), [pool = source_->pool()](std::vector<std::vector<uint8_t>> bufs) {
    if (!pool) return;
    for (auto& b : bufs) pool->Put(std::move(b));
  });
  last_epoch_pages_ = pages_ref->pages();
  RETURN_IF_ERROR(netbuf_.load()->Barrier(epoch));
  LOG_DEBUG(Tag()) << "epoch " << epoch << ": output barrier, wall " << WallSeconds();
  const uint64_t page_bytes = pages_ref->bytes();
  uint64_t bytes = page_bytes + blob.size();
  wire::CommitInfo ci{pages_ref->pages(), page_bytes, blob.size()};
  if (disks_) RETURN_IF_ERROR(disks_->failure());  // the backup's disk would fall behind for good
  {
    MutexLock l(mu_);
    bytes += disk_bytes_;
    auto room = [&]() REQUIRES(mu_) {
      return stopping_ || qemu_dead_ ||
             (unacked_.size() < opts_.max_unacked_epochs &&
              (unacked_.empty() || unacked_bytes_ + bytes <= opts_.max_unacked_bytes));
    };
    if (!room()) {
      backpressure_waits_++;
      // The guest stays paused: the backup is behind. Teardown wakes this
      // (stopping_) when the backup is lost, so the wait ends within the
      // heartbeat timeout of the backup's last frame.
      cv_.Wait(mu_, room);
    }
    if (stopping_) return Cancelled("stopped");
    if (qemu_dead_) return Unavailable("QEMU exited while the checkpoint waited for the backup");
    unacked_.push_back({epoch, bytes});
    unacked_bytes_ += bytes;
    if (pages_ref->pages() > 0) {
      OutFrame pf{MsgType::kPages, epoch, std::string()};
      pf.pages = std::move(pages_ref);
      PushLocked(std::move(pf));
    }
    PushLocked({MsgType::kDevice, epoch, std::move(blob)});
    PushCommitLocked(epoch, ci);
    last_staged_epoch_ = epoch;
    loaded_at_.push_back({epoch, clock_.Now()});
    if (final_checkpoint) {
      // Under mu_ with the frames: the phase is set before the ACK can come.
      final_epoch_ = static_cast<int64_t>(epoch);
      switch_phase_ = "final-ack";
      switch_deadline_ = clock_.Now() + opts_.heartbeat.timeout;
      cv_.NotifyAll();  // the sender
    }
  }
  if (final_checkpoint) {
    LOG_INFO(Tag()) << "switchover: checkpoint " << epoch << " is the final one; the guest stays paused";
    // The lifecycle thread takes it from here; the guest resumes only if
    // the switchover ends before the backup was told (Teardown's GiveUp).
    MutexLock l(mu_);
    cv_.Wait(mu_, [&]() REQUIRES(mu_) { return stopping_ || qemu_dead_; });
    return Cancelled("the switchover's final checkpoint " + std::to_string(epoch) + " was the last");
  }
  Status resumed = source_->EndPause();  // the guest resumes: speculative execution
  stage_ms_.Add(ToMillis(clock_.Now() - t_reply));
  {
    // The sender starts on this epoch after LOADED: woken earlier, it would
    // take the CPU QEMU needs to resume the guest. (Measured: making it also
    // yield during QEMU's serialization starves the link at high dirty rates
    // and the guest then waits on backpressure instead; docs/performance.md.)
    MutexLock l(mu_);
    cv_.NotifyAll();
  }
  RETURN_IF_ERROR(resumed);
  dirty_pages_.Add(static_cast<double>(pages));
  epoch_bytes_.Add(static_cast<double>(bytes));
  dirty_hist_.Observe(static_cast<double>(pages));
  dirty_pages_total_ += pages;
  epoch_bytes_total_ += bytes;
  checkpoints_.Mark();
  checkpoints_total_++;
  return OkStatus();
}

bool PrimaryLifecycle::QemuExited() {
  // Did QEMU die, or did the stream break under a live QEMU? The monitor
  // closes with the process; give it a moment to notice.
  auto gone = [&] {
    if (!qemu_dead_ && qemu_running_ && !qemu_running_()) qemu_dead_ = true;
    return qemu_dead_.load();
  };
  for (int i = 0; i < 50; i++) {
    if (gone()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!monitor_) return gone();
  // Still there. A QEMU told to quit (SIGTERM from `virsh destroy`: its
  // SHUTDOWN event may come late through libvirt) closes the stream when
  // its main loop has ended, and lives on a little for its cleanup; its
  // monitor no longer answers then. One that answers, and not "shutdown",
  // runs on: the stream broke under a live guest.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  while (std::chrono::steady_clock::now() < deadline) {
    if (gone()) return true;
    if (!host_shutdown_) {
      auto st = monitor_->Execute("query-status", json::object(), 1000);
      if (st.ok() && st->value("status", "") != "shutdown") return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return gone();
}

}  // namespace remus
