#include "netbuf/plug_schedule.h"

#include <string>

#include "common/thread_annotations.h"

namespace remus::netbuf {

Status PlugSchedule::Barrier(uint64_t epoch) {
  MutexLock g(mu_);
  if (finished_) return OkStatus();
  if (last_barrier_ && epoch <= *last_barrier_)
    return InvalidArgument("netbuf barrier for epoch " + std::to_string(epoch) + " after epoch " +
                           std::to_string(*last_barrier_));
  last_barrier_ = epoch;
  if (closed_) return OkStatus();  // merged into the section a later barrier closes
  RETURN_IF_ERROR(control_->Buffer());
  closed_ = epoch;
  // An ack that overtook its barrier: the section is covered already.
  if (acked_ && epoch <= *acked_) {
    closed_.reset();
    return control_->ReleaseOne();
  }
  return OkStatus();
}

Status PlugSchedule::Release(uint64_t epoch) {
  MutexLock g(mu_);
  if (finished_) return OkStatus();
  if (acked_ && epoch <= *acked_) return OkStatus();  // duplicate or out of order
  acked_ = epoch;
  if (!closed_ || *closed_ > epoch) return OkStatus();
  closed_.reset();
  return control_->ReleaseOne();
}

Status PlugSchedule::Finish(bool release) {
  MutexLock g(mu_);
  if (finished_) return OkStatus();
  finished_ = true;
  closed_.reset();
  return release ? control_->ReleaseIndefinite() : OkStatus();
}

std::optional<uint64_t> PlugSchedule::closed_section() const {
  MutexLock g(mu_);
  return closed_;
}

}  // namespace remus::netbuf
