// The link's two directions: the send queue and its sender thread, the ack
// reader, and the heartbeat sender.
#include <algorithm>
#include <chrono>

#include "common/log.h"
#include "replicator/primary/lifecycle.h"

namespace remus {

using nlohmann::json;
using wire::MsgType;

void PrimaryLifecycle::Enqueue(OutFrame f) {
  MutexLock l(mu_);
  cv_.Wait(mu_, [&]() REQUIRES(mu_) { return stopping_ || queued_bytes_ < kInitialQueueBound; });
  PushLocked(std::move(f));
  cv_.NotifyAll();
}

void PrimaryLifecycle::PushLocked(OutFrame f) {
  queued_bytes_ += f.size();
  queue_.push_back(std::move(f));
}

void PrimaryLifecycle::OnDiskWrite(uint32_t disk, wire::DiskOp op, uint64_t offset, uint64_t length,
                                   std::span<const uint8_t> data) {
  std::string payload = wire::EncodeDiskRecord(
      disk, op, offset, length, std::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
  MutexLock l(mu_);
  // The guest's write waits here while the link is behind (flow control).
  cv_.Wait(mu_, [&]() REQUIRES(mu_) { return stopping_ || queued_bytes_ < kInitialQueueBound; });
  if (stopping_) return;  // protection ended: the write is the guest's alone
  disk_records_++;
  disk_bytes_ += payload.size();
  PushLocked({MsgType::kDisk, disk_epoch_, std::move(payload)});
  cv_.NotifyAll();
}

void PrimaryLifecycle::PushCommitLocked(uint64_t epoch, wire::CommitInfo ci) {
  // QEMU drained the guest's I/O before it stopped the guest for this
  // checkpoint, and the guest is still stopped: every write of the epoch is
  // in the queue, and none of the next one.
  ci.disk_records = disk_records_;
  disk_records_ = 0;
  disk_bytes_ = 0;
  disk_epoch_ = epoch + 1;
  if (disks_ && disk_synced_epoch_ < 0 && disks_->AllReady()) {
    disk_synced_epoch_ = static_cast<int64_t>(epoch);
    PushLocked({MsgType::kDiskSynced, epoch, std::string()});
    LOG_INFO(Tag()) << "disk copies complete as of checkpoint " << epoch;
  }
  PushLocked({MsgType::kCommit, epoch, wire::EncodeCommit(ci)});
}

void PrimaryLifecycle::SenderLoop() {
  for (;;) {
    OutFrame f;
    {
      MutexLock l(mu_);
      cv_.Wait(mu_, [&]() REQUIRES(mu_) { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      f = std::move(queue_.front());
      queue_.pop_front();
      queued_bytes_ -= f.size();
      cv_.NotifyAll();
    }
    Status s = SendFrame(f);
    if (!s.ok()) {
      // The backup may have said why it closed (an ERROR the ack reader is
      // about to read): its reason beats our broken pipe.
      {
        MutexLock l(mu_);
        cv_.WaitFor(mu_, std::chrono::milliseconds(500), [&]() REQUIRES(mu_) { return stopping_.load(); });
      }
      if (stopping_) return;
      Post({Unavailable("lost the backup " + opts_.backup + ": " + s.message()), false, false});
      return;
    }
  }
}

Status PrimaryLifecycle::SendPages(uint64_t epoch, std::string* payload) {
  uint16_t flags = 0;
  const size_t raw = payload->size();
  std::string_view out = *payload;
  if (opts_.compress) {
    // XOR against the versions sent before, then LZ4 (in this thread, after
    // the guest resumed: off the pause path), into the kept buffer.
    if (xor_cache_) RETURN_IF_ERROR(xor_cache_->EncodeBatch(epoch, payload));
    std::string_view z = wire::CompressBatch(*payload, &lz4_scratch_);
    if (z.size() < payload->size()) {
      out = z;
      flags |= wire::kFlagLz4;
    }
  }
  if (epoch > 0) {  // epoch 0 is the initial copy, whose zero pages compress far better
    ckpt_page_bytes_raw_ += raw;
    ckpt_page_bytes_wire_ += out.size();
  }
  return link_->Send(MsgType::kPages, epoch, out, flags);
}

Status PrimaryLifecycle::SendFrame(OutFrame& f) {
  if (f.pages) {
    // The pages leave QEMU's stream buffers here, after the guest resumed;
    // the buffers go back to the pool when f.pages is dropped.
    if (opts_.compress) {
      while (f.pages->NextBatch(kBatchBytes, &batch_scratch_)) RETURN_IF_ERROR(SendPages(f.epoch, &batch_scratch_));
    } else {
      std::string batch;  // the records' headers
      // No copy in user space: the kernel gathers the pages from the
      // stream's buffers (measured: docs/performance.md section 1).
      std::vector<std::string_view> parts;
      while (f.pages->NextBatchViews(kBatchBytes, &batch, &parts)) {
        RETURN_IF_ERROR(link_->SendV(MsgType::kPages, f.epoch, parts));
        if (f.epoch > 0) {
          uint64_t n = 0;
          for (std::string_view p : parts) n += p.size();
          ckpt_page_bytes_raw_ += n;
          ckpt_page_bytes_wire_ += n;
        }
      }
    }
    f.pages.reset();
    return OkStatus();
  }
  if (f.type == MsgType::kPages) return SendPages(f.epoch, &f.payload);
  if (f.type == MsgType::kDevice) return link_->SendSplit(f.type, f.epoch, f.payload);
  return link_->Send(f.type, f.epoch, f.payload, f.flags);
}

void PrimaryLifecycle::AckLoop() {
  for (;;) {
    auto f = link_->Recv();
    if (!f.ok()) {
      if (!stopping_) Post({Unavailable("lost the backup " + opts_.backup + ": " + f.status().message()), false, false});
      return;
    }
    hb_.Received();  // any frame is a sign of life (last words wait on it too)
    if (stopping_) continue;  // draining after FAILOVER/GOODBYE until the backup closes
    switch (f->type) {
      case MsgType::kAck:
        OnAck(f->epoch);
        break;
      case MsgType::kHeartbeat:
        break;
      case MsgType::kResyncOffer:
      case MsgType::kResyncHashes:
        break;  // an offer that came after Connect stopped waiting: the copy is full
      case MsgType::kError:
        // After SWITCHOVER went out, an ERROR is the backup's refusal: it
        // never promotes this session, so our guest may resume.
        if (switch_told_ && !switch_accepted_) switch_refused_ = true;
        Post({wire::DecodeError(f->payload).Annotate("the backup refused the stream"), false, false});
        return;
      case MsgType::kSwitchover:
        if (switch_told_ && static_cast<int64_t>(f->epoch) == final_epoch_.load()) {
          switch_accepted_ = true;
          MutexLock l(mu_);
          switch_kick_ = true;
          ev_cv_.NotifyAll();
        } else {
          LOG_WARN(Tag()) << "ignoring SWITCHOVER " << f->epoch << " from the backup: none asked for that epoch";
        }
        break;
      default:
        LOG_WARN(Tag()) << "ignoring unexpected " << wire::MsgTypeName(f->type) << " from the backup";
    }
  }
}

void PrimaryLifecycle::OnAck(uint64_t e) {
  const TimePoint now = clock_.Now();
  bool complete;
  {
    MutexLock l(mu_);
    // What the initial copy took on the link (with the device state).
    if (last_acked_epoch_ < 0) initial_wire_bytes_ = link_->bytes_sent();
    if (static_cast<int64_t>(e) > last_acked_epoch_) last_acked_epoch_ = static_cast<int64_t>(e);
    uint64_t epoch_bytes = 0;
    while (!unacked_.empty() && unacked_.front().first <= e) {
      if (unacked_.front().first == e) epoch_bytes = unacked_.front().second;
      unacked_bytes_ -= unacked_.front().second;
      unacked_.pop_front();
    }
    while (!loaded_at_.empty() && loaded_at_.front().first <= e) {
      if (loaded_at_.front().first == e) {
        const double ack = ToMillis(now - loaded_at_.front().second);
        ack_ms_.Add(ack);
        ack_hist_.Observe(ack / 1000.0);
        // The automatic interval learns from checkpoints staged once
        // protected only: the first ones wait behind the initial copy.
        if (interval_auto_ && e > 0 && loaded_at_.front().second >= protected_since_ &&
            interval_auto_->OnCheckpointAcked({ack, epoch_bytes, last_pause_ms_.load()})) {
          pending_interval_ = interval_auto_->interval_ms();
          interval_kick_ = true;
          ev_cv_.NotifyAll();
        }
      }
      loaded_at_.pop_front();
    }
    complete = !disks_ || (disk_synced_epoch_ >= 0 && static_cast<int64_t>(e) >= disk_synced_epoch_);
    cv_.NotifyAll();  // backpressure
  }
  // Output commit: the backup holds every checkpoint up to e, so the
  // packets of those epochs may leave (the netbuf releases in order).
  // With an arbiter, only while our lease is valid: a copy past its
  // deadline may have been replaced; a later ACK releases these too.
  if (lease_ && !lease_->Valid()) {
    releases_deferred_++;
    LOG_DEBUG(Tag()) << "epoch " << e << ": acked, output held: the lease is not valid";
  } else if (OutputBuffer* nb = netbuf_.load()) {
    LOG_DEBUG(Tag()) << "epoch " << e << ": acked, releasing output, wall " << WallSeconds();
    Status r = nb->Release(e);
    if (!r.ok()) LOG_ERROR(Tag()) << "netbuf release of epoch " << e << ": " << r.ToString();
    released_epoch_ = std::max<int64_t>(released_epoch_.load(), static_cast<int64_t>(e));
  } else {
    released_epoch_ = std::max<int64_t>(released_epoch_.load(), static_cast<int64_t>(e));
  }
  if (switch_requested_ && static_cast<int64_t>(e) >= final_epoch_.load() && final_epoch_.load() >= 0) {
    MutexLock l(mu_);
    switch_kick_ = true;
    ev_cv_.NotifyAll();  // the switchover's next step
  }
  if (complete && Advance(PrimaryState::kSyncing, PrimaryState::kProtected)) {
    {
      MutexLock l(mu_);
      protected_since_ = clock_.Now();
    }
    LOG_INFO(Tag()) << "protected: the backup committed checkpoint " << e
                    << (disks_ ? " with complete memory and disk copies" : " with the initial copy");
  }
}

void PrimaryLifecycle::HeartbeatLoop() {
  MutexLock l(mu_);
  while (!stopping_) {
    auto wait = std::clamp<Nanos>(hb_.NextCheckIn(), std::chrono::milliseconds(1), std::chrono::milliseconds(50));
    cv_.WaitFor(mu_, wait, [&]() REQUIRES(mu_) { return stopping_.load(); });
    if (stopping_) return;
    if (!hb_.SendDue()) continue;
    l.Unlock();
    // Never waits behind the sender: a busy link carries data anyway, and a
    // write stuck on a silent backup must not silence us (the backup would
    // take us for dead). The backup's loss is judged on the lifecycle thread.
    Status s = link_->TrySend(MsgType::kHeartbeat, 0, "");
    if (s.ok() || s.code() == Code::kResourceExhausted) hb_.Sent();
    // Other failures show up in the ack reader or the sender.
    l.Lock();
  }
}

}  // namespace remus
