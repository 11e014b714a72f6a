#include "netbuf/packet_ledger.h"

#include <string>

#include "common/thread_annotations.h"

namespace remus::netbuf {

Status PacketLedger::SendLocked(uint32_t last_id, Verdict v, uint64_t packets) {
  (v == Verdict::kAccept ? released_ : discarded_) += packets;
  return sink_->Batch(last_id, v);
}

Status PacketLedger::OnPackets(std::span<const uint32_t> ids) {
  if (ids.empty()) return OkStatus();
  MutexLock g(mu_);
  last_id_ = ids.back();
  if (final_) return SendLocked(ids.back(), *final_, ids.size());
  open_packets_ += ids.size();
  return OkStatus();
}

Status PacketLedger::Barrier(uint64_t epoch) {
  MutexLock g(mu_);
  if (final_) return OkStatus();
  if (last_barrier_ && epoch <= *last_barrier_)
    return InvalidArgument("netbuf barrier for epoch " + std::to_string(epoch) + " after epoch " +
                           std::to_string(*last_barrier_));
  last_barrier_ = epoch;
  if (open_packets_ == 0) return OkStatus();
  uint64_t n = open_packets_;
  open_packets_ = 0;
  // The backup already acked this epoch (its ack overtook the barrier): the
  // packets are covered, let them go now (with any older epoch still listed,
  // which cannot happen in order but costs nothing: batches are cumulative).
  if (acked_ && epoch <= *acked_) {
    for (const Closed& c : closed_) n += c.packets;
    closed_.clear();
    return SendLocked(*last_id_, Verdict::kAccept, n);
  }
  closed_.push_back({epoch, *last_id_, n});
  return OkStatus();
}

Status PacketLedger::Release(uint64_t epoch) {
  MutexLock g(mu_);
  if (final_) return OkStatus();
  if (acked_ && epoch <= *acked_) return OkStatus();  // duplicate or out of order
  acked_ = epoch;
  uint64_t n = 0;
  std::optional<uint32_t> upto;
  while (!closed_.empty() && closed_.front().epoch <= epoch) {
    n += closed_.front().packets;
    upto = closed_.front().last_id;
    closed_.pop_front();
  }
  if (!upto) return OkStatus();
  return SendLocked(*upto, Verdict::kAccept, n);
}

Status PacketLedger::Finish(Verdict v) {
  MutexLock g(mu_);
  if (final_) return OkStatus();
  final_ = v;
  uint64_t n = open_packets_;
  for (const Closed& c : closed_) n += c.packets;
  closed_.clear();
  open_packets_ = 0;
  if (n == 0) return OkStatus();
  return SendLocked(*last_id_, v, n);
}

uint64_t PacketLedger::buffered() const {
  MutexLock g(mu_);
  uint64_t n = open_packets_;
  for (const Closed& c : closed_) n += c.packets;
  return n;
}

uint64_t PacketLedger::released() const {
  MutexLock g(mu_);
  return released_;
}

uint64_t PacketLedger::discarded() const {
  MutexLock g(mu_);
  return discarded_;
}

bool PacketLedger::finished() const {
  MutexLock g(mu_);
  return final_.has_value();
}

}  // namespace remus::netbuf
