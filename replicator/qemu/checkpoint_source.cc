#include "replicator/qemu/checkpoint_source.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <thread>

#include "common/log.h"
#include "common/thread_annotations.h"

namespace remus {

using nlohmann::json;

namespace {
constexpr size_t kReadBuffer = 1 << 20;
constexpr char kMigrationFdName[] = "remus-migrate";  // QEMU's name for the socketpair end (getfd)
}  // namespace

CheckpointSource::CheckpointSource(QemuMonitor* monitor, CheckpointSourceOptions opts)
    : monitor_(monitor),
      opts_(std::move(opts)),
      pool_(std::make_shared<BufferPool>(kReadBuffer, opts_.buffer_pool_bytes / kReadBuffer)) {}

CheckpointSource::~CheckpointSource() {
  Abort();
  if (!opts_.pass_fd) ::unlink(opts_.migration_socket.c_str());
}

Status CheckpointSource::Start() {
  std::string tag = "colo[" + opts_.domain + "]";
  if (!opts_.pass_fd) {
    ASSIGN_OR_RETURN(listen_fd_, ListenUnix(opts_.migration_socket, 0600));
  }
  RETURN_IF_ERROR(monitor_
                      ->Execute("migrate-set-capabilities",
                                {{"capabilities",
                                  json::array({{{"capability", "x-colo"}, {"state", true}},
                                               {{"capability", "return-path"}, {"state", false}}})}})
                      .status()
                      .Annotate("domain " + opts_.domain + ": enabling x-colo"));
  // QEMU 7.2 limits migration to 128 MiB/s by default; the initial copy should
  // go as fast as the link allows.
  RETURN_IF_ERROR(monitor_
                      ->Execute("migrate-set-parameters",
                                {{"x-checkpoint-delay", opts_.interval_ms}, {"max-bandwidth", int64_t{1} << 40}})
                      .status()
                      .Annotate("domain " + opts_.domain + ": setting migration parameters"));
  if (opts_.pass_fd) {
    // QEMU gets its end through the monitor; ours must be the only other
    // copy, so that QEMU's death reads as EOF here.
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
      return ErrnoStatus("domain " + opts_.domain + ": socketpair for the migration stream", errno);
    Fd ours(sv[0]), theirs(sv[1]);
    RETURN_IF_ERROR(opts_.pass_fd(kMigrationFdName, theirs.get())
                        .Annotate("domain " + opts_.domain + ": handing QEMU the migration channel"));
    theirs.Reset();
    Status m = monitor_->Execute("migrate", {{"uri", std::string("fd:") + kMigrationFdName}}).status();
    if (!m.ok()) {
      (void)monitor_->Execute("closefd", {{"fdname", kMigrationFdName}});
      return m.Annotate("domain " + opts_.domain + ": starting the COLO migration");
    }
    conn_ = std::move(ours);
  } else {
    RETURN_IF_ERROR(monitor_->Execute("migrate", {{"uri", "unix:" + opts_.migration_socket}})
                        .status()
                        .Annotate("domain " + opts_.domain + ": starting the COLO migration"));
    ASSIGN_OR_RETURN(bool ready, WaitReadable(listen_fd_.get(), opts_.accept_timeout_ms));
    if (!ready) return DeadlineExceeded("domain " + opts_.domain + ": QEMU did not connect to the migration socket");
    ASSIGN_OR_RETURN(conn_, Accept(listen_fd_.get()));
    listen_fd_.Reset();
    ::unlink(opts_.migration_socket.c_str());
  }
  source_ = std::make_unique<FdSource>(conn_.get());
  reader_ = std::make_unique<BufferedReader>(source_.get(), kReadBuffer);
  parser_ = std::make_unique<qemu::StreamParser>(reader_.get());
  LOG_INFO(tag) << "QEMU connected; initial copy starting";
  return OkStatus();
}

Status CheckpointSource::ReadInitial(qemu::PageSink* sink, qemu::InitialInfo* info) {
  RETURN_IF_ERROR(parser_->ReadInitial(sink, info));
  if (!info->colo_enabled)
    return FailedPrecondition("domain " + opts_.domain + ": QEMU's stream did not enable COLO");
  return OkStatus();
}

Status CheckpointSource::Send(qemu::ColoMessage m) {
  if (aborted_) return Cancelled("checkpoint source aborted");
  std::string b;
  qemu::StreamWriter(&b).Colo(m);
  return WriteFull(conn_.get(), b.data(), b.size());
}

Status CheckpointSource::SendReady() { return Send(qemu::ColoMessage::kCheckpointReady); }
Status CheckpointSource::WaitForRequest() { return parser_->ExpectColoMessage(qemu::ColoMessage::kCheckpointRequest); }
Status CheckpointSource::BeginPause() { return Send(qemu::ColoMessage::kCheckpointReply); }

StatusOr<std::string> CheckpointSource::ReadCheckpoint(qemu::PageSink* sink, uint64_t* pages) {
  reader_->StartRetaining(pool_.get());
  RETURN_IF_ERROR(parser_->ExpectColoMessage(qemu::ColoMessage::kVmstateSend));
  ASSIGN_OR_RETURN(*pages, parser_->ReadCheckpointRam(sink));
  return parser_->ReadCheckpointDevices();
}

std::vector<std::vector<uint8_t>> CheckpointSource::TakeRetained() { return reader_->TakeRetained(); }

Status CheckpointSource::EndPause() {
  if (aborted_) return Cancelled("checkpoint source aborted");
  std::string b;
  qemu::StreamWriter w(&b);
  w.Colo(qemu::ColoMessage::kVmstateReceived);
  w.Colo(qemu::ColoMessage::kVmstateLoaded);
  return WriteFull(conn_.get(), b.data(), b.size());
}

Status CheckpointSource::SetInterval(int ms) {
  return monitor_->Execute("migrate-set-parameters", {{"x-checkpoint-delay", ms}}).status();
}

Status CheckpointSource::CheckInColo() {
  ASSIGN_OR_RETURN(json st, monitor_->Execute("query-migrate"));
  std::string status = st.value("status", "");
  if (status != "colo")
    return FailedPrecondition("domain " + opts_.domain + ": QEMU reports migration state '" + status +
                              "' instead of 'colo' after the initial copy; this QEMU does not enter COLO "
                              "(QEMU 10.0.0-10.0.6 and 10.1.0-10.1.2 are known not to; 10.0.7, 10.1.3 "
                              "and 10.2 fix it)");
  return OkStatus();
}

const std::vector<qemu::RamBlock>& CheckpointSource::blocks() const {
  static const std::vector<qemu::RamBlock> kNone;
  return parser_ ? parser_->blocks() : kNone;
}

void CheckpointSource::Abort() {
  aborted_ = true;
  if (conn_.valid()) ::shutdown(conn_.get(), SHUT_RDWR);
  if (listen_fd_.valid()) ::shutdown(listen_fd_.get(), SHUT_RDWR);
}

Status CheckpointSource::GiveUp() {
  MutexLock g(give_up_mu_);
  if (gave_up_) return OkStatus();
  gave_up_ = true;
  std::string tag = "colo[" + opts_.domain + "]";
  Abort();
  // QEMU's COLO thread waits for this after any stream error; without it a
  // guest stopped mid-checkpoint would stay stopped.
  Status s = monitor_->Execute("x-colo-lost-heartbeat").status();
  if (!s.ok()) LOG_WARN(tag) << "x-colo-lost-heartbeat: " << s.ToString();
  // Wait for QEMU to leave COLO and make sure the guest runs.
  for (int i = 0; i < 100; i++) {
    auto st = monitor_->Execute("query-status", json::object(), 2000);
    if (!st.ok()) {
      // The monitor is unreachable (libvirtd restarting): nothing was
      // done, so a later call may try again.
      if (!s.ok() && s.code() == Code::kUnavailable && st.status().code() == Code::kUnavailable) gave_up_ = false;
      return st.status().Annotate("domain " + opts_.domain + ": after leaving COLO");
    }
    std::string status = st->value("status", "");
    if (status == "running") {
      LOG_INFO(tag) << "left COLO; guest running unprotected";
      return OkStatus();
    }
    if (status == "colo" || status == "finish-migrate" || status == "postmigrate" || status == "paused") {
      // Stopped by the checkpoint engine, not by the operator: resume it once
      // QEMU's COLO thread has finished.
      auto mig = monitor_->Execute("query-migrate", json::object(), 2000);
      std::string ms = mig.ok() ? mig->value("status", "") : "";
      // "device": QEMU 10.0+ saving the device state (between active and colo).
      if (ms != "colo" && ms != "active" && ms != "device") {
        Status c = monitor_->Execute("cont").status();
        if (c.ok()) {
          LOG_INFO(tag) << "resumed the guest after leaving COLO (it was " << status << ")";
          return OkStatus();
        }
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return Internal("domain " + opts_.domain + ": QEMU did not leave COLO after x-colo-lost-heartbeat");
}

}  // namespace remus
